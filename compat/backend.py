"""What the MLflow API runs on: a small pool of read clients, and the write pipeline when this node stores.

Reads are blocking clickhouse-connect calls, so they run in worker threads,
each on a client of its own; the pool size bounds concurrent queries.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Concatenate, ParamSpec, TypeVar

from trackhouse.ingest.batch import Batch
from trackhouse.ingest.codec import DecodedRequest
from trackhouse.ingest.errors import PermanentError
from trackhouse.ingest.pipeline import WritePipeline
from trackhouse.query.connection import Client

P = ParamSpec("P")
T = TypeVar("T")

#: REST writers wait for each call, so their writes skip most of the batching delay.
DEFAULT_REST_FLUSH_MS = 5


@dataclass(frozen=True, slots=True)
class BackendConfig:
    database: str
    #: How long a REST write may wait for others to share its insert.
    rest_flush_ms: int = DEFAULT_REST_FLUSH_MS


class Backend:
    def __init__(self, clients: list[Client], config: BackendConfig, pipeline: WritePipeline | None) -> None:
        self._idle: asyncio.Queue[Client] = asyncio.Queue()
        for client in clients:
            self._idle.put_nowait(client)
        self._config = config
        self._pipeline = pipeline

    @property
    def database(self) -> str:
        return self._config.database

    @property
    def stores(self) -> bool:
        """Whether this node writes (a reader's writes are refused)."""
        return self._pipeline is not None

    @asynccontextmanager
    async def _client(self) -> AsyncIterator[Client]:
        client = await self._idle.get()
        try:
            yield client
        finally:
            self._idle.put_nowait(client)

    async def read(self, query: Callable[Concatenate[Client, str, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `query(client, database, *args)` in a worker thread on a pooled client."""
        async with self._client() as client:
            return await asyncio.to_thread(query, client, self._config.database, *args, **kwargs)

    @asynccontextmanager
    async def experiment_names(self) -> AsyncIterator[Callable[[str], str | None]]:
        """Hold the node's experiment-name lock; yields a lookup of names taken but perhaps not yet stored.

        Check-then-write on experiment names happens inside, through to a durable write, so concurrent
        creates and renames on this node (REST or gRPC) never leave two live experiments with one name.
        """
        if self._pipeline is None:  # a reader writes nothing; its writes are refused
            yield lambda _: None
            return
        catalog = self._pipeline.catalog
        async with catalog.names_lock:
            yield catalog.cached_experiment_id

    async def write(self, batch: Batch) -> None:
        """Store `batch` through the same pipeline as gRPC and Kafka; returns once it is durable."""
        if self._pipeline is None:
            raise PermanentError("this node is read-only (--role reader); send writes to a node that stores")
        request = DecodedRequest(writer_id="rest", sequence=0, batch=batch)
        durable = await self._pipeline.accept(request, self._config.rest_flush_ms)
        await durable


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def next_version(previous: int = 0) -> int:
    """A row version that outranks `previous` and every earlier write from this clock."""
    # Capped at UInt64's top: a row pinned there before versions were capped (codec._server_version) is
    # outranked by an equal version, since ReplacingMergeTree keeps the last insert among equals.
    return max(time.time_ns(), min(previous + 1, 2**64 - 1))
