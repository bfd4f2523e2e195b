"""MLflow's metric-history endpoints: full history with pagination, and the sampled series charts ask for."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from mlflow.protos import service_pb2 as pb
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from trackhouse.compat import wire
from trackhouse.compat.backend import Backend
from trackhouse.compat.errors import invalid
from trackhouse.compat.routing import Endpoint
from trackhouse.compat.runs import RunsApi
from trackhouse.query import metrics
from trackhouse.query.connection import Client
from trackhouse.query.metrics import Point

#: MLflow's limits for the chart call (mlflow/server/handlers.py).
MAX_RUNS_PER_CHART = 100
MAX_POINTS_PER_RUN = 2500
#: Points per query of a long history, and per written chunk. A query costs chDB ~10 ms beyond its rows
#: (measured), which favours big reads, but the server's RSS grew 106-122 MB streaming 10^7 points with
#: 262,144-point reads and 65,536-point chunks, 35-50 MB with 65,536 and 65,536, and 16 MB with 65,536 and
#: 16,384 (measured on a shared machine): a point costs 24 bytes as numpy and about 85 as JSON.
HISTORY_READ = 65_536
HISTORY_WRITE = 16_384
#: The older bulk call the metric page uses.
MAX_BULK_HISTORY = 25_000


class MetricsApi:
    def __init__(self, backend: Backend, runs: RunsApi) -> None:
        self._backend = backend
        self._runs = runs

    def endpoints(self) -> list[Endpoint]:
        return [
            ("metrics/get-history", "GET", self.history),
            ("metrics/get-history-bulk-interval", "GET", self.bulk_interval),
            ("metrics/get-history-bulk", "GET", self.bulk),
        ]

    async def history(self, request: Request) -> Response:
        message = await wire.parse(request, pb.GetMetricHistory())
        run_id = wire.required(message.run_id or message.run_uuid, "run_id")
        key = wire.required(message.metric_key, "metric_key")
        limit = message.max_results if message.HasField("max_results") else None
        if limit is not None and limit <= 0:
            raise invalid(f"Invalid value {limit} for parameter 'max_results' supplied. It must be a positive integer.")
        after = decode_page_token(message.page_token) if message.page_token else None
        # An unknown run has an empty history, as in stock MLflow.
        if limit is not None and limit <= HISTORY_READ:
            # One read answers a page (the UI's are 25,000 points): written whole, with its length, rather than
            # streamed, it skips chunked framing and three copies of its first chunk (about 2 ms of a page's 30).
            page = await self._backend.read(_rendered, run_id, key, limit, after, None)
            return Response(_page_body(page), media_type="application/json")
        return await _json_stream(_history_body(self._chunks([run_id], key, limit, after, with_run_id=False)))

    async def _chunks(
        self, run_ids: list[str], key: str, limit: int | None, after: Point | None, with_run_id: bool
    ) -> AsyncIterator[_Chunk]:
        """The runs' histories in turn as JSON chunks, `limit` points in all (None: every point), the first run's
        from `after`. Without max_results MLflow answers a whole series in one response, so it is read
        HISTORY_READ points a query and written HISTORY_WRITE points a chunk. A page is read and rendered in one
        worker thread (one hand-off per page, not one per chunk), and the next page is read while the current
        one is written."""
        remaining = limit
        opened = False
        runs = iter(run_ids)

        def read(run_id: str, after: Point | None) -> asyncio.Future[_Rendered]:
            size = HISTORY_READ if remaining is None else min(HISTORY_READ, remaining)
            shown = run_id if with_run_id else None
            return asyncio.ensure_future(self._backend.read(_rendered, run_id, key, size, after, shown))

        first = next(runs, None)
        pending = read(first, after) if first is not None else None
        try:
            while pending is not None:
                page = await pending
                pending = None
                if remaining is not None:
                    remaining -= page.points
                if remaining != 0 and page.next_after is not None:
                    pending = read(page.run_id, page.next_after)
                elif remaining != 0 and (following := next(runs, None)) is not None:
                    pending = read(following, None)
                while page.chunks:  # each chunk is dropped as it is sent: the server holds about a page of JSON
                    written = page.chunks.popleft()
                    if written and not opened:  # the response's first metric object opens the list
                        written = b"[" + written[1:]
                        opened = True
                    yield _Chunk(written, None if page.chunks else page.next_after)
        finally:
            if pending is not None:  # the client went away: let the read finish on its pooled client, unobserved
                pending.add_done_callback(_ignore)

    async def bulk_interval(self, request: Request) -> Response:
        message = await wire.parse(request, pb.GetMetricHistoryBulkInterval())
        run_ids = list(dict.fromkeys(message.run_ids))
        if not run_ids:
            raise invalid("Missing value for required parameter 'run_ids'. See the API docs for more information.")
        _check_run_count(run_ids, "GetMetricHistoryBulkInterval request must specify at most")
        key = wire.required(message.metric_key, "metric_key")
        max_results = message.max_results if message.HasField("max_results") else MAX_POINTS_PER_RUN
        if not 1 <= max_results <= MAX_POINTS_PER_RUN:
            raise invalid(f"max_results must be between 1 and {MAX_POINTS_PER_RUN}.")
        start = message.start_step if message.HasField("start_step") else None
        end = message.end_step if message.HasField("end_step") else None
        if (start is None) != (end is None):
            raise invalid("If either start step or end step are specified, both must be specified.")
        if start is not None and end is not None and start > end:
            raise invalid(f"end_step must be greater than start_step. Found start_step={start} and end_step={end}.")
        series = await self._backend.read(metrics.sampled, run_ids, key, max_results, start, end)
        return wire.ok({"metrics": _with_run_ids(key, series)})

    async def bulk(self, request: Request) -> Response:
        """The older bulk call (no protobuf message in MLflow either): whole series, capped in total."""
        run_ids = sorted(set(request.query_params.getlist("run_id")))
        if not run_ids:
            raise invalid("GetMetricHistoryBulk request must specify at least one run_id.")
        _check_run_count(run_ids, "GetMetricHistoryBulk request cannot specify more than")
        key = request.query_params.get("metric_key")
        if key is None:
            raise invalid("GetMetricHistoryBulk request must specify a metric_key.")
        raw_limit = request.query_params.get("max_results", str(MAX_BULK_HISTORY))
        try:
            limit = int(raw_limit)
        except ValueError:
            raise invalid("max_results must be an integer") from None
        if limit <= 0:  # stock would slice with it (a negative one drops points from the end); refuse instead
            raise invalid(f"Invalid value {limit} for parameter 'max_results' supplied. It must be a positive integer.")
        limit = min(limit, MAX_BULK_HISTORY)  # as stock
        return await _json_stream(_bulk_body(self._chunks(run_ids, key, limit, None, with_run_id=True)))


@dataclass(frozen=True, slots=True)
class _Chunk:
    #: Metric objects after `[` (the first) or `,`; empty for a history without points.
    json: bytes
    #: Where the next page starts: the history's last chunk so far, None when nothing follows.
    next_after: Point | None


@dataclass(frozen=True, slots=True)
class _Rendered:
    """One history page, read and written as JSON chunks in a worker thread."""

    run_id: str
    points: int
    #: HISTORY_WRITE points each, as metric objects after `,`; one empty chunk for a page without points.
    chunks: deque[bytes]
    next_after: Point | None


def _rendered(
    client: Client, database: str, run_id: str, key: str, size: int, after: Point | None, shown: str | None
) -> _Rendered:
    """A page of `size` points of the series from `after`, as JSON chunks (`shown`: the run_id each object
    carries, or None)."""
    page = metrics.history(client, database, run_id, key, size, after)
    chunks = deque(
        wire.metric_objects(
            key,
            page.step[begin : begin + HISTORY_WRITE],
            page.timestamp[begin : begin + HISTORY_WRITE],
            page.value[begin : begin + HISTORY_WRITE],
            shown,
        )
        for begin in range(0, max(len(page), 1), HISTORY_WRITE)
    )
    return _Rendered(run_id, len(page), chunks, page.next_after)


async def _history_body(chunks: AsyncIterator[_Chunk]) -> AsyncIterator[bytes]:
    """`{"metrics": [...], "next_page_token": ...}`, as stock writes it: `{}` for an empty history."""
    opened = False
    after = None
    async for chunk in chunks:
        if chunk.json:
            yield chunk.json if opened else b'{"metrics":' + chunk.json
            opened = True
        after = chunk.next_after
    yield _history_end(opened, after)


def _page_body(page: _Rendered) -> bytes:
    """One page as _history_body writes it, joined once: its first chunk's leading `,` becomes the list's `[`."""
    chunks = [memoryview(chunk) for chunk in page.chunks if chunk]
    if not chunks:
        return _history_end(False, page.next_after)
    chunks[0] = chunks[0][1:]
    return b"".join([b'{"metrics":[', *chunks, _history_end(True, page.next_after)])


def _history_end(opened: bool, after: Point | None) -> bytes:
    """What follows a history's metric objects (`opened`: there were some): the list's end and the page token."""
    token = b'"next_page_token":' + orjson.dumps(encode_page_token(after)) if after is not None else b""
    return (b"]" + (b"," + token if token else b"") if opened else b"{" + token) + b"}"


async def _bulk_body(chunks: AsyncIterator[_Chunk]) -> AsyncIterator[bytes]:
    """As stock: each run's first points in history order, runs in id order, `limit` points in all."""
    opened = False
    async for chunk in chunks:
        if chunk.json:
            yield chunk.json if opened else b'{"metrics":' + chunk.json
            opened = True
    yield b"]}" if opened else b'{"metrics":[]}'


async def _json_stream(body: AsyncIterator[bytes]) -> Response:
    """The body's first chunk is made here, so that a failing first read is an MLflow error, not a cut stream."""
    first = await anext(body)

    async def rest() -> AsyncIterator[bytes]:
        yield first
        async for chunk in body:
            yield chunk

    return StreamingResponse(rest(), media_type="application/json")


def _ignore(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _check_run_count(run_ids: list[str], message: str) -> None:
    """MLflow's cap on runs per chart call, with its wording for each call."""
    if len(run_ids) > MAX_RUNS_PER_CHART:
        raise invalid(f"{message} {MAX_RUNS_PER_CHART} run_ids. Received {len(run_ids)} run_ids.")


def _with_run_ids(key: str, series: dict[str, list[Point]]) -> list[dict[str, Any]]:
    # Built in one comprehension: a chart answer for 100 runs holds 32,000 of these.
    number = wire.number
    return [
        {"key": key, "value": number(value), "timestamp": timestamp, "step": step, "run_id": run_id}
        for run_id, points in series.items()
        for step, timestamp, value in points
    ]


def encode_page_token(after: Point) -> str:
    """An opaque token for the point a page ended on: stable (it names a point, not an offset)."""
    step, timestamp, value = after
    raw = json.dumps([step, timestamp, value.hex()]).encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode_page_token(token: str) -> Point:
    """The one place page tokens are parsed: anything that is not a token this server made is refused."""
    try:
        if len(token) > _MAX_TOKEN_CHARS:
            raise ValueError("too long")
        step, timestamp, value = json.loads(base64.urlsafe_b64decode(token.encode()))
        if not (_is_int64(step) and _is_int64(timestamp) and isinstance(value, str)):
            raise ValueError("not a step, timestamp and value")
        return step, timestamp, float.fromhex(value)
    except (ValueError, TypeError, binascii.Error):
        raise invalid(f"Invalid page token {token[:100]!r}") from None


# Two int64s and a hex double in JSON, base64: about 100 characters.
_MAX_TOKEN_CHARS = 256


def _is_int64(number: object) -> bool:
    return isinstance(number, int) and not isinstance(number, bool) and -(2**63) <= number < 2**63
