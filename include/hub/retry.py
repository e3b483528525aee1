"""Calls to the Hugging Face Hub with bounded retries (429/5xx, honouring Retry-After) and clear errors.

:class:`HubCaller` wraps every ``HfApi`` call of the engine: HTTP 429, 500, 502, 503 and 504 (and dropped
connections) are retried up to ``max_retries`` times, waiting ``Retry-After`` seconds when the Hub sends it
(capped at ``max_wait_s``) or an exponential backoff otherwise. What is left becomes a
:class:`~include.errors.PublishError` carrying the server's message and a fix: 401/403/404 (and other 4xx) are
not retryable (the Airflow task fails at once), exhausted 429/5xx are (the task's own retries take over).
The token is scrubbed from every message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from include.errors import LoraDeployError, PublishError

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
TOKEN_FIX = ("create a token with the 'write' role at https://huggingface.co/settings/tokens and set it as the "
             "password of the Airflow connection 'huggingface_default' (or HF_TOKEN)")


class TransientPublishError(PublishError):
    """The Hub kept answering 429/5xx (or the link dropped) after the in-call retries: the task retries later."""

    retryable = True


class HubCaller:
    """Run Hub calls for one model with retries and error mapping; see the module doc.

    ``secrets`` are removed from messages; ``sleep`` is injectable so tests can record the waits.
    """

    def __init__(self, model: str, *, secrets: tuple[str | None, ...] = (), max_retries: int = 4,
                 base_wait_s: float = 1.0, max_wait_s: float = 60.0, endpoint: str | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.model = model
        self.secrets = tuple(s for s in secrets if s)
        self.max_retries = max_retries
        self.base_wait_s = base_wait_s
        self.max_wait_s = max_wait_s
        self.endpoint = endpoint or "https://huggingface.co"
        self.sleep = sleep
        self.waits: list[float] = []

    def __call__(self, action: str, repo_id: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, retried on 429/5xx; ``action``/``repo_id`` word the error ("create", ...)."""
        import httpx2
        from huggingface_hub.errors import HfHubHTTPError

        attempt = 0
        while True:
            try:
                return fn(*args, **kwargs)
            except LoraDeployError:
                raise
            except HfHubHTTPError as e:
                status = e.response.status_code if e.response is not None else 0
                if status not in RETRY_STATUSES or attempt >= self.max_retries:
                    raise self._http_error(e, status, action, repo_id) from e
                wait = self._wait(attempt, e.response.headers.get("Retry-After") if e.response is not None else None)
                reason = f"HTTP {status}"
            except httpx2.TransportError as e:
                if attempt >= self.max_retries:
                    raise TransientPublishError(
                        self.scrub(f"could not {action} {repo_id!r}: {type(e).__name__}: {e}"), model=self.model,
                        fix=f"check that {self.endpoint!r} is reachable from the worker (proxy, DNS, firewall)",
                    ) from e
                wait, reason = self._wait(attempt, None), type(e).__name__
            except (RuntimeError, ValueError, OSError) as e:  # LFS upload failures, invalid README metadata
                cause = f"{e}: {e.__cause__}" if e.__cause__ else str(e)
                raise PublishError(self.scrub(f"could not {action} {repo_id!r}: {cause}"), model=self.model,
                                   fix="see the message; retry the task if it was a transient upload error") from e
            attempt += 1
            self.waits.append(wait)
            log.warning("model %r: %s while trying to %s %r; retry %d/%d in %.1f s", self.model, reason, action,
                        repo_id, attempt, self.max_retries, wait)
            self.sleep(wait)

    def _wait(self, attempt: int, retry_after: str | None) -> float:
        """Seconds before the next try: Retry-After (delta-seconds) when given, else exponential; capped."""
        if retry_after is not None and retry_after.strip().isdigit():
            return min(float(retry_after.strip()), self.max_wait_s)
        return min(self.base_wait_s * 2 ** attempt, self.max_wait_s)

    def _http_error(self, e: Any, status: int, action: str, repo_id: str) -> PublishError:
        from huggingface_hub.errors import RepositoryNotFoundError

        server = (e.server_message or str(e).splitlines()[0]).strip()
        if isinstance(e, RepositoryNotFoundError) and status not in (401, 403):
            status = 404
        message = self.scrub(f"could not {action} {repo_id!r}: HTTP {status}: {server}")
        kind = TransientPublishError if status in RETRY_STATUSES else PublishError
        return kind(message, model=self.model, fix=fix_for(status, repo_id))

    def scrub(self, text: str) -> str:
        """``text`` with every secret replaced by ``***``."""
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


def fix_for(status: int, repo_id: str) -> str:
    """The fix to print for an HTTP status from the Hub."""
    namespace = repo_id.split("/")[0]
    return {
        401: f"the token was rejected (invalid or expired): {TOKEN_FIX}",
        402: "the Hub asks for payment (a Gradio Space needs a PRO/Team plan or paid hardware); "
             "upgrade, or set hf.space_id to null",
        403: f"the token lacks write access to {namespace!r}: use a token with the 'write' role "
             "(or a fine-grained token with write permission on that namespace)",
        404: f"check the repo id {repo_id!r} (namespace/name) in hf.repo_id / hf.space_id, and that the token's "
             "user or organization owns it",
        409: "another operation changed the repo at the same time: retry the task",
        429: "the Hub rate-limited the token: the task retries later; lower the run frequency if it persists",
    }.get(status, "the Hub failed; the task retries later" if status >= 500 else "see the Hub's message")
