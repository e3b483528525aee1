"""The heavy operators check their own worker at the start of ``execute``: a stage that cannot fit fails at once
(no retries) with the numbers and the fix, before it writes anything; the try after an OOM-killed one fails too."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

from include.config.sections import QuantizeSettings
from include.resources.attempts import DIRECTORY_ENV, Attempt, write
from include.resources.oom import OomCounters, read_oom_counters
from operators.operators.gguf import GGUFConvertOperator, GGUFQuantizeOperator
from operators.operators.merge import MergeOperator
from tests.gguf_helpers import tiny_gguf


def task_instance(task_id: str) -> SimpleNamespace:
    pushed: dict[str, Any] = {}
    return SimpleNamespace(dag_id="deploy_m", run_id="manual__1", task_id=task_id, map_index=-1, pushed=pushed,
                           xcom_push=lambda key, value: pushed.__setitem__(key, value))


@pytest.fixture
def attempts_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "attempts"
    monkeypatch.setenv(DIRECTORY_ENV, str(directory))
    return directory


def test_quantize_refuses_a_budget_it_cannot_fit_before_writing(gguf_root: Path, tmp_path: Path, attempts_dir: Path):
    f16 = tiny_gguf(gguf_root, "f16")
    converted = {"base": {"quant": "F16", "path": str(f16), "sha256": "tiny-f16"}, "imatrix": None}
    op = GGUFQuantizeOperator(task_id="quantize", model="m", converted=converted, quant_type="Q4_K_M",
                              artifact_root=str(tmp_path / "store"), settings=QuantizeSettings().model_dump(),
                              workers={"memory_budget_mb": 1})
    with pytest.raises(AirflowFailException) as err:
        op.execute({"ti": task_instance("quantize")})
    message = str(err.value)
    for phrase in ("model 'm': stage 'quantize' needs about", "largest tensor", "memory_budget_mb=1",
                   "MB short, so it would be OOM-killed",
                   "Fix: run it on a worker with more memory (workers.heavy_queue"):
        assert phrase in message, message
    assert not (tmp_path / "store").exists() and not attempts_dir.exists()  # nothing written, no record left


def test_merge_refuses_the_peft_backend_on_a_small_budget(demo_inputs, tmp_path: Path, attempts_dir: Path):
    adapter = {"path": str(demo_inputs.training_box / "checkpoint-20"), "sha256": "a", "version": "checkpoint-20"}
    op = MergeOperator(task_id="merge", model="m", adapter=adapter, base_model=str(demo_inputs.base),
                       artifact_root=str(tmp_path / "store"), backend="peft", workers={"memory_budget_mb": 100})
    with pytest.raises(AirflowFailException, match=r"stage 'merge' needs about .*the whole model in memory.*"
                                                   r"Fix: use merge.backend: fused"):
        op.execute({"ti": task_instance("merge")})
    assert not (tmp_path / "store").exists()


def test_convert_after_an_oom_killed_try_fails_at_once(gguf_root: Path, tmp_path: Path, attempts_dir: Path):
    tiny_gguf(gguf_root, "f16")  # makes tiny-base
    merged = {"path": str(gguf_root / "tiny-base"), "sha256": "tiny-base-v1", "adapter_version": "checkpoint-20"}
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    now = read_oom_counters()
    assert now.system is not None
    # What a convert try leaves when the OOM killer ends its process: its record, and a higher counter since.
    write(attempts_dir, Attempt(key="deploy_m/manual__1/convert/-1", stage="convert", estimate_bytes=611_000_000,
                                memory="2,000 MB (MemAvailable 2,000 MB)", counters=OomCounters(system=now.system - 1),
                                pid=dead.pid, pid_start=None, peak_bytes=1_900_000_000))
    op = GGUFConvertOperator(task_id="convert", model="m", merged=merged, adapter={}, quant_types=["Q8_0"],
                             artifact_root=str(tmp_path / "store"), settings=QuantizeSettings().model_dump())
    with pytest.raises(AirflowFailException) as err:
        op.execute({"ti": task_instance("convert")})
    message = str(err.value)
    for phrase in ("the previous try of stage 'convert'", "killed by the kernel's OOM killer", "peaked at 1,900 MB",
                   "estimate 611 MB", "Not trying again", "then clear the task to run it again"):
        assert phrase in message, message
    assert not (tmp_path / "store").exists()
    # A try after a kill that was not the OOM killer's (the counter did not move) runs: here it converts.
    write(attempts_dir, dataclasses.replace(Attempt(key="deploy_m/manual__1/convert/-1", stage="convert",
                                                    estimate_bytes=1, memory="?", counters=read_oom_counters()),
                                            pid=dead.pid, pid_start=None))
    ti = task_instance("convert")
    record = op.execute({"ti": ti})
    assert record["base"]["quant"] == "F16" and ti.pushed["quant_types"] == ["Q8_0"]
    assert not list(attempts_dir.glob("*.json"))
