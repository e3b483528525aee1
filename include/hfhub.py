"""Publish GGUFs to a Hugging Face model repo and point a Gradio Space at them.

One call, :func:`publish_model`, does: create the model repo (``exist_ok``), one commit with the GGUFs (LFS)
and the model card, a tag for the adapter version, then (when a Space is configured) the Space's files,
its variables ``MODEL_REPO`` / ``MODEL_FILE`` / ``MODEL_REVISION`` and, for private repos, the secret
``HF_TOKEN``. Hub errors become :class:`~include.errors.PublishError` with the server's message and a fix.
The token is never logged, returned or uploaded in a file.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from include.errors import ConfigError, LoraDeployError, PublishError
from include.hashing import digest_of
from include.model_card import model_card_text, space_files

log = logging.getLogger(__name__)

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
QUANT = re.compile(r"[A-Za-z0-9_]{1,32}")
MODEL_NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,95}")
HARDWARE = re.compile(r"[a-z0-9-]{1,40}")
TOKEN_FIX = ("create a token with the 'write' role at https://huggingface.co/settings/tokens and set it as the "
             "password of the Airflow connection 'huggingface_default'")


@dataclass(frozen=True)
class HubTarget:
    """Where to publish: model repo, optional Space, visibility and credentials.

    ``space_token`` (optional) is the token stored as the Space secret ``HF_TOKEN`` for private repos; a
    read-only token is the safer choice. It defaults to ``token``.
    """

    repo_id: str
    space_id: str | None
    private: bool
    token: str = field(repr=False)
    endpoint: str | None = None
    space_hardware: str = "cpu-basic"
    space_token: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return (f"HubTarget(repo_id={self.repo_id!r}, space_id={self.space_id!r}, private={self.private!r}, "
                f"endpoint={self.endpoint!r}, space_hardware={self.space_hardware!r}, token='***')")


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


def publish_model(*, model: str, version: str, target: HubTarget, ggufs: list[dict], card: dict) -> dict:
    """Publish ``ggufs`` (items ``{"quant", "path", "bytes", "sha256"}``) with a model card; see module doc.

    Returns ``{"repo_id", "repo_url", "commit", "tag", "files", "space_id", "space_url", "space_commit"}``.
    Re-publishing the same version is idempotent (no new commit when nothing changed; the tag is kept or moved
    to the new commit). Raises ConfigError for a bad target or version, PublishError for the rest.
    """
    _check_target(model, version, target)
    files = _check_ggufs(model, ggufs)
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    ops: list[Any] = [CommitOperationAdd(f["name"], f["path"]) for f in files]
    _check_hashes(model, files, ops)
    api = HfApi(endpoint=target.endpoint, token=target.token, library_name="lora-deploy")
    log.info("model %r: publishing %d GGUF(s) of version %r to %s", model, len(files), version, target.repo_id)
    with _hub_errors(model, "create the model repo", target.repo_id, target):
        repo_url = api.create_repo(target.repo_id, private=target.private, exist_ok=True)
        existing = api.list_repo_files(target.repo_id)
    readme = model_card_text(model=model, version=version, repo_id=target.repo_id, files=files, card=card)
    ops.append(CommitOperationAdd("README.md", readme.encode("utf-8")))
    names = {f["name"] for f in files}
    stale = sorted(p for p in existing if re.fullmatch(re.escape(model) + r"-\w+\.gguf", p) and p not in names)
    ops += [CommitOperationDelete(p) for p in stale]
    with _hub_errors(model, "commit the GGUFs to", target.repo_id, target):
        info = api.create_commit(target.repo_id, ops, commit_message=f"lora-deploy: {model} adapter {version}",
                                 commit_description=f"Quantizations: {', '.join(f['quant'] for f in files)}.")
    commit = str(info.oid)
    log.info("model %r: commit %s on %s (removed stale: %s)", model, commit, target.repo_id, stale or "none")
    tag = version_tag(version)
    with _hub_errors(model, f"tag {tag!r} on", target.repo_id, target):
        _ensure_tag(api, target.repo_id, tag, commit, f"adapter version {version}", model)
    record: dict[str, Any] = {"repo_id": target.repo_id, "repo_url": str(repo_url), "commit": commit, "tag": tag,
                              "files": [f["name"] for f in files], "space_id": None, "space_url": None,
                              "space_commit": None}
    if target.space_id:
        smallest = min(files, key=lambda f: f["bytes"])["name"]
        record.update(_publish_space(api, model=model, target=target, model_file=smallest, revision=commit))
    return record


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
        files.append({"name": repo_file_name(model, quant), "quant": quant, "path": str(path), "bytes": size,
                      "sha256": str(item.get("sha256", "")).lower()})
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


def _publish_space(api: Any, *, model: str, target: HubTarget, model_file: str, revision: str) -> dict:
    """Create/update the Gradio Space, then set its variables (only changed ones) and, if private, the secret."""
    from huggingface_hub import CommitOperationAdd

    space_id = str(target.space_id)
    with _hub_errors(model, "create the Space", space_id, target):
        space_url = api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=target.private,
                                    space_hardware=target.space_hardware, exist_ok=True)
    rendered = space_files(model=model, model_repo=target.repo_id, hardware=target.space_hardware,
                           endpoint=target.endpoint)
    ops = [CommitOperationAdd(name, content) for name, content in rendered.items()]
    with _hub_errors(model, "commit the app to the Space", space_id, target):
        info = api.create_commit(space_id, ops, repo_type="space",
                                 commit_message=f"lora-deploy: serve {target.repo_id}/{model_file}")
    wanted = {"MODEL_REPO": target.repo_id, "MODEL_FILE": model_file, "MODEL_REVISION": revision}
    with _hub_errors(model, "set the variables of the Space", space_id, target):
        current = {k: v.value for k, v in api.get_space_variables(space_id).items()}
        for key, value in wanted.items():
            if current.get(key) != value:
                api.add_space_variable(space_id, key, value, description="set by lora-deploy")
        if target.private:
            api.add_space_secret(space_id, "HF_TOKEN", target.space_token or target.token,
                                 description="read access to the private model repo (lora-deploy)")
    log.info("model %r: Space %s serves %s @ %s", model, space_id, model_file, revision[:12])
    return {"space_id": space_id, "space_url": str(space_url), "space_commit": str(info.oid)}


@contextlib.contextmanager
def _hub_errors(model: str, action: str, repo_id: str, target: HubTarget) -> Iterator[None]:
    """Turn huggingface_hub / transport errors into PublishError with the server's message and a fix."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        yield
    except LoraDeployError:
        raise
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else 0
        server = (e.server_message or str(e).splitlines()[0]).strip()
        if isinstance(e, RepositoryNotFoundError) and status != 401:
            status = 404
        fix = _fix_for(status, repo_id)
        message = f"could not {action} {repo_id!r}: HTTP {status}: {server}"
        raise PublishError(_scrub(message, target), model=model, fix=fix) from e
    except (httpx2.TransportError, OSError) as e:
        endpoint = target.endpoint or "https://huggingface.co"
        raise PublishError(_scrub(f"could not {action} {repo_id!r}: {type(e).__name__}: {e}", target), model=model,
                           fix=f"check that {endpoint!r} is reachable from the worker (proxy, DNS, firewall)") from e
    except (RuntimeError, ValueError) as e:  # LFS upload failures, invalid README metadata
        cause = f"{e}: {e.__cause__}" if e.__cause__ else str(e)
        raise PublishError(_scrub(f"could not {action} {repo_id!r}: {cause}", target), model=model,
                           fix="see the message; retry the task if it was a transient upload error") from e


def _fix_for(status: int, repo_id: str) -> str:
    namespace = repo_id.split("/")[0]
    return {
        401: f"the token was rejected (invalid or expired): {TOKEN_FIX}",
        402: "the Hub asks for payment (a Gradio Space needs a PRO/Team plan or paid hardware); "
             "upgrade, or set hf.space_id to null",
        403: f"the token lacks write access to {namespace!r}: use a token with the 'write' role "
             "(or a fine-grained token with write permission on that namespace)",
        404: f"check the repo id {repo_id!r} (namespace/name) in hf.repo_id / hf.space_id, and that the token's "
             "user or organization owns it",
        409: "another operation changed the repo at the same time: retry the task",
        429: "the Hub rate-limited the token: retry the task later",
    }.get(status, "the Hub failed; retry the task later" if status >= 500 else "see the Hub's message")


def _scrub(text: str, target: HubTarget) -> str:
    """Remove the token(s) from a message, whatever produced it."""
    for secret in (target.token, target.space_token):
        if secret:
            text = text.replace(secret, "***")
    return text
