"""Where the receivers meet: resolve a batch's references, then queue it. gRPC, Kafka and REST all call this."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

from trackhouse.ingest.batcher import Batcher
from trackhouse.ingest.catalog import Catalog
from trackhouse.ingest.codec import DecodedRequest
from trackhouse.ingest.telemetry import Telemetry


class Writer(Protocol):
    async def accept(self, request: DecodedRequest) -> Awaitable[None]:
        """Check and queue `request`, or raise an IngestError. The result completes once it is durable.

        Accepting is separate from waiting, so a stream can accept requests in
        order while earlier ones are still being inserted.
        """
        ...


class WritePipeline:
    def __init__(self, catalog: Catalog, batcher: Batcher, telemetry: Telemetry) -> None:
        self._catalog = catalog
        self._batcher = batcher
        self._telemetry = telemetry

    @property
    def catalog(self) -> Catalog:
        return self._catalog

    async def accept(self, request: DecodedRequest, flush_within_ms: int | None = None) -> Awaitable[None]:
        batch = await self._catalog.resolve(request.batch)
        # No await from here to `remember`: the catalog learns new names before any other task runs.
        durable = self._batcher.submit(batch, flush_within_ms)
        self._catalog.remember(batch)
        self._telemetry.received_points.inc(batch.points)
        return durable
