"""The Deployments page's FastAPI app: a static page plus three JSON endpoints, behind an injected auth check.

No Airflow import here: the plugin (``plugins/lora_deploy_deployments.py``) passes Airflow's ``get_user``
dependency and an authorizer backed by Airflow's auth manager, so the same app is testable with any user
dependency. Mounted by the api-server under ``/lora-deploy``:

- ``GET /lora-deploy/`` - the page (static HTML + JS, no data in it);
- ``GET /lora-deploy/signin`` - sets Airflow's ``_token`` cookie from ``#token=<jwt>`` (for scripts/headless);
- ``GET /lora-deploy/api/models`` - :func:`include.deployments.view.list_models`;
- ``GET /lora-deploy/api/models/{model}`` - :func:`include.deployments.view.model_detail`;
- ``GET /lora-deploy/api/models/{model}/history`` - :func:`include.deployments.view.model_history`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import HTMLResponse

from include.config.loader import load_config
from include.config.model import LoadedConfig
from include.deployments import view as view
from include.errors import LoraDeployError

PAGE_DIR = Path(__file__).resolve().parent
Authorizer = Callable[[Any, str], bool]


def _allow_all(user: Any, dag_id: str) -> bool:
    return True


def create_app(user_dependency: Callable[..., Any], *, can_read: Authorizer = _allow_all,
               config_loader: Callable[[], LoadedConfig] = load_config) -> FastAPI:
    """Build the app. ``user_dependency`` must raise 401/403 for anonymous callers; ``can_read(user, dag_id)``
    decides per model (by its ``deploy_<model>`` DAG) whether the user may see it."""
    app = FastAPI(title="lora-deploy Deployments", version="1",
                  description="Models, versions, sizes and health from the lora-deploy deployments ledgers.")

    def config() -> LoadedConfig:
        try:
            return config_loader()
        except LoraDeployError as err:
            raise HTTPException(status_code=500, detail=str(err)) from err

    def readable(user: Any, loaded: LoadedConfig, model: str) -> None:
        if model not in loaded.models:
            raise HTTPException(status_code=404, detail=str(view.UnknownModelError(
                f"model {model!r} is not configured; configured models: {sorted(loaded.models)}")))
        if not can_read(user, loaded.models[model].dag_id):
            raise HTTPException(status_code=403, detail=f"you may not read the DAG {loaded.models[model].dag_id}")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse((PAGE_DIR / "index.html").read_text(encoding="utf-8"))

    @app.get("/signin", response_class=HTMLResponse, include_in_schema=False)
    def signin() -> HTMLResponse:
        return HTMLResponse((PAGE_DIR / "signin.html").read_text(encoding="utf-8"))

    @app.get("/api/models", summary="Every configured model with its current version and latest health")
    def models(user: Any = Depends(user_dependency)) -> dict[str, Any]:  # noqa: B008
        loaded = config()
        allowed = {name for name, model in loaded.models.items() if can_read(user, model.dag_id)}
        return view.list_models(loaded, allowed)

    @app.get("/api/models/{model}", summary="One model's versions (newest first) with files, health and events")
    def model(model: str, user: Any = Depends(user_dependency)) -> dict[str, Any]:  # noqa: B008
        loaded = config()
        readable(user, loaded, model)
        return view.model_detail(loaded, model)

    @app.get("/api/models/{model}/history", summary="Chart series across versions (oldest first)")
    def history(model: str, user: Any = Depends(user_dependency)) -> dict[str, Any]:  # noqa: B008
        loaded = config()
        readable(user, loaded, model)
        return view.model_history(loaded, model)

    return app
