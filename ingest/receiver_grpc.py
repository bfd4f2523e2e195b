"""The gRPC receiver: `trackhouse.v1.Ingest` on grpc.aio, plus the standard health service.

Requests arrive as raw bytes and are decoded by ingest.codec, so size and
decode errors get our clear INVALID_ARGUMENT instead of gRPC's generic ones.
Every ack is sent only after the insert holding the request has returned.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from trackhouse.ingest.auth import Authenticator
from trackhouse.ingest.codec import decode_request
from trackhouse.ingest.config import DEFAULT_MAX_MESSAGE_BYTES, BatcherConfig
from trackhouse.ingest.errors import IngestError, QueueFullError, RetryableError
from trackhouse.ingest.grpc_auth import AuthInterceptor
from trackhouse.ingest.pipeline import Writer
from trackhouse.ingest.telemetry import Telemetry
from trackhouse.v1 import ingest_pb2

SERVICE_NAME = "trackhouse.v1.Ingest"
RETRY_AFTER_METADATA = "retry-after-ms"


@dataclass(frozen=True, slots=True)
class GrpcConfig:
    #: Interface to listen on.
    host: str = "127.0.0.1"
    #: Port to listen on; 0 picks a free one.
    port: int = 50051
    #: Largest request accepted, in bytes (ReceiverConfig.max_message_bytes).
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: Seconds that shutdown gives open streams after the batcher has drained.
    stop_grace_s: float = 2.0
    #: PEM certificate chain and private key: serve TLS. Both or neither.
    tls_cert: Path | None = None
    tls_key: Path | None = None


def status_of(exc: IngestError) -> tuple[grpc.StatusCode, int]:
    """The one mapping from write-path errors to gRPC: (code, retry-after ms, 0 when not retryable)."""
    if isinstance(exc, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, exc.retry_after_ms
    if isinstance(exc, RetryableError):
        return grpc.StatusCode.UNAVAILABLE, exc.retry_after_ms
    return grpc.StatusCode.INVALID_ARGUMENT, 0


def limits_of(config: GrpcConfig, queue: BatcherConfig | None) -> ingest_pb2.Limits:
    """The handshake's answer. Without a local queue (a Kafka gateway) only the message size is known here."""
    limits = ingest_pb2.Limits(max_message_bytes=config.max_message_bytes)
    if queue is not None:
        limits.max_queue_points = queue.max_queue_points
        limits.flush_points = queue.flush_points
        limits.max_request_points = queue.max_queue_points  # the batcher refuses a larger request outright
    return limits


class GrpcReceiver:
    def __init__(
        self,
        writer: Writer,
        config: GrpcConfig,
        telemetry: Telemetry,
        queue: BatcherConfig | None = None,
        authenticator: Authenticator | None = None,
        services: Sequence[grpc.GenericRpcHandler[Any, Any]] = (),
    ) -> None:
        """`queue` is the batcher's configuration when requests go to a local one, for GetLimits. `services` are
        more services on the same port, behind the same authentication (the composition root's Runs service)."""
        self._writer = writer
        self._services = tuple(services)
        self._authenticator = authenticator
        self._config = config
        self._telemetry = telemetry
        self._limits = limits_of(config, queue)
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]  # not in the package's stubs
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        """Listen and serve; returns the bound port."""
        # gRPC may take twice our limit, so that requests in between reach decode_request and get a clear error.
        limit = 2 * self._config.max_message_bytes
        server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", 4 * 1024 * 1024)],
            interceptors=[AuthInterceptor(self._authenticator)] if self._authenticator else None,
        )
        server.add_generic_rpc_handlers((self._handlers(), *self._services))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        address = f"{self._config.host}:{self._config.port}"
        if self._config.tls_cert and self._config.tls_key:
            pair = (self._config.tls_key.read_bytes(), self._config.tls_cert.read_bytes())
            self.port = server.add_secure_port(address, grpc.ssl_server_credentials([pair]))
        else:
            self.port = server.add_insecure_port(address)
        await server.start()
        self._server = server
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def begin_stop(self) -> None:
        """Tell health checkers we are going away; new writes are refused by the closing batcher."""
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(self._config.stop_grace_s)
            self._server = None

    def _handlers(self) -> grpc.GenericRpcHandler[Any, Any]:
        serialize = ingest_pb2.WriteAck.SerializeToString
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                # request_deserializer=None hands us the raw bytes.
                "Write": grpc.unary_unary_rpc_method_handler(self._write, response_serializer=serialize),
                "WriteStream": grpc.stream_stream_rpc_method_handler(self._write_stream, response_serializer=serialize),
                "GetLimits": grpc.unary_unary_rpc_method_handler(
                    self._get_limits,
                    request_deserializer=ingest_pb2.LimitsRequest.FromString,
                    response_serializer=ingest_pb2.Limits.SerializeToString,
                ),
            },
        )

    async def _get_limits(
        self, request: ingest_pb2.LimitsRequest, context: grpc.aio.ServicerContext[bytes, ingest_pb2.Limits]
    ) -> ingest_pb2.Limits:
        return self._limits

    async def _write(
        self, raw: bytes, context: grpc.aio.ServicerContext[bytes, ingest_pb2.WriteAck]
    ) -> ingest_pb2.WriteAck:
        self._telemetry.received_requests.inc()
        sequence = 0
        try:
            request = decode_request(raw, self._config.max_message_bytes)
            sequence = request.sequence
            await (await self._writer.accept(request))
        except IngestError as exc:
            code, retry_after_ms = self._rejected(exc)
            if retry_after_ms:
                context.set_trailing_metadata(((RETRY_AFTER_METADATA, str(retry_after_ms)),))
            await context.abort(code, str(exc))
        return ingest_pb2.WriteAck(sequence=sequence, points=request.batch.points)

    async def _write_stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, ingest_pb2.WriteAck]
    ) -> AsyncIterator[ingest_pb2.WriteAck]:
        acks: asyncio.Queue[ingest_pb2.WriteAck | None] = asyncio.Queue()
        pump = asyncio.create_task(self._pump(requests, acks))
        try:
            while (ack := await acks.get()) is not None:
                yield ack
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    async def _pump(self, requests: AsyncIterator[bytes], acks: asyncio.Queue[ingest_pb2.WriteAck | None]) -> None:
        """Accept requests in stream order; ack each when durable.

        After a retryable refusal, every later request on the stream is refused
        too: the client resends from the refused one, so a run upsert can never
        be overtaken by the points that depend on it.
        """
        waiting: set[asyncio.Task[None]] = set()
        refusal: RetryableError | None = None
        try:
            async for raw in requests:
                self._telemetry.received_requests.inc()
                sequence = 0
                try:
                    request = decode_request(raw, self._config.max_message_bytes)
                    sequence = request.sequence
                    if refusal is not None:
                        raise refusal
                    durable = await self._writer.accept(request)
                except IngestError as exc:
                    if isinstance(exc, RetryableError):
                        refusal = exc
                    # A request that parses but fails validation is answered under its own sequence, or the
                    # client (and a replayed spool) would wait for an answer that never names it.
                    acks.put_nowait(self._error_ack(sequence or _sequence_of(raw), exc))
                    continue
                task = asyncio.create_task(self._ack_when_durable(sequence, request.batch.points, durable, acks))
                waiting.add(task)
                task.add_done_callback(waiting.discard)
            if waiting:
                await asyncio.gather(*waiting)
        finally:
            for task in waiting:
                task.cancel()
            acks.put_nowait(None)

    async def _ack_when_durable(
        self, sequence: int, points: int, durable: Awaitable[None], acks: asyncio.Queue[ingest_pb2.WriteAck | None]
    ) -> None:
        try:
            await durable
        except IngestError as exc:
            acks.put_nowait(self._error_ack(sequence, exc))
            return
        acks.put_nowait(ingest_pb2.WriteAck(sequence=sequence, points=points))

    def _error_ack(self, sequence: int, exc: IngestError) -> ingest_pb2.WriteAck:
        code, retry_after_ms = self._rejected(exc)
        return ingest_pb2.WriteAck(
            sequence=sequence, code=code.value[0], message=str(exc), retry_after_ms=retry_after_ms
        )

    def _rejected(self, exc: IngestError) -> tuple[grpc.StatusCode, int]:
        code, retry_after_ms = status_of(exc)
        self._telemetry.rejected_requests.labels(reason=code.name.lower()).inc()
        return code, retry_after_ms


def _sequence_of(raw: bytes) -> int:
    """The sequence of a request that failed validation; 0 when it does not even parse."""
    try:
        return ingest_pb2.WriteRequest.FromString(raw).sequence
    except DecodeError:
        return 0
