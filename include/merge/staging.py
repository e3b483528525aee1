"""Files around the merge: output staging (atomic publish, stale stages removed), side files, a read-ahead thread.

A merge writes into a hidden sibling ``.<out>.merging-<token>`` (a scratch of :mod:`include.store.scratch`, locked
by the merging process) and renames it onto ``out_dir`` only when complete, so a merge killed at any point (even
SIGKILL) leaves no ``out_dir`` a later run could take as complete. The next merge into the same directory removes
every stage whose writer is gone (its lock is free), whatever output it was for; inside the artifact store the
next build of the stage does the same.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from include.errors import MergeError
from include.merge.safetensors_io import INDEX_FILE
from include.store import scratch

log = logging.getLogger(__name__)

# Files of the base dir that are weights (never copied): other formats and the old index.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
WEIGHT_INDEXES = (INDEX_FILE, "pytorch_model.bin.index.json")


def check_out_dir(out_dir: Path) -> None:
    """Raise MergeError unless ``out_dir`` is absent or an empty directory (a merge never overwrites)."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise MergeError(
            f"output dir {str(out_dir)!r} already exists and is not empty",
            fix="choose a new output dir or delete the old one (the merge never overwrites)",
        )


def new_stage(out_dir: Path) -> Path:
    """Create this process's staging dir next to ``out_dir``, first removing stages left by dead merges."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for gone in scratch.sweep(out_dir.parent, kinds=("merging",)):
        log.info("removed %s, left by a merge that did not finish", gone.path)
    return scratch.claim(out_dir, "merging")


def publish(stage: Path, out_dir: Path) -> None:
    """Rename the finished ``stage`` onto ``out_dir`` (absent or empty) in one step."""
    os.chmod(stage, 0o755)
    try:
        scratch.finish(stage, out_dir)  # an empty out_dir is replaced atomically
    except OSError as e:
        raise MergeError(
            f"cannot move the merged model into {str(out_dir)!r}: {e}",
            fix="make sure the output dir is empty and on the same filesystem as its parent",
        ) from e


class Ahead:
    """Run a stream of ``(index, job)`` items ahead of the writer: jobs (zero-argument callables returning a
    chunk) execute on ``workers`` threads, at most ``depth`` in flight, results consumed in order. numpy and
    file I/O release the GIL, so blocks compute in parallel while the writer writes. ``(index, None)``
    ends tensor ``index``. Exceptions (of the stream or of a job) re-raise in the consumer."""

    def __init__(self, items: Iterator[tuple[int, Any]], *, workers: int = 2, depth: int = 6,
                 initializer: Callable[[], None] | None = None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="merge-block",
                                        initializer=initializer)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), name="merge-plan", daemon=True)
        self._thread.start()

    def _run(self, items: Iterator[tuple[int, Any]]) -> None:
        try:
            for index, job in items:
                if not self._put((index, None if job is None else self._pool.submit(job))):
                    return
        except BaseException as e:  # handed to the consumer
            self._put(e)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def chunks(self, index: int) -> Iterator[Any]:
        """The chunks of tensor ``index``, in order."""
        while True:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            got, future = item
            if got != index:
                raise RuntimeError(f"merge pipeline out of step: tensor {got} while writing tensor {index}")
            if future is None:
                return
            yield future.result()

    def close(self) -> None:
        """Stop planning, drop queued jobs and wait for the threads."""
        self._stop.set()
        self._thread.join()
        self._pool.shutdown(wait=True, cancel_futures=True)


def copy_side_files(base_dir: Path, stage: Path, out_dtype: str) -> list[str]:
    """Copy the base's non-weight files (following symlinks) and set the dtype in config.json."""
    copied = []
    for src in sorted(base_dir.rglob("*")):
        rel = src.relative_to(base_dir)
        if any(part.startswith(".") for part in rel.parts) or not src.is_file():
            continue
        if src.name.endswith(WEIGHT_SUFFIXES) or src.name in WEIGHT_INDEXES:
            continue
        dst = stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel.as_posix() == "config.json":
            config = json.loads(src.read_text())
            set_dtype(config, out_dtype)
            dst.write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copyfile(src, dst)
        copied.append(rel.as_posix())
    return copied


def set_dtype(config: dict[str, Any], dtype: str) -> None:
    """Set ``dtype`` / ``torch_dtype`` (whichever exist; both when neither does), also in sub-configs."""
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype", "torch_dtype"]
    for key in keys:
        config[key] = dtype
    for value in config.values():  # nested sub-configs (text_config of multimodal models) that name a dtype
        if isinstance(value, dict) and ("torch_dtype" in value or "dtype" in value):
            set_dtype(value, dtype)
