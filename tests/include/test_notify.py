"""Slack texts: the figures a reader acts on are there, and a rollback says what serves now."""

from __future__ import annotations

from include.notify import failure_text, is_noop, rollback_success_text, success_text

RECORDS = {
    "plan": {"version": "checkpoint-20"},
    "download": {"version": "checkpoint-20", "time": "2026-11-20T10:00:00+00:00"},
    "ggufs": {"files": [
        {"quant": "Q8_0", "bytes": 1_830_000, "bits_per_weight": 8.52, "ppl_ratio": 1.004},
        {"quant": "Q4_K_M", "bytes": 1_090_000, "bits_per_weight": 5.03, "ppl_ratio": None},
    ]},
    "promote": {"promoted": True, "version": "checkpoint-20", "previous": "checkpoint-10"},
    "health": {"latency_s": 0.42, "tokens_per_s": 310.5, "answer_excerpt": "Hello there"},
    "publish": {"repo_url": "https://hf.co/me/demo-GGUF", "tag": "v-checkpoint-20",
                "space_url": "https://hf.co/spaces/me/demo-chat"},
}


def test_success_lists_files_promotion_health_and_links():
    text = success_text("demo", "http://airflow/dags/deploy_demo/runs/r1", RECORDS)
    assert text.startswith(":white_check_mark: *demo* deployed adapter `checkpoint-20`")
    assert "`Q8_0` 1.8 MB, 8.52 bpw, perplexity x1.004 vs f16" in text
    assert "`Q4_K_M` 1.1 MB, 5.03 bpw" in text
    assert "`checkpoint-20` is now current (was `checkpoint-10`)" in text
    assert "live: 0.42 s latency, 310.5 tokens/s" in text
    assert "https://hf.co/me/demo-GGUF (tag `v-checkpoint-20`) | Space: https://hf.co/spaces/me/demo-chat" in text
    assert "Airflow run: http://airflow/dags/deploy_demo/runs/r1" in text


def test_backfilled_version_says_it_was_not_made_current():
    records = {**RECORDS, "promote": {"promoted": False, "reason": "checkpoint-30 is newer"}, "health": {
        "skipped": "not current"}, "smoke": {"latency_s": 1.5, "tokens_per_s": 20.0}}
    text = success_text("demo", None, records)
    assert "installed, not made current (checkpoint-30 is newer)" in text
    assert "smoke test: 1.50 s latency" in text


def test_a_forced_rerun_of_the_current_version_says_nothing_changed():
    records = {**RECORDS, "install": {"noop": True, "version": "checkpoint-20"},
               "promote": {"promoted": False, "version": "checkpoint-20", "previous": "checkpoint-20",
                           "reason": "checkpoint-20 is already current"}}
    text = success_text("demo", None, records)
    assert "LM Studio: `checkpoint-20` was already current with the same files: nothing changed" in text
    assert "not made current" not in text and "is now current" not in text
    older = {**records, "promote": {"promoted": False, "version": "checkpoint-20", "previous": "checkpoint-30",
                                    "reason": "checkpoint-30 is newer"}}
    assert "LM Studio: already installed with the same files, not made current (checkpoint-30 is newer)" in \
        success_text("demo", None, older)


def test_failure_names_the_stage_its_log_and_the_rollback():
    records = {**RECORDS, "rollback": {"failed_version": "checkpoint-20", "restored_version": "checkpoint-10",
                                       "reason": "live endpoint: 0.5 tokens/s is below min_tokens_per_s 5"}}
    text = failure_text("demo", "http://run", [("health", "http://log")], "task_failure", records)
    assert text.startswith(":x: *demo* deploy of `checkpoint-20` failed: task_failure")
    assert "stage `health` failed, log: http://log" in text
    assert "`checkpoint-10` is current again (`checkpoint-20` failed: live endpoint: 0.5 tokens/s" in text


def test_a_failure_before_promotion_names_the_failed_stages():
    records = {"download": {"version": "checkpoint-20"},
               "rollback": {"failed_version": None, "restored_version": None, "reason": "stage(s) download failed",
                            "failed_stages": ["download"]}}
    text = failure_text("demo", None, [("rollback", "http://log/rollback")], None, records)
    assert "• stage `download` failed\n• stage `rollback` failed, log: http://log/rollback" in text
    assert "LM Studio unchanged (nothing was made current): stage(s) download failed" in text


def test_rollback_dag_success_and_noop_detection():
    text = rollback_success_text("demo", None, {"promote": {"version": "checkpoint-10", "previous": "checkpoint-20"},
                                                "health": {"latency_s": 0.3, "tokens_per_s": 99.0}})
    assert "`checkpoint-10` is now current in LM Studio (was `checkpoint-20`)" in text
    assert is_noop({"plan": {"version": "x"}, "download": None})
    assert not is_noop(RECORDS)
