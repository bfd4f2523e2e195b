"""The HTTP application: MLflow's REST API and UI, plus /health and the Prometheus /metrics."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from trackhouse.compat.artifact_roots import ArtifactRoots
from trackhouse.compat.artifacts import ArtifactsConfig, artifact_routes, is_upload
from trackhouse.compat.attempts import AttemptsApi
from trackhouse.compat.backend import Backend
from trackhouse.compat.compression import Compression, CompressionConfig
from trackhouse.compat.datasets import DatasetsApi
from trackhouse.compat.experiments import ExperimentsApi
from trackhouse.compat.graphql import GraphQlApi
from trackhouse.compat.limits import BodyLimit, HttpLimits
from trackhouse.compat.logged_models import LoggedModelsApi
from trackhouse.compat.logged_models import artifact_routes as model_artifact_routes
from trackhouse.compat.metrics import MetricsApi
from trackhouse.compat.ranks import RanksApi
from trackhouse.compat.registry import RegistryApi
from trackhouse.compat.registry_store import RegistryStore
from trackhouse.compat.routing import TRACKHOUSE_PREFIXES, mlflow_routes
from trackhouse.compat.runs import RunsApi
from trackhouse.compat.security import SecurityConfig, middleware
from trackhouse.compat.ui import ui_routes


def create_app(
    render_metrics: Callable[[], bytes],
    is_serving: Callable[[], bool],
    backend: Backend | None = None,
    artifacts: ArtifactsConfig | None = None,
    security: SecurityConfig | None = None,
    registry: RegistryStore | None = None,
    limits: HttpLimits | None = None,
    attempts: AttemptsApi | None = None,
    compression: CompressionConfig | None = None,
) -> Starlette:
    async def health(_: Request) -> Response:
        if is_serving():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "stopping"}, status_code=503)

    async def metrics(_: Request) -> Response:
        return Response(render_metrics(), media_type=CONTENT_TYPE_LATEST)

    routes: list[BaseRoute] = [Route("/health", health), Route("/metrics", metrics)]
    if backend is not None:  # a gateway has no storage, so no MLflow API
        roots = artifacts.roots() if artifacts is not None else ArtifactRoots(None)
        experiments = ExperimentsApi(backend, roots)
        datasets = DatasetsApi(backend)
        runs = RunsApi(backend, experiments, datasets)
        endpoints = [*experiments.endpoints(), *runs.endpoints(), *MetricsApi(backend, runs).endpoints()]
        endpoints += datasets.endpoints()
        # MLflow 3 logged models (compat.logged_models) and runs/outputs; runs/log-inputs hands them its models.
        logged_models = LoggedModelsApi(backend, experiments, runs)
        runs.log_model_inputs = logged_models.log_model_inputs
        endpoints += logged_models.endpoints()
        routes += mlflow_routes(endpoints)
        # Model registry (issue 14): MLflow's registry service over MLflow's SQLAlchemy store.
        if registry is not None:
            registry_api = RegistryApi(registry, runs.artifact_uri, logged_models=logged_models)
            routes += mlflow_routes(registry_api.endpoints()) + registry_api.ui_routes()
        if artifacts is not None:
            routes += artifact_routes(artifacts, runs.artifact_uri)
            routes += model_artifact_routes(artifacts, logged_models)
        # --- trackhouse's own read API for distributed runs (issue 16): GET only, so readers may call it. ---
        routes += mlflow_routes(RanksApi(backend).endpoints(), TRACKHOUSE_PREFIXES)
        # --- end of the rank API ---
        # Resume and fork (issue 17): trackhouse's own endpoints; MLflow's resume (runs/update) opens attempts too.
        routes += mlflow_routes((attempts or AttemptsApi(backend)).endpoints(runs), TRACKHOUSE_PREFIXES)
        routes += ui_routes(GraphQlApi())
    # The edge's policy, here and nowhere else, outermost first: Host, CORS and authentication (so nobody
    # unauthenticated gets a body read), compression of the answers, then the body caps (artifact uploads get
    # their own, larger cap).
    stack = middleware(security or SecurityConfig())
    compression = compression or CompressionConfig()
    if compression.mode != "off":
        stack.append(Middleware(Compression, config=compression))
    stack.append(Middleware(BodyLimit, limits=limits or HttpLimits(), is_upload=is_upload))
    return Starlette(routes=routes, middleware=stack)
