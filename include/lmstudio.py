"""Install GGUFs into LM Studio's models tree: ``<models_dir>/<publisher>/<repo>/<file>.gguf``.

LM Studio only finds models at exactly that depth. Files are versioned by adapter version, so the
previous version stays installed beside the new one. Each file appears atomically: a hard link from
the artifact store when both are on one filesystem (no copy, no extra space), else a copy to a hidden
temp name in the target directory, fsync, rename.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from include.errors import InstallError
from include.fileops import link_or_copy
from include.hashing import sha256_file

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def gguf_file_name(model: str, version: str, quant: str) -> str:
    """The versioned file name of one quant, e.g. ``demo-checkpoint-20-Q4_K_M.gguf``."""
    return f"{model}-{_UNSAFE.sub('_', version)}-{quant}.gguf"


def install_ggufs(
    ggufs: list[dict[str, Any]], *, models_dir: Path, publisher: str, repo: str, model: str, version: str
) -> dict[str, Any]:
    """Install each ``{"quant", "path", "bytes", "sha256"}`` and return the installed paths and identifiers."""
    target = Path(models_dir) / publisher / repo
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InstallError(f"cannot create {str(target)!r}: {err.strerror}",
                           fix="make lmstudio.models_dir writable or point it elsewhere") from err
    _check_space(target, ggufs)
    installed = []
    for gguf in ggufs:
        name = gguf_file_name(model, version, gguf["quant"])
        dest = target / name
        linked = _place(Path(gguf["path"]), dest, gguf["sha256"])
        installed.append({
            "quant": gguf["quant"], "path": str(dest), "bytes": gguf["bytes"], "sha256": gguf["sha256"],
            "identifier": f"{publisher}/{repo}/{name}", "linked": linked,
        })
        log.info("installed %s (%s, %.1f MB)", dest, "hard link" if linked else "copy", gguf["bytes"] / 1e6)
    names = {item["path"] for item in installed}
    others = sorted(str(p) for p in target.glob("*.gguf") if str(p) not in names)
    return {"models_dir": str(models_dir), "directory": str(target), "version": version,
            "installed": installed, "other_versions": others}


def _check_space(target: Path, ggufs: list[dict[str, Any]]) -> None:
    needed = sum(g["bytes"] for g in ggufs)
    free = shutil.disk_usage(target).free
    if free < needed * 1.05:
        raise InstallError(f"{str(target)!r} has {free / 1e9:.2f} GB free, the GGUFs need {needed / 1e9:.2f} GB",
                           fix="free disk space there or prune old versions")


def _place(src: Path, dest: Path, sha256: str) -> bool:
    """Put ``src`` at ``dest`` atomically; return True when it was hard-linked."""
    if dest.exists() and dest.stat().st_size == src.stat().st_size and sha256_file(dest) == sha256:
        return dest.stat().st_ino == src.stat().st_ino
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        linked = link_or_copy(src, tmp)
        os.replace(tmp, dest)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise InstallError(f"cannot install {str(dest)!r}: {err.strerror}",
                           fix="check that lmstudio.models_dir is writable and has space") from err
    return linked
