"""Client -> gRPC -> batcher -> chDB, checked by SQL. No mocks."""

from __future__ import annotations

import math
import threading
import urllib.request
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests import stored
from tests.conftest import RunningServer
from trackhouse import Client, ClientConfig
from trackhouse.ingest.codec import BlockColumns, encode_request
from trackhouse.ingest.errors import InvalidArgumentError
from trackhouse.query import schema
from trackhouse.v1 import ingest_pb2

COUNT_DISTINCT = "SELECT count() FROM (SELECT DISTINCT * FROM trackhouse.metrics WHERE run_id = {run:String})"


def read_once(server: RunningServer, run_id: str, key: str, values: npt.ArrayLike, max_rows: int) -> None:
    """The series, read as get-history reads it, is exactly `values` at steps 0..n-1, each once; and at most
    `max_rows` rows were stored for the run (a resend may store a request again, never more often than sent)."""
    assert server.sql is not None
    expected = np.asarray(values, np.float64)
    found = stored.history(server.sql, run_id, key)
    assert [p[0] for p in found] == list(range(len(expected)))
    assert np.array_equal([p[2] for p in found], expected)
    assert len(expected) <= stored.raw_rows(server.sql, run_id) <= max_rows


def raw_write(target: str) -> Any:
    """The unary Write method taking raw bytes, so tests can send what the client never would."""
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 512 * 1024 * 1024)])
    return channel.unary_unary(
        "/trackhouse.v1.Ingest/Write", request_serializer=None, response_deserializer=ingest_pb2.WriteAck.FromString
    )


def run_upsert(run_id: str, experiment: str = "Default") -> ingest_pb2.RunUpsert:
    return ingest_pb2.RunUpsert(
        run_id=run_id, experiment_name=experiment, name="r", status=ingest_pb2.RUNNING, version=1
    )


def points(run_id: str, n: int, keys: tuple[str, ...] = ("loss",), start: int = 0) -> BlockColumns:
    return BlockColumns(
        run_id=run_id,
        keys=list(keys),
        key_index=np.arange(n, dtype=np.uint32) % len(keys),
        step=np.arange(start, start + n, dtype=np.int64),
        value=np.random.default_rng(start).random(n),
        timestamp_ms=np.full(n, 1_700_000_000_000, np.int64),
    )


def test_issue_example_round_trip(server: RunningServer) -> None:
    with Client(server.target) as client:
        run = client.start_run(
            experiment="sweep-42", name="trial-7", params={"lr": 3e-4, "layers": 12}, tags={"team": "nlp"}
        )
        for step in range(10_000):
            run.log_metrics({"loss": 1.0 / (step + 1), "lr": 3e-4}, step=step)
        run.log_series("grad_norm", steps=np.arange(50_000), values=np.random.rand(50_000))
        run.finish()
    rid = run.run_id
    assert server.rows(
        "SELECT key, count(), min(step), max(step) FROM trackhouse.metrics"
        " WHERE run_id = {r:String} GROUP BY key ORDER BY key",
        r=rid,
    ) == [("grad_norm", 50_000, 0, 49_999), ("loss", 10_000, 0, 9_999), ("lr", 10_000, 0, 9_999)]
    name, status, end_time, experiment = server.rows(
        "SELECT r.name, r.status, r.end_time, e.name FROM trackhouse.runs AS r FINAL"
        " JOIN trackhouse.experiments AS e FINAL ON r.experiment_id = e.experiment_id WHERE run_id = {r:String}",
        r=rid,
    )[0]
    assert (name, status, experiment) == ("trial-7", "FINISHED", "sweep-42")
    assert end_time > 0
    assert server.rows("SELECT key, value FROM trackhouse.params WHERE run_id = {r:String} ORDER BY key", r=rid) == [
        ("layers", "12"),
        ("lr", "0.0003"),
    ]
    assert ("team", "nlp") in server.rows(
        "SELECT key, value FROM trackhouse.tags FINAL WHERE run_id = {r:String}", r=rid
    )
    value = schema.latest_point_sql("latest")[2]
    latest = server.scalar(
        f"SELECT {value} FROM trackhouse.{schema.LATEST_METRICS} FINAL WHERE run_id = {{r:String}} AND key = 'loss'",
        r=rid,
    )
    assert latest == pytest.approx(1.0 / 10_000)


def test_many_runs_and_threads_at_once(server: RunningServer) -> None:
    with Client(server.target, ClientConfig(request_points=5_000)) as client:
        runs = [client.start_run(experiment="hpo", name=f"trial-{i}") for i in range(20)]

        def rank(worker: int) -> None:
            for step in range(500):
                for run in runs[worker::4]:
                    run.log_metrics({f"rank{worker}/loss": step * 0.1, f"rank{worker}/acc": 1.0}, step=step)

        threads = [threading.Thread(target=rank, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    counts = dict(server.rows("SELECT run_id, count() FROM trackhouse.metrics GROUP BY run_id"))  # raw rows
    assert counts == {run.run_id: 1000 for run in runs}
    for i, run in enumerate(runs):
        read_once(server, run.run_id, f"rank{i % 4}/loss", np.arange(500) * 0.1, max_rows=1000)
    assert server.scalar("SELECT count() FROM trackhouse.runs FINAL WHERE experiment_id != '0'") == 20


def test_nan_and_inf_are_stored_as_themselves(server: RunningServer) -> None:
    with Client(server.target) as client:
        run = client.start_run()
        run.log_metrics({"nan": math.nan, "inf": math.inf, "ninf": -math.inf}, step=1)
    rows = dict(server.rows("SELECT key, value FROM trackhouse.metrics WHERE run_id = {r:String}", r=run.run_id))
    assert math.isnan(rows["nan"]) and rows["inf"] == math.inf and rows["ninf"] == -math.inf


def test_non_numbers_are_refused_in_the_training_loop(server: RunningServer) -> None:
    """Bools are numbers to MLflow (stored as 1.0 and 0.0: test_compat_api checks that); strings are not."""
    with Client(server.target) as client:
        run = client.start_run()
        with pytest.raises(InvalidArgumentError, match="'s' is not a number"):
            run.log_metrics({"ok": 1.0, "s": "high"}, step=0)  # type: ignore[dict-item]
        with pytest.raises(InvalidArgumentError, match="values must be numbers"):
            run.log_series("b", np.arange(3), np.array(["x", "y", "z"]))
        with pytest.raises(InvalidArgumentError, match="bad key!"):
            run.log_metrics({"bad key!": 1.0})
        run.log_metrics({"ok": 2.0}, step=1)
    # The refused calls left nothing behind, and the later call went through.
    assert server.rows("SELECT key, step, value FROM trackhouse.metrics WHERE run_id = {r:String}", r=run.run_id) == [
        ("ok", 1, 2.0)
    ]


@pytest.mark.parametrize(
    ("make_request", "message"),
    [
        (
            lambda rid: [points(rid, 3, ("fine", "x" * 251))],
            "'Metric name' exceeds the maximum length of 250 characters",
        ),
        (
            lambda rid: [points(rid, 3, ("fine", "no;semicolons"))],
            "Invalid value \"no;semicolons\" for parameter 'name'",
        ),
        (lambda rid: [points("f" * 32, 3)], f"run '{'f' * 32}' does not exist"),
    ],
    ids=["long-key", "invalid-key", "unknown-run"],
)
def test_bad_requests_get_invalid_argument_and_lose_nothing_else(server: RunningServer, make_request, message) -> None:  # type: ignore[no-untyped-def]
    write = raw_write(server.target)
    rid = "c" * 32
    write(encode_request(ingest_pb2.WriteRequest(runs=[run_upsert(rid)]), [points(rid, 10)]))
    with pytest.raises(grpc.RpcError) as info:
        write(encode_request(ingest_pb2.WriteRequest(), make_request(rid)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in str(info.value.details())
    write(encode_request(ingest_pb2.WriteRequest(), [points(rid, 10, start=10)]))
    assert server.scalar(COUNT_DISTINCT, run=rid) == 20


def test_mismatched_column_lengths(server: RunningServer) -> None:
    rid = "d" * 32
    bad = ingest_pb2.WriteRequest(
        schema_version=1,
        runs=[run_upsert(rid)],
        metrics=[
            ingest_pb2.MetricBlock(
                run_id=rid, keys=["k"], key_index=[0, 0], step=[1, 2], value=[1.0], timestamp_ms=[1, 2]
            )
        ],
    )
    with pytest.raises(grpc.RpcError) as info:
        raw_write(server.target)(bad.SerializeToString())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "column lengths differ" in str(info.value.details())
    assert server.scalar("SELECT count() FROM trackhouse.runs WHERE run_id = {r:String}", r=rid) == 0  # atomic


def test_oversized_message(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(max_message_bytes=100_000)
    rid = "e" * 32
    with pytest.raises(grpc.RpcError) as info:
        raw_write(server.target)(encode_request(ingest_pb2.WriteRequest(runs=[run_upsert(rid)]), [points(rid, 5_000)]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "over the limit of 100000" in str(info.value.details())


def test_changing_a_param_is_refused(server: RunningServer) -> None:
    write = raw_write(server.target)
    rid = "a1" * 16
    write(
        encode_request(
            ingest_pb2.WriteRequest(
                runs=[run_upsert(rid)], params=[ingest_pb2.Param(run_id=rid, key="lr", value="0.1")]
            ),
            [],
        )
    )
    write(
        encode_request(ingest_pb2.WriteRequest(params=[ingest_pb2.Param(run_id=rid, key="lr", value="0.1")]), [])
    )  # same: fine
    with pytest.raises(grpc.RpcError) as info:
        write(encode_request(ingest_pb2.WriteRequest(params=[ingest_pb2.Param(run_id=rid, key="lr", value="0.2")]), []))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(info.value.details()).startswith("Changing param values is not allowed.")  # stock's words
    with Client(server.target) as client:
        run = client.start_run(params={"a": 1})
        run.log_params({"a": 1})
        with pytest.raises(InvalidArgumentError, match="immutable"):
            run.log_params({"a": 2})


def test_a_retried_request_is_one_set_of_points(server: RunningServer) -> None:
    write = raw_write(server.target)
    rid = "b2" * 16
    request = encode_request(ingest_pb2.WriteRequest(runs=[run_upsert(rid)], sequence=1), [points(rid, 1000)])
    for _ in range(3):
        write(request)
    # Reads see one set of points; the three sends stored at most three copies, which merges remove.
    read_once(server, rid, "loss", points(rid, 1000).value, max_rows=3 * 1000)


def test_full_queue_answers_resource_exhausted_and_the_client_recovers(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(flush_points=1_000, max_queue_points=1_000, flush_interval_ms=1_000)
    write = raw_write(server.target)
    rid = "f0" * 16
    write(encode_request(ingest_pb2.WriteRequest(runs=[run_upsert(rid)]), []))
    first = write.future(encode_request(ingest_pb2.WriteRequest(), [points(rid, 800)]))
    with pytest.raises(grpc.RpcError) as info:
        write(encode_request(ingest_pb2.WriteRequest(), [points(rid, 800, start=800)]))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers: dict[str, Any] = dict(info.value.trailing_metadata() or ())  # type: ignore[arg-type]
    assert trailers["retry-after-ms"] == "1000"
    assert first.result().points == 800

    # The streaming client meets the same refusals, backs off, resends, and loses nothing.
    with Client(server.target, ClientConfig(request_points=600, linger_ms=5)) as client:
        run = client.start_run()
        for step in range(3_000):
            run.log_metric("loss", float(step), step=step)
    assert client.stats().reconnects > 0, "the queue never filled: the test did not exercise back-pressure"
    assert server.scalar(COUNT_DISTINCT, run=run.run_id) == 3_000
    # Refused requests were never stored; only a request accepted but unacknowledged when a stream broke is resent.
    read_once(server, run.run_id, "loss", np.arange(3_000.0), max_rows=2 * 3_000)
    assert server.server.telemetry.rejected_requests.labels(reason="resource_exhausted")._value.get() > 0


def test_health_and_metrics_endpoints(server: RunningServer) -> None:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.target))
    assert (
        stub.Check(health_pb2.HealthCheckRequest(service="trackhouse.v1.Ingest")).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    with Client(server.target) as client:
        client.start_run().log_series("x", np.arange(100), np.ones(100))
    with urllib.request.urlopen(f"{server.http_url}/health") as response:
        assert response.status == 200
    with urllib.request.urlopen(f"{server.http_url}/metrics") as response:
        text = response.read().decode()
    assert "trackhouse_inserted_points_total 100.0" in text
    for name in (
        "trackhouse_queue_points",
        "trackhouse_batch_points_bucket",
        "trackhouse_insert_seconds_bucket",
        "trackhouse_insert_retries_total",
    ):
        assert name in text


def test_tags_overwrite_and_the_latest_value_wins(server: RunningServer) -> None:
    with Client(server.target) as client:
        run = client.start_run(tags={"stage": "warmup"})
        client.flush()
        run.set_tags({"stage": "train", "owner": "ana"})
    tags = dict(server.rows("SELECT key, value FROM trackhouse.tags FINAL WHERE run_id = {r:String}", r=run.run_id))
    assert tags["stage"] == "train"
    assert tags["owner"] == "ana"
    assert tags["mlflow.runName"] == f"run-{run.run_id[:8]}"
