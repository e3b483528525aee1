"""The demo's terminal lines: one per task, with the figure that matters, from real stage records."""

from __future__ import annotations

from include.cli.task_lines import run_summary, stage_figure, task_line

QUANTIZE = {"quant": "Q4_K_M", "path": "/s/demo-Q4_K_M.gguf", "bytes": 1_090_432, "bits_per_weight": 5.0324,
            "ppl_ratio": 1.033534, "reused": False}
CONVERT = {"base": {"quant": "F16", "bytes": 3_413_760, "reused": False},
           "fidelity": {"max_abs_diff": 0.006305, "max_abs_diff_limit": 1.0},
           "tokenizer": {"comparison": {"texts": 6, "tokens": 350, "equal": True}}}
INSTALL = {"version": "checkpoint-20", "directory": "/m/lora-deploy/demo-GGUF", "noop": False, "pruned": [],
           "installed": [{"quant": "Q8_0", "bytes": 1_828_000, "path": "/m/a-Q8_0.gguf", "linked": True},
                         {"quant": "Q4_K_M", "bytes": 1_090_432, "path": "/m/a-Q4_K_M.gguf", "linked": False}]}


def test_a_line_has_the_task_its_state_its_duration_and_the_figure():
    line = task_line("quantize[1]", "success", 0.34, QUANTIZE)
    assert line.split()[:4] == ["quantize[1]", "success", "0.3", "s"]
    assert line.endswith("Q4_K_M 1.1 MB, 5.03 bits/weight, perplexity +3.4 % vs F16")


def test_each_stage_names_its_figure():
    assert stage_figure("convert", CONVERT) == ("F16 3.4 MB; logits max|diff| 0.006305 (limit 1); tokenizer "
                                                "matches HF on 6 texts (350 tokens)")
    assert stage_figure("install", INSTALL) == "2 GGUFs into /m/lora-deploy/demo-GGUF (1 hard links, 1 copies)"
    assert stage_figure("install", {**INSTALL, "noop": True}) == ("checkpoint-20 already installed (same files): "
                                                                  "nothing to do")
    assert stage_figure("download", {"version": "c", "files": [{}, {}], "bytes": 266_879,
                                     "transfer": {"method": "rsync", "resumed_bytes": 2_000_000}}) == (
        "c: 2 files, 267 kB by rsync, 2.0 MB resumed")
    assert stage_figure("promote", {"promoted": False, "version": "c-20", "previous": "c-20", "reason": "x"}) == (
        "c-20 was already current")
    assert stage_figure("promote", {"promoted": False, "version": "c-10", "previous": "c-20",
                                    "reason": "not newer"}) == "c-10 installed, c-20 stays current (not newer)"
    assert stage_figure("retention", {"freed_bytes": 3_417_143, "removed_count": 1, "kept_bytes": 3_194_849}) == (
        "freed 3.4 MB (1 path); kept 3.2 MB")
    assert stage_figure("health", {"skipped": "no lmstudio.endpoint configured"}) == (
        "skipped: no lmstudio.endpoint configured")


def test_an_unknown_or_partial_record_still_gives_a_line():
    assert stage_figure("a_new_stage", {"anything": 1}) == ""
    assert stage_figure("quantize", {"quant": "Q8_0"}) == ""  # no bytes yet: no figure, no error
    assert task_line("merge", "skipped", None).split() == ["merge", "skipped"]


def test_a_failure_shows_the_first_line_of_its_error_instead_of_a_figure():
    error = "\nmodel 'demo': adapter_config.json: base_model_name_or_path is 'x'\nFix: retrain on the base\n"
    line = task_line("merge", "failed", 1.0, {"bytes": 1}, error=error)
    assert line.endswith("model 'demo': adapter_config.json: base_model_name_or_path is 'x'")
    assert len(task_line("merge", "failed", 1.0, error="e" * 500)) < 200


def test_the_summary_lists_the_ggufs_and_what_is_current():
    text = run_summary("deploy_demo", "success", 30.6, {
        "install": INSTALL, "promote": {"promoted": True, "version": "checkpoint-20", "reason": "first version"}})
    assert text.splitlines() == [
        "deploy_demo finished: success in 30.6 s",
        "GGUFs installed for LM Studio:",
        "  Q8_0       1.8 MB  /m/a-Q8_0.gguf",
        "  Q4_K_M     1.1 MB  /m/a-Q4_K_M.gguf",
        "LM Studio current: checkpoint-20 (first version)",
    ]
