"""HealthCheckSensor and LiveEndpointTrigger against the LM Studio stand-in (real llama.cpp)."""

from __future__ import annotations

import asyncio
import importlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

from include.errors import HealthError
from include.health.endpoint import chat_body
from include.lmstudio.ledger import read_ledger, record_install, update_ledger
from include.store.hashing import sha256_file
from operators.sensors.health import HealthCheckSensor
from operators.triggers.health import LiveEndpointTrigger
from tests.gguf_helpers import tiny_gguf

# Measured on 2 shared cores with two `while True: pass` processes running (worst of 300+ samples):
# - loading the tiny Q8_0 into llama.cpp just in time (the stand-in's first chat): up to 2.6 s. Never timed here:
#   the `served` fixture warms the model (see warm) before any test runs a check.
# - the trigger's first attempt on the warm model (new httpx.AsyncClient, GET /v1/models, POST /v1/chat/completions):
#   up to 0.46 s; a warm POST /v1/chat/completions alone up to 0.07 s; GET /v1/models alone up to 0.04 s.
# Every timeout below leaves at least 5x the time it bounds; WARM_ATTEMPT_S is the worst first attempt. HEALTH's
# timeout_s 5 s (10x) bounds the deferrable test's trigger, trigger()'s default 20 s (40x) a succeeding one, and both
# max_latency_s 30 s (400x the warm POST); startup_timeout_s is never reached (the smoke test fails before serving).
WARM_ATTEMPT_S = 0.46
HEALTH = {"prompt": "Say hello.", "system_prompt": "You are terse.", "max_tokens": 6, "min_answer_tokens": 1,
          "startup_timeout_s": 60, "max_latency_s": 30, "min_tokens_per_s": 0, "mode": "poke", "poke_interval_s": 0.5,
          "timeout_s": 5, "deferrable": False}


@pytest.fixture(scope="module")
def q8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as Q8_0 (built before the lmstudio fixture changes HOME, where the toolchain lives)."""
    root = tmp_path_factory.getbasetemp() / "tiny-gguf"
    root.mkdir(exist_ok=True)
    return tiny_gguf(root, "Q8_0")


@pytest.fixture
def served(q8: Path, lmstudio: Any, tmp_path: Path) -> dict[str, Any]:
    """The tiny Q8_0 installed in the stand-in's tree, loaded as 'tiny' with the stand-in lms, and in a ledger."""
    src = q8
    dest = lmstudio.models_dir / "acme" / "tiny-GGUF" / "tiny-v1-Q8_0.gguf"
    dest.parent.mkdir(parents=True)
    shutil.copy(src, dest)
    item = {"quant": "Q8_0", "path": str(dest), "identifier": "tiny", "bytes": dest.stat().st_size,
            "sha256": sha256_file(dest), "linked": False}
    with update_ledger(tmp_path / "art", "tiny") as ledger:
        record_install(ledger, "v1", adapter_time="2026-11-01T00:00:00Z", files=[item], run_id="r")
    load = ["lms", "load", "acme/tiny-GGUF/tiny-v1-Q8_0.gguf", "--identifier", "tiny", "--gpu", "off", "-y"]
    assert subprocess.run(load, check=False).returncode == 0
    warm(lmstudio, "tiny")
    installed = {"version": "v1", "models_dir": str(lmstudio.models_dir), "installed": [item]}
    return {"installed": installed, "root": str(tmp_path / "art"), "url": lmstudio.url, "stand_in": lmstudio}


def warm(stand_in: Any, model_id: str) -> None:
    """Load ``model_id`` into the stand-in's llama.cpp (LM Studio's just-in-time load) with one untimed chat.

    Called in-process, not over HTTP: it is not a request of the code under test (``stand_in.requests`` stays empty).
    """
    body = chat_body(model_id, system_prompt="You are terse.", prompt="Say hello.", max_tokens=1)
    status, payload = stand_in.chat(body)
    assert status == 200, payload


def trigger(url: str, model_id: str = "tiny", **over: Any) -> LiveEndpointTrigger:
    kwargs = {"base_url": url, "model_id": model_id, "system_prompt": "You are terse.", "prompt": "Say hello.",
              "max_tokens": 6, "max_latency_s": 30.0, "min_tokens_per_s": 0.0, "min_answer_tokens": 1,
              "timeout_s": 20.0, "poke_interval_s": 0.5, **over}
    return LiveEndpointTrigger(**kwargs)


async def first_event(t: LiveEndpointTrigger) -> dict[str, Any]:
    async for event in t.run():
        return event.payload
    raise AssertionError("the trigger yielded no event")


def test_trigger_serializes_to_json_and_rebuilds(served: dict) -> None:
    path, kwargs = trigger(served["url"]).serialize()
    module, name = path.rsplit(".", 1)
    rebuilt = getattr(importlib.import_module(module), name)(**json.loads(json.dumps(kwargs)))
    assert rebuilt.serialize() == (path, kwargs)


def test_trigger_succeeds_against_lm_studio(served: dict) -> None:
    event = asyncio.run(first_event(trigger(served["url"])))
    assert event["ok"] is True and event["error"] is None and event["attempts"] == 1
    assert event["figures"]["completion_tokens"] >= 1 and [c["ok"] for c in event["checks"]] == [True] * 3
    assert served["stand_in"].loads == [("tiny", served["installed"]["installed"][0]["path"])]


def test_trigger_times_out_with_the_last_error(served: dict) -> None:
    # Polls every 0.25 s for 3 s: the first attempt (<= WARM_ATTEMPT_S) has 2.75 s to end for a second one to start
    # (6x); the last attempt starts before the deadline and gets >= 0.5 s for its GET (12x the measured 0.04 s).
    # So waited_s is in [timeout - poke interval, timeout + one attempt]; the upper bound allows 6x WARM_ATTEMPT_S.
    timeout_s, poke_s = 3.0, 0.25
    event = asyncio.run(first_event(trigger(served["url"], model_id="not-loaded", timeout_s=timeout_s,
                                            poke_interval_s=poke_s)))
    assert event["ok"] is False and event["attempts"] >= 2
    assert "'not-loaded' is not listed by /v1/models" in event["error"]
    assert timeout_s - poke_s <= event["waited_s"] < timeout_s + 6 * WARM_ATTEMPT_S
    # One attempt (poke interval = timeout) that answers too slowly for min_tokens_per_s; the model is warm and the
    # attempt has the whole 3 s (6.5x WARM_ATTEMPT_S), so the last error is the rate check, never a ReadTimeout.
    slow = asyncio.run(first_event(trigger(served["url"], min_tokens_per_s=1e9, timeout_s=3.0, poke_interval_s=3.0)))
    assert slow["ok"] is False and slow["attempts"] == 1
    assert "min_tokens_per_s" in slow["error"] and slow["figures"]["latency_s"] > 0


def sensor(served: dict, *, phase: str = "live", promoted: Any = None, **settings: Any) -> HealthCheckSensor:
    conf = {"endpoint": served["url"], "quant": None, **HEALTH, **settings}
    return HealthCheckSensor(task_id=phase, model="tiny", installed=served["installed"], phase=phase,
                             settings=conf, artifact_root=served["root"],
                             promoted={"promoted": True, "version": "v1"} if promoted is None else promoted)


def test_deferrable_live_check_defers_with_a_serializable_trigger(served: dict) -> None:
    served["stand_in"].set_fail("tiny", "error")  # the sensor's own first check fails: it defers
    with pytest.raises(TaskDeferred) as deferred:
        sensor(served, deferrable=True).execute({})
    assert deferred.value.method_name == "execute_complete"
    path, kwargs = deferred.value.trigger.serialize()
    assert path == "operators.triggers.health.LiveEndpointTrigger" and json.loads(json.dumps(kwargs)) == kwargs
    assert kwargs["model_id"] == "tiny" and kwargs["timeout_s"] == 5.0
    served["stand_in"].set_fail("tiny", None)  # healthy again: the trigger's first attempt passes
    event = asyncio.run(first_event(deferred.value.trigger))
    report = sensor(served).execute_complete({}, event)
    assert report["ok"] and report["phase"] == "live" and report["tokens_per_s"] > 0


def test_deferrable_live_check_of_a_healthy_endpoint_passes_without_the_triggerer(served: dict) -> None:
    report = sensor(served, deferrable=True).execute({})  # no TaskDeferred: its own first check passed
    assert report["ok"] and report["phase"] == "live" and report["endpoint"] == served["url"]
    assert len([r for r in served["stand_in"].requests if r["path"].startswith("/v1/chat")]) == 1


def test_failed_trigger_event_fails_the_task_and_is_recorded(served: dict) -> None:
    # One attempt (poke interval = timeout) with the whole 3 s for its GET (6.5x WARM_ATTEMPT_S).
    event = asyncio.run(first_event(trigger(served["url"], model_id="gone", timeout_s=3.0, poke_interval_s=3.0)))
    with pytest.raises(AirflowFailException, match=r"model 'tiny': live check failed: .*'gone' is not listed"):
        sensor(served).execute_complete({}, event)
    ledger = read_ledger(served["root"], "tiny")
    assert ledger["events"][-1]["action"] == "health_failed"
    assert ledger["versions"]["v1"]["health"][-1]["ok"] is False
    with pytest.raises(AirflowFailException, match="unexpected event"):
        sensor(served).execute_complete({}, {"status": "?"})


def test_poked_live_check_times_out_with_figures(served: dict) -> None:
    # The stand-in sleeps 1.5 s before answering, so the latency is >= 1.5 s > max_latency_s by construction; the
    # sensor checks its 1 s timeout after each poke, so it gives up right after the first one (whose chat has
    # check_chat's 60 s, 30x the measured 1.5 s + WARM_ATTEMPT_S), with that poke's figures.
    served["stand_in"].set_fail("tiny", "slow:1.5")
    with pytest.raises(AirflowFailException, match=r"live check failed: latency: \d+\.\d+ s \(max_latency_s 1"):
        sensor(served, max_latency_s=1.0, timeout_s=1).execute({})


def test_live_check_is_skipped_without_endpoint_or_promotion(served: dict) -> None:
    assert sensor(served, endpoint=None).execute({})["skipped"] == "no lmstudio.endpoint configured"
    skipped = sensor(served, promoted={"promoted": False, "reason": "adapter time is not newer"}).execute({})
    assert skipped == {"ok": True, "phase": "live", "skipped": "this run's version was not made current "
                                                               "(adapter time is not newer)"}


def test_smoke_check_rejects_a_changed_file_without_serving_it(served: dict) -> None:
    path = Path(served["installed"]["installed"][0]["path"])
    with path.open("r+b") as handle:
        handle.seek(200)
        handle.write(b"\x00corrupt")
    with pytest.raises(HealthError, match=r"model 'tiny': smoke check failed: sha256: .*\(record: "):
        sensor(served, phase="smoke").execute({})
    report = read_ledger(served["root"], "tiny")["versions"]["v1"]["health"][-1]
    assert [c["name"] for c in report["checks"]] == ["size", "gguf_magic", "gguf_version", "sha256"]
