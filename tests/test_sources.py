"""Rank, node and attempt on every point (migration 9): the wire, the client's defaults, storage, old data."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import RunningServer
from tests.older_nodes import sink_before_migration_15
from trackhouse import Client
from trackhouse.ingest.batch import Batch, Metrics
from trackhouse.ingest.client.api import launcher_source
from trackhouse.ingest.codec import BlockColumns, decode_request, encode_request, split_by_run
from trackhouse.ingest.errors import InvalidArgumentError
from trackhouse.ingest.sink import ClickHouseSink
from trackhouse.query import schema
from trackhouse.query.connection import Client as SqlClient
from trackhouse.v1 import ingest_pb2

RUN, OTHER = "a" * 32, "b" * 32
LIMIT = 1 << 26
LAUNCHER = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def block(run_id: str, n: int, rank: int = 0, node: str = "", attempt: int = 0) -> BlockColumns:
    return BlockColumns(
        run_id,
        ["loss"],
        np.zeros(n, np.uint32),
        np.arange(n, dtype=np.int64),
        np.full(n, float(rank)),
        np.arange(n, dtype=np.int64),
        rank=rank,
        node=node,
        attempt=attempt,
    )


def sources_of(m: Metrics) -> list[tuple[int, str, int]]:
    """Each point's (rank, node, attempt), in point order."""
    sources, index = m.source_columns()
    return [sources[i] for i in index]


def test_each_block_keeps_its_source_through_decoding_and_the_gateways_split() -> None:
    raw = encode_request(
        ingest_pb2.WriteRequest(writer_id="w", sequence=4),
        [block(RUN, 2, 0, "host-a"), block(RUN, 3, 5, "host-b", attempt=2), block(OTHER, 1)],
    )
    m = decode_request(raw, LIMIT).batch.metrics
    assert sources_of(m) == [(0, "host-a", 0)] * 2 + [(5, "host-b", 2)] * 3 + [(0, "", 0)]
    parts = dict(split_by_run(decode_request(raw, LIMIT)))
    mine = decode_request(parts[RUN], LIMIT).batch.metrics
    assert sources_of(mine) == [(0, "host-a", 0)] * 2 + [(5, "host-b", 2)] * 3
    assert mine.value.tolist() == [0, 0, 5, 5, 5]  # each point stays with its own rank
    assert not decode_request(parts[OTHER], LIMIT).batch.metrics.sourced


def test_points_without_a_source_carry_no_source_columns() -> None:
    m = decode_request(encode_request(ingest_pb2.WriteRequest(), [block(RUN, 3)]), LIMIT).batch.metrics
    assert not m.sourced and sources_of(m) == [(0, "", 0)] * 3


@pytest.mark.parametrize("node", ["has space", "tab\there", "x" * 254, "bell\x07"])
def test_a_bad_node_is_refused_naming_it(node: str) -> None:
    raw = encode_request(ingest_pb2.WriteRequest(), [block(RUN, 1, 1, node)])
    with pytest.raises(InvalidArgumentError, match="node"):
        decode_request(raw, LIMIT)


def test_launcher_variables_give_the_default_rank_and_node(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in LAUNCHER:
        monkeypatch.delenv(name, raising=False)
    assert launcher_source() == (0, "", 0)  # not distributed: nothing set, nothing stored
    monkeypatch.setenv("LOCAL_RANK", "3")
    rank, node, attempt = launcher_source()
    assert rank == 3 and node and attempt == 0  # the host name
    monkeypatch.setenv("NODE_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert launcher_source()[0] == 19  # node 2 of 8 GPUs each, local rank 3
    monkeypatch.setenv("RANK", "42")
    assert launcher_source()[0] == 42  # torchrun's global rank wins
    assert launcher_source(rank=7, node="gpu-7") == (7, "gpu-7", 0)  # explicit arguments win over all
    monkeypatch.setenv("RANK", "zero")
    with pytest.raises(InvalidArgumentError, match="RANK='zero'"):
        launcher_source()
    with pytest.raises(InvalidArgumentError, match="rank -1"):
        launcher_source(rank=-1)


def test_ranks_logging_into_one_run_are_stored_apart(server: RunningServer) -> None:
    with Client(server.target) as starter:
        run = starter.start_run(experiment="ddp", rank=0, node="node-a")
        run.log_metrics({"loss": 1.0}, step=0)
        starter.flush()
    for rank, node in ((1, "node-a"), (2, "node-b")):
        with Client(server.target) as client:
            attached = client.attach_run(run.run_id, rank=rank, node=node)
            # Equal points from every rank: each is kept, none merges into another's.
            attached.log_metrics({"loss": 1.0}, step=0, timestamp_ms=5)
            attached.log_series("loss", np.arange(1, 4), np.full(3, float(rank)))
    rows = server.rows(
        "SELECT rank, node, attempt, count() FROM trackhouse.metrics WHERE run_id = {r:String}"
        " GROUP BY ALL ORDER BY ALL",
        r=run.run_id,
    )
    assert rows == [(0, "node-a", 0, 1), (1, "node-a", 0, 4), (2, "node-b", 0, 4)]
    assert server.sql is not None
    server.sql.command("OPTIMIZE TABLE trackhouse.metrics FINAL")
    assert server.scalar("SELECT count() FROM trackhouse.metrics WHERE run_id = {r:String}", r=run.run_id) == 9


def test_points_stored_before_migration_9_read_as_rank_0_of_attempt_0(
    sql: SqlClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = "before9"
    monkeypatch.setattr(schema, "MIGRATIONS", tuple(m for m in schema.MIGRATIONS if m[0] < 9))
    schema.migrate(sql, database)
    # A sink of that time wrote no rank summaries (migration 10 added them, and backfills them below), and no
    # by-key copy of the latest points (migration 15, which copies them below).
    monkeypatch.setattr(ClickHouseSink, "_write_rank_summaries", lambda *_: None)
    old = decode_request(encode_request(ingest_pb2.WriteRequest(), [block(RUN, 2)]), LIMIT).batch.metrics
    with sink_before_migration_15():
        ClickHouseSink(sql, database).write(Batch(metrics=old))
    monkeypatch.undo()
    assert schema.migrate(sql, database) >= 9
    assert schema.migrate(sql, database) >= 9  # idempotent
    new = decode_request(encode_request(ingest_pb2.WriteRequest(), [block(RUN, 2, 4, "n", 1)]), LIMIT).batch.metrics
    ClickHouseSink(sql, database).write(Batch(metrics=new))
    rows = sql.query(f"SELECT step, rank, node, attempt FROM {database}.metrics ORDER BY rank, step").result_rows
    assert rows == [(0, 0, "", 0), (1, 0, "", 0), (0, 4, "n", 1), (1, 4, "n", 1)]
    # Migration 15 copied the old latest points and the new sink wrote its own: the copy agrees with metric_latest.
    latest = "SELECT key, max(latest) FROM {}.{} WHERE run_id = {{r:String}} GROUP BY key ORDER BY key"
    by_key, by_run = (
        sql.query(latest.format(database, table), parameters={"r": RUN}).result_rows
        for table in (schema.LATEST_BY_KEY, schema.LATEST_METRICS)
    )
    assert by_key == by_run and by_run
