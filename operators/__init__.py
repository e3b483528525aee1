"""The Airflow layer of lora-deploy, laid out like an Airflow provider.

- ``hooks/``: the only code that reads Airflow connections (training box over SSH, Vast.ai, Hugging Face Hub);
- ``operators/``: one operator per deploy stage, thin over the engine in ``include/``;
- ``sensors/`` and ``triggers/``: health checks and the Space runtime, with their deferrable waits;
- ``notifiers/``: Slack messages; ``links/``: extra links on task instances.

The public classes can be imported from here, e.g. ``from operators import MergeOperator``; the names
resolve lazily, so importing this package costs nothing.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_PUBLIC = {
    "DeployPlanOperator": "operators.operators.plan",
    "VastAIDownloadOperator": "operators.operators.download",
    "MergeOperator": "operators.operators.merge",
    "GGUFConvertOperator": "operators.operators.gguf",
    "GGUFQuantizeOperator": "operators.operators.gguf",
    "GGUFCollectOperator": "operators.operators.gguf_asset",
    "LMStudioDeployOperator": "operators.operators.lmstudio",
    "LMStudioPromoteOperator": "operators.operators.promote",
    "LMStudioRollbackOperator": "operators.operators.promote",
    "HFSpaceDeployOperator": "operators.operators.hf_space",
    "StoreRetentionOperator": "operators.operators.retention",
    "HealthCheckSensor": "operators.sensors.health",
    "HFSpaceRuntimeSensor": "operators.sensors.hf_space",
    "LiveEndpointTrigger": "operators.triggers.health",
    "HFSpaceRuntimeTrigger": "operators.triggers.hf_space",
    "HFModelRepoLink": "operators.links.huggingface",
    "HFSpaceLink": "operators.links.huggingface",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'operators' has no attribute {name!r}")
    return getattr(import_module(_PUBLIC[name]), name)
