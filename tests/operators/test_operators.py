"""The Airflow layer: declarative constructors (no I/O), templated fields, and engine errors mapped to Airflow's.

Constructors run in every DAG parse (the dag-processor re-parses the file every few seconds), so they must
only store their arguments: no file, network or process access. That is observed with an audit hook
(:func:`sys.addaudithook`) in a child process, so each operator class is constructed there for the first time:
a lazy first-use read cannot hide behind an earlier test having constructed the same class.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

from include.errors import ConfigError, HealthError
from operators.common import as_bool, engine_errors
from operators.operators.download import VastAIDownloadOperator
from operators.operators.gguf import GGUFConvertOperator, GGUFQuantizeOperator
from operators.operators.gguf_asset import GGUFCollectOperator
from operators.operators.hf_space import HFSpaceDeployOperator
from operators.operators.lmstudio import LMStudioDeployOperator
from operators.operators.merge import MergeOperator
from operators.operators.plan import DeployPlanOperator
from operators.operators.promote import LMStudioPromoteOperator, LMStudioRollbackOperator
from operators.operators.retention import StoreRetentionOperator
from operators.sensors.health import HealthCheckSensor
from operators.sensors.hf_space import HFSpaceRuntimeSensor

# Not tests.conftest.ROOT: importing tests.conftest sets up a session directory, and the child process imports this
# module.
ROOT = Path(__file__).resolve().parents[2]
NOWHERE = "/nonexistent/lora-deploy"


# One builder per operator class, with paths that do not exist: nothing is constructed at import (the child
# process of test_constructors_do_no_io constructs each class for the first time, observed).
BUILDERS: dict[str, Callable[[], Any]] = {
    "DeployPlanOperator": lambda: DeployPlanOperator(
        task_id="plan", model="m", artifact_root=NOWHERE, source={"kind": "local", "path": NOWHERE},
        base_model=NOWHERE),
    "VastAIDownloadOperator": lambda: VastAIDownloadOperator(
        task_id="download", model="m", artifact_root=NOWHERE, source_kind="local", source_path=NOWHERE),
    "MergeOperator": lambda: MergeOperator(
        task_id="merge", model="m", adapter={}, base_model=NOWHERE, artifact_root=NOWHERE),
    "GGUFConvertOperator": lambda: GGUFConvertOperator(
        task_id="convert", model="m", merged={}, adapter={}, quant_types=["Q8_0"], artifact_root=NOWHERE,
        settings={}),
    "GGUFQuantizeOperator": lambda: GGUFQuantizeOperator(
        task_id="quantize", model="m", converted={}, quant_type="Q8_0", artifact_root=NOWHERE, settings={}),
    "GGUFCollectOperator": lambda: GGUFCollectOperator(
        task_id="ggufs", model="m", converted={}, quantized=[], adapter={}),
    "LMStudioDeployOperator": lambda: LMStudioDeployOperator(
        task_id="install", model="m", ggufs={}, adapter={}, artifact_root=NOWHERE, settings={}),
    "HealthCheckSensor": lambda: HealthCheckSensor(
        task_id="smoke", model="m", installed={}, phase="smoke", settings={}, artifact_root=NOWHERE),
    "LMStudioPromoteOperator": lambda: LMStudioPromoteOperator(
        task_id="promote", model="m", artifact_root=NOWHERE, settings={}),
    "LMStudioRollbackOperator": lambda: LMStudioRollbackOperator(
        task_id="rollback", model="m", artifact_root=NOWHERE, settings={}),
    "HFSpaceDeployOperator": lambda: HFSpaceDeployOperator(
        task_id="publish", model="m", ggufs={}, adapter={}, settings=None),
    "HFSpaceRuntimeSensor": lambda: HFSpaceRuntimeSensor(
        task_id="space_ready", model="m", published={}, settings=None),
    "StoreRetentionOperator": lambda: StoreRetentionOperator(
        task_id="retention", model="m", artifact_root=NOWHERE, settings={}, keep_versions=2),
}
# Audit events that touch files, directories, the network, processes or the environment (see the audit events
# table of the Python docs). Imports are allowed: events raised by the import system are not counted.
WATCHED = ("open", "os.", "shutil.", "socket.", "subprocess.", "sqlite3.", "urllib.", "http.client.", "glob.",
           "ctypes.", "tempfile.", "webbrowser.", "ftplib.", "smtplib.", "poplib.", "imaplib.", "telnetlib.")
_observing: dict[int, list[str]] = {}  # thread id -> watched events raised by that thread while observed
_hook_installed = False


def all_operators() -> list[Any]:
    """One instance of each operator (constructed now)."""
    return [build() for build in BUILDERS.values()]


def project_operator_classes() -> dict[str, type]:
    """Every operator and sensor class defined under operators/operators and operators/sensors, by name."""
    from airflow.sdk import BaseOperator

    classes: dict[str, type] = {}
    for package in ("operators.operators", "operators.sensors"):
        for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
            module = importlib.import_module(f"{package}.{info.name}")
            classes.update({name: cls for name, cls in inspect.getmembers(module, inspect.isclass)
                            if issubclass(cls, BaseOperator) and cls.__module__ == module.__name__})
    return classes


def _audit(event: str, args: tuple[Any, ...]) -> None:
    """The audit hook: record a watched event of an observed thread, unless the import system raised it."""
    if not event.startswith(WATCHED):
        return
    seen = _observing.get(threading.get_ident())
    if seen is None:
        return
    # The import system reads source and bytecode and lists path entries itself (its frame raised the event);
    # a module run by an import (a DAG file, or top-level code doing I/O) is not excused: only its own frames.
    if sys._getframe(1).f_code.co_filename.startswith("<frozen importlib"):
        return
    seen.append(f"{event} {args!r:.300}")


@contextmanager
def observed_io() -> Iterator[list[str]]:
    """The watched events this thread raises inside the block (nested blocks share the outer list).

    Audit hooks cannot be removed: the hook is installed once per process and records only while a thread is
    inside this block, so call it in a child process (test_constructors_do_no_io) rather than in pytest's.
    """
    global _hook_installed
    if not _hook_installed:
        sys.addaudithook(_audit)
        _hook_installed = True
    thread = threading.get_ident()
    if thread in _observing:
        yield _observing[thread]
        return
    _observing[thread] = seen = []
    try:
        yield seen
    finally:
        del _observing[thread]


def constructor_io_report() -> dict[str, Any]:
    """Run in the child process: every constructor observed, with typical arguments and in every generated DAG.

    Returns ``{"builders": {class: events}, "dags": {class: events}, "dag_ids", "tasks", "mapped",
    "import_errors", "probe"}`` (``tasks``/``mapped``: the class of each task of the DAGs); ``probe`` is what
    a constructor that does open, connect and spawn was seen doing (the check works).
    """
    import socket

    from airflow.dag_processing.dagbag import BundleDagBag
    from airflow.sdk import BaseOperator

    report: dict[str, Any] = {"builders": {}, "dags": {}, "dag_ids": [], "tasks": [], "mapped": [],
                              "import_errors": {}}
    for name, build in BUILDERS.items():
        with observed_io() as seen:
            build()
        report["builders"][name] = list(seen)

    def observed_init(cls: type) -> Callable[..., None]:
        init = cls.__dict__["__init__"]

        @wraps(init)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
            with observed_io() as seen:
                before = len(seen)
                init(self, *args, **kwargs)
            report["dags"].setdefault(type(self).__name__, []).extend(seen[before:])

        # Airflow's apply_defaults finishes construction (XComArg dependencies) only when the instance's
        # __init__.__wrapped__ is the function it wraps: keep that true through this wrapper.
        wrapper.__wrapped__ = init.__wrapped__  # type: ignore[attr-defined]
        return wrapper

    for cls in project_operator_classes().values():
        if "__init__" in cls.__dict__:
            cls.__init__ = observed_init(cls)
    dags = ROOT / "dags"
    for config in ("models.yaml", "models.example.yaml"):
        os.environ["LORA_DEPLOY_CONFIG"] = str(ROOT / "config" / config)
        bag = BundleDagBag(dag_folder=str(dags), bundle_path=dags, bundle_name="dags-folder")
        report["import_errors"].update(bag.import_errors)
        report["dag_ids"] += sorted(bag.dags)
        for dag in bag.dags.values():
            report["tasks"] += [type(t).__name__ for t in dag.tasks if isinstance(t, BaseOperator)]
            report["mapped"] += [t.operator_class.__name__ for t in dag.tasks if not isinstance(t, BaseOperator)]

    class NosyOperator(BaseOperator):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            Path(__file__).read_bytes()
            with socket.socket() as sock:
                sock.settimeout(1)
                sock.connect_ex(("127.0.0.1", 9))
            subprocess.run(["true"], check=False)

    with observed_io() as seen:
        NosyOperator(task_id="nosy")
    report["probe"] = [event.split(" ", 1)[0] for event in seen]
    return report


def test_constructors_do_no_io():
    """No file, directory, network, process or environment access in any constructor (imports aside)."""
    child = subprocess.run(
        [sys.executable, "-c", "import json, tests.operators.test_operators as t; "
                               "print(json.dumps(t.constructor_io_report()))"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert {"open", "socket.connect", "subprocess.Popen"} <= set(report["probe"]), report["probe"]
    assert report["builders"] == {name: [] for name in BUILDERS}
    assert report["import_errors"] == {}
    assert {"deploy_demo", "rollback_demo", "deploy_majora", "rollback_majora"} <= set(report["dag_ids"])
    # every operator class appears in a generated DAG; each plain task was constructed there, observed (a mapped
    # task's operator is constructed per task run: its builder above covers it)
    public = {name for name in project_operator_classes() if not name.startswith("_")}
    assert set(report["tasks"]) | set(report["mapped"]) >= public  # the rest: @task functions (not ours)
    assert set(report["dags"]) == set(report["tasks"]) & public
    assert report["dags"] == {name: [] for name in report["dags"]}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_templated_fields_are_attributes_and_documented(name):
    operator = BUILDERS[name]()
    assert operator.template_fields, f"{name} declares no template_fields"
    for field in operator.template_fields:
        assert hasattr(operator, field), f"{name}.{field} is templated but not set"
        assert f":param {field}:" in (type(operator).__doc__ or ""), f"{name} documents no {field}"


def test_non_retryable_engine_errors_fail_at_once_with_the_model_named():
    with pytest.raises(AirflowFailException, match=r"model 'majora': bad value\. Fix: do this"), \
            engine_errors("majora"):
        raise ConfigError("bad value", fix="do this")


def test_retryable_engine_errors_are_left_to_the_retry_policy():
    with pytest.raises(HealthError, match="model 'majora'"), engine_errors("majora"):
        raise HealthError("endpoint down")


@pytest.mark.parametrize(("value", "expected"), [(True, True), (False, False), ("True", True), ("false", False),
                                                 ("False", False), ("", False), (None, False)])
def test_rendered_force_flags_are_read_as_booleans(value, expected):
    assert as_bool(value) is expected
