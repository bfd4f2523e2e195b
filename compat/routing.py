"""Mounting MLflow endpoints under both of MLflow's prefixes, with errors mapped at the edge."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from trackhouse.compat.errors import to_response

Handler = Callable[[Request], Awaitable[Response]]
#: (path below the prefix, HTTP method, handler)
Endpoint = tuple[str, str, Handler]

#: The MLflow client calls /api, the UI calls /ajax-api; both get the same answers.
PREFIXES = ("/api/2.0/mlflow/", "/ajax-api/2.0/mlflow/")
#: trackhouse's own API (ranks, attempts, forks), beside MLflow's and served the same way.
TRACKHOUSE_PREFIXES = ("/api/2.0/trackhouse/", "/ajax-api/2.0/trackhouse/")


def guarded(handler: Handler) -> Handler:
    """Turn any error into MLflow's error JSON, so a client never sees an HTML traceback."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as exc:  # mapped once, in compat.errors
            return to_response(exc)

    return endpoint


def mlflow_routes(endpoints: Iterable[Endpoint], prefixes: Iterable[str] = PREFIXES) -> list[Route]:
    by_path: dict[str, dict[str, Handler]] = {}
    for path, method, handler in endpoints:
        by_path.setdefault(path, {})[method] = handler
    routes = []
    for prefix in prefixes:
        for path, methods in by_path.items():
            routes.append(Route(prefix + path, _dispatch(methods), methods=list(methods)))
    return routes


def _dispatch(methods: dict[str, Handler]) -> Handler:
    guarded_methods = {method: guarded(handler) for method, handler in methods.items()}
    if len(guarded_methods) == 1:
        return next(iter(guarded_methods.values()))

    async def endpoint(request: Request) -> Response:
        return await guarded_methods[request.method](request)

    return endpoint
