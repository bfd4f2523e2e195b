"""The client fits the server: it learns the limits in a handshake, splits to fit, and reports what failed."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
import pytest

from tests.conftest import RunningServer
from trackhouse import Client, ClientConfig
from trackhouse.ingest.errors import InvalidArgumentError
from trackhouse.v1 import ingest_pb2

COUNT_DISTINCT = "SELECT count() FROM (SELECT DISTINCT * FROM trackhouse.metrics WHERE run_id = {run:String})"


def get_limits(target: str) -> ingest_pb2.Limits:
    with grpc.insecure_channel(target) as channel:
        method = channel.unary_unary(
            "/trackhouse.v1.Ingest/GetLimits",
            request_serializer=ingest_pb2.LimitsRequest.SerializeToString,
            response_deserializer=ingest_pb2.Limits.FromString,
        )
        answer: ingest_pb2.Limits = method(ingest_pb2.LimitsRequest())
        return answer


def test_the_handshake_announces_the_servers_limits(start_server: Callable[..., RunningServer]) -> None:
    server = start_server(max_queue_points=200_000, flush_points=100_000, max_message_bytes=2_000_000)
    limits = get_limits(server.target)
    assert (limits.max_message_bytes, limits.max_queue_points, limits.flush_points, limits.max_request_points) == (
        2_000_000,
        200_000,
        100_000,
        200_000,
    )


def test_a_million_point_series_fits_a_small_queue(start_server: Callable[..., RunningServer]) -> None:
    """Issue 11 finding 6: the default 250k-point request was refused by a 200k queue, and nothing was stored."""
    server = start_server(max_queue_points=200_000, flush_points=100_000)
    assert ClientConfig().request_points > 200_000, "the default must exceed the queue for this test to mean much"
    with Client(server.target) as client:
        run = client.start_run()
        run.log_series("loss", np.arange(1_000_000), np.random.default_rng(0).random(1_000_000))
        client.flush()
        assert client.stats().failed_points == 0
    assert server.scalar(COUNT_DISTINCT, run=run.run_id) == 1_000_000


def test_requests_are_split_to_the_servers_message_size(start_server: Callable[..., RunningServer]) -> None:
    server = start_server(max_message_bytes=64 * 1024)
    many_tags = {f"tag{i}": "v" * 2000 for i in range(100)}  # 200 kB of tags: more than one request holds
    with Client(server.target) as client:
        run = client.start_run(tags=many_tags)
        run.log_series("loss", np.arange(100_000), np.ones(100_000))
    assert client.stats().failed_points == 0
    assert server.scalar(COUNT_DISTINCT, run=run.run_id) == 100_000
    stored = server.scalar("SELECT count() FROM trackhouse.tags FINAL WHERE run_id = {r:String}", r=run.run_id)
    assert stored == len(many_tags) + 1  # and mlflow.runName


def test_a_permanent_refusal_is_reported_with_its_points_and_never_resent(server: RunningServer) -> None:
    with Client(server.target) as first:
        run = first.start_run(params={"lr": "0.1"})
    with Client(server.target) as second:
        # Another process changes the param in the same request as 1000 points: the server refuses the whole request.
        other = second.attach_run(run.run_id)
        other.log_params({"lr": "0.2"})
        other.log_series("loss", np.arange(1000), np.ones(1000))
        with pytest.raises(
            InvalidArgumentError,
            match=r"1001 points in 1 write request\(s\) rejected.*Changing param values is not allowed",
        ):
            second.flush()
        stats = second.stats()
        assert (stats.failed_points, stats.rejected_requests, stats.reconnects) == (1001, 1, 0)
        assert stats.unacknowledged_points == 0
        second.flush()  # reported once; later flushes start clean
    assert server.scalar(COUNT_DISTINCT, run=run.run_id) == 0
