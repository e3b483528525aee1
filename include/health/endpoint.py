"""Checks of a model served through an OpenAI-compatible API (llama.cpp server, LM Studio), over httpx.

- :func:`check_endpoint` is the **live** check: the model is listed by ``GET /v1/models`` and
  ``POST /v1/completions`` returns at least one token; it reports latency and tokens/s.
- :func:`check_chat` is the same through ``POST /v1/chat/completions`` with the model's system prompt (what
  LM Studio users send); :func:`evaluate` turns its figures into named checks against the thresholds.
- :func:`chat_body`, :func:`served_ids`, :func:`chat_report` and :func:`evaluate` are pure: the deferred
  trigger (``operators/triggers/health.py``) sends the same requests with ``httpx.AsyncClient`` and reuses them.

Every request goes through the engine's retry policy (:mod:`include.retry`) within the check's deadline: an answer
of 429/5xx or a refused or dropped connection is tried again (:data:`ENDPOINT_RETRY`); what is left after that
is a :class:`~include.errors.HealthError` naming the request and the fix. The sensors' own poking (a live check
poked until ``timeout_s``) stays around these calls.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx

from include.errors import HealthError
from include.retry import RetryPolicy, send

log = logging.getLogger(__name__)

ANSWER_CHARS = 200
ENDPOINT_RETRY = RetryPolicy(attempts=3, base_wait_s=0.5, max_wait_s=5.0)


def client() -> httpx.Client:
    """The httpx client of the checks (made once per check: making one costs tens of milliseconds)."""
    return httpx.Client(headers={"Accept": "application/json"})


def request_json(http: httpx.Client, url: str, *, body: dict[str, Any] | None, deadline: float,
                 retry: RetryPolicy = ENDPOINT_RETRY) -> dict[str, Any]:
    """GET (body None) or POST JSON to ``url`` before ``deadline`` (monotonic); the decoded JSON object.

    Raises ``httpx.HTTPError`` (an error status included), ``httpx.InvalidURL``, ``ValueError`` (not JSON) or
    ``TypeError`` (JSON but not an object).
    """
    response = send(http, "GET" if body is None else "POST", url, policy=retry, deadline=deadline, json=body)
    response.raise_for_status()
    payload = response.json()
    if not isinstance(payload, dict):
        raise TypeError(f"expected a JSON object, got {type(payload).__name__}")
    return payload


REQUEST_ERRORS = (httpx.HTTPError, httpx.InvalidURL, ValueError, TypeError)


def describe(e: BaseException) -> str:
    """A failed request in a few words: ``HTTP 500 Internal Server Error: <body>`` or ``ConnectError: ...``."""
    if isinstance(e, httpx.HTTPStatusError):
        response = e.response
        return f"HTTP {response.status_code} {response.reason_phrase}: {response.text[:300]}"
    return f"{type(e).__name__}: {e}"


def _fail(base_url: str, what: str, fix: str) -> HealthError:
    return HealthError(f"endpoint {base_url!r}: {what}", fix=fix)


def served_ids(listing: dict[str, Any]) -> list[str]:
    """The model ids of a ``GET /v1/models`` answer."""
    return [str(item.get("id")) for item in listing.get("data", []) if isinstance(item, dict)]


def require_listed(http: httpx.Client, base_url: str, model_id: str, deadline: float, *,
                   retry: RetryPolicy = ENDPOINT_RETRY) -> None:
    """HealthError unless ``GET /v1/models`` answers before ``deadline`` (monotonic) and lists ``model_id``."""
    try:
        listing = request_json(http, f"{base_url.rstrip('/')}/v1/models", body=None, deadline=deadline, retry=retry)
    except REQUEST_ERRORS as e:
        raise _fail(base_url, f"GET /v1/models failed ({describe(e)})",
                    "check that the server is running and the URL (scheme, host, port) is right") from e
    if model_id not in served_ids(listing):
        raise _fail(base_url, f"model {model_id!r} is not listed by /v1/models (served: {served_ids(listing)!r})",
                    "load the model (LM Studio: `lms load`) or check lmstudio.identifier")


def check_endpoint(base_url: str, *, model_id: str, prompt: str, max_tokens: int = 16, timeout_s: float = 60,
                   retry: RetryPolicy = ENDPOINT_RETRY) -> dict[str, Any]:
    """Check that ``model_id`` is served at ``base_url`` and generates; HealthError naming what failed.

    Returns ``{"ok", "endpoint", "model_id", "latency_s", "completion_tokens", "tokens_per_s", "answer"}``.
    """
    base = base_url.rstrip("/")
    with client() as http:
        deadline = time.monotonic() + timeout_s
        require_listed(http, base_url, model_id, deadline, retry=retry)
        body = {"model": model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": False}
        started = time.monotonic()
        try:
            result = request_json(http, f"{base}/v1/completions", body=body, deadline=deadline, retry=retry)
        except REQUEST_ERRORS as e:
            raise _fail(base_url, f"POST /v1/completions for {model_id!r} failed ({describe(e)})",
                        "check the server log; the model may have failed to load or the request timed out") from e
        latency = time.monotonic() - started
    choices = result.get("choices") or [{}]
    answer = str(choices[0].get("text") or "")
    usage = result.get("usage") or {}
    tokens = int(usage.get("completion_tokens") or 0)
    if tokens < 1:
        raise _fail(base_url, f"POST /v1/completions for {model_id!r} returned no tokens "
                              f"(usage {usage!r}, text {answer[:80]!r})",
                    "the model produced end-of-sequence at once or is broken: try another prompt, "
                    "check the GGUF and its tokenizer")
    report = {
        "ok": True,
        "endpoint": base_url,
        "model_id": model_id,
        "latency_s": round(latency, 3),
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / latency, 2) if latency > 0 else None,
        "answer": answer[:ANSWER_CHARS],
    }
    log.info("health %s %s: %d tokens in %.2fs (%s tok/s)", base_url, model_id, tokens, latency,
             report["tokens_per_s"])
    return report


def chat_body(model_id: str, *, system_prompt: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """The OpenAI chat-completions request of a health check (deterministic: temperature 0)."""
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}]
    return {"model": model_id, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": False}


def chat_report(base_url: str, model_id: str, result: dict[str, Any], latency: float) -> dict[str, Any]:
    """The figures of one chat completion: latency, completion tokens, tokens/s and the answer excerpt."""
    choices = result.get("choices") or [{}]
    message = choices[0].get("message") or {}
    answer = str(message.get("content") or choices[0].get("text") or "")
    tokens = int((result.get("usage") or {}).get("completion_tokens") or 0)
    return {"endpoint": base_url, "model_id": model_id, "latency_s": round(latency, 3), "completion_tokens": tokens,
            "tokens_per_s": round(tokens / latency, 2) if latency > 0 else None,
            "answer_excerpt": answer[:ANSWER_CHARS]}


def check_chat(base_url: str, *, model_id: str, system_prompt: str, prompt: str, max_tokens: int = 16,
               timeout_s: float = 60, retry: RetryPolicy = ENDPOINT_RETRY) -> dict[str, Any]:
    """``GET /v1/models`` lists ``model_id`` and ``POST /v1/chat/completions`` answers; HealthError if not.

    Returns :func:`chat_report`'s figures (thresholds are applied by :func:`evaluate`). The latency includes
    the waits of a retried request: it is what a user of the endpoint would have waited.
    """
    base = base_url.rstrip("/")
    with client() as http:
        deadline = time.monotonic() + timeout_s
        require_listed(http, base_url, model_id, deadline, retry=retry)
        body = chat_body(model_id, system_prompt=system_prompt, prompt=prompt, max_tokens=max_tokens)
        started = time.monotonic()
        try:
            result = request_json(http, f"{base}/v1/chat/completions", body=body, deadline=deadline, retry=retry)
        except REQUEST_ERRORS as e:
            raise _fail(base_url, f"POST /v1/chat/completions for {model_id!r} failed ({describe(e)})",
                        "check the server log; the model may have failed to load or the request timed out") from e
        return chat_report(base_url, model_id, result, time.monotonic() - started)


def check(name: str, ok: bool, detail: str) -> dict[str, Any]:
    """One named check of a health report."""
    return {"name": name, "ok": bool(ok), "detail": detail}


def evaluate(figures: dict[str, Any], *, max_latency_s: float, min_tokens_per_s: float,
             min_answer_tokens: int) -> list[dict[str, Any]]:
    """Named checks of a chat report against the thresholds of ``health``."""
    latency, tokens, rate = figures["latency_s"], figures["completion_tokens"], figures["tokens_per_s"] or 0.0
    return [
        check("answer_tokens", tokens >= min_answer_tokens, f"{tokens} tokens (min_answer_tokens {min_answer_tokens})"),
        check("latency", latency <= max_latency_s, f"{latency:.2f} s (max_latency_s {max_latency_s})"),
        check("tokens_per_s", rate >= min_tokens_per_s, f"{rate:.1f} tokens/s (min_tokens_per_s {min_tokens_per_s})"),
    ]
