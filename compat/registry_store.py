"""The model registry's storage: MLflow's own SQLAlchemy registry store, called off the event loop.

The registry is small transactional metadata (version numbers must be unique and
consecutive per model), which ClickHouse cannot give, so it lives in a SQL database
through `mlflow.store.model_registry.sqlalchemy_store.SqlAlchemyStore`: an SQLite file
in the data directory by default, PostgreSQL or MySQL when several nodes share it.

How versions stay unique and consecutive: the store allocates `max(version) + 1` and
the primary key `(name, version)` refuses a duplicate, which it retries. Within a node
every write goes through one lock, so those retries only arise between nodes of a
shared server database; with SQLite, the only writer is this process, and the lock
also keeps SQLite from refusing a second writer ("database is locked").
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST
from mlflow.utils.uri import extract_db_type_from_uri

from trackhouse.ingest.errors import PermanentError

if TYPE_CHECKING:
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

T = TypeVar("T")

#: Registry calls in flight at once, each a worker thread on a pooled connection.
DEFAULT_MAX_CONCURRENCY = 4
REGISTRY_FILE = "registry.db"


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    #: A SQLAlchemy URL: sqlite:///path, postgresql://..., mysql://... (as `mlflow server --registry-store-uri`).
    store_uri: str = field(repr=False)  # may hold a password
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY

    def __post_init__(self) -> None:
        try:  # fails fast on a scheme MLflow's store does not support
            extract_db_type_from_uri(self.store_uri)
        except MlflowException as exc:
            raise ValueError(f"registry store URI: {exc.message}") from None
        if self.max_concurrency < 1:
            raise ValueError("registry max_concurrency must be at least 1")

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> RegistryConfig:
        return cls(f"sqlite:///{(data_dir / REGISTRY_FILE).resolve()}")

    @property
    def is_sqlite(self) -> bool:
        return self.store_uri.startswith("sqlite")

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite file, for a file-backed SQLite URI."""
        path = self.store_uri.removeprefix("sqlite:///") if self.is_sqlite else ""
        return Path(path) if path and path != ":memory:" and "?" not in path else None


class RegistryStore:
    """MLflow's registry store, opened on first use: a fresh database runs MLflow's migrations
    (seconds of CPU), which a server that never touches the registry should not pay."""

    def __init__(self, config: RegistryConfig, *, read_only: bool = False) -> None:
        self._config = config
        #: A reader node (--role reader) serves the registry and refuses to change it, like every other write.
        self.read_only = read_only
        self._store: SqlAlchemyStore | None = None
        self._open_lock = threading.Lock()
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self._write_lock = asyncio.Lock()

    async def read(self, call: Callable[..., T], *args: object, absent: T | None = None, **kwargs: object) -> T:
        """`call(store, *args, **kwargs)` in a worker thread, e.g. `read(SqlAlchemyStore.get_registered_model, n)`.

        `absent`: the answer while the default SQLite file does not exist yet (nothing was ever registered),
        so that the UI's searches on every page never make a server create and migrate it.
        """
        if absent is not None and self._store is None and self._not_created():
            return absent

        def run() -> T:
            return call(self._opened(), *args, **kwargs)

        async with self._slots:
            return await asyncio.to_thread(run)

    async def write(
        self, call: Callable[..., T], *args: object, logged_models: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> T:
        """As `read`, one write at a time on this node. `logged_models` answers the store's questions about the
        logged models a version comes from (see `_LoggedModelsForStore`)."""
        if self.read_only:
            raise PermanentError("this node is read-only (--role reader); send writes to a node that stores")
        async with self._write_lock:
            token = _LOGGED_MODELS.set(logged_models or {})
            try:  # to_thread copies this context into the worker thread
                return await self.read(call, *args, **kwargs)
            finally:
                _LOGGED_MODELS.reset(token)

    def _not_created(self) -> bool:
        path = self._config.sqlite_path
        return path is not None and not path.exists()

    def _opened(self) -> SqlAlchemyStore:
        with self._open_lock:
            if self._store is None:
                self._store = _open(self._config)
            return self._store

    def close(self) -> None:
        with self._open_lock:
            if self._store is not None:
                self._store.engine.dispose()
                type(self._store)._engine_map.pop(self._config.store_uri, None)
                self._store = None


#: The logged models (by id) the current registry write may ask about; set per call by `RegistryStore.write`.
_LOGGED_MODELS: ContextVar[Mapping[str, Any]] = ContextVar(
    "trackhouse_registry_logged_models", default=MappingProxyType({})
)


class _LoggedModelsForStore:
    """Stands in for `MlflowClient` inside MLflow's registry store.

    Registering from `models:/<model_id>` (or with a model_id and no run), the store asks
    `MlflowClient().get_logged_model(id)` for the model's artifact location and source run: in a
    stock server that is its own tracking store, here it would be a client on some default
    tracking URI. The API looks the model up first and hands it over through a context variable.
    """

    def get_logged_model(self, model_id: str) -> Any:
        found = _LOGGED_MODELS.get().get(model_id)
        if found is None:
            raise MlflowException(f"Logged model with ID '{model_id}' not found.", RESOURCE_DOES_NOT_EXIST)
        return found


def _open(config: RegistryConfig) -> SqlAlchemyStore:
    # Imported here: SQLAlchemy, alembic and the store cost seconds to import.
    from mlflow.store.model_registry import sqlalchemy_store
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

    setattr(sqlalchemy_store, "MlflowClient", _LoggedModelsForStore)  # noqa: B010  (replacing MLflow's name)

    if config.sqlite_path is not None:
        config.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
    store = SqlAlchemyStore(config.store_uri)
    if config.is_sqlite:
        # WAL: readers never wait for the one writer, and a commit is one append.
        with store.engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA journal_mode=WAL")
    return store
