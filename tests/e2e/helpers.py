"""Shared by the end-to-end tests: write a config, run a deploy DAG with ``dag.test()``, read its records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT

STAGES = ("plan", "download", "merge", "convert", "quantize", "ggufs", "install", "smoke", "promote", "health",
          "rollback", "publish", "space_ready")


def write_config(path: Path, name: str, entry: dict[str, Any], artifact_root: Path) -> Path:
    """A config file with one model."""
    path.write_text(yaml.safe_dump({"settings": {"artifact_root": str(artifact_root)},
                                    "defaults": {"retry": {"default": {"retries": 1, "delay_s": 0}}},
                                    "models": {name: entry}}))
    return path


def run_deploy(dag_id: str, conf: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """Parse the dags folder like the dag-processor, run ``dag_id`` in-process; return state and records."""
    from airflow.dag_processing.dagbag import BundleDagBag

    dags = ROOT / "dags"
    bag = BundleDagBag(dag_folder=str(dags), bundle_path=dags, bundle_name="dags-folder")
    assert dag_id in bag.dags, bag.import_errors
    dag_run = bag.dags[dag_id].test(run_conf=conf or {})
    records: dict[str, Any] = {}
    for task_id in STAGES:
        tis = [ti for ti in dag_run.get_task_instances() if ti.task_id == task_id]
        if task_id == "quantize":  # mapped: one instance per type, in map index order
            tis.sort(key=lambda ti: ti.map_index)
            records[task_id] = {"state": sorted({str(ti.state) for ti in tis}),
                                "xcom": [ti.xcom_pull(task_ids=task_id, map_indexes=ti.map_index) for ti in tis]}
            continue
        ti = tis[0] if tis else None
        records[task_id] = {"state": str(ti.state) if ti else None,
                            "xcom": ti.xcom_pull(task_ids=task_id) if ti else None}
    return str(dag_run.state), records


LOOPBACK = ("127.0.0.1", "::1")


def listeners(pids: list[int]) -> list[tuple[str, int, str]]:
    """``(address, port, command)`` of every listening TCP socket of the processes ``pids`` and their descendants."""
    import psutil

    from tests.e2e.task_rss import process_tree

    found = []
    for proc in process_tree(pids):
        try:
            sockets = proc.net_connections(kind="tcp")
            command = " ".join(proc.cmdline()[:4])
        except psutil.Error:
            continue
        found += [(s.laddr.ip, s.laddr.port, command) for s in sockets if s.status == psutil.CONN_LISTEN]
    return sorted(set(found))
