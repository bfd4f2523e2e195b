"""Where the receivers meet: resolve a batch's references, then queue it. gRPC, Kafka and REST all call this."""

from __future__ import annotations

import asyncio
import uuid
import zlib
from collections.abc import Awaitable
from dataclasses import replace
from typing import Protocol

from trackhouse.ingest.attempts import AttemptCheck
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
    def __init__(
        self, catalog: Catalog, batcher: Batcher, telemetry: Telemetry, attempts: AttemptCheck | None = None
    ) -> None:
        self._catalog = catalog
        self._batcher = batcher
        self._telemetry = telemetry
        self._attempts = attempts

    @property
    def catalog(self) -> Catalog:
        return self._catalog

    async def accept(self, request: DecodedRequest, flush_within_ms: int | None = None) -> Awaitable[None]:
        if self._attempts is not None:  # before resolve: nothing may await between resolve and remember
            await self._attempts.check(request.batch)
        batch = replace(await self._catalog.resolve(request.batch), origins=(origin(request),))
        # No await from here to `remember`: the catalog learns new names and claims before any other task runs.
        claims = self._catalog.claims(batch)
        durable = self._batcher.submit(batch, flush_within_ms)
        self._catalog.remember(batch)
        durable.add_done_callback(lambda _: self._catalog.stored(batch))
        self._telemetry.received_points.inc(batch.points)
        if claims:  # params no node is known to have logged: stored, then checked against other nodes' claims
            return asyncio.ensure_future(self._catalog.confirm(durable, claims))
        return durable


def origin(request: DecodedRequest) -> str:
    """What names `request` across retries, for the sink's deduplication tokens (ingest.sink.flush_token):
    - its Kafka topic, partition, offset and timestamp, which a redelivery repeats (the timestamp tells a
      recreated topic's offsets from the old ones);
    - else its writer and sequence number, which a client's retry repeats, to any node, with a checksum of its
      bytes, which a retry also repeats (it resends them): a writer that reused a sequence number for other data,
      by a bug or on purpose, gets another token, so deduplication can drop only a copy, never data (the checksum
      costs about 1 ms per MB of request, measured on this shared machine);
    - else (REST, a writer without sequence numbers) nothing repeats: a name of its own, so a retry of the same
      flush still shares one token, while a client's retry is a new request, deduplicated by reads and merges.
    """
    if request.origin:
        return request.origin
    if request.writer_id and request.sequence > 0:
        return f"grpc:{request.writer_id}:{request.sequence}:{zlib.crc32(request.raw):08x}"
    return f"once:{uuid.uuid4().hex}"
