"""Publish GGUFs to a Hugging Face model repo and point a Gradio Space at them.

One call, :func:`publish_model`, does: create the model repo (``exist_ok``), read what ``main`` holds
(``lora-deploy.json``: ``{"version", "adapter_time"}``), then one commit with the GGUFs (LFS), the model card and
``lora-deploy.json``, and a tag ``v-<version>``:

- a newer (or first) adapter version is committed on ``main``; the Space (when configured) is then repointed
  (:mod:`include.hub.space`);
- an OLDER adapter version (a backfill: its adapter time is before the one on ``main``) is committed on a
  temporary branch made from ``main``, tagged, and the branch deleted: the tag addresses it, ``main`` and the
  Space keep the newer version;
- a version whose tag already holds the same GGUFs (same sha256) is a no-op.

Every Hub call goes through :class:`~include.hub.retry.HubCaller` (429/5xx retried honouring Retry-After, errors
with the server's message and a fix). The token is never logged, returned or uploaded in a file.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from include.errors import ConfigError, PublishError
from include.hub.model_card import model_card_text
from include.hub.retry import TOKEN_FIX, HubCaller
from include.hub.space import publish_space
from include.store.hashing import digest_of
from include.units import format_bytes

log = logging.getLogger(__name__)

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
QUANT = re.compile(r"[A-Za-z0-9_]{1,32}")
MODEL_NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,95}")
HARDWARE = re.compile(r"[a-z0-9-]{1,40}")
STATE_FILE = "lora-deploy.json"
MEASURED = ("bits_per_weight", "perplexity", "perplexity_f16", "ppl_ratio")  # quant record figures for the card


@dataclass(frozen=True)
class HubTarget:
    """Where to publish: model repo, optional Space, visibility and credentials.

    ``space_token`` (optional) is the token stored as the Space secret ``HF_TOKEN`` for private repos; a
    read-only token is the safer choice. It defaults to ``token``. ``space_quant`` picks the GGUF the Space
    serves (default: the first); ``max_retries`` bounds the retries of one Hub call on 429/5xx.
    """

    repo_id: str
    space_id: str | None
    private: bool
    token: str = field(repr=False)
    endpoint: str | None = None
    space_hardware: str = "cpu-basic"
    space_token: str | None = field(default=None, repr=False)
    space_quant: str | None = None
    system_prompt: str = "You are a helpful assistant."
    max_retries: int = 4
    max_wait_s: float = 60.0

    def __repr__(self) -> str:
        return (f"HubTarget(repo_id={self.repo_id!r}, space_id={self.space_id!r}, private={self.private!r}, "
                f"endpoint={self.endpoint!r}, space_hardware={self.space_hardware!r}, "
                f"space_quant={self.space_quant!r}, token='***')")


def version_tag(version: str) -> str:
    """Git tag for an adapter version: ``v-<version>`` with characters git refs forbid replaced by ``-``."""
    tag = re.sub(r"[^A-Za-z0-9._+-]+", "-", f"v-{version}")
    tag = re.sub(r"\.{2,}", ".", tag).rstrip(".-")
    if tag.endswith(".lock"):
        tag = tag[: -len(".lock")] + "-lock"
    if len(tag) > 100:
        tag = f"{tag[:83]}-{digest_of(version)}"
    return tag


def repo_file_name(model: str, quant: str) -> str:
    """Name of a GGUF in the repo: ``<model>-<quant>.gguf`` (stable across versions; tags pin versions)."""
    return f"{model}-{quant}.gguf"


def publish_model(*, model: str, version: str, target: HubTarget, ggufs: list[dict], card: dict,
                  adapter_time: str | None = None, sleep: Any = None) -> dict[str, Any]:
    """Publish ``ggufs`` (records ``{"quant", "path", "bytes", "sha256", ...}``) with a model card; see module doc.

    ``adapter_time`` (ISO-8601) orders versions: older than ``main``'s means a backfill. Returns ``{"repo_id",
    "repo_url", "version", "commit", "tag", "revision", "main_moved", "files", "space_id", "space_url",
    "space_action"}`` (``space_action``: created / updated / restarted / unchanged, or None when the Space was
    not touched). Raises ConfigError for a bad target or version, PublishError for the rest.
    """
    _check_target(model, version, target)
    files = _check_ggufs(model, ggufs)
    if target.space_quant and target.space_quant not in {f["quant"] for f in files}:
        raise ConfigError(f"hf.space_quant {target.space_quant!r} is not among the published quants "
                          f"{[f['quant'] for f in files]}", model=model,
                          fix="set hf.space_quant to one of quantize.types, or remove it to serve the first")
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.utils import disable_progress_bars

    # The client's tqdm bars go to stderr, which a task log records at ERROR; the lines below say what happens.
    disable_progress_bars()
    ops: list[Any] = [CommitOperationAdd(f["name"], f["path"]) for f in files]
    _check_hashes(model, files, ops)
    api = HfApi(endpoint=target.endpoint, token=target.token, library_name="lora-deploy")
    call = HubCaller(model, secrets=(target.token, target.space_token), max_retries=target.max_retries,
                     max_wait_s=target.max_wait_s, endpoint=target.endpoint, **({"sleep": sleep} if sleep else {}))
    repo_id, tag = target.repo_id, version_tag(version)
    log.info("model %r: publishing %d GGUF(s) of version %r to %s (%s)", model, len(files), version, repo_id,
             format_bytes(sum(f["bytes"] for f in files)))
    repo_url = str(call("create the model repo", repo_id, api.create_repo, repo_id, private=target.private,
                        exist_ok=True))
    refs = call("list the refs of", repo_id, api.list_repo_refs, repo_id)
    tags = {ref.name: ref.target_commit for ref in refs.tags}
    main_before = next((ref.target_commit for ref in refs.branches if ref.name == "main"), None)
    record: dict[str, Any] = {
        "repo_id": repo_id, "repo_url": repo_url, "version": version, "commit": None, "tag": tag, "revision": tag,
        "main_moved": False, "files": [f["name"] for f in files], "space_id": target.space_id,
        "space_url": _space_url(target), "space_action": None}
    if tag in tags and _same_files(call, api, repo_id, tags[tag], files):
        log.info("model %r: tag %r already holds these GGUFs (commit %s): nothing to publish", model, tag,
                 tags[tag][:12])
        return {**record, "commit": tags[tag]}
    on_main = _read_state(call, api, repo_id)
    backfill = _is_older(adapter_time, on_main) and on_main.get("version") != version
    state = {"version": version, "adapter_time": adapter_time, "model": model,
             "files": {f["name"]: f["sha256"] for f in files}}
    readme = model_card_text(model=model, version=version, repo_id=repo_id, files=files,
                             card={**card, "adapter_time": adapter_time})
    ops.append(CommitOperationAdd("README.md", readme.encode("utf-8")))
    ops.append(CommitOperationAdd(STATE_FILE, (json.dumps(state, indent=2) + "\n").encode("utf-8")))
    existing = call("list the files of", repo_id, api.list_repo_files, repo_id)
    names = {f["name"] for f in files}
    stale = sorted(p for p in existing if re.fullmatch(re.escape(model) + r"-\w+\.gguf", p) and p not in names)
    ops += [CommitOperationDelete(p) for p in stale]
    message = {"commit_message": f"lora-deploy: {model} adapter {version}",
               "commit_description": f"Quantizations: {', '.join(f['quant'] for f in files)}."}
    if backfill:
        log.info("model %r: version %r (adapter time %s) is older than %r on main (%s): backfilling it under tag "
                 "%r without moving main", model, version, adapter_time, on_main.get("version"),
                 on_main.get("adapter_time"), tag)
        commit = _commit_on_side_branch(call, api, repo_id, tag, ops, message, set(b.name for b in refs.branches))
    else:
        info = call("commit the GGUFs to", repo_id, api.create_commit, repo_id, ops, **message)
        commit = str(info.oid)
        record["main_moved"] = commit != main_before
    log.info("model %r: commit %s on %s (%s; removed stale: %s)", model, commit, repo_id,
             "backfill" if backfill else "main", stale or "none")
    call(f"tag {tag!r} on", repo_id, _ensure_tag, api, repo_id, tag, commit, f"adapter version {version}", model)
    if backfill:
        _delete_side_branch(call, api, repo_id, tag)
    record["commit"] = commit
    if target.space_id and record["main_moved"]:
        served = next((f for f in files if f["quant"] == target.space_quant), files[0])["name"]
        record.update(publish_space(api, call, model=model, model_repo=repo_id, space_id=target.space_id,
                                    private=target.private, hardware=target.space_hardware, model_file=served,
                                    revision=commit, system_prompt=target.system_prompt,
                                    space_token=target.space_token or target.token))
        record.pop("space_commit", None)
    elif target.space_id:
        log.info("model %r: main did not move: Space %s left as it is", model, target.space_id)
    return record


def _space_url(target: HubTarget) -> str | None:
    if not target.space_id:
        return None
    return f"{(target.endpoint or 'https://huggingface.co').rstrip('/')}/spaces/{target.space_id}"


def _same_files(call: HubCaller, api: Any, repo_id: str, commit: str, files: list[dict]) -> bool:
    """Whether ``commit`` holds exactly these GGUFs (names and LFS sha256)."""
    tree = call("list the files of", repo_id, lambda: list(api.list_repo_tree(repo_id, revision=commit)))
    held = {e.path: e.lfs.sha256 for e in tree if getattr(e, "lfs", None) is not None and e.path.endswith(".gguf")}
    return held == {f["name"]: f["sha256"] for f in files}


def _read_state(call: HubCaller, api: Any, repo_id: str) -> dict[str, Any]:
    """``lora-deploy.json`` on ``main`` (``{}`` when absent or unreadable as JSON)."""
    from huggingface_hub.errors import EntryNotFoundError

    def fetch() -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="lora-deploy-hf-") as cache:
            try:
                path = api.hf_hub_download(repo_id, STATE_FILE, revision="main", cache_dir=cache)
            except EntryNotFoundError:
                return {}
            try:
                data = json.loads(Path(path).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                log.warning("%s on main of %s is not JSON: treating main as empty", STATE_FILE, repo_id)
                return {}
            return data if isinstance(data, dict) else {}

    return call(f"read {STATE_FILE} of", repo_id, fetch)


def _is_older(adapter_time: str | None, on_main: dict[str, Any]) -> bool:
    """True when ``adapter_time`` is strictly before the adapter time recorded on ``main``."""
    ours, theirs = _parse_time(adapter_time), _parse_time(on_main.get("adapter_time"))
    return ours is not None and theirs is not None and ours < theirs


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else None


def _commit_on_side_branch(call: HubCaller, api: Any, repo_id: str, tag: str, ops: list[Any], message: dict,
                           branches: set[str]) -> str:
    """Commit ``ops`` on a temporary branch made from ``main``; return the commit (the caller tags it)."""
    branch = f"lora-deploy-backfill-{tag}"[:120]
    if branch in branches:  # left over by an interrupted run: start again from main
        call(f"delete the branch {branch!r} of", repo_id, api.delete_branch, repo_id, branch=branch)
    call(f"create the branch {branch!r} of", repo_id, api.create_branch, repo_id, branch=branch, revision="main")
    info = call("commit the GGUFs to", repo_id, api.create_commit, repo_id, ops, revision=branch, **message)
    return str(info.oid)


def _delete_side_branch(call: HubCaller, api: Any, repo_id: str, tag: str) -> None:
    """Remove the temporary backfill branch once its commit is tagged."""
    branch = f"lora-deploy-backfill-{tag}"[:120]
    call(f"delete the branch {branch!r} of", repo_id, api.delete_branch, repo_id, branch=branch)


def _check_target(model: str, version: str, target: HubTarget) -> None:
    if not MODEL_NAME.fullmatch(model or ""):
        raise ConfigError(f"model name {model!r} cannot name files in a Hub repo",
                          fix="use letters, digits, '_', '-' and '.' only")
    if not isinstance(version, str) or not version.strip():
        raise ConfigError(f"adapter version {version!r} is empty", model=model, fix="pass the adapter's version")
    for label, value in (("hf.repo_id", target.repo_id), ("hf.space_id", target.space_id)):
        if value is not None and (not REPO_ID.fullmatch(value) or ".." in value):
            raise ConfigError(f"{label} {value!r} is not a Hub repo id", model=model,
                              fix="write it as 'namespace/name' (letters, digits, '_', '-', '.')")
    if not HARDWARE.fullmatch(target.space_hardware or ""):
        raise ConfigError(f"hf.space_hardware {target.space_hardware!r} is not a Space hardware name", model=model,
                          fix="use a name like 'cpu-basic', 'cpu-upgrade' or 't4-small'")
    if not target.token:
        raise PublishError("no Hugging Face token", model=model, fix=TOKEN_FIX)


def _check_ggufs(model: str, ggufs: list[dict]) -> list[dict]:
    """Validated file records ``{"name", "quant", "path", "bytes", "sha256"}`` (sizes checked on disk)."""
    if not ggufs:
        raise PublishError("no GGUF files to publish", model=model, fix="run the quantize stage first")
    files, seen = [], set()
    for item in ggufs:
        quant, path = str(item.get("quant", "")), Path(str(item.get("path", "")))
        if not QUANT.fullmatch(quant) or quant in seen:
            raise PublishError(f"quant {quant!r} is invalid or repeated", model=model,
                               fix="give each GGUF a distinct quant type such as 'Q4_K_M'")
        seen.add(quant)
        if not path.is_file():
            raise PublishError(f"GGUF {str(path)!r} ({quant}) does not exist", model=model,
                               fix="re-run the quantize stage; its artifact directory was removed")
        size = path.stat().st_size
        if size != int(item.get("bytes", -1)):
            raise PublishError(f"GGUF {str(path)!r} has {size} bytes, its record says {item.get('bytes')!r}",
                               model=model, fix="re-run the quantize stage; the file changed after it was made")
        measured = {k: item[k] for k in MEASURED if isinstance(item.get(k), (int, float))}
        files.append({"name": repo_file_name(model, quant), "quant": quant, "path": str(path), "bytes": size,
                      "sha256": str(item.get("sha256", "")).lower(), **measured})
    return files


def _check_hashes(model: str, files: list[dict], ops: list[Any]) -> None:
    """Compare each file's sha256 (computed once by the client's upload info, reused for LFS) with its record."""
    for f, op in zip(files, ops, strict=False):
        actual = op.upload_info.sha256.hex()
        if actual != f["sha256"]:
            raise PublishError(f"GGUF {f['path']!r} has sha256 {actual}, its record says {f['sha256']!r}",
                               model=model, fix="re-run the quantize stage; the file changed after it was made")


def _ensure_tag(api: Any, repo_id: str, tag: str, commit: str, message: str, model: str) -> None:
    """Create ``tag`` at ``commit``; an existing tag at another commit is moved (same version re-published)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_tag(repo_id, tag=tag, revision=commit, tag_message=message)
        return
    except HfHubHTTPError as e:
        if e.response.status_code != 409:
            raise
    current = {ref.name: ref.target_commit for ref in api.list_repo_refs(repo_id).tags}.get(tag)
    if current == commit:
        log.info("model %r: tag %r already at %s", model, tag, commit)
        return
    log.warning("model %r: moving tag %r from %s to %s (version re-published)", model, tag, current, commit)
    api.delete_tag(repo_id, tag=tag)
    api.create_tag(repo_id, tag=tag, revision=commit, tag_message=message)
