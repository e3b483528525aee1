"""LM Studio's models tree: home discovery, versioned installs, the stable "current" file, pruning and ``lms``.

LM Studio only finds models at exactly ``<models_dir>/<publisher>/<repo>/<file>.gguf``. In the repo directory
each version is installed as ``<model>-<version>-<quant>.gguf`` and the current one is also at the stable
path ``<model>-<quant>.gguf`` (what ``lms load`` loads). Every file appears atomically: a hard link when
source and target share a filesystem, else a copy to a hidden temp name beside it, fsync, rename. A failed
install removes what it created, so nothing half-installed is ever left behind.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

from include.errors import InstallError
from include.store.fileops import link_or_copy
from include.store.hashing import sha256_file
from include.units import format_bytes

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
POINTER = ".lmstudio-home-pointer"
SPACE_MARGIN = 1.05
LMS_TIMEOUT_S = 300


def discover_home(home: str | None = None) -> Path:
    """LM Studio's home: ``home`` if given, else ``~/.lmstudio-home-pointer``'s target, ``~/.lmstudio`` or the
    legacy ``~/.cache/lm-studio`` (the first that exists); ``~/.lmstudio`` when none does."""
    if home:
        return Path(home).expanduser()
    user = Path.home()
    pointer = user / POINTER
    if pointer.is_file():
        target = pointer.read_text(encoding="utf-8").strip()
        if target and Path(target).expanduser().is_dir():
            return Path(target).expanduser()
        log.warning("%s points to %r, which is not a directory; ignoring it", pointer, target)
    for candidate in (user / ".lmstudio", user / ".cache" / "lm-studio"):
        if candidate.is_dir():
            return candidate
    return user / ".lmstudio"


def models_dir(settings: dict[str, Any]) -> Path:
    """The models tree: ``lmstudio.models_dir`` if set, else ``<home>/models``."""
    configured = settings.get("models_dir")
    return Path(configured).expanduser() if configured else discover_home(settings.get("home")) / "models"


def repo_dir(settings: dict[str, Any], model: str) -> Path:
    """``<models_dir>/<publisher>/<repo>`` of ``model`` (repo defaults to ``<model>-GGUF``)."""
    return models_dir(settings) / settings.get("publisher", "lora-deploy") / (settings.get("repo") or f"{model}-GGUF")


def identifier(settings: dict[str, Any], model: str) -> str:
    """The API identifier the model is served as (``lmstudio.identifier``, default the model name)."""
    return str(settings.get("identifier") or model)


def versioned_name(model: str, version: str, quant: str) -> str:
    """The versioned file name of one quant, e.g. ``demo-checkpoint-20-Q4_K_M.gguf``."""
    return f"{model}-{_UNSAFE.sub('_', version)}-{quant}.gguf"


def stable_name(model: str, quant: str) -> str:
    """The file name of the current version of one quant, e.g. ``demo-Q4_K_M.gguf``."""
    return f"{model}-{quant}.gguf"


def model_key(settings: dict[str, Any], model: str, quant: str) -> str:
    """The ``lms load`` key of the stable file: its path relative to the models tree."""
    return str((repo_dir(settings, model) / stable_name(model, quant)).relative_to(models_dir(settings)))


def install_version(ggufs: list[dict[str, Any]], *, target: Path, model: str, version: str) -> list[dict[str, Any]]:
    """Install each ``{"quant", "path", "bytes", "sha256"}`` as a versioned file in ``target``.

    Returns ``[{"quant", "path", "bytes", "sha256", "linked", "created"}]``. On any error the files created by
    this call are removed again and InstallError says what failed.
    """
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InstallError(f"cannot create {str(target)!r}: {err.strerror}",
                           fix="make lmstudio.models_dir writable or point it elsewhere") from err
    check_space(target, ggufs)
    done: list[dict[str, Any]] = []
    try:
        for gguf in ggufs:
            dest = target / versioned_name(model, version, gguf["quant"])
            existed = dest.exists()
            linked = place(Path(gguf["path"]), dest, gguf["sha256"])
            done.append({"quant": gguf["quant"], "path": str(dest), "bytes": gguf["bytes"], "sha256": gguf["sha256"],
                         "linked": linked, "created": not existed})
            log.info("installed %s (%s, %s)", dest, "hard link" if linked else "copy", format_bytes(gguf["bytes"]))
    except InstallError:
        for item in done:
            if item["created"]:
                Path(item["path"]).unlink(missing_ok=True)
                log.info("removed %s again: the install of %s failed", item["path"], version)
        raise
    return done


def check_space(target: Path, ggufs: list[dict[str, Any]]) -> None:
    """InstallError when the files that cannot be hard-linked do not fit in ``target``'s filesystem."""
    device = target.stat().st_dev
    needed = sum(g["bytes"] for g in ggufs if Path(g["path"]).stat().st_dev != device)
    free = shutil.disk_usage(target).free
    if needed and free < needed * SPACE_MARGIN:
        raise InstallError(f"{str(target)!r} has {format_bytes(free)} free, the GGUFs need {format_bytes(needed)}",
                           fix="free disk space there, lower lmstudio.keep_versions or move lmstudio.models_dir")


def place(src: Path, dest: Path, sha256: str) -> bool:
    """Put ``src`` at ``dest`` atomically (an identical file there is kept); True when hard-linked."""
    if dest.exists() and dest.stat().st_size == src.stat().st_size and sha256_file(dest) == sha256:
        return dest.stat().st_ino == src.stat().st_ino
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        linked = link_or_copy(src, tmp)
        os.replace(tmp, dest)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise InstallError(f"cannot install {str(dest)!r}: {err.strerror or err}",
                           fix="check that lmstudio.models_dir is writable and has space") from err
    return linked


def make_current(target: Path, model: str, files: list[dict[str, Any]]) -> list[str]:
    """Point every stable ``<model>-<quant>.gguf`` at the versioned file of ``files`` (``{"quant", "path"}``).

    All replacements are staged first (hard link or copy to temp names), then renamed, so an error (disk full)
    leaves the stable files as they were. Returns the stable paths.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for item in files:
            dest = target / stable_name(model, item["quant"])
            tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
            staged.append((tmp, dest))
            link_or_copy(Path(item["path"]), tmp)
    except OSError as err:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise InstallError(f"cannot stage the current file in {str(target)!r}: {err.strerror or err}",
                           fix="free disk space in lmstudio.models_dir") from err
    for tmp, dest in staged:
        os.replace(tmp, dest)
    return [str(dest) for _, dest in staged]


def remove_stable(target: Path, model: str, quants: list[str]) -> None:
    """Remove the stable files (nothing is current any more)."""
    for quant in quants:
        (target / stable_name(model, quant)).unlink(missing_ok=True)


def versions_to_prune(ledger: dict[str, Any], keep: int) -> list[str]:
    """Installed versions beyond the ``keep`` newest (by adapter time); never the current or previous one."""
    protected = {ledger.get("current"), ledger.get("previous")}
    alive = [v for v in ledger["versions"].values() if v.get("status") != "pruned"]
    alive.sort(key=lambda v: (v.get("adapter_time") or "", v["version"]), reverse=True)
    return [v["version"] for v in alive[keep:] if v["version"] not in protected]


def delete_files(entry: dict[str, Any]) -> list[str]:
    """Delete a version's versioned files; return the paths removed."""
    removed = []
    for item in entry.get("files", []):
        path = Path(item["path"])
        if path.exists():
            path.unlink()
            removed.append(str(path))
    return removed


def lms_command(settings: dict[str, Any]) -> str | None:
    """The ``lms`` CLI: ``lmstudio.lms_path`` or the one on PATH; None when there is none."""
    configured = settings.get("lms_path")
    if configured:
        return configured if Path(configured).is_file() else None
    return shutil.which("lms")


def load_argv(lms: str, settings: dict[str, Any], key: str, ident: str) -> list[str]:
    """``lms load <key> --identifier <id> [--context-length N] --gpu <x> -y``."""
    argv = [lms, "load", key, "--identifier", ident]
    if settings.get("context_length"):
        argv += ["--context-length", str(settings["context_length"])]
    return [*argv, "--gpu", str(settings.get("gpu", "max")), "-y"]


def lms_reload(settings: dict[str, Any], model: str, quant: str | None) -> list[list[str]]:
    """Unload the identifier (the replaced version) and load the stable file of ``quant`` (None: unload only).

    Returns the argv lists run; InstallError with lms's output when ``load`` fails. Without ``lms`` it logs
    one line and returns ``[]``.
    """
    lms = lms_command(settings)
    ident = identifier(settings, model)
    if lms is None:
        log.info("lms not found (lmstudio.lms_path unset and no `lms` on PATH): not loading %r; LM Studio loads "
                 "the stable file itself on its next request (just-in-time loading)", ident)
        return []
    runs = [[lms, "unload", ident]]
    result = _run(runs[0])
    if result.returncode != 0:
        log.info("lms unload %s: exit %d (%s) - nothing was loaded under that identifier", ident, result.returncode,
                 result.stdout.strip()[-200:])
    if quant is None:
        return runs
    argv = load_argv(lms, settings, model_key(settings, model, quant), ident)
    runs.append(argv)
    result = _run(argv)
    if result.returncode != 0:
        raise InstallError(f"`{' '.join(argv[1:])}` failed with exit {result.returncode}: "
                           f"{result.stdout.strip()[-500:]}",
                           fix="check LM Studio is running (`lms server status`) and has memory for the model; "
                               "lower lmstudio.context_length or set lmstudio.gpu")
    log.info("lms load %s as %r: ok", argv[2], ident)
    return runs


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    log.info("running %s", " ".join(argv))
    try:
        return subprocess.run(argv, capture_output=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=LMS_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise InstallError(f"`{' '.join(argv)}` could not run: {err}",
                           fix="check lmstudio.lms_path, or that LM Studio's CLI works (`lms status`)") from err
