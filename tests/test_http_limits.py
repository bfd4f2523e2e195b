"""Issue 11 findings 3 and 4, and issue 19 item 3: bounded bodies and uploads, slow clients, and a read-only node's
artifacts. Through the real server, with raw sockets for what no polite client sends."""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tests.conftest import RunningServer
from trackhouse.cli import _parser, build_config
from trackhouse.compat.limits import HttpLimits
from trackhouse.ingest.codec import encode_request
from trackhouse.ingest.config import ConfigError
from trackhouse.v1 import ingest_pb2

KIB = 1024
MIB = 1024 * KIB


def connect(server: RunningServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.server.http_port), timeout=30)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Everything the server sends until it closes the connection (every refusal here closes it)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


def request(server: RunningServer, method: str, target: str, body: bytes | None = None) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=60)
    try:
        connection.request(method, target, body=body)
        response = connection.getresponse()
        raw = response.read()
        try:
            return response.status, (json.loads(raw) if raw else {})
        except ValueError:
            return response.status, {"raw": raw}
    finally:
        connection.close()


def send_chunked_head(sock: socket.socket, method: str, target: str) -> None:
    sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n".encode())


def send_chunk(sock: socket.socket, data: bytes) -> None:
    sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")


def assert_too_large(status: int, headers: dict[str, str], body: bytes, flag: str) -> None:
    assert status == 413
    assert headers["content-type"] == "application/json"
    error = json.loads(body)
    assert error["error_code"] == "INVALID_PARAMETER_VALUE"
    assert flag in error["message"]


@pytest.fixture
def small(start_server: Callable[..., RunningServer]) -> RunningServer:
    limits = HttpLimits(max_body_bytes=64 * KIB, max_upload_bytes=1 * MIB, header_timeout_s=0.5, max_connections=40)
    return start_server(network={"http_limits": limits})


def new_run(server: RunningServer) -> tuple[str, str]:
    run = MlflowClient(tracking_uri=server.http_url).create_run("0")
    return run.info.run_id, run.info.experiment_id


# --- finding 3: request bodies ---------------------------------------------------------------------------------


def test_a_declared_length_over_the_cap_is_refused_before_any_body_is_read(small: RunningServer) -> None:
    with closing(connect(small)) as sock:
        # 10 GB declared, none sent: an answer at all proves the server did not wait to read it.
        sock.sendall(
            b"POST /api/2.0/mlflow/runs/log-batch HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10737418240\r\n\r\n"
        )
        assert_too_large(*read_response(sock), "--max-body-bytes")


def test_a_chunked_body_is_cut_off_at_the_cap(small: RunningServer) -> None:
    with closing(connect(small)) as sock:
        send_chunked_head(sock, "POST", "/api/2.0/mlflow/runs/log-batch")
        # Just past the 64 KiB cap, and the body never ends, so only the cap can answer. (No more than that is
        # sent: bytes the server never reads would make its close a reset, which may discard the answer.)
        for size in (16 * KIB, 16 * KIB, 16 * KIB, 16 * KIB, KIB):
            send_chunk(sock, b" " * size)
        assert_too_large(*read_response(sock), "--max-body-bytes")
    # The server is fine afterwards, and bodies under the cap work.
    run_id, _ = new_run(small)
    MlflowClient(tracking_uri=small.http_url).log_param(run_id, "p", "v" * 1000)


def test_a_malformed_content_length_is_refused(small: RunningServer) -> None:
    with closing(connect(small)) as sock:
        sock.sendall(b"POST /api/2.0/mlflow/runs/log-batch HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -5\r\n\r\n")
        status, _, _ = read_response(sock)
        assert status == 400


def test_uploads_stream_under_their_own_cap_and_leave_nothing_when_cut_off(small: RunningServer) -> None:
    run_id, experiment_id = new_run(small)
    destination = small.data_dir / "artifacts" / experiment_id / run_id / "artifacts"
    base = f"/api/2.0/mlflow-artifacts/artifacts/{experiment_id}/{run_id}/artifacts"
    # Larger than the body cap, smaller than the upload cap: accepted, byte for byte.
    payload = os.urandom(512 * KIB)
    assert request(small, "PUT", f"{base}/fits.bin", payload)[0] == 200
    assert (destination / "fits.bin").read_bytes() == payload

    with closing(connect(small)) as sock:  # 2 MiB declared, none sent: refused without reading
        sock.sendall(
            f"PUT {base}/declared.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {2 * MIB}\r\n\r\n".encode()
        )
        assert_too_large(*read_response(sock), "--max-upload-bytes")
    with closing(connect(small)) as sock:
        send_chunked_head(sock, "PUT", f"{base}/chunked.bin")
        for _ in range(16):  # 1 MiB, then one more KiB: past the upload cap, and no further
            send_chunk(sock, b"x" * 64 * KIB)
        send_chunk(sock, b"x" * KIB)
        assert_too_large(*read_response(sock), "--max-upload-bytes")
    assert sorted(p.name for p in destination.iterdir()) == ["fits.bin"]  # no partial or staged file


def test_the_ui_upload_behaves_as_stock(small: RunningServer) -> None:
    run_id, experiment_id = new_run(small)
    target = f"/ajax-api/2.0/mlflow/upload-artifact?run_uuid={run_id}&path=notes/today.txt"
    assert request(small, "POST", target, b"written from the UI") == (200, {})
    stored = small.data_dir / "artifacts" / experiment_id / run_id / "artifacts" / "notes" / "today.txt"
    assert stored.read_bytes() == b"written from the UI"
    listed = MlflowClient(tracking_uri=small.http_url).list_artifacts(run_id, "notes")
    assert [(f.path, f.file_size) for f in listed] == [("notes/today.txt", 19)]

    # Stock's messages (mlflow/server/handlers.py upload_artifact_handler), in stock's order.
    base = "/ajax-api/2.0/mlflow/upload-artifact"
    for query, body, message in [
        ("path=a.txt", b"x", "Request must specify run_uuid."),
        (f"run_uuid={run_id}", b"x", "Request must specify path."),
        (f"run_uuid={run_id}&path=a.txt", b"", "Request must specify data."),
        (f"run_uuid={run_id}&path=../a.txt", b"x", "Invalid path"),
    ]:
        status, error = request(small, "POST", f"{base}?{query}", body)
        assert (status, error["error_code"], error["message"]) == (400, "INVALID_PARAMETER_VALUE", message)
    status, error = request(small, "POST", f"{base}?run_uuid=missing&path=a.txt", b"x")
    assert (status, error["error_code"]) == (404, "RESOURCE_DOES_NOT_EXIST")
    assert not (stored.parent.parent / "a.txt").exists()


def test_the_ui_upload_has_stocks_10_mb_cap(server: RunningServer) -> None:
    """Declared or streamed without a length, over 10 MB is stock's 400, and nothing is stored."""
    run_id, _ = new_run(server)
    target = f"/ajax-api/2.0/mlflow/upload-artifact?run_uuid={run_id}&path=big.bin"
    status, error = request(server, "POST", target, b"x" * (10 * MIB + 1))
    assert (status, error["message"]) == (400, "Artifact size is too large. Max size is 10MB.")
    with closing(connect(server)) as sock:
        send_chunked_head(sock, "POST", target)
        for _ in range(11):
            send_chunk(sock, b"x" * MIB)
        sock.sendall(b"0\r\n\r\n")
        response = b""
        while b"Max size is 10MB" not in response and (chunk := sock.recv(65536)):
            response += chunk
    assert response.startswith(b"HTTP/1.1 400")
    assert not [p for p in (server.data_dir / "artifacts").rglob("*") if p.is_file()]  # nothing staged is left


def test_oversized_grpc_messages_are_refused_and_the_server_carries_on(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(max_message_bytes=100_000)
    with grpc.insecure_channel(server.target) as channel:
        write = channel.unary_unary(
            "/trackhouse.v1.Ingest/Write",
            request_serializer=lambda raw: raw,
            response_deserializer=ingest_pb2.WriteAck.FromString,
        )
        huge = encode_request(ingest_pb2.WriteRequest(writer_id="x" * 300_000), [])  # over gRPC's own 2x limit
        with pytest.raises(grpc.RpcError) as info:
            write(huge, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        ok = encode_request(ingest_pb2.WriteRequest(writer_id="small"), [])
        assert write(ok, timeout=30) is not None


# --- issue 19 item 3: a reader refuses artifact writes and deletes ---------------------------------------------


def test_a_reader_refuses_artifact_writes_and_deletes(start_server: Callable[..., RunningServer]) -> None:
    reader = start_server(role="reader")
    kept = reader.data_dir / "artifacts" / "1" / "run" / "artifacts" / "kept.txt"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"kept")
    base = "/api/2.0/mlflow-artifacts"
    for method, target, body in [
        ("PUT", f"{base}/artifacts/1/run/artifacts/new.txt", b"new"),
        ("PUT", "/ajax-api/2.0/mlflow-artifacts/artifacts/1/run/artifacts/new.txt", b"new"),
        ("DELETE", f"{base}/artifacts/1/run/artifacts/kept.txt", None),
        ("DELETE", f"{base}/artifacts/1", None),
        ("POST", f"{base}/mpu/create/1/run/artifacts", b'{"path": "big.bin", "num_parts": 2}'),
        ("POST", f"{base}/mpu/complete/1/run/artifacts", b'{"path": "big.bin", "upload_id": "u", "parts": []}'),
        ("POST", f"{base}/mpu/abort/1/run/artifacts", b'{"path": "big.bin", "upload_id": "u"}'),
        ("POST", "/ajax-api/2.0/mlflow/upload-artifact?run_uuid=r&path=new.txt", b"new"),
    ]:
        status, error = request(reader, method, target, body)
        assert (status, error.get("error_code")) == (403, "PERMISSION_DENIED"), (method, target, error)
        assert "read-only" in error["message"]
    assert kept.read_bytes() == b"kept"
    assert not (kept.parent / "new.txt").exists()
    # Reads still work on a reader.
    status, _ = request(reader, "GET", f"{base}/artifacts/1/run/artifacts/kept.txt")
    assert status == 200


# --- finding 4: slow clients --------------------------------------------------------------------------------------


def test_a_silent_connection_is_closed(small: RunningServer) -> None:
    with closing(connect(small)) as sock:
        status, _, _ = read_response(sock)  # sends nothing at all
        assert status == 408


def test_a_trickled_head_is_cut_off_and_others_are_served_meanwhile(small: RunningServer) -> None:
    tricklers = [connect(small) for _ in range(20)]
    try:
        for sock in tricklers:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        # While they trickle, a normal client is served.
        assert request(small, "GET", "/health") == (200, {"status": "ok"})
        closed = _trickle_until_closed(tricklers[0])
        assert closed, "the server kept a trickling connection open"
    finally:
        for sock in tricklers:
            sock.close()


def _trickle_until_closed(sock: socket.socket, limit_s: float = 30) -> bool:
    """One header byte every 50 ms, as a slow-loris client does; True once the server hangs up."""
    sock.settimeout(0.05)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            sock.sendall(b"X")
            if sock.recv(65536).startswith(b"HTTP/1.1 408"):
                return True
        except TimeoutError:
            continue
        except OSError:  # reset: closed
            return True
    return False


def test_an_oversized_head_is_refused(small: RunningServer) -> None:
    with closing(connect(small)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        try:
            for _ in range(40):
                sock.sendall(b"X-Filler: " + b"y" * 8 * KIB + b"\r\n")
        except OSError:
            pass  # the server hung up mid-send, as it should
        data = sock.recv(65536)
    assert data.startswith(b"HTTP/1.1 431")


def test_connections_beyond_the_bound_are_refused(small: RunningServer) -> None:
    held: list[socket.socket] = []
    try:
        for _ in range(40):
            sock = connect(small)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            sock.recv(65536)  # served: the connection stays open, kept alive
            held.append(sock)
        with closing(connect(small)) as extra:
            status, _, _ = read_response(extra)
            assert status == 503
    finally:
        for sock in held:
            sock.close()
    _wait_for_health(small)


def _wait_for_health(server: RunningServer) -> None:
    for _ in range(100):
        try:
            if request(server, "GET", "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("server never recovered")


@pytest.fixture
def mlflow_client(small: RunningServer) -> Iterator[MlflowClient]:
    yield MlflowClient(tracking_uri=small.http_url)


def test_the_mlflow_client_over_the_limits(mlflow_client: MlflowClient, small: RunningServer, tmp_path: Path) -> None:
    """MLflow's client sees a clear error for an oversized body, and keeps working."""
    run_id, _ = new_run(small)
    with pytest.raises(MlflowException, match="--max-body-bytes"):
        mlflow_client.set_tag(run_id, "t", "x" * 100 * KIB)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(2 * MIB))
    with pytest.raises(requests.HTTPError, match="--max-upload-bytes"):  # MLflow's artifact client raises these
        mlflow_client.log_artifact(run_id, str(big))
    mlflow_client.set_tag(run_id, "t", "fine")
    assert mlflow_client.get_run(run_id).data.tags["t"] == "fine"


# --- configuration ------------------------------------------------------------------------------------------------


def test_the_flags_reach_the_server_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACKHOUSE_MAX_BODY_BYTES", "2000000")
    monkeypatch.setenv("TRACKHOUSE_ARTIFACTS_ALLOWED_ROOTS", "s3://a/x, gs://b/y")
    args = ["serve", "--max-upload-bytes", "3000000", "--http-header-timeout", "2", "--http-max-connections", "7"]
    config = build_config(_parser().parse_args([*args, "--http-keep-alive-timeout", "3"]))
    assert config.http_limits == HttpLimits(
        max_body_bytes=2_000_000,
        max_upload_bytes=3_000_000,
        header_timeout_s=2,
        keep_alive_timeout_s=3,
        max_connections=7,
    )
    assert config.artifacts_allowed_roots == ("s3://a/x", "gs://b/y")
    for bad in (["--max-body-bytes", "0"], ["--http-header-timeout", "0"], ["--artifacts-allowed-roots", "/a/../b"]):
        with pytest.raises(ConfigError):
            build_config(_parser().parse_args(["serve", *bad]))
