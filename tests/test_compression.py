"""Compressed HTTP answers (compat.compression): negotiation, the per-peer policy, whole and streamed bodies.

Through real servers (chDB, uvicorn) with the real MLflow client, requests and raw http.client; the middleware's
edge cases also through a small Starlette app called as ASGI."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import http.client
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import requests
from backports import zstd
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from playwright.sync_api import Response as PlaywrightResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message

from benchmarks.uiwalk import CHROMIUM
from tests.conftest import RunningServer, ServerProcess, start_in_process
from tests.test_compat_ui import no_error_notification, watched_page
from trackhouse import Client
from trackhouse.cli import _parser, build_config
from trackhouse.compat.app import create_app
from trackhouse.compat.compression import Compression, CompressionConfig, is_same_host, negotiate
from trackhouse.compat.ui import BUILD_DIR
from trackhouse.ingest.config import ConfigError

API = "/ajax-api/2.0/mlflow"
LONG_RUN = "c" * 32
LONG_POINTS = 40_000  # three streamed chunks of 16,384 points, about 3.3 MB of JSON
CODINGS = ("zstd", "gzip")


# --- Negotiation and configuration, no network ---


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        ("gzip, deflate, br, zstd", "zstd"),  # Chromium 156 (Debian), as it sends it
        ("gzip, deflate, zstd", "zstd"),  # requests with urllib3 2.x and backports.zstd
        ("gzip, deflate", "gzip"),
        ("GZIP", "gzip"),
        ("gzip;q=1.0, zstd;q=0.5", "gzip"),
        ("zstd;q=0, gzip", "gzip"),
        ("gzip;q=0", None),
        ("gzip;q=0, zstd;q=0", None),
        ("*", "zstd"),
        ("*;q=0", None),
        ("*, zstd;q=0", "gzip"),
        ("identity", None),
        ("identity;q=1, gzip;q=0.5", None),
        ("identity;q=0", None),  # nothing we offer is acceptable either: the RFC allows plain bytes over 406
        ("identity;q=0, gzip", "gzip"),
        ("", None),
        ("br, deflate", None),
        ("gzip;q=2", None),  # out of range: ignored
        ("gzip;q=abc", None),
        ("gzip;level=9", None),
        ("gzip;q=0.5;;,,;q=,=", "gzip"),
        (";;;,,,q=1", None),
        ("gzip;q=" + "1" * 1000, None),
        ("\x00\xff, gzip", "gzip"),
    ],
)
def test_negotiation_follows_q_values(accept: str, chosen: str | None) -> None:
    assert negotiate(accept, CODINGS) == chosen


def test_gzip_only_when_zstd_is_not_offered() -> None:
    assert negotiate("gzip, zstd", ("gzip",)) == "gzip"
    assert negotiate("zstd", ("gzip",)) is None


@pytest.mark.parametrize(
    ("client", "server", "same"),
    [
        (("127.0.0.1", 5), ("127.0.0.1", 5000), True),
        (("127.8.9.10", 5), ("127.0.0.1", 5000), True),
        (("::1", 5), ("::1", 5000), True),
        (("::ffff:127.0.0.1", 5), ("::", 5000), True),
        (("10.1.2.3", 5), ("10.1.2.3", 5000), True),  # this host, through its own network address
        (("10.1.2.4", 5), ("10.1.2.3", 5000), False),
        (("203.0.113.7", 5), ("0.0.0.0", 5000), False),
        (("not-an-address", 5), ("127.0.0.1", 5000), False),
        (None, None, True),  # a Unix socket
    ],
)
def test_same_host(client: Any, server: Any, same: bool) -> None:
    assert is_same_host({"client": client, "server": server}) is same


def test_bad_settings_are_refused() -> None:
    for bad in ({"mode": "yes"}, {"min_bytes": -1}, {"gzip_level": 0}, {"zstd_level": 23}):
        with pytest.raises(ConfigError):
            CompressionConfig(**bad)


def test_flag_and_environment_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def mode(*flags: str) -> str:
        return build_config(_parser().parse_args(["serve", "--data-dir", str(tmp_path), *flags])).http_compression.mode

    assert mode() == "auto"
    assert mode("--http-compression", "OFF") == "off"
    monkeypatch.setenv("TRACKHOUSE_HTTP_COMPRESSION", "on")
    assert mode() == "on"
    assert mode("--http-compression", "auto") == "auto"
    with pytest.raises(SystemExit) as exit_:
        mode("--http-compression", "brotli")
    assert exit_.value.code == 2


def test_off_installs_no_middleware() -> None:
    def installed(mode: str) -> bool:
        app = create_app(lambda: b"", lambda: True, compression=CompressionConfig(mode))
        return any(cast(object, m.cls) is Compression for m in app.user_middleware)

    assert not installed("off")
    assert installed("auto") and installed("on")


# --- The middleware's edge cases, through a small app called as ASGI ---

BIG = {"values": list(range(2_000))}  # about 10 KB of JSON
PIECES = [b'{"a":[', *(b"%d," % i * 500 for i in range(5)), b"0]}"]


async def _pieces(chunks: list[bytes]) -> Any:
    for chunk in chunks:
        yield chunk


def _app(mode: str) -> Starlette:
    async def big(_: Request) -> Response:
        return JSONResponse(BIG, headers={"etag": '"v1"'})

    async def stream(_: Request) -> Response:
        return StreamingResponse(_pieces(PIECES), media_type="application/json")

    async def tiny_stream(_: Request) -> Response:
        return StreamingResponse(_pieces([b"{", b"}"]), media_type="application/json")

    async def attachment(_: Request) -> Response:
        return Response(b"x" * 10_000, media_type="text/plain", headers={"content-disposition": "attachment"})

    async def png(_: Request) -> Response:
        return Response(b"x" * 10_000, media_type="image/png")

    async def encoded(_: Request) -> Response:
        return Response(b"x" * 10_000, media_type="application/json", headers={"content-encoding": "br"})

    async def partial(_: Request) -> Response:
        return Response(b"x" * 10_000, status_code=206, media_type="text/plain")

    routes = [
        Route("/big", big, methods=["GET", "HEAD"]),
        *(Route(f"/{f.__name__.replace('_', '-')}", f) for f in (stream, tiny_stream, attachment, png, encoded)),
        Route("/partial", partial),
    ]
    return Starlette(routes=routes, middleware=[Middleware(Compression, config=CompressionConfig(mode))])


def _call(
    app: Starlette,
    path: str,
    accept: str = "gzip",
    client: tuple[str, int] = ("203.0.113.7", 40000),
    method: str = "GET",
) -> tuple[int, dict[str, str], list[bytes]]:
    """Status, headers and the body's messages, as the server would put them on the socket."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", b"example.org"), (b"accept-encoding", accept.encode("latin-1"))],
        "client": client,
        "server": ("192.0.2.1", 5000),
    }
    sent: list[Message] = []

    requests = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if requests:
            return requests.pop()
        await asyncio.Event().wait()  # the client stays: StreamingResponse waits for a disconnect beside its stream
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = sent[0]
    headers: dict[str, str] = {}
    for key, value in start["headers"]:
        headers[key.decode()] = (
            headers[key.decode()] + ", " + value.decode() if key.decode() in headers else value.decode()
        )
    return start["status"], headers, [m.get("body", b"") for m in sent[1:]]


def test_whole_answer_gzip_with_length_vary_and_weak_etag() -> None:
    status, headers, bodies = _call(_app("auto"), "/big")
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert "Accept-Encoding" in headers["vary"]
    assert int(headers["content-length"]) == len(bodies[0]) and len(bodies) == 1
    assert json.loads(gzip.decompress(bodies[0])) == BIG
    assert headers["etag"] == 'W/"v1"'


def test_auto_leaves_a_loopback_peer_alone_and_on_does_not() -> None:
    for client in (("127.0.0.1", 40000), ("::1", 40000), ("192.0.2.1", 40000)):  # the last: the server's own address
        _, headers, bodies = _call(_app("auto"), "/big", client=client)
        assert "content-encoding" not in headers and json.loads(b"".join(bodies)) == BIG
        assert "Accept-Encoding" in headers["vary"]
    _, headers, bodies = _call(_app("on"), "/big", client=("127.0.0.1", 40000))
    assert headers["content-encoding"] == "gzip" and json.loads(gzip.decompress(bodies[0])) == BIG


@pytest.mark.parametrize("coding", CODINGS)
def test_streamed_answer_is_compressed_chunk_by_chunk(coding: str) -> None:
    _, headers, bodies = _call(_app("auto"), "/stream", accept=coding)
    assert headers["content-encoding"] == coding and "content-length" not in headers
    # The first three pieces go as one (held until they made min_bytes), then one per piece, then the end.
    assert len(bodies) == len(PIECES) - 2 + 1
    decoder: Any = zlib.decompressobj(16 + zlib.MAX_WBITS) if coding == "gzip" else zstd.ZstdDecompressor()
    decoded = [decoder.decompress(body) for body in bodies]
    # Each flushed piece decodes on its own: the client sees the answer as it is made.
    assert decoded[0].startswith(b'{"a":[') and all(decoded[:-1])
    assert b"".join(decoded) == b"".join(PIECES)


def test_streamed_tiny_answer_goes_plain_with_its_length() -> None:
    _, headers, bodies = _call(_app("on"), "/tiny-stream")
    assert "content-encoding" not in headers and headers["content-length"] == "2"
    assert b"".join(bodies) == b"{}"


@pytest.mark.parametrize("path", ["/attachment", "/png", "/encoded", "/partial"])
def test_attachments_binary_encoded_and_partial_answers_are_left_alone(path: str) -> None:
    status, headers, bodies = _call(_app("on"), path)
    assert headers.get("content-encoding") in (None, "br") and b"".join(bodies) == b"x" * 10_000
    assert status in (200, 206)


def test_head_is_left_alone() -> None:
    _, headers, bodies = _call(_app("on"), "/big", method="HEAD")
    assert "content-encoding" not in headers and json.loads(b"".join(bodies)) == BIG  # uvicorn drops it


# --- A real server that compresses for every peer (on), with the MLflow client ---


@pytest.fixture(scope="module")
def compressing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, str]]:
    running = start_in_process(
        tmp_path_factory.mktemp("compress") / "data", network={"http_compression": CompressionConfig("on")}
    )
    try:
        mlflow = MlflowClient(tracking_uri=running.http_url)
        experiment = mlflow.create_experiment("wide")
        for r in range(3):
            run_id = mlflow.create_run(experiment).info.run_id
            metrics = [Metric(f"layer.{k}.grad_norm", k * 0.5 + r, 1_700_000_000_000, 0) for k in range(200)]
            mlflow.log_batch(run_id, metrics=metrics)
        with Client(running.target) as client:
            run = client.start_run(experiment="history", run_id=LONG_RUN)
            run.log_series(
                "loss", np.arange(LONG_POINTS), np.cumsum(np.random.default_rng(3).standard_normal(LONG_POINTS))
            )
        yield running, experiment
    finally:
        running.stop()
        if running.sql is not None:
            running.sql.close()


def _connection(server: RunningServer) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=60)


def _request(connection: http.client.HTTPConnection, target: str, accept: str | None, body: Any = None) -> None:
    headers = {"Accept-Encoding": accept} if accept is not None else {}
    if body is None:
        connection.request("GET", target, headers=headers)
    else:
        headers["Content-Type"] = "application/json"
        connection.request("POST", target, body=json.dumps(body), headers=headers)


def _fetch(server: RunningServer, target: str, accept: str | None, body: Any = None) -> tuple[Any, bytes]:
    """The answer's status and headers, and its body as sent (not decoded)."""
    with contextlib.closing(_connection(server)) as connection:
        _request(connection, target, accept, body)
        answer = connection.getresponse()
        return answer, answer.read()


def _search(experiment: str) -> dict[str, Any]:
    return {"experiment_ids": [experiment], "order_by": ["attributes.start_time DESC"], "max_results": 50}


def test_mlflow_client_works_unchanged(compressing: tuple[RunningServer, str]) -> None:
    server, experiment = compressing
    mlflow = MlflowClient(tracking_uri=server.http_url)
    runs = mlflow.search_runs([experiment])
    assert len(runs) == 3 and all(len(r.data.metrics) == 200 for r in runs)
    history = mlflow.get_metric_history(LONG_RUN, "loss")
    assert [m.step for m in history] == list(range(LONG_POINTS))
    # What the client's requests session got: compressed (zstd, as urllib3 with backports.zstd accepts it).
    with requests.post(f"{server.http_url}{API}/runs/search", json=_search(experiment), stream=True) as answer:
        assert "zstd" in answer.request.headers["Accept-Encoding"] and answer.headers["content-encoding"] == "zstd"
        raw = answer.raw.read(decode_content=False)
    _, plain = _fetch(server, f"{API}/runs/search", None, _search(experiment))
    assert zstd.decompress(raw) == plain and len(raw) < len(plain) / 4


@pytest.mark.parametrize("coding", CODINGS)
def test_compressed_search_decodes_to_exactly_the_plain_answer(
    compressing: tuple[RunningServer, str], coding: str
) -> None:
    server, experiment = compressing
    plain, expected = _fetch(server, f"{API}/runs/search", None, _search(experiment))
    assert "content-encoding" not in plain.headers and int(plain.headers["content-length"]) == len(expected)
    answer, raw = _fetch(server, f"{API}/runs/search", coding, _search(experiment))
    assert answer.headers["content-encoding"] == coding
    assert int(answer.headers["content-length"]) == len(raw) < len(expected) / 4
    assert "Accept-Encoding" in answer.headers["vary"]
    assert (gzip.decompress(raw) if coding == "gzip" else zstd.decompress(raw)) == expected


@pytest.mark.parametrize(
    ("accept", "coding"),
    [
        (None, None),
        ("identity", None),
        ("gzip;q=0", None),
        ("*;q=0", None),
        ("zstd;q=0, gzip", "gzip"),
        ("gzip;q=0.9, zstd;q=0.1", "gzip"),
        ("gzip;q=nope, zstd;;q=", None),
        (",,;;==", None),
        ("x" * 4000, None),
    ],
)
def test_accept_encoding_is_respected_and_garbage_gets_plain_bytes(
    compressing: tuple[RunningServer, str], accept: str | None, coding: str | None
) -> None:
    server, experiment = compressing
    _, expected = _fetch(server, f"{API}/runs/search", "identity", _search(experiment))
    answer, raw = _fetch(server, f"{API}/runs/search", accept, _search(experiment))
    assert answer.status == 200 and answer.headers.get("content-encoding") == coding
    assert (gzip.decompress(raw) if coding == "gzip" else raw) == expected


def test_small_answers_and_artifacts_go_plain(compressing: tuple[RunningServer, str], tmp_path: Path) -> None:
    server, experiment = compressing
    small, body = _fetch(server, f"{API}/experiments/get?experiment_id={experiment}", "gzip")
    assert "content-encoding" not in small.headers and json.loads(body)["experiment"]["name"] == "wide"
    mlflow = MlflowClient(tracking_uri=server.http_url)
    run_id = mlflow.create_run(experiment).info.run_id
    text = "step,loss\n" + "".join(f"{i},{i * 0.001}\n" for i in range(2_000))
    mlflow.log_text(run_id, text, "log.csv")
    artifact, body = _fetch(server, f"/get-artifact?run_uuid={run_id}&path=log.csv", "gzip, zstd")
    assert artifact.status == 200 and "content-encoding" not in artifact.headers
    assert body.decode() == text
    assert Path(mlflow.download_artifacts(run_id, "log.csv", str(tmp_path))).read_text() == text


@pytest.mark.parametrize("coding", CODINGS)
def test_streamed_history_stays_streamed(compressing: tuple[RunningServer, str], coding: str) -> None:
    server, _ = compressing
    target = f"{API}/metrics/get-history?run_id={LONG_RUN}&metric_key=loss"
    _, expected = _fetch(server, target, None)
    decoder: Any = zlib.decompressobj(16 + zlib.MAX_WBITS) if coding == "gzip" else zstd.ZstdDecompressor()
    decoded = b""
    prefixes = 0
    with contextlib.closing(_connection(server)) as connection:
        _request(connection, target, coding)
        answer = connection.getresponse()
        assert answer.headers["content-encoding"] == coding
        assert answer.headers["transfer-encoding"] == "chunked" and "content-length" not in answer.headers
        while chunk := answer.read1(64 * 1024):
            decoded += decoder.decompress(chunk)
            prefixes += 0 < len(decoded) < len(expected)
            assert expected.startswith(decoded)
    assert decoded == expected
    assert len(json.loads(decoded)["metrics"]) == LONG_POINTS
    assert prefixes >= 3  # the answer was decodable piece by piece, before its end


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (make test installs it)")
def test_the_ui_in_chromium_decodes_compressed_answers(compressing: tuple[RunningServer, str]) -> None:
    """The browser the UI tests drive: it gets zstd (it offers it), the runs table loads from it without an
    error, and a streamed history decodes to every point."""
    server, experiment = compressing
    encodings: dict[str, str | None] = {}
    with watched_page(server.http_url) as (tab, problems):

        def seen(response: PlaywrightResponse) -> None:
            encodings.setdefault(response.url.split("?")[0], response.headers.get("content-encoding"))

        tab.on("response", seen)
        with tab.expect_response(lambda r: r.url.endswith("/runs/search"), timeout=60_000) as searched:
            tab.goto(f"{server.http_url}/#/experiments/{experiment}")
        assert searched.value.headers["content-encoding"] == "zstd"
        assert len(searched.value.json()["runs"]) >= 3  # another test here adds a run with an artifact
        history = f"{API}/metrics/get-history?run_id={LONG_RUN}&metric_key=loss"
        points = tab.evaluate(f"fetch('{history}').then(r => r.json()).then(j => j.metrics.length)")
        no_error_notification(tab)
    assert points == LONG_POINTS
    assert encodings[server.http_url + history.split("?")[0]] == "zstd"
    assert any(url.endswith(".js") and coding == "zstd" for url, coding in encodings.items())  # the UI's code
    assert problems == []


# --- A real server with the default policy (auto) ---


@pytest.fixture(scope="module")
def default(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`trackhouse serve` as a process (embedded chDB opens one directory per process), default settings."""
    process = ServerProcess(tmp_path_factory.mktemp("auto") / "data")
    process.start()
    yield f"http://127.0.0.1:{process.http_port}"
    process.terminate()


def test_auto_compresses_for_a_remote_peer_only(default: str) -> None:
    """Loopback peers get plain bytes; a peer that a same-host proxy names (X-Forwarded-For, which uvicorn trusts
    from loopback) gets them compressed. The UI's JavaScript is the first large answer a browser fetches."""
    asset = min((p for p in (BUILD_DIR / "static" / "js").glob("*.js") if p.stat().st_size > 200_000), key=_size)
    target = "/static-files/" + asset.relative_to(BUILD_DIR).as_posix()
    url = default + target
    with requests.Session() as session:
        _check_auto(session, url, asset)


def _check_auto(session: requests.Session, url: str, asset: Path) -> None:
    local = session.get(url, headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in local.headers and local.content == asset.read_bytes()
    remote = session.get(url, headers={"Accept-Encoding": "gzip", "X-Forwarded-For": "203.0.113.7"})
    assert remote.headers["content-encoding"] == "gzip" and remote.content == asset.read_bytes()
    assert remote.headers["etag"] == "W/" + local.headers["etag"]
    # A file goes in 64 KiB pieces, so its answer is compressed piece by piece, and its length is not known ahead.
    assert remote.headers["transfer-encoding"] == "chunked" and "content-length" not in remote.headers
    cached = session.get(
        url,
        headers={"Accept-Encoding": "gzip", "X-Forwarded-For": "203.0.113.7", "If-None-Match": remote.headers["etag"]},
    )
    assert cached.status_code == 304


def _size(path: Path) -> int:
    return path.stat().st_size
