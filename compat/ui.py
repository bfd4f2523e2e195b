"""The stock MLflow UI, served from the installed package's static build, and the calls it makes on every page.

trackhouse has no traces, logged models, registry, gateway or assistant, so
those calls get MLflow's own empty answers (recorded from a stock server),
and the UI shows empty lists instead of errors.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from compat import wire
from compat.backend import Backend

# Located without importing mlflow.server, which would load Flask and SQLAlchemy for nothing.
BUILD_DIR = Path(mlflow.__file__).parent / "server" / "js" / "build"


def ui_routes(backend: Backend) -> list[BaseRoute]:
    del backend  # the GraphQL queries read through it; see compat.graphql

    async def index(_: Request) -> Response:
        return FileResponse(BUILD_DIR / "index.html")

    async def version(_: Request) -> Response:
        return PlainTextResponse(mlflow.__version__)

    async def server_info(_: Request) -> Response:
        return wire.ok({"store_type": "SqlStore", "workspaces_enabled": False})

    return [
        Route("/", index),
        Route("/version", version),
        Route("/ajax-api/3.0/mlflow/server-info", server_info),
        Mount("/static-files", StaticFiles(directory=BUILD_DIR)),
    ]
