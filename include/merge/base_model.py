"""Find the base model's files (a local directory or a Hugging Face cache snapshot) and fingerprint them."""

from __future__ import annotations

import json
import re
from pathlib import Path

from include.errors import MergeError
from include.store.hashing import digest_of

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")


def is_hub_model_id(value: str) -> bool:
    """True when ``value`` looks like a Hub model id (``name`` or ``namespace/name``), not a local path."""
    return bool(_HUB_ID.fullmatch(value)) and ".." not in value and not Path(value).expanduser().exists()


def public_base_name(spec: str, base_dir: str | Path | None = None, adapter_dir: str | Path | None = None) -> str:
    """The base model's public name, never a local path: for GGUF metadata, LM Studio and the Hub.

    The first Hub id among: ``spec`` (config's ``base_model``), the base directory's ``config.json``
    ``_name_or_path``, the adapter's ``base_model_name_or_path``; else the name of ``spec``'s directory.
    """
    candidates = [spec]
    for path, key in ((base_dir, "config.json"), (adapter_dir, "adapter_config.json")):
        if path:
            try:
                recorded = json.loads((Path(path) / key).read_text())
            except (OSError, ValueError):
                continue
            candidates.append(str(recorded.get("_name_or_path" if key == "config.json" else
                                               "base_model_name_or_path") or ""))
    for candidate in candidates:
        if candidate and is_hub_model_id(candidate):
            return candidate
    return Path(str(spec or base_dir)).expanduser().name or str(spec)


def resolve_base_model(spec: str) -> Path:
    """A local directory as is; a repo id (``org/name``) from the local Hugging Face cache, offline."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if spec.startswith(("/", "~", ".")) or spec.count("/") != 1:
        raise MergeError(f"base_model {spec!r} does not exist",
                         fix="set base_model to a directory with config.json and *.safetensors, or to a Hugging "
                             "Face repo id that is in the local cache")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(spec, local_files_only=True))
    except LocalEntryNotFoundError as err:
        raise MergeError(f"base_model {spec!r} is not in the local Hugging Face cache",
                         fix=f"run `hf download {spec}` on this machine first, or set base_model to a local "
                             "directory") from err


def fingerprint(directory: Path) -> str:
    """A cheap identity of a model directory: names, sizes and mtimes of its files (no full read)."""
    stats = [(p.relative_to(directory).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
             for p in sorted(directory.rglob("*")) if p.is_file()]
    return digest_of(stats, length=64)
