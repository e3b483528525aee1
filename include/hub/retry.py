"""Calls to the Hugging Face Hub with bounded retries (429/5xx, honouring Retry-After) and clear errors.

:class:`HubCaller` wraps every ``HfApi`` call of the engine: HTTP 429, 500, 502, 503 and 504 (and dropped
connections) are retried up to ``max_retries`` times, waiting ``Retry-After`` seconds when the Hub sends it
(capped at ``max_wait_s``) or an exponential backoff otherwise: the engine's one retry policy
(:class:`include.retry.RetryPolicy`), with the Hub client's own error classes as what is transient. What is
left becomes a :class:`~include.errors.PublishError` carrying the server's message and a fix: 401/403/404 (and
other 4xx) are not retryable (the Airflow task fails at once), exhausted 429/5xx are (the task's own retries take
over).
The token is scrubbed from every message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from include.errors import LoraDeployError, PublishError, TransientPublishError
from include.retry import RETRY_STATUSES, RetryPolicy

log = logging.getLogger(__name__)
T = TypeVar("T")

TOKEN_FIX = ("create a token with the 'write' role at https://huggingface.co/settings/tokens and set it as the "
             "password of the Airflow connection 'huggingface_default' (or HF_TOKEN)")


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

        def on_retry(failures: int, wait: float, error: BaseException) -> None:
            self.waits.append(wait)
            reason = f"HTTP {_status(error)}" if isinstance(error, HfHubHTTPError) else type(error).__name__
            log.warning("model %r: %s while trying to %s %r; retry %d/%d in %.1f s", self.model, reason, action,
                        repo_id, failures, self.max_retries, wait)

        policy = RetryPolicy(attempts=self.max_retries + 1, base_wait_s=self.base_wait_s, max_wait_s=self.max_wait_s,
                             sleep=self.sleep)
        try:
            return policy.call(lambda: fn(*args, **kwargs), transient=_transient, retry_after=_retry_after,
                               on_retry=on_retry)
        except LoraDeployError:
            raise
        except HfHubHTTPError as e:
            raise self._http_error(e, _status(e), action, repo_id) from e
        except httpx2.TransportError as e:
            raise TransientPublishError(
                self.scrub(f"could not {action} {repo_id!r}: {type(e).__name__}: {e}"), model=self.model,
                fix=f"check that {self.endpoint!r} is reachable from the worker (proxy, DNS, firewall)",
            ) from e
        except (RuntimeError, ValueError, OSError) as e:  # LFS upload failures, invalid README metadata
            cause = f"{e}: {e.__cause__}" if e.__cause__ else str(e)
            raise PublishError(self.scrub(f"could not {action} {repo_id!r}: {cause}"), model=self.model,
                               fix="see the message; retry the task if it was a transient upload error") from e

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


def _status(error: Any) -> int:
    """The HTTP status of a Hub error (0 when it carries no response)."""
    return error.response.status_code if getattr(error, "response", None) is not None else 0


def _transient(error: BaseException) -> bool:
    """A Hub failure worth another try: HTTP 429/5xx, or the link dropped (the Hub client's transport errors)."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        return _status(error) in RETRY_STATUSES
    return isinstance(error, httpx2.TransportError)


def _retry_after(error: BaseException) -> str | None:
    response = getattr(error, "response", None)
    return response.headers.get("Retry-After") if response is not None else None


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
