"""MLflow's handler-level request checks (mlflow.server.handlers), so REST errors carry stock's exact words.

mlflow.server loads Flask and SQLAlchemy on import, which takes seconds, so
`preload` imports it on a background thread as the app is built; only failing
requests need it, and GraphQL (which needs MLflow's schema from the same
package) waits for it on its first query. The server waits for it (`load`)
before it says it is ready: an import holds the GIL for most of its seconds,
and requests answered meanwhile took 5-10x their time (measured in the README).
"""

from __future__ import annotations

import functools
import threading
from types import ModuleType
from typing import Any


def preload() -> None:
    threading.Thread(target=load, name="mlflow-handlers", daemon=True).start()


def load() -> None:
    """Import both now, or wait for the import `preload` began (the import lock makes the two calls one)."""
    handlers()
    graphql_schema()


@functools.cache
def handlers() -> ModuleType:
    import mlflow.server.handlers as module  # slow: see the module docstring

    return module


@functools.cache
def graphql_schema() -> Any:
    """MLflow's graphene schema (mlflow/server/graphql/)."""
    from mlflow.server.graphql.graphql_schema_extensions import schema  # slow: see the module docstring

    return schema


def check_required(value: object, name: str) -> None:
    """Stock's check of a required request field: None and "" are missing."""
    if value is None or value == "":
        module = handlers()
        module._validate_param_against_schema([module._assert_required], name, value)
