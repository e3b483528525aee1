"""The Gradio Space of a published model: its files, variables, secret and (when needed) a restart.

:func:`publish_space` creates the Space (``exist_ok``), commits the app rendered from ``include/hub/space_template``
(the Hub skips the commit when nothing changed), sets the variables ``MODEL_REPO``, ``MODEL_FILE``,
``MODEL_REVISION`` and ``SYSTEM_PROMPT`` (only changed ones) and, for a private model repo, the secret
``HF_TOKEN`` (when the Space does not have it yet). When only variables changed the Space is restarted so the
running app picks them up. :func:`space_stage` reads the runtime stage for the sensor and its trigger.
"""

from __future__ import annotations

import logging
from typing import Any

from include.hub.model_card import space_files
from include.hub.retry import HubCaller

log = logging.getLogger(__name__)

ERROR_STAGES = frozenset({"BUILD_ERROR", "RUNTIME_ERROR", "CONFIG_ERROR"})
STOPPED_STAGES = frozenset({"STOPPED", "PAUSED", "DELETING", "NO_APP_FILE"})


def publish_space(api: Any, call: HubCaller, *, model: str, model_repo: str, space_id: str, private: bool,
                  hardware: str, model_file: str, revision: str, system_prompt: str,
                  space_token: str) -> dict[str, Any]:
    """Create or update ``space_id`` to serve ``model_repo``/``model_file`` at ``revision``.

    Returns ``{"space_id", "space_url", "space_commit", "space_action"}`` where ``space_action`` is
    ``created`` (new Space), ``updated`` (new app files), ``restarted`` (only variables changed) or
    ``unchanged``.
    """
    from huggingface_hub import CommitOperationAdd

    created, space_url = call("create the Space", space_id, _create_space, api, space_id, private, hardware)
    before = None if created else call("read the Space", space_id, api.space_info, space_id).sha
    rendered = space_files(model=model, model_repo=model_repo, hardware=hardware, endpoint=api.endpoint)
    ops = [CommitOperationAdd(name, content) for name, content in rendered.items()]
    info = call("commit the app to the Space", space_id, api.create_commit, space_id, ops, repo_type="space",
                commit_message=f"lora-deploy: serve {model_repo}/{model_file}")
    files_changed = created or str(info.oid) != before
    wanted = {"MODEL_REPO": model_repo, "MODEL_FILE": model_file, "MODEL_REVISION": revision,
              "SYSTEM_PROMPT": system_prompt}
    current = {k: v.value for k, v in call("read the variables of the Space", space_id,
                                              api.get_space_variables, space_id).items()}
    changed = sorted(k for k, v in wanted.items() if current.get(k) != v)
    for key in changed:
        call(f"set the variable {key} of the Space", space_id, api.add_space_variable, space_id, key, wanted[key],
             description="set by lora-deploy")
    if private and not _has_secret(api, call, space_id, "HF_TOKEN"):
        call("set the secret HF_TOKEN of the Space", space_id, api.add_space_secret, space_id, "HF_TOKEN",
             space_token, description="read access to the private model repo (lora-deploy)")
        changed.append("HF_TOKEN (secret)")
    if created:
        action = "created"
    elif files_changed:
        action = "updated"
    elif changed:
        call("restart the Space", space_id, api.restart_space, space_id)
        action = "restarted"
    else:
        action = "unchanged"
    log.info("model %r: Space %s %s (serves %s @ %s; changed variables: %s)", model, space_id, action, model_file,
             revision[:12], ", ".join(changed) or "none")
    return {"space_id": space_id, "space_url": str(space_url), "space_commit": str(info.oid), "space_action": action}


def _create_space(api: Any, space_id: str, private: bool, hardware: str) -> tuple[bool, str]:
    """``(created, url)``: create the Space, or find it existing (HTTP 409)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        url = api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private,
                              space_hardware=hardware)
        return True, str(url)
    except HfHubHTTPError as e:
        if e.response is None or e.response.status_code != 409:
            raise
    return False, str(api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private,
                                      space_hardware=hardware, exist_ok=True))


def _has_secret(api: Any, call: HubCaller, space_id: str, key: str) -> bool:
    """Whether the Space has the secret ``key`` (values are write-only; the listing shows keys)."""
    return key in call("read the secrets of the Space", space_id, api.get_space_secrets, space_id)


def space_stage(api: Any, space_id: str) -> tuple[str, str | None]:
    """``(stage, error message)`` of the Space's runtime (``errorMessage`` of an error stage, else None)."""
    runtime = api.get_space_runtime(space_id)
    raw = getattr(runtime, "raw", {}) or {}
    return str(runtime.stage), raw.get("errorMessage")
