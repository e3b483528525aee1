"""The deploy plan: size estimates, disk checks, targets, and the record round trip."""

from __future__ import annotations

import pytest

from include.errors import ConfigError, ResourceError
from include.plan import DeployPlan, DiskCheck, check_targets, disk_check, estimate_outputs, require_space


def test_outputs_are_estimated_from_parameters_and_bits_per_weight():
    outputs = estimate_outputs(1_000_000_000, 2_000_000_000, "bfloat16", "f16", ["Q4_K_M", "Q8_0", "F16"])
    assert outputs == [{"name": "merged", "bytes": 2_000_000_000}, {"name": "F16", "bytes": 2_000_000_000},
                       {"name": "Q4_K_M", "bytes": 612_500_000}, {"name": "Q8_0", "bytes": 1_062_500_000}]
    assert estimate_outputs(10, 40, "auto", "f16", [])[0] == {"name": "merged", "bytes": 40}
    assert estimate_outputs(10, 40, "fused", "f16", [])[0] == {"name": "merged", "bytes": 0}  # nothing written


def test_disk_check_walks_up_to_an_existing_parent(tmp_path):
    check = disk_check(tmp_path / "not" / "yet" / "there", 1)
    assert check.ok and check.free_bytes > 0
    assert not disk_check(tmp_path, 10**18).ok


def test_short_disk_names_the_directory_and_the_fix():
    plan = DeployPlan(model="m", version="v", adapter_time="t", selected_by="newest", source="s", base_model="b",
                      parameters=1, merge_dtype="auto", quant_types=["Q8_0"], targets=["lmstudio"],
                      disk=[DiskCheck("/data/artifacts", 5_000_000_000, 1_000_000_000)])
    with pytest.raises(ResourceError, match=r"/data/artifacts needs ~5,000 MB, has 1,000 MB free") as err:
        require_space(plan)
    assert "artifact_root" in err.value.fix
    assert "<-- NOT ENOUGH" in plan.text()


def test_targets_are_checked_and_huggingface_needs_an_hf_section():
    assert check_targets(["lmstudio", "huggingface"], has_hf=False) == ["lmstudio"]
    assert check_targets(["huggingface"], has_hf=True) == ["huggingface"]
    with pytest.raises(ConfigError, match="subset"):
        check_targets(["ftp"], has_hf=True)


def test_record_round_trip():
    plan = DeployPlan(model="m", version="checkpoint-2", adapter_time="2026-01-01T00:00:00+00:00",
                      selected_by="conf", source="box", base_model="b", parameters=5, merge_dtype="auto",
                      quant_types=["Q8_0"], targets=["lmstudio"], disk=[DiskCheck("/x", 1, 2)], dry_run=True)
    again = DeployPlan.from_record(plan.as_record())
    assert again == plan and "[DRY RUN: nothing will be written]" in again.text()


def test_memory_entries_refuse_what_runs_here_and_leave_the_heavy_queue_to_its_worker():
    from include.plan.fit import memory_entries, require_memory
    from include.resources.guard import StageEstimate
    from include.resources.memory import WorkerMemory

    estimates = [StageEstimate("download", 250_000_000, {"task": 150_000_000, "work": 100_000_000}),
                 StageEstimate("convert", 5_000_000_000, {"task": 150_000_000, "tensor": 4_850_000_000},
                               basis="largest tensor lm_head.weight", fix="use workers.heavy_queue"),
                 StageEstimate("smoke", 900_000_000, {"task": 150_000_000, "kv_cache": 750_000_000},
                               fix="free memory where the smoke check runs")]
    memory = WorkerMemory(mem_available=4_000_000_000, budget=800_000_000)
    plan = DeployPlan(model="m", version="v1", adapter_time="t", selected_by="newest", source="s", base_model="b",
                      parameters=1, merge_dtype="fused", quant_types=["Q8_0"], targets=["lmstudio"],
                      memory=memory_entries(estimates, memory, heavy_queue=None), worker_memory=memory.as_record(),
                      largest_layer={"name": "output head", "fp32_bytes": 2_000_000_000}, goal_bytes=5_000_000_000)
    assert [e["fits"] for e in plan.memory] == [True, False, False]
    with pytest.raises(ResourceError) as err:
        require_memory(plan)
    message = str(err.value)
    for phrase in ("cannot be deployed on this kind of worker", "convert needs ~5,000 MB", "largest tensor lm_head",
                   "smoke needs ~900 MB", "budget workers.memory_budget_mb=800", "nothing was started",
                   "Fix: use workers.heavy_queue; free memory where the smoke check runs"):
        assert phrase in message, message
    text = plan.text()
    assert "convert   ~5,000 MB (task 150 + tensor 4,850 MB)  <-- DOES NOT FIT" in text
    assert "goal: 2 GB + 1.5 x the largest layer (output head, 2,000 MB in float32) = 5,000 MB" in text
    assert DeployPlan.from_record(plan.as_record()) == plan

    elsewhere = memory_entries(estimates, memory, heavy_queue="gpu")  # convert is checked on the gpu worker
    assert [e["fits"] for e in elsewhere] == [True, None, False] and elsewhere[1]["where"] == "queue gpu: checked there"
