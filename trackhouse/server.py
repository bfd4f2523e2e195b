"""The composition root: wires the stages and owns their lifecycle.

Start order is storage, sink, batcher, receivers; stop runs in reverse, with
the batcher drained before the receivers close, so every accepted write is
either stored and acknowledged or refused with a retryable status.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field

from compat.app import create_app
from compat.http_server import HttpServer
from ingest.batcher import Batcher
from ingest.catalog import Catalog
from ingest.config import BatcherConfig, ReceiverConfig
from ingest.pipeline import WritePipeline
from ingest.receiver_grpc import GrpcConfig, GrpcReceiver
from ingest.sink import ClickHouseSink
from ingest.telemetry import Telemetry
from query import schema
from query.connection import StoreConfig, connect

log = logging.getLogger("trackhouse")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    store: StoreConfig
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    http_host: str = "127.0.0.1"
    #: HTTP port (/health, /metrics; the MLflow API later); 0 picks a free one.
    http_port: int = 5000
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    receiver: ReceiverConfig = field(default_factory=ReceiverConfig)


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self.telemetry = Telemetry()
        self._serving = False
        self._batcher: Batcher | None = None
        self._grpc: GrpcReceiver | None = None
        self._http: HttpServer | None = None
        self._clients: list[object] = []

    @property
    def grpc_port(self) -> int:
        return self._grpc.port if self._grpc else 0

    @property
    def http_port(self) -> int:
        return self._http.port if self._http else 0

    async def start(self) -> None:
        config = self._config
        database = config.store.resolved_database
        # Separate clients, so catalog lookups never queue behind a long insert.
        sink_client = await asyncio.to_thread(connect, config.store)
        self._clients.append(sink_client)
        await asyncio.to_thread(schema.migrate, sink_client, database)
        catalog_client = await asyncio.to_thread(connect, config.store)
        self._clients.append(catalog_client)

        self._batcher = Batcher(ClickHouseSink(sink_client, database), config.batcher, self.telemetry)
        await self._batcher.start()
        catalog = Catalog(catalog_client, database, config.receiver.catalog_cache_entries)
        pipeline = WritePipeline(catalog, self._batcher, self.telemetry)
        self._grpc = GrpcReceiver(pipeline, config.grpc, self.telemetry)
        await self._grpc.start()
        self._http = HttpServer(
            create_app(self.telemetry.render, lambda: self._serving), config.http_host, config.http_port
        )
        await self._http.start()
        self._serving = True

    async def stop(self) -> None:
        """Drain and stop. Idempotent, and safe after a failed or partial start."""
        self._serving = False
        if self._grpc is not None:
            await self._grpc.begin_stop()
        if self._batcher is not None:
            await self._batcher.stop()
        if self._grpc is not None:
            await self._grpc.stop()
        if self._http is not None:
            await self._http.stop()
            self._http = None
        for client in self._clients:
            client.close()  # type: ignore[attr-defined]
        self._clients.clear()


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain and stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = Server(config)
    try:
        await server.start()
        print(
            f"trackhouse ready grpc={config.grpc.host}:{server.grpc_port}"
            f" http=http://{config.http_host}:{server.http_port} storage={config.store.url}",
            flush=True,
        )
        await stop.wait()
        log.info("stopping: draining the write queue")
    finally:
        await server.stop()
    log.info("stopped")
