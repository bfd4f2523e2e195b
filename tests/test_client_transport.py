"""The client's transport against a small grpc.aio server started here: credentials, TLS, and errors never retried.

The server side of authentication is built separately; this one only records
what the client sends and answers as trackhouse's receiver would.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trackhouse import Client, ClientConfig, IngestError
from trackhouse.ingest.client.transport import Credentials, Target
from trackhouse.ingest.codec import decode_request
from trackhouse.v1 import ingest_pb2

TOKEN = "s3cret-token-value"


@dataclass
class FakeIngest:
    """trackhouse.v1.Ingest answering every request as stored; optionally demanding one authorization value."""

    expected_auth: str | None = None
    limits: ingest_pb2.Limits | None = None
    max_receive_bytes: int = 64 * 1024 * 1024
    tls: tuple[bytes, bytes] | None = None  # (key, cert) PEM
    seen_auth: list[str] = field(default_factory=list)
    points: int = 0
    port: int = 0

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)

    async def _start(self) -> grpc.aio.Server:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", self.max_receive_bytes)])
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "WriteStream": grpc.stream_stream_rpc_method_handler(
                self._write_stream, response_serializer=ingest_pb2.WriteAck.SerializeToString
            )
        }
        if self.limits is not None:
            handlers["GetLimits"] = grpc.unary_unary_rpc_method_handler(
                self._get_limits,
                request_deserializer=ingest_pb2.LimitsRequest.FromString,
                response_serializer=ingest_pb2.Limits.SerializeToString,
            )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("trackhouse.v1.Ingest", handlers),))
        if self.tls is None:
            self.port = server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([self.tls]))
        await server.start()
        return server

    async def _check(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        auth = dict(context.invocation_metadata() or ()).get("authorization", "")
        self.seen_auth.append(str(auth))
        if self.expected_auth is not None and auth != self.expected_auth:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad credentials")

    async def _get_limits(
        self, request: ingest_pb2.LimitsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.Limits:
        await self._check(context)
        assert self.limits is not None
        return self.limits

    async def _write_stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[ingest_pb2.WriteAck]:
        await self._check(context)
        async for raw in requests:
            request = decode_request(raw, len(raw))
            self.points += request.batch.points
            yield ingest_pb2.WriteAck(sequence=request.sequence, points=request.batch.points)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def fakes() -> Iterator[list[FakeIngest]]:
    started: list[FakeIngest] = []
    yield started
    for fake in started:
        fake.stop()


def fake(fakes: list[FakeIngest], **kwargs: Any) -> FakeIngest:
    server = FakeIngest(**kwargs)
    fakes.append(server)
    return server


def log_some(client: Client, n: int = 1000) -> None:
    client.start_run().log_series("loss", np.arange(n), np.ones(n))


def test_a_token_argument_travels_as_bearer_metadata_and_is_never_logged(
    fakes: list[FakeIngest], caplog: pytest.LogCaptureFixture
) -> None:
    server = fake(fakes, expected_auth=f"Bearer {TOKEN}", limits=ingest_pb2.Limits())
    caplog.set_level(logging.DEBUG)
    with Client(f"127.0.0.1:{server.port}", token=TOKEN) as client:
        log_some(client)
        assert TOKEN not in repr(client.__dict__)
    assert server.points == 1000
    assert set(server.seen_auth) == {f"Bearer {TOKEN}"}
    assert TOKEN not in caplog.text


def test_mlflows_environment_variables_are_the_fallback(
    fakes: list[FakeIngest], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ana")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pa:ss")
    server = fake(fakes, expected_auth="Basic YW5hOnBhOnNz", limits=ingest_pb2.Limits())  # base64("ana:pa:ss")
    with Client(f"127.0.0.1:{server.port}") as client:
        log_some(client)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    with Client(f"127.0.0.1:{server.port}", username="ana", password="pa:ss") as client:  # arguments win
        log_some(client)
    assert server.points == 2000


def test_refused_credentials_fail_once_and_say_why(fakes: list[FakeIngest], caplog: pytest.LogCaptureFixture) -> None:
    server = fake(fakes, expected_auth="Bearer right", limits=ingest_pb2.Limits())
    client = Client(f"127.0.0.1:{server.port}", token=TOKEN)
    log_some(client)
    with pytest.raises(IngestError, match=r"1002 points not delivered: UNAUTHENTICATED: bad credentials"):
        client.flush(timeout=30)
    assert client.stats().reconnects == 0
    with pytest.raises(IngestError, match="not acknowledged"):
        client.close()
    assert TOKEN not in caplog.text


def test_an_oversized_message_is_refused_for_good_not_retried(fakes: list[FakeIngest]) -> None:
    """A server without the handshake and a smaller gRPC limit: RESOURCE_EXHAUSTED from size is permanent."""
    server = fake(fakes, max_receive_bytes=1024 * 1024)  # no GetLimits: the client assumes the default 64 MB
    client = Client(f"127.0.0.1:{server.port}", ClientConfig(linger_ms=5))
    run = client.start_run()
    client.flush(timeout=30)
    run.log_series("loss", np.arange(200_000), np.ones(200_000))  # about 5.6 MB in one request
    with pytest.raises(IngestError, match=r"200000 points in 1 write request\(s\).*over the limit of 1048576 bytes"):
        client.flush(timeout=60)
    run.log_series("loss", np.arange(200_000), np.ones(200_000))  # now sized to the limit it learned
    client.close(timeout=60)
    assert client.stats().failed_points == 200_000
    assert server.points == 200_000


def self_signed(tmp_path: Path) -> tuple[bytes, bytes, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    path = tmp_path / "ca.pem"
    path.write_bytes(cert_pem)
    return key_pem, cert_pem, path


def test_tls_targets_verify_the_server_against_a_ca_bundle(
    fakes: list[FakeIngest], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key, cert, ca = self_signed(tmp_path)
    server = fake(fakes, tls=(key, cert), expected_auth=f"Bearer {TOKEN}", limits=ingest_pb2.Limits())
    with Client(f"grpcs://localhost:{server.port}", ca_bundle=ca, token=TOKEN) as client:
        log_some(client)
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(ca))
    with Client(f"localhost:{server.port}", tls=True, token=TOKEN) as client:
        log_some(client)
    assert server.points == 2000

    # Without the CA the server is not trusted: nothing is sent, and the points are still waiting.
    monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
    untrusted = Client(f"grpcs://localhost:{server.port}", token=TOKEN)
    log_some(untrusted)
    with pytest.raises(TimeoutError, match="1002 points still unacknowledged"):
        untrusted.flush(timeout=2)
    with pytest.raises(IngestError, match="not acknowledged"):
        untrusted.close(timeout=1)
    assert server.points == 2000


def test_credentials_without_tls_off_loopback_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    # Decided from the target alone: this machine may send traffic to loopback only, so no client dials out here.
    credentials = Credentials.resolve(TOKEN, None, None)
    for target, exposed in (("10.255.255.1:1", True), ("localhost:1", False), ("grpcs://10.255.255.1:1", False)):
        assert Target.parse(target).exposes(credentials) == exposed, target
    assert not Target.parse("10.255.255.1:1").exposes(None)
    client = Client("localhost:1", token=TOKEN)
    with contextlib.suppress(IngestError, TimeoutError):  # nothing was logged; whether it connects is moot
        client.close(timeout=0.1)
    assert "without TLS" not in caplog.text and TOKEN not in caplog.text
    assert TOKEN not in repr(credentials)


def test_targets_are_checked_when_the_client_is_made() -> None:
    for bad in ("http://127.0.0.1:5000", "grpc://", "127.0.0.1:5000/path"):
        with pytest.raises(ValueError, match="target"):
            Client(bad)
    with pytest.raises(ValueError, match="username and password go together"):
        Client("127.0.0.1:1", username="ana")
