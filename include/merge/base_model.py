"""Find the base model's files (a local directory or a Hugging Face cache snapshot) and fingerprint them."""

from __future__ import annotations

from pathlib import Path

from include.errors import MergeError
from include.store.hashing import digest_of


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
