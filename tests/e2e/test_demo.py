"""The main job as a user runs it: ``scripts/demo.py`` prints one line per task and a summary, and sends
Airflow's full log to a file whose path it prints; ``--verbose`` streams that log instead."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
STAGES = ["plan", "publish", "space_ready", "download", "merge", "convert", "quant_types", "quantize[Q8_0]",
          "quantize[Q4_K_M]", "ggufs", "install", "smoke", "promote", "health", "rollback", "retention"]
TASK_LINE = re.compile(r"^  (?P<task>[a-z_]+(\[\w+\])?) +(?P<state>success|skipped|failed)(?: +(?P<rest>.*))?$")


def run_demo(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The demo in a clean environment: its own Airflow home and config under ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "LORA_DEPLOY_"))}
    env["LORA_DEPLOY_CACHE"] = os.environ.get("LORA_DEPLOY_CACHE", str(Path.home() / ".cache" / "lora-deploy"))
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--home", str(home), *args],
                          env=env, capture_output=True, text=True, timeout=600, check=False)


def task_lines(stdout: str) -> dict[str, tuple[str, str]]:
    """``{task: (state, rest of the line)}`` from the demo's output."""
    found = {}
    for line in stdout.splitlines():
        match = TASK_LINE.match(line)
        if match:
            assert match["task"] not in found, f"two lines for {match['task']}"
            found[match["task"]] = (match["state"], match["rest"] or "")
    return found


def test_the_demo_prints_a_line_per_task_and_keeps_airflows_log_in_a_file(tmp_path):
    first = run_demo(tmp_path / "home")
    assert first.returncode == 0, first.stdout + first.stderr
    lines = task_lines(first.stdout)
    # In the order they finished (the plan skips publish at once; the two quantize tasks in either order).
    assert sorted(lines) == sorted(STAGES) and list(lines)[:3] == STAGES[:3] and list(lines)[-1] == "retention", (
        first.stdout)
    assert {task for task, (state, _) in lines.items() if state == "skipped"} == {"publish", "space_ready",
                                                                                  "rollback"}
    assert lines["publish"][1] == "by the plan: targets lmstudio only (the model has no `hf` section)"
    assert lines["rollback"][1] == "runs only when a task before it fails"
    assert re.match(r"\d+\.\d s  checkpoint-20: 2 files, \d+ kB by copy$", lines["download"][1])
    assert "logits max|diff|" in lines["convert"][1] and "tokenizer matches HF" in lines["convert"][1]
    assert re.search(r"Q4_K_M \d\.\d MB, \d\.\d\d bits/weight, perplexity \+\d+\.\d % vs F16$",
                     lines["quantize[Q4_K_M]"][1])
    assert re.search(r"Q8_0 at ephemeral llama_cpp.server: \d+\.\d\d s, \d+ tokens/s$", lines["smoke"][1])
    assert lines["promote"][1].endswith("checkpoint-20 is current (first version)")
    # The first run says what it builds; nothing of Airflow's structured log reaches the terminal.
    assert "first run: generating a tiny Llama base model" in first.stdout
    assert "first run: creating Airflow's SQLite database" in first.stdout
    assert len(first.stdout.splitlines()) < 35, first.stdout
    assert not re.search(r"\[(info|warning|error) *\]|Pushing xcom|loc=", first.stdout + first.stderr)
    assert "deploy_demo finished: success in" in first.stdout
    # The full log: where the output said, with Airflow's and llama.cpp's lines, and no ERROR line.
    log_path = Path(re.search(r"Airflow's full log: (\S+\.log)", first.stdout)[1])
    log_text = log_path.read_text()
    assert "[DAG TEST] end task task_id=retention" in log_text and "llama" in log_text
    assert [line for line in log_text.splitlines() if re.search(r"\[(error|critical) *\]| ERROR ", line)] == []

    second = run_demo(tmp_path / "home", "--verbose")
    assert second.returncode == 0, second.stdout + second.stderr
    lines = task_lines(second.stdout)
    assert lines["download"][1].endswith("(reused)") and lines["install"][1].endswith("nothing to do")
    assert lines["promote"][1].endswith("checkpoint-20 was already current")
    assert "first run" not in second.stdout and "Airflow's full log" not in second.stdout
    assert "[DAG TEST] end task task_id=retention" in second.stdout + second.stderr  # streamed
    assert sorted(p.name for p in log_path.parent.iterdir()) == [log_path.name]  # --verbose writes no log file
