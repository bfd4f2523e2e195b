"""The HTTP application. This issue serves `/health` and the Prometheus `/metrics`; MLflow's API joins later."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def create_app(render_metrics: Callable[[], bytes], is_serving: Callable[[], bool]) -> Starlette:
    async def health(_: Request) -> Response:
        if is_serving():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "stopping"}, status_code=503)

    async def metrics(_: Request) -> Response:
        return Response(render_metrics(), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/health", health), Route("/metrics", metrics)])
