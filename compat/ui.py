"""The stock MLflow UI, served from the installed package's static build, and the calls its pages make.

trackhouse has no traces, gateway, evaluation datasets, issues,
scorers or assistant. The UI asks for them on most pages, so those calls get
the answers a stock server gives with nothing stored (recorded from MLflow
3.17 behind a proxy), and the UI shows empty lists instead of errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from trackhouse.compat import wire
from trackhouse.compat.graphql import GraphQlApi
from trackhouse.compat.routing import guarded

# Located without importing mlflow.server, which would load Flask and SQLAlchemy for nothing.
BUILD_DIR = Path(mlflow.__file__).parent / "server" / "js" / "build"

SERVER_INFO = {
    "store_type": "SqlStore",
    "workspaces_enabled": False,
    "trace_archival_enabled": False,
    "multipart_uploads_enabled": False,
    "multipart_downloads_enabled": False,
    "presigned_upload_run_id_supported": False,
    "presigned_upload_model_id_supported": False,
    "features_enabled": {"gateway": False},
}

#: (path, methods, answer) for features trackhouse does not have. `{}` is protobuf's empty message:
#: no results and no page token. Both MLflow prefixes are served; the client uses /api, the UI /ajax-api.
_EMPTY: tuple[tuple[str, tuple[str, ...], dict[str, Any]], ...] = (
    ("2.0/mlflow/gateway-proxy", ("GET", "POST"), {"endpoints": []}),
    ("2.0/mlflow/traces", ("GET",), {}),
    ("3.0/mlflow/traces", ("GET",), {}),
    ("3.0/mlflow/traces/search", ("POST",), {}),
    ("3.0/mlflow/traces/metrics", ("POST",), {}),
    ("3.0/mlflow/issues/search", ("POST",), {"next_page_token": ""}),
    ("3.0/mlflow/datasets/search", ("POST",), {}),
    ("3.0/mlflow/scorers/list", ("GET",), {}),
    ("3.0/mlflow/gateway/endpoints/list", ("GET",), {}),
    (
        "3.0/mlflow/ui-telemetry",
        ("GET",),
        {"disable_ui_events": [], "disable_ui_telemetry": True, "ui_rollout_percentage": 0},
    ),
    ("3.0/mlflow/ui-telemetry", ("POST",), {}),
    ("3.0/mlflow/assistant/config", ("GET",), {"providers": {}, "projects": {}, "remote_access_allowed": False}),
    ("3.0/mlflow/assistant/providers", ("GET",), {"providers": [], "resolved": None, "gateway_vendor_options": {}}),
    ("3.0/mlflow/server-info", ("GET",), SERVER_INFO),
)


def ui_routes(graphql: GraphQlApi) -> list[BaseRoute]:
    async def index(_: Request) -> Response:
        return FileResponse(BUILD_DIR / "index.html")

    async def version(_: Request) -> Response:
        return PlainTextResponse(mlflow.__version__)

    routes: list[BaseRoute] = [
        Route("/", index),
        Route("/version", version),
        Route("/graphql", guarded(graphql.handle), methods=["POST"]),
        Route("/ajax-api/graphql", guarded(graphql.handle), methods=["POST"]),
    ]
    for path, methods, answer in _EMPTY:
        for prefix in ("/api/", "/ajax-api/"):
            routes.append(Route(prefix + path, _constant(answer), methods=list(methods)))
    # Last: the build's hashed assets, as a stock server serves them.
    routes.append(Mount("/static-files", StaticFiles(directory=BUILD_DIR)))
    return routes


def _constant(answer: dict[str, Any]) -> Any:
    async def endpoint(_: Request) -> Response:
        return wire.ok(answer)

    return endpoint
