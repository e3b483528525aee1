"""Airflow plugin: the lora-deploy Deployments page (nav entry "Deployments") and its JSON API under /lora-deploy.

Thin layer: the app and the page live in :mod:`include.deployments.page`, the data in
:mod:`include.deployments.view`. This module only wires them to Airflow: the api-server mounts the FastAPI
app, and every JSON endpoint requires an Airflow user (bearer JWT or the UI's ``_token`` cookie, checked by
Airflow's own ``get_user``) allowed to read the model's ``deploy_<model>`` DAG.
"""

from __future__ import annotations

from typing import Any, ClassVar

from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from include.deployments.page.app import create_app

URL_PREFIX = "/lora-deploy"
_bearer = HTTPBearer(auto_error=False)


async def airflow_user(request: Request,
                       bearer: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Any:  # noqa: B008
    """The Airflow user of the request, resolved by Airflow's own ``get_user`` (bearer JWT first, else the
    ``_token`` cookie); 401 without credentials, 403 for an invalid token.

    Airflow's API modules are imported here, not at module level: every Airflow process loads plugins, and only
    the api-server serves this app (importing them costs ~2 s).
    """
    from airflow.api_fastapi.core_api.security import get_user

    return await get_user(request, None, bearer)


def can_read_dag(user: Any, dag_id: str) -> bool:
    """Whether Airflow's auth manager lets ``user`` read the DAG ``dag_id``."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails

    return get_auth_manager().is_authorized_dag(method="GET", user=user, details=DagDetails(id=dag_id))


deployments_app = create_app(airflow_user, can_read=can_read_dag)


class LoraDeployDeploymentsPlugin(AirflowPlugin):
    """Registers the Deployments FastAPI app and its nav entry in the Airflow UI."""

    name = "lora_deploy_deployments"
    fastapi_apps: ClassVar[list[dict[str, Any]]] = [
        {"app": deployments_app, "url_prefix": URL_PREFIX, "name": "lora-deploy deployments"},
    ]
    external_views: ClassVar[list[dict[str, Any]]] = [{
        "name": "Deployments",
        "href": f"{URL_PREFIX}/",
        "destination": "nav",
        "url_route": "lora-deploy-deployments",
        "category": "browse",
    }]
