"""Backfills, no-op re-publishes, retries and Space actions of include.hub.publish against the Hub stand-in.

Every test uses the ``hub`` fixture, which asserts after the test that no request hit an unknown route.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from huggingface_hub import HfApi

from include.errors import ConfigError, PublishError, TransientPublishError
from include.hub.publish import STATE_FILE, HubTarget, publish_model
from include.hub.retry import HubCaller
from include.hub.space import space_stage
from include.store.hashing import sha256_file
from tests.stand_ins.hf_hub import HubStandIn

MODEL = "majora"
CARD = {"base_model": "Qwen/Qwen2.5-0.5B-Instruct", "adapter_source": "ssh://box/out/checkpoint-20"}
T1, T2 = "2026-11-01T03:00:00+00:00", "2026-11-02T03:00:00+00:00"


@pytest.fixture
def make_ggufs(tmp_path: Path) -> Callable[..., list[dict]]:
    """Fake GGUF files (binary, so LFS) with full quant records, distinct per ``salt``."""

    def make(salt: str = "", quants: tuple[str, ...] = ("Q4_K_M", "Q8_0")) -> list[dict]:
        records = []
        for i, quant in enumerate(quants):
            path = tmp_path / f"{quant}-{salt}.gguf"
            path.write_bytes(b"GGUF\x03\x00\x00\x00" + salt.encode() + quant.encode() * (400 + 100 * i))
            records.append({"quant": quant, "path": str(path), "bytes": path.stat().st_size,
                            "sha256": sha256_file(path), "bits_per_weight": 4.85 + i * 3.65,
                            "perplexity": 12.5 + i, "perplexity_f16": 12.0, "ppl_ratio": (12.5 + i) / 12.0})
        return records

    return make


def target(hub: HubStandIn, *, space: bool = True, **kwargs: object) -> HubTarget:
    """A target in the stand-in user's namespace (no waits between retries beyond what a test records)."""
    return HubTarget(repo_id=f"{hub.user}/{MODEL}-GGUF", space_id=f"{hub.user}/{MODEL}-chat" if space else None,
                     private=False, token=hub.token, endpoint=hub.url, **kwargs)  # type: ignore[arg-type]


def publish(hub: HubStandIn, version: str, ggufs: list[dict], when: str | None, **kwargs: object) -> dict:
    """publish_model with recorded (not slept) retry waits in ``hub.waits``."""
    waits = getattr(hub, "waits", [])
    hub.waits = waits  # type: ignore[attr-defined]
    return publish_model(model=MODEL, version=version, target=target(hub, **kwargs), ggufs=ggufs, card=CARD,
                         adapter_time=when, sleep=waits.append)


def test_backfilling_an_older_version_tags_it_without_moving_main_or_the_space(hub, make_ggufs):
    newer = publish(hub, "checkpoint-40", make_ggufs("new"), T2)
    repo, space = hub.repo(newer["repo_id"]), hub.repo(newer["space_id"], "space")
    main_before, space_commits, variables = repo.head.oid, len(space.commits), dict(space.variables)

    older_files = make_ggufs("old")
    older = publish(hub, "checkpoint-20", older_files, T1)

    assert newer["main_moved"] and not older["main_moved"] and older["space_action"] is None
    assert repo.head.oid == main_before, "a backfill must not move main"
    assert repo.tags["v-checkpoint-20"] == older["commit"] != main_before
    assert repo.tags["v-checkpoint-40"] == main_before
    tagged = repo.resolve("v-checkpoint-20")
    assert tagged.files[f"{MODEL}-Q4_K_M.gguf"].content == Path(older_files[0]["path"]).read_bytes()
    assert json.loads(tagged.files[STATE_FILE].content) == {
        "version": "checkpoint-20", "adapter_time": T1, "model": MODEL,
        "files": {f"{MODEL}-{f['quant']}.gguf": f["sha256"] for f in older_files}}
    assert json.loads(repo.files[STATE_FILE])["version"] == "checkpoint-40"
    assert "checkpoint-20" in tagged.files["README.md"].content.decode()
    assert list(repo.branches) == ["main"], "the temporary backfill branch is removed"
    assert len(space.commits) == space_commits and space.variables == variables


def test_same_version_twice_is_a_no_op(hub, make_ggufs):
    ggufs = make_ggufs("a")
    first = publish(hub, "checkpoint-20", ggufs, T1)
    repo = hub.repo(first["repo_id"])
    commits, before = len(repo.commits), len(hub.requests)

    again = publish(hub, "checkpoint-20", ggufs, T1)

    assert again == {**first, "main_moved": False, "space_action": None}
    assert len(repo.commits) == commits and repo.tags == {"v-checkpoint-20": first["commit"]}
    methods = {m for m, _ in hub.requests[before:]}
    assert methods <= {"GET", "POST"} and not any("/commit/" in p or "lfs" in p for _, p in hub.requests[before:])


def test_newer_version_moves_main_and_restarts_the_space_when_only_variables_changed(hub, make_ggufs):
    ggufs = make_ggufs("a")
    first = publish(hub, "checkpoint-20", ggufs, T1)
    space = hub.repo(first["space_id"], "space")
    app_commits = len(space.commits)

    second = publish(hub, "checkpoint-40", ggufs, T2)  # same GGUFs, new version: only MODEL_REVISION changes

    assert first["space_action"] == "created" and second["space_action"] == "restarted"
    assert second["main_moved"] and len(space.commits) == app_commits, "the app files did not change"
    assert space.variables["MODEL_REVISION"]["value"] == second["commit"] == hub.repo(first["repo_id"]).head.oid
    assert space.restarts == 1
    third = publish(hub, "checkpoint-60", make_ggufs("b"), "2026-11-03T03:00:00Z", system_prompt="Be terse.")
    assert third["space_action"] == "restarted" and space.variables["SYSTEM_PROMPT"]["value"] == "Be terse."


def test_space_serves_the_configured_quant_and_private_repos_get_the_secret(hub, make_ggufs):
    record = publish_model(model=MODEL, version="1", target=HubTarget(
        repo_id=f"{hub.user}/{MODEL}-GGUF", space_id=f"{hub.user}/{MODEL}-chat", private=True, token=hub.token,
        endpoint=hub.url, space_quant="Q8_0"), ggufs=make_ggufs("a"), card=CARD, adapter_time=T1)

    space = hub.repo(record["space_id"], "space")
    assert space.variables["MODEL_FILE"]["value"] == f"{MODEL}-Q8_0.gguf"
    assert set(space.secrets) == {"HF_TOKEN"} and space.private


def test_unknown_space_quant_fails_before_any_request(hub, make_ggufs):
    with pytest.raises(ConfigError, match=r"hf.space_quant 'Q2_K' is not among"):
        publish(hub, "1", make_ggufs("a"), T1, space_quant="Q2_K")
    assert hub.requests == []


def test_model_card_has_real_bits_per_weight_perplexity_and_fidelity(hub, make_ggufs):
    ggufs = make_ggufs("a")
    card = {**CARD, "health": {"latency_s": 0.5, "tokens_per_s": 40.0},
            "converted": {"llama_cpp": "b4567", "fidelity": {"max_abs_diff": 0.0123, "mean_kl": 0.00042}}}
    publish_model(model=MODEL, version="checkpoint-20", target=target(hub, space=False), ggufs=ggufs, card=card,
                  adapter_time=T1)

    readme = hub.repo(f"{hub.user}/{MODEL}-GGUF").files["README.md"].decode()
    row = next(line for line in readme.splitlines() if line.startswith(f"| [{MODEL}-Q8_0.gguf]"))
    assert re.search(r"\| 8\.50 \| 13\.500 \| x1\.125 \|", row), row
    assert "f16: 12.000" in readme and "b4567" in readme and "mean KL 0.00042" in readme
    assert f"Adapter time: `{T1}`" in readme and "| 0.50 | 40.00 |" in readme


def test_429_with_retry_after_then_success(hub, make_ggufs):
    hub.fail_next("POST", r"/commit/main$", 429, headers={"Retry-After": "3"}, message="Too many requests")

    record = publish(hub, "1", make_ggufs("a"), T1, space=False)

    assert hub.waits == [3.0]
    assert [s for m, p, s in hub.responses if p.endswith("/commit/main")] == [429, 200]
    assert hub.repo(record["repo_id"]).head.oid == record["commit"]


def test_503_then_success_backs_off(hub, make_ggufs):
    hub.fail_next("POST", r"/api/repos/create$", 503, times=2, message="Service Unavailable")

    record = publish(hub, "1", make_ggufs("a"), T1, space=False)

    assert hub.waits == [1.0, 2.0] and record["main_moved"]


def test_429_that_persists_is_a_retryable_error_after_max_retries(hub, make_ggufs):
    hub.fail_next("GET", r"/refs$", 429, times=10, headers={"Retry-After": "1"}, message="rate limited")

    with pytest.raises(TransientPublishError, match=r"HTTP 429: rate limited.*Fix: the Hub rate-limited") as caught:
        publish(hub, "1", make_ggufs("a"), T1, space=False, max_retries=2)
    assert caught.value.retryable and hub.waits == [1.0, 1.0]


def test_retry_after_is_capped(hub):
    caller = HubCaller(MODEL, max_retries=1, max_wait_s=5, sleep=lambda s: None)
    hub.fail_next("GET", r"/api/whoami-v2$", 429, headers={"Retry-After": "3600"})

    HfApi(endpoint=hub.url, token=hub.token)
    caller("ask who am I at", "hub", HfApi(endpoint=hub.url, token=hub.token).whoami)

    assert caller.waits == [5]


@pytest.mark.parametrize("status", [401, 403, 404])
def test_auth_and_not_found_errors_fail_fast_with_the_server_message_and_a_fix(hub, status):
    caller = HubCaller(MODEL, secrets=("hf_bad_token_123",), sleep=lambda s: pytest.fail("must not retry"))
    api = HfApi(endpoint=hub.url, token={401: "hf_bad_token_123", 403: hub.read_token, 404: hub.token}[status])
    action = (lambda: api.create_repo(f"{hub.user}/x")) if status != 404 else (lambda: api.model_info("nobody/x"))

    with pytest.raises(PublishError) as caught:
        caller("reach", f"{hub.user}/x", action)

    text = str(caught.value)
    assert not caught.value.retryable and f"HTTP {status}" in text and "hf_bad_token_123" not in text
    assert {401: "Invalid credentials", 403: "write access", 404: "check the repo id"}[status] in text


def test_space_runtime_stages_and_build_error_message(hub, make_ggufs):
    hub.space_build_stages = ["BUILDING", "BUILD_ERROR"]
    hub.space_error_message = "pip failed: no matching distribution for llama-cpp-python"
    record = publish(hub, "1", make_ggufs("a"), T1)
    api = HfApi(endpoint=hub.url, token=hub.token)

    assert space_stage(api, record["space_id"]) == ("BUILDING", None)
    assert space_stage(api, record["space_id"]) == ("BUILD_ERROR", hub.space_error_message)


def test_token_is_not_in_logs_records_or_any_uploaded_file(hub, make_ggufs, caplog):
    caplog.set_level("DEBUG")
    hub.fail_next("POST", r"/commit/main$", 503)
    records = [publish_model(model=MODEL, version=v, target=HubTarget(
        repo_id=f"{hub.user}/{MODEL}-GGUF", space_id=f"{hub.user}/{MODEL}-chat", private=True, token=hub.token,
        endpoint=hub.url), ggufs=make_ggufs(v), card=CARD, adapter_time=t, sleep=lambda s: None)
        for v, t in (("2", T2), ("1", T1))]

    assert "retry 1/4" in caplog.text and "backfilling" in caplog.text
    assert hub.token not in caplog.text and hub.token not in json.dumps(records)
    for repo in hub.repos.values():
        for commit in repo.commits:
            for path, blob in commit.files.items():
                assert hub.token.encode() not in blob.content, f"token in {repo.repo_id}/{path}"
        assert all(hub.token not in v["value"] for v in repo.variables.values())
    assert hub.token not in "".join(hub.lfs_objects[k].decode("latin-1") for k in hub.lfs_objects)
