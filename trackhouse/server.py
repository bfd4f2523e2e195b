"""The composition root: wires the stages and owns their lifecycle.

Start order is storage, sink, batcher, receivers; stop runs in reverse, with
the batcher drained before the receivers close, so every accepted write is
either stored and acknowledged or refused with a retryable status.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import signal
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from trackhouse.compat import handlers
from trackhouse.compat.app import create_app
from trackhouse.compat.artifact_roots import ArtifactRoots
from trackhouse.compat.artifacts import ArtifactsConfig
from trackhouse.compat.attempts import AttemptsApi
from trackhouse.compat.backend import Backend, BackendConfig
from trackhouse.compat.compression import CompressionConfig
from trackhouse.compat.http_server import HttpServer
from trackhouse.compat.limits import HttpLimits
from trackhouse.compat.registry_store import RegistryConfig, RegistryStore
from trackhouse.compat.security import SecurityConfig
from trackhouse.ingest.attempts import AttemptCheck
from trackhouse.ingest.auth import Authenticator
from trackhouse.ingest.batcher import Batcher
from trackhouse.ingest.catalog import Catalog
from trackhouse.ingest.config import BatcherConfig, ConfigError, KafkaConfig, ReceiverConfig
from trackhouse.ingest.forwarder_kafka import KafkaForwarder
from trackhouse.ingest.pipeline import WritePipeline, Writer
from trackhouse.ingest.receiver_grpc import GrpcConfig, GrpcReceiver
from trackhouse.ingest.receiver_kafka import KafkaReceiver
from trackhouse.ingest.sink import ClickHouseSink
from trackhouse.ingest.telemetry import Telemetry
from trackhouse.query import integrity, layout, schema
from trackhouse.query.connection import Client, StoreConfig, connect
from trackhouse.runs_service import runs_service

log = logging.getLogger("trackhouse")


ROLES = ("all", "gateway", "worker", "reader")
#: Read clients for the MLflow API: concurrent queries, one per client.
READ_CLIENTS = 2


@dataclass(frozen=True, slots=True)
class ServerConfig:
    store: StoreConfig
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    http_host: str = "127.0.0.1"
    #: HTTP port (MLflow API and UI, /health, /metrics); 0 picks a free one.
    http_port: int = 5000
    #: Where proxied MLflow artifacts live (directory or URI); None serves no artifacts.
    artifacts_destination: str | None = None
    #: Other roots an experiment's artifact_location may name (e.g. s3://bucket/prefix); nothing else is touched.
    artifacts_allowed_roots: tuple[str, ...] = ()
    #: Body caps, timeouts and the connection bound of the HTTP server.
    http_limits: HttpLimits = field(default_factory=HttpLimits)
    #: Which HTTP answers are compressed, and how.
    http_compression: CompressionConfig = field(default_factory=CompressionConfig)
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    receiver: ReceiverConfig = field(default_factory=ReceiverConfig)
    #: all: gRPC in, storage out (through Kafka when configured). gateway: gRPC in, Kafka out.
    #: worker: Kafka in, storage out. reader: the MLflow API and UI, read-only.
    role: str = "all"
    kafka: KafkaConfig | None = None
    #: The operator's users-and-tokens file (`trackhouse auth`); None serves without authentication.
    auth_file: Path | None = None
    #: PEM certificate chain and key: HTTP and gRPC both serve TLS. Both or neither.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Host headers the HTTP server answers (DNS-rebinding protection); empty: stock MLflow's defaults.
    allowed_hosts: tuple[str, ...] = ()
    #: Origins allowed to make cross-origin writes to the HTTP API.
    cors_allowed_origins: tuple[str, ...] = ()
    #: Listen beyond loopback without authentication: the operator's explicit, informed choice.
    allow_unauthenticated_network: bool = False
    #: The model registry's SQL database; None: an SQLite file beside embedded storage (none for a server URL).
    registry: RegistryConfig | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}, not {self.role!r}")
        if self.role in ("gateway", "worker") and self.kafka is None:
            raise ConfigError(f"role {self.role} needs Kafka (--kafka-bootstrap)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        for path in (self.tls_cert, self.tls_key, self.auth_file):
            if path is not None and not path.is_file():
                raise ConfigError(f"{path} is not a readable file")
        exposed = [h for h in {self.http_host, self.grpc.host} if not is_loopback(h)]
        if exposed and self.auth_file is None and not self.allow_unauthenticated_network:
            raise ConfigError(
                f"refusing to listen on {', '.join(sorted(exposed))} without authentication: pass --auth-file"
                " (create it with `trackhouse auth add-user`), or --allow-unauthenticated-network to accept the risk"
            )
        ArtifactRoots(self.artifacts_destination, self.artifacts_allowed_roots)  # fails fast on an ambiguous root

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def stores(self) -> bool:
        return self.role in ("all", "worker")

    @property
    def reads(self) -> bool:
        """Serves the MLflow API: every role with storage access."""
        return self.role != "gateway"

    @property
    def registry_store(self) -> RegistryConfig | None:
        if self.registry is not None or not self.store.embedded:
            return self.registry
        return RegistryConfig.for_data_dir(Path(urlsplit(self.store.url).path))

    @property
    def receives_grpc(self) -> bool:
        return self.role in ("all", "gateway")


def is_loopback(host: str) -> bool:
    """Only loopback addresses and `localhost`; an empty host, 0.0.0.0 and :: listen everywhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self.telemetry = Telemetry()
        self._serving = False
        self._batcher: Batcher | None = None
        self._kafka_in: KafkaReceiver | None = None
        self._kafka_out: KafkaForwarder | None = None
        self._grpc: GrpcReceiver | None = None
        self._http: HttpServer | None = None
        self._clients: list[Client] = []
        self._registry: RegistryStore | None = None

    @property
    def grpc_port(self) -> int:
        return self._grpc.port if self._grpc else 0

    @property
    def http_port(self) -> int:
        return self._http.port if self._http else 0

    async def start(self) -> None:
        config = self._config
        max_bytes = config.receiver.max_message_bytes
        # Loaded first: a malformed file stops the start before anything listens.
        authenticator = Authenticator(config.auth_file) if config.auth_file else None
        pipeline = await self._start_storage() if config.stores else None
        if config.kafka is not None and pipeline is not None:
            self._kafka_in = KafkaReceiver(pipeline, config.kafka, max_bytes, self.telemetry)
            await self._kafka_in.start()
        backend = await self._start_backend(pipeline) if config.reads else None
        # Resume and fork (issue 17): one instance for HTTP and gRPC; a node without storage serves neither.
        attempts = AttemptsApi(backend) if backend is not None else None
        if config.receives_grpc:
            writer: Writer | None = pipeline
            if config.kafka is not None:  # with Kafka, gRPC writes go through it, even in role all
                writer = self._kafka_out = KafkaForwarder(config.kafka, max_bytes, self.telemetry)
                await self._kafka_out.start()
            assert writer is not None
            queue = config.batcher if config.kafka is None else None  # with Kafka, the workers' queues apply
            grpc_config = replace(config.grpc, tls_cert=config.tls_cert, tls_key=config.tls_key)
            services = [runs_service(attempts)] if attempts is not None and pipeline is not None else []
            self._grpc = GrpcReceiver(writer, grpc_config, self.telemetry, queue, authenticator, services)
            await self._grpc.start()
        artifacts = None
        if config.artifacts_destination:
            artifacts = ArtifactsConfig(
                config.artifacts_destination, config.artifacts_allowed_roots, writable=config.stores
            )
        security = SecurityConfig(authenticator, config.allowed_hosts, config.cors_allowed_origins)
        if backend is not None and config.registry_store is not None:
            self._registry = RegistryStore(config.registry_store, read_only=not config.stores)
        app = create_app(
            self.telemetry.render,
            lambda: self._serving,
            backend,
            artifacts,
            security,
            registry=self._registry,
            limits=config.http_limits,
            attempts=attempts,
            compression=config.http_compression,
        )
        self._http = HttpServer(
            app, config.http_host, config.http_port, config.tls_cert, config.tls_key, config.http_limits
        )
        await self._http.start()
        if backend is not None:
            # The app began importing mlflow.server (compat.handlers.preload); "ready" means answering at speed.
            await asyncio.to_thread(handlers.load)
        self._serving = True

    async def _connect(self) -> Client:
        client = await asyncio.to_thread(connect, self._config.store)
        self._clients.append(client)
        return client

    async def _start_storage(self) -> WritePipeline:
        database = self._config.store.resolved_database
        # Separate clients, so catalog lookups never queue behind a long insert.
        sink_client = await self._open_checked()
        catalog_client = await self._connect()
        self._batcher = Batcher(ClickHouseSink(sink_client, database), self._config.batcher, self.telemetry)
        await self._batcher.start()
        receiver = self._config.receiver
        catalog = Catalog(catalog_client, database, receiver.catalog_cache_entries, receiver.catalog_cache_seconds)
        attempts = AttemptCheck(catalog_client, database, receiver.catalog_cache_entries)
        return WritePipeline(catalog, self._batcher, self.telemetry, attempts)

    async def _start_backend(self, pipeline: WritePipeline | None) -> Backend:
        """The MLflow API's read clients, and the pipeline its writes share with gRPC (none on a reader)."""
        # A reader may be the first node to reach a fresh database, so it checks and migrates too.
        first = await self._connect() if pipeline is not None else await self._open_checked()
        clients = [first, *[await self._connect() for _ in range(READ_CLIENTS - 1)]]
        return Backend(clients, BackendConfig(self._config.store.resolved_database), pipeline)

    async def _open_checked(self) -> Client:
        """A client on a store that is safe to serve, migrated. Damage stops the start (DamagedStoreError):
        an embedded directory's files are looked at before chDB opens it, then the store itself by SQL."""
        store, database = self._config.store, self._config.store.resolved_database
        where = store.display_url
        if store.embedded:
            integrity.verify(await asyncio.to_thread(integrity.inspect_directory, store.directory), where)
        client = await self._connect()
        integrity.verify(await asyncio.to_thread(integrity.inspect_store, client, database), where)
        # The migration lease is renewed from a second client while statements run (one client runs one query at a
        # time); an embedded store belongs to this process alone, so it renews between statements.
        renewer = None if store.embedded else functools.partial(connect, store)
        await asyncio.to_thread(schema.migrate, client, database, store.cluster, renewer)
        await asyncio.to_thread(_apply_layout, client, store)
        return client

    async def stop(self) -> None:
        """Drain and stop. Idempotent, and safe after a failed or partial start."""
        self._serving = False
        if self._grpc is not None:
            await self._grpc.begin_stop()
        if self._kafka_in is not None:  # settles on the batcher, so before it stops
            await self._kafka_in.stop()
        if self._batcher is not None:
            await self._batcher.stop()
        if self._kafka_out is not None:
            await self._kafka_out.stop()
        if self._grpc is not None:
            await self._grpc.stop()
        if self._http is not None:
            await self._http.stop()
            self._http = None
        for client in self._clients:
            client.close()
        self._clients.clear()
        if self._registry is not None:
            await asyncio.to_thread(self._registry.close)
            self._registry = None


def _apply_layout(client: Client, store: StoreConfig) -> None:
    """query.layout's fine layout: applied here to an embedded store, which nothing else can be writing to while
    this process opens it; a server's store is only reported, since other nodes may be writing."""
    database = store.resolved_database
    if store.embedded:
        rebuilt = layout.rebuild(client, database)
        if rebuilt:
            log.info("rebuilt %s with %s (once)", ", ".join(rebuilt), layout.FINE_LAYOUT_TEXT)
        return
    coarse = layout.coarse_tables(client, database)
    if coarse:
        log.warning(
            "%s have an older layout: run pages of large experiments read faster once rebuilt, with"
            " every node stopped: trackhouse rebuild --clickhouse-url URL --writers-stopped",
            ", ".join(coarse),
        )


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain and stop. A signal during start-up (e.g. while waiting for an
    unreachable broker) cancels the start-up and stops what had started."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("starting role=%s; SIGTERM or SIGINT now stops the start-up", config.role)  # tests wait for it
    server = Server(config)
    exposed = not (is_loopback(config.http_host) and is_loopback(config.grpc.host))
    if exposed and config.auth_file is not None and not config.tls:
        log.warning("serving beyond loopback without TLS: passwords and tokens cross the network in clear text")
    if exposed and not config.allowed_hosts:
        log.warning("answering only Host headers of loopback and private addresses: set --allowed-hosts to the names")
    try:
        starting = asyncio.create_task(server.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            log.info("stopping during start-up")
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return
        starting.result()  # start-up errors surface here
        print(
            f"trackhouse ready role={config.role} grpc={config.grpc.host}:{server.grpc_port}"
            f" http={'https' if config.tls else 'http'}://{config.http_host}:{server.http_port}"
            f" storage={config.store.display_url if config.reads else '-'}"
            f" tls={'on' if config.tls else 'off'} auth={'on' if config.auth_file else 'off'}"
            f" kafka={config.kafka.bootstrap + '/' + config.kafka.topic if config.kafka else '-'}",
            flush=True,
        )
        await stopping
        log.info("stopping: draining the write queue")
    finally:
        await server.stop()
    log.info("stopped")
