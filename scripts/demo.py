"""Run the demo deployment through the real ``deploy_demo`` DAG and print what it produced.

Called by ``scripts/demo.sh`` inside the project's virtualenv. Uses a local Airflow home with SQLite under
``$LORA_DEPLOY_HOME`` (default ``~/.lora-deploy``); runs the DAG in-process with ``dag.test()``, so no
scheduler or other process is left running.

The terminal gets one line per task as it finishes (state, duration, the figure that matters) and a summary.
Airflow's full log, llama.cpp's output included, goes to ``$LORA_DEPLOY_HOME/logs/demo-<time>.log`` (the
newest ``KEEP_LOGS`` are kept); ``--verbose`` streams it to the terminal instead.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import pluggy

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the demo's inputs come from the generators in tests/fixtures
DAG_ID = "deploy_demo"
KEEP_LOGS = 10
# Airflow's listener marker, made without importing airflow (the environment is set first).
hookimpl = pluggy.HookimplMarker("airflow")
FINISHED = ("success", "failed", "skipped", "upstream_failed", "removed")


def configure_environment(home: Path) -> None:
    """Point Airflow and lora-deploy at the demo home (before anything imports airflow)."""
    os.environ["LORA_DEPLOY_HOME"] = str(home)
    os.environ.setdefault("AIRFLOW_HOME", str(home / "airflow"))
    os.environ.setdefault("LORA_DEPLOY_CONFIG", str(ROOT / "config" / "models.yaml"))
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO")


@contextlib.contextmanager
def output_to(log_path: Path | None) -> Iterator[TextIO]:
    """Send everything written to stdout and stderr (Python's, Airflow's and llama.cpp's C code's) to
    ``log_path``; yield a stream to the terminal for the demo's own lines. ``None``: no redirection."""
    terminal = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    if log_path is None:
        try:
            yield terminal
        finally:
            terminal.close()
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    saved = [os.dup(1), os.dup(2)]
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log_path, "ab") as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
        try:
            yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            terminal.close()


def prune_logs(directory: Path, keep: int = KEEP_LOGS) -> None:
    """Keep the newest ``keep`` demo logs: the demo's own disk use stays bounded across runs."""
    logs = sorted(directory.glob("demo-*.log"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in logs[keep:]:
        old.unlink(missing_ok=True)


class TaskLinePrinter:
    """An Airflow listener that prints one line per task instance of the run as it finishes.

    Tasks the scheduler decides without running them (skipped by a trigger rule, upstream failed) have no
    listener call of their own: :meth:`flush` prints them, at the next task's start and at the end of the run.
    """

    def __init__(self, out: TextIO, dag: Any) -> None:
        self.out = out
        self.dag = dag
        self.started: dict[tuple[str, int], float] = {}
        self.printed: set[tuple[str, int]] = set()
        self.records: dict[str, Any] = {}  # the XCom record of each unmapped task that succeeded
        self.order = {task.task_id: i for i, task in enumerate(dag.topological_sort())}

    def _print(self, task_id: str, map_index: int, state: str, record: Any = None, error: str | None = None,
               label: str | None = None) -> None:
        from include.cli.task_lines import task_line

        key = (task_id, map_index)
        if key in self.printed:
            return
        self.printed.add(key)
        started = self.started.get(key)
        seconds = time.monotonic() - started if started is not None else None
        name = task_id if map_index < 0 else f"{task_id}[{label or map_index}]"
        if state == "skipped" and not error and record is None:
            error = self._skip_reason(task_id)
        self.out.write(task_line(name, state, seconds, record, error) + "\n")

    def _skip_reason(self, task_id: str) -> str | None:
        skipped = (self.records.get("plan") or {}).get("skipped") or {}
        if task_id in skipped.get("tasks", []):
            return f"by the plan: {skipped['why']}"
        rule = getattr(self.dag.task_dict.get(task_id), "trigger_rule", "")
        return "runs only when a task before it fails" if str(getattr(rule, "value", rule)) == "one_failed" else None

    def flush(self, run_id: str) -> None:
        """Print the run's finished task instances that have no line yet (decided by the scheduler)."""
        from airflow.models.taskinstance import TaskInstance
        from airflow.utils.session import create_session

        with create_session() as session:
            rows = session.query(TaskInstance.task_id, TaskInstance.map_index, TaskInstance.state,
                                 TaskInstance.rendered_map_index).filter(
                TaskInstance.dag_id == self.dag.dag_id, TaskInstance.run_id == run_id).all()
        for task_id, map_index, state, label in sorted(rows, key=lambda r: (self.order.get(r[0], 0), r[1])):
            if state and str(state) in FINISHED and (task_id, map_index) not in self.printed:
                self._print(task_id, map_index, str(state), label=label)

    def _record(self, task_instance: Any) -> Any:
        try:
            return task_instance.xcom_pull(task_ids=task_instance.task_id, map_indexes=task_instance.map_index)
        except Exception:  # a figure is optional; the state line must still print
            return None

    @hookimpl
    def on_task_instance_running(self, previous_state: Any, task_instance: Any) -> None:
        """Note the start time; print the lines the scheduler decided since the last task."""
        self.flush(task_instance.run_id)
        self.started[(task_instance.task_id, task_instance.map_index)] = time.monotonic()

    @hookimpl
    def on_task_instance_success(self, previous_state: Any, task_instance: Any) -> None:
        """Print the success line with the stage's figure."""
        record = self._record(task_instance)
        if task_instance.map_index < 0:
            self.records[task_instance.task_id] = record
        self._print(task_instance.task_id, task_instance.map_index, "success", record, label=_label(task_instance))

    @hookimpl
    def on_task_instance_failed(self, previous_state: Any, task_instance: Any, error: Any) -> None:
        """Print the failure line with the error's first line."""
        self._print(task_instance.task_id, task_instance.map_index, "failed", error=str(error or "failed"),
                    label=_label(task_instance))

    @hookimpl
    def on_task_instance_skipped(self, previous_state: Any, task_instance: Any) -> None:
        """Print the line of a task that skipped itself."""
        self._print(task_instance.task_id, task_instance.map_index, "skipped", label=_label(task_instance))


def _label(task_instance: Any) -> str | None:
    """A mapped task's rendered map index (``Q4_K_M`` for ``quantize``), if Airflow has rendered it."""
    label = getattr(task_instance, "rendered_map_index", None)
    return str(label) if label not in (None, "") else None


def run_dag(conf: dict[str, object], out: TextIO) -> tuple[str, dict[str, Any]]:
    """Run deploy_demo with ``dag.test()``, printing a line per task; return the state and the records."""
    from airflow.dag_processing.dagbag import BundleDagBag
    from airflow.sdk.listener import get_listener_manager

    dags_dir = str(ROOT / "dags")
    bag = BundleDagBag(dag_folder=dags_dir, bundle_path=Path(dags_dir), bundle_name="dags-folder")
    if DAG_ID not in bag.dags:
        raise SystemExit(f"{DAG_ID} did not load: {bag.import_errors}")
    dag = bag.dags[DAG_ID]
    printer = TaskLinePrinter(out, dag)
    get_listener_manager().add_listener(printer)
    dag_run = dag.test(run_conf=conf)
    printer.flush(dag_run.run_id)
    return str(dag_run.state), printer.records


def first_run_notes(home: Path) -> list[str]:
    """What a first run builds before the DAG starts, and roughly how long it takes."""
    from tests.fixtures.demo_inputs import GENERATOR_VERSION

    notes = []
    marker = home / "demo" / ".generated"
    if not (marker.is_file() and marker.read_text().strip() == GENERATOR_VERSION):
        notes.append(f"first run: generating a tiny Llama base model and two LoRA checkpoints under {home / 'demo'}"
                     " (a few seconds)")
    if not (home / "airflow" / "airflow.db").exists():
        notes.append(f"first run: creating Airflow's SQLite database under {home / 'airflow'} (about 15 s)")
    return notes


def main() -> int:
    """Prepare the demo inputs, run the DAG, print a line per task and the summary; exit 1 when it failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("LORA_DEPLOY_HOME", "~/.lora-deploy")))
    parser.add_argument("--adapter-version", default=None, help="checkpoint to deploy (default: the newest)")
    parser.add_argument("--force", action="store_true", help="redo every stage")
    parser.add_argument("--dry-run", action="store_true", help="resolve, check and print the plan; write nothing")
    parser.add_argument("--promote", action="store_true", help="make this version current even if it is older")
    parser.add_argument("--quant-types", default=None, help="comma-separated llama.cpp types (default: config)")
    parser.add_argument("--verbose", action="store_true", help="stream Airflow's full log instead of a log file")
    args = parser.parse_args()
    home = args.home.expanduser().resolve()
    configure_environment(home)
    started = time.monotonic()
    log_path = None if args.verbose else home / "logs" / f"demo-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.log"
    print(f"{DAG_ID}: deploying the demo model's {args.adapter_version or 'newest'} adapter through a local "
          f"Airflow (SQLite) under {home}", flush=True)
    for note in first_run_notes(home):
        print(note, flush=True)
    if log_path:
        print(f"Airflow's full log: {log_path} (--verbose streams it here)", flush=True)
    conf: dict[str, object] = {"adapter_version": args.adapter_version, "force": args.force,
                               "dry_run": args.dry_run, "promote": args.promote}
    if args.quant_types:
        conf["quant_types"] = [t.strip().upper() for t in args.quant_types.split(",") if t.strip()]
    with output_to(log_path) as out:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from tests.fixtures.demo_inputs import prepare_demo

        prepare_demo(home)
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True)
        state, records = run_dag(conf, out)
    if log_path:
        prune_logs(log_path.parent)
    from include.cli.task_lines import run_summary

    print(run_summary(DAG_ID, state, time.monotonic() - started, records))
    if state != "success" and log_path:
        print(f"the full log, with each task's traceback: {log_path}")
    return 0 if state == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
