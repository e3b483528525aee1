"""Airflow plugin registering the extra links of lora-deploy's Hugging Face tasks (model repo and Space).

Airflow 3 needs operator links registered through a plugin (or provider) so that the API server can rebuild
them from serialized DAGs; the operators attach them with ``operator_extra_links``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from airflow.plugins_manager import AirflowPlugin

from operators.links.huggingface import HFModelRepoLink, HFSpaceLink


class LoraDeployLinksPlugin(AirflowPlugin):
    """Registers the Hugging Face extra links (:mod:`operators.links.huggingface`): model repo and Space."""

    name = "lora_deploy_links"
    operator_extra_links: ClassVar[list[Any]] = [HFModelRepoLink(), HFSpaceLink()]
