"""How requests leave the client: one gRPC WriteStream (or a Kafka producer), reconnects, and what is retried.

A session sends the client's unacknowledged requests in order and hands every
answer back through the `Outbox` protocol. Errors are sorted once, here:
`RetryLater` (the same bytes may succeed later: reconnect with backoff and
resend) or `Refused` (they never will: report the points, never resend).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol
from urllib.parse import urlsplit

import grpc

from trackhouse.ingest.client.spool import Record
from trackhouse.ingest.config import DEFAULT_KAFKA_TOPIC, DEFAULT_MAX_MESSAGE_BYTES
from trackhouse.v1 import ingest_pb2

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

#: MLflow's own client conventions, so one set of variables serves both paths.
TOKEN_ENV = "MLFLOW_TRACKING_TOKEN"
USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
CA_BUNDLE_ENV = "MLFLOW_TRACKING_SERVER_CERT_PATH"

_WRITE_STREAM = "/trackhouse.v1.Ingest/WriteStream"
_GET_LIMITS = "/trackhouse.v1.Ingest/GetLimits"
_HANDSHAKE_TIMEOUT_S = 10.0
#: The client's own ceiling on one request, whatever the server allows.
_MAX_SEND_BYTES = 256 * 1024 * 1024
_RETRYABLE_ACKS = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], grpc.StatusCode.UNAVAILABLE.value[0]})
#: A stream ending with one of these may succeed on a new one; anything else is a configuration or input error.
_RETRYABLE_STATUSES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)
# gRPC's wording when a message is over a peer's limit: "... message larger than max (<size> vs. <limit>)".
_TOO_LARGE = re.compile(r"message larger than max \((\d+) vs\. (\d+)\)")


class RetryLater(Exception):
    """The same requests may succeed on a new connection."""

    def __init__(self, reason: str, retry_after_ms: int = 0) -> None:
        super().__init__(reason)
        self.retry_after_ms = retry_after_ms


class Refused(Exception):
    """Nothing sent on this connection can ever succeed (bad credentials, an unknown service)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What the server accepts (GetLimits); 0 means not known."""

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_queue_points: int = 0
    flush_points: int = 0
    max_request_points: int = 0

    def request_points(self, wanted: int) -> int:
        """Points per request: the caller's wish, within the server's hard limit and half its queue.

        Half, so that one request can be taken while another is still queued; a
        request as large as the whole queue would wait for the queue to empty.
        """
        fits = [wanted]
        if self.max_request_points:
            fits.append(self.max_request_points)
        if self.max_queue_points:
            fits.append(max(1, self.max_queue_points // 2))
        return min(fits)

    def request_bytes(self) -> int:
        return min(self.max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES, _MAX_SEND_BYTES)


@dataclass(slots=True)
class Request:
    raw: bytes
    #: Points plus run, param and tag rows.
    size: int
    #: The one run a Kafka-bound request carries: the message key.
    run_id: str = ""
    #: When it was first sent (monotonic seconds), for the acknowledgement latency.
    sent_at: float = 0.0
    #: Where the bytes are while spooled (then `raw` is empty and memory is free).
    record: Record | None = None
    #: Appended to the spooled bytes: a recovered request's new sequence (a later scalar field wins in protobuf).
    suffix: bytes = b""

    def payload(self) -> bytes:
        return self.record.read() + self.suffix if self.record is not None else self.raw


class Outbox(Protocol):
    """The client's side of a session: requests to send, and where their answers go."""

    def unsent_after(self, sent: int) -> list[tuple[int, Request]] | None:
        """Unacknowledged requests after sequence `sent`, in order; None once the client is closing."""

    async def linger_then_drain(self, timeout: float) -> None:
        """Wait for new points (or `timeout`), then turn them into requests."""

    def settle(self, sequence: int, code: int, message: str) -> None:
        """A final answer for one request: code 0 is stored, anything else is a permanent refusal."""

    def use_limits(self, limits: Limits) -> None:
        """The server's limits, learned on a new connection."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where requests go: a gRPC address (plain or TLS), or Kafka bootstrap servers and a topic."""

    address: str
    tls: bool = False
    kafka_topic: str | None = None

    @classmethod
    def parse(cls, target: str, tls: bool | None = None) -> Target:
        """host:port, grpc://host:port, grpcs://host:port (TLS), or kafka://host:port[,host:port]/topic."""
        scheme, _, rest = target.rpartition("://")
        if scheme == "kafka":
            parts = urlsplit(target)
            return cls(parts.netloc, kafka_topic=parts.path.strip("/") or DEFAULT_KAFKA_TOPIC)
        if scheme not in ("", "grpc", "grpcs"):
            raise ValueError(f"target must be host:port, grpc://, grpcs:// or kafka://, not {scheme}://")
        if not rest or "/" in rest:
            raise ValueError(f"target {target!r} is not host:port")
        return cls(rest, tls=scheme == "grpcs" if tls is None else tls)

    @property
    def loopback(self) -> bool:
        host = urlsplit(f"//{self.address}").hostname or ""
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def exposes(self, credentials: Credentials | None) -> bool:
        """Whether credentials would cross a network in plain text: worth a warning, not a refusal."""
        return bool(credentials) and not self.tls and not self.loopback


class Credentials:
    """The `authorization` metadata every call carries. Its repr never shows the secret."""

    __slots__ = ("_header",)

    def __init__(self, header: str | None) -> None:
        self._header = header

    @classmethod
    def resolve(cls, token: str | None, username: str | None, password: str | None) -> Credentials:
        """Explicit arguments win; otherwise MLflow's environment variables. Basic before Bearer, as MLflow."""
        if token is None and username is None and password is None:
            token, username, password = (os.environ.get(v) or None for v in (TOKEN_ENV, USERNAME_ENV, PASSWORD_ENV))
        if (username is None) != (password is None):
            raise ValueError("username and password go together")
        if username is not None and password is not None:
            encoded = base64.b64encode(f"{username}:{password}".encode()).decode()
            return cls(f"Basic {encoded}")
        return cls(f"Bearer {token}" if token else None)

    def __bool__(self) -> bool:
        return self._header is not None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", self._header),) if self._header else ()

    def __repr__(self) -> str:
        return f"Credentials({self._header.split(' ', 1)[0] + ' ***' if self._header else 'none'})"


def channel_credentials(ca_bundle: str | os.PathLike[str] | None) -> grpc.ChannelCredentials:
    """TLS trusting `ca_bundle` (PEM), else MLFLOW_TRACKING_SERVER_CERT_PATH, else the system's roots."""
    path = ca_bundle if ca_bundle is not None else os.environ.get(CA_BUNDLE_ENV) or None
    return grpc.ssl_channel_credentials(root_certificates=Path(path).read_bytes() if path else None)


@dataclass(frozen=True, slots=True)
class GrpcSession:
    target: Target
    credentials: Credentials
    tls: grpc.ChannelCredentials | None
    linger_s: float

    async def run(self, outbox: Outbox) -> None:
        """Handshake, then stream unacknowledged requests in order until the client closes."""
        options = [
            ("grpc.max_send_message_length", _MAX_SEND_BYTES),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ]
        if self.tls is not None:
            channel = grpc.aio.secure_channel(self.target.address, self.tls, options=options)
        else:
            channel = grpc.aio.insecure_channel(self.target.address, options=options)
        async with channel:
            outbox.use_limits(await self._handshake(channel))
            # No serializer: requests are already bytes. grpc-stubs predates aio's call-then-write form.
            method = channel.stream_stream(
                _WRITE_STREAM, request_serializer=None, response_deserializer=ingest_pb2.WriteAck.FromString
            )
            call = method(metadata=self.credentials.metadata)  # type: ignore[call-arg]
            stream = _Stream()
            reader = asyncio.create_task(_read_acks(call, stream, outbox))
            try:
                await self._send(call, stream, reader, outbox)
            except (grpc.RpcError, asyncio.InvalidStateError):
                # A failed RPC surfaces as an RpcError from reads, or InvalidStateError from writes.
                await asyncio.wait([reader], timeout=1)
                raise await _classify(call, stream, outbox) from None
            finally:
                reader.cancel()
                call.cancel()

    async def _handshake(self, channel: grpc.aio.Channel) -> Limits:
        get_limits = channel.unary_unary(
            _GET_LIMITS,
            request_serializer=ingest_pb2.LimitsRequest.SerializeToString,
            response_deserializer=ingest_pb2.Limits.FromString,
        )
        try:
            answer = await get_limits(
                ingest_pb2.LimitsRequest(), timeout=_HANDSHAKE_TIMEOUT_S, metadata=self.credentials.metadata
            )
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNIMPLEMENTED:  # a server older than the handshake
                return Limits()
            if code in _RETRYABLE_STATUSES:
                raise RetryLater(f"handshake: {code.name}: {exc.details()}") from None
            raise Refused(f"{code.name}: {exc.details()}") from None
        return Limits(
            answer.max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES,
            answer.max_queue_points,
            answer.flush_points,
            answer.max_request_points,
        )

    async def _send(
        self,
        call: grpc.aio.StreamStreamCall[bytes, ingest_pb2.WriteAck],
        stream: _Stream,
        reader: asyncio.Task[None],
        outbox: Outbox,
    ) -> None:
        while True:
            if reader.done():
                reader.result()
                raise RetryLater("server ended the stream")
            unsent = outbox.unsent_after(stream.sent)
            if unsent is None:
                break
            for sequence, request in unsent:
                if stream.refusal is not None:
                    break  # refused: send nothing new until every answer is in
                payload = request.payload()
                stream.unanswered[sequence] = len(payload)
                request.sent_at = request.sent_at or time.monotonic()
                await call.write(payload)
                stream.sent = sequence
            await outbox.linger_then_drain(self.linger_s)
        if not stream.unanswered:  # a graceful end; otherwise close() gave up and the stream is cut
            await call.done_writing()
            await reader


@dataclass(slots=True)
class _Stream:
    """What one WriteStream has sent and not yet heard back about."""

    #: Sequence -> encoded size, for requests sent and not answered.
    unanswered: dict[int, int] = field(default_factory=dict)
    sent: int = 0
    refusal: RetryLater | None = None


async def _read_acks(
    call: grpc.aio.StreamStreamCall[bytes, ingest_pb2.WriteAck], stream: _Stream, outbox: Outbox
) -> None:
    """Apply acks. After a retryable refusal, keep reading until every request sent is answered.

    The server refuses everything after a refusal on the same stream, so the
    requests before it are still stored and acknowledged here; only then does
    the client reconnect and resend what is left, in order.
    """
    async for ack in call:
        stream.unanswered.pop(ack.sequence, None)
        if ack.code in _RETRYABLE_ACKS:
            stream.refusal = stream.refusal or RetryLater(ack.message, ack.retry_after_ms)
        else:
            outbox.settle(ack.sequence, ack.code, ack.message)
        if stream.refusal is not None and not stream.unanswered:
            raise stream.refusal


async def _classify(
    call: grpc.aio.StreamStreamCall[bytes, ingest_pb2.WriteAck], stream: _Stream, outbox: Outbox
) -> Exception:
    """Why the stream ended, as RetryLater or Refused; a request over a size limit is settled as refused."""
    try:
        status, details = await asyncio.wait_for(asyncio.gather(call.code(), call.details()), 5)
    except TimeoutError:
        return RetryLater("stream broke")
    if status == grpc.StatusCode.RESOURCE_EXHAUSTED and (match := _TOO_LARGE.search(details or "")):
        # Not the queue: a message over a gRPC limit. Retrying the same bytes can never succeed.
        size, limit = int(match[1]), int(match[2])
        oversized = [q for q, n in stream.unanswered.items() if n == size] or list(stream.unanswered)[:1]
        for sequence in oversized:
            outbox.settle(sequence, status.value[0], f"request of {size} bytes is over the limit of {limit} bytes")
        outbox.use_limits(Limits(max_message_bytes=limit))
        return RetryLater(details)
    if status in _RETRYABLE_STATUSES:
        return stream.refusal or RetryLater(f"{status.name}: {details}")
    return Refused(f"{status.name}: {details}")


@dataclass(frozen=True, slots=True)
class KafkaSession:
    """Produce requests in order; a delivery with acks=all is the acknowledgement. Needs trackhouse[kafka]."""

    LIMITS: ClassVar[Limits] = Limits(max_message_bytes=_MAX_SEND_BYTES)

    target: Target
    linger_s: float

    async def run(self, outbox: Outbox) -> None:
        try:
            from aiokafka import AIOKafkaProducer
            from aiokafka.errors import KafkaError
        except ImportError as exc:
            raise Refused("kafka:// targets need aiokafka: pip install 'trackhouse[kafka]'") from exc
        assert self.target.kafka_topic is not None
        producer = AIOKafkaProducer(
            bootstrap_servers=self.target.address,
            acks="all",
            linger_ms=5,
            max_request_size=_MAX_SEND_BYTES,
            request_timeout_ms=10_000,
            enable_idempotence=False,
        )
        try:
            await producer.start()
            await self._produce(producer, outbox)
        except KafkaError as exc:
            raise RetryLater(f"Kafka: {exc!r}") from exc
        finally:
            await producer.stop()

    async def _produce(self, producer: AIOKafkaProducer, outbox: Outbox) -> None:
        topic = self.target.kafka_topic
        stream = _Stream()
        while True:
            if stream.refusal is not None:
                raise stream.refusal
            unsent = outbox.unsent_after(stream.sent)
            if unsent is None:
                break
            for sequence, request in unsent:
                request.sent_at = request.sent_at or time.monotonic()
                delivery = await producer.send(topic, key=request.run_id.encode(), value=request.raw)
                delivery.add_done_callback(lambda f, q=sequence: _delivered(q, f, stream, outbox))
                stream.sent = sequence
            await outbox.linger_then_drain(self.linger_s)


def _delivered(sequence: int, delivery: asyncio.Future[object], stream: _Stream, outbox: Outbox) -> None:
    from aiokafka.errors import KafkaError, MessageSizeTooLargeError

    failure = None if delivery.cancelled() else delivery.exception()
    if delivery.cancelled() or (isinstance(failure, KafkaError) and not isinstance(failure, MessageSizeTooLargeError)):
        stream.refusal = stream.refusal or RetryLater(f"Kafka delivery failed: {failure!r}")
        return
    outbox.settle(sequence, grpc.StatusCode.INVALID_ARGUMENT.value[0] if failure else 0, str(failure or ""))
