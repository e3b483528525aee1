"""In-use marks ("leases"): which deploy runs use which store entries, so that collection never deletes them.

A lease is an empty file ``<root>/<model>/.leases/<holder>/<stage>.<key>`` whose mtime is the holder's last use of
the entry ``<root>/<model>/<stage>/<key>/``. The store takes one on every lookup and build (:mod:`.artifacts`), so
every stage of a run marks what it read or wrote, on whichever worker host it ran.

The holder is one deploy run, not a process: the tasks of an Airflow run are separate processes on possibly
separate hosts, and a lease must cover the gap between them (convert writes the f16 GGUF, the quantize tasks
read it later). Airflow exports ``AIRFLOW_CTX_DAG_ID`` and ``AIRFLOW_CTX_DAG_RUN_ID`` to every task it runs;
:func:`current_holder` names the holder from them (``LORA_DEPLOY_HOLDER`` overrides; outside Airflow it is the
process). The run's last task releases its leases (:func:`release`) once the version is delivered; a run that
failed keeps them, so a retry of its failed task still finds its inputs. A lease untouched for the retention's
``lease_hours`` no longer protects anything: a crashed run cannot pin disk forever.

Why marks with a time and not only ``flock``: a lock is held by a process, and no process lives from convert to
the last quantize task. (``flock`` does guard the short windows: see :mod:`.scratch`.)
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import time
from collections import defaultdict
from pathlib import Path

HOLDER_ENV = "LORA_DEPLOY_HOLDER"
LEASES_DIR = ".leases"
HOLDER_FILE = ".holder"


def holder_of(dag_id: str, run_id: str) -> str:
    """The holder name of one Airflow run."""
    return f"{dag_id}/{run_id}"


def current_holder() -> str:
    """Who is using the store now: ``$LORA_DEPLOY_HOLDER``, else the Airflow run of this task, else this process."""
    explicit = os.environ.get(HOLDER_ENV)
    if explicit:
        return explicit
    dag_id, run_id = os.environ.get("AIRFLOW_CTX_DAG_ID"), os.environ.get("AIRFLOW_CTX_DAG_RUN_ID")
    if dag_id and run_id:
        return holder_of(dag_id, run_id)
    return f"process/{socket.gethostname()}/{os.getpid()}"


def holder_dir_name(holder: str) -> str:
    """A file-system-safe, collision-free directory name for ``holder``."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", holder)[:80]
    return f"{readable}-{hashlib.sha256(holder.encode()).hexdigest()[:10]}"


def _root(model_dir: Path) -> Path:
    return Path(model_dir) / LEASES_DIR


def take(model_dir: Path, stage: str, key: str, holder: str | None = None) -> None:
    """Mark ``<stage>/<key>`` as used now by ``holder`` (default :func:`current_holder`)."""
    holder = holder or current_holder()
    directory = _root(model_dir) / holder_dir_name(holder)
    mark = directory / f"{stage}.{key}"
    for _ in range(3):  # a collector may remove an empty holder dir between our mkdir and our touch
        try:
            mark.touch()  # creates it, or sets its mtime to now
            return
        except FileNotFoundError:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / HOLDER_FILE).write_text(holder + "\n", encoding="utf-8")
    mark.touch()


def release(model_dir: Path, holder: str) -> int:
    """Drop every lease of ``holder``; returns how many there were."""
    directory = _root(model_dir) / holder_dir_name(holder)
    if not directory.is_dir():
        return 0
    count = sum(1 for p in directory.iterdir() if p.name != HOLDER_FILE)
    shutil.rmtree(directory, ignore_errors=True)
    return count


def fresh(model_dir: Path, max_age_s: float, *, now: float | None = None,
          stage: str | None = None, key: str | None = None) -> dict[tuple[str, str], dict[str, float]]:
    """``{(stage, key): {holder: age in seconds}}`` of leases used within ``max_age_s`` (optionally of one entry)."""
    now = time.time() if now is None else now
    found: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    root = _root(model_dir)
    if not root.is_dir():
        return {}
    for directory in root.iterdir():
        holder = _holder_name(directory)
        wanted = [directory / f"{stage}.{key}"] if stage and key else directory.iterdir()
        for mark in wanted:
            if mark.name == HOLDER_FILE or "." not in mark.name:
                continue
            try:
                age = now - mark.stat().st_mtime
            except FileNotFoundError:
                continue
            if age <= max_age_s:
                mark_stage, mark_key = mark.name.rsplit(".", 1)
                found[(mark_stage, mark_key)][holder] = age
    return dict(found)


def prune(model_dir: Path, max_age_s: float, *, now: float | None = None) -> int:
    """Remove leases older than ``max_age_s`` and holders left with none; returns how many leases went."""
    now = time.time() if now is None else now
    root = _root(model_dir)
    if not root.is_dir():
        return 0
    gone = 0
    for directory in list(root.iterdir()):
        marks = [p for p in directory.iterdir() if p.name != HOLDER_FILE] if directory.is_dir() else []
        for mark in marks:
            try:
                if now - mark.stat().st_mtime > max_age_s:
                    mark.unlink()
                    gone += 1
            except FileNotFoundError:
                continue
        if directory.is_dir() and not [p for p in directory.iterdir() if p.name != HOLDER_FILE]:
            shutil.rmtree(directory, ignore_errors=True)
    return gone


def _holder_name(directory: Path) -> str:
    try:
        return (directory / HOLDER_FILE).read_text(encoding="utf-8").strip() or directory.name
    except OSError:
        return directory.name
