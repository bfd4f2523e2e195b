"""Idempotent inserts: every sink insert carries a deduplication token naming the requests it holds, and migration 12
makes the (non-replicated) tables remember tokens, so ClickHouse drops an insert it already stored.

Rows are counted as stored, before any merge (merges are stopped), so ReplacingMergeTree's own clean-up cannot
hide a duplicate."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from aiokafka.structs import ConsumerRecord

from tests import stored as stored_rows
from tests.conftest import RunningServer, start_in_process
from tests.test_ingest_grpc import points, raw_write, run_upsert
from trackhouse.ingest import pipeline, receiver_kafka
from trackhouse.ingest.batch import Batch, ExperimentRow, Metrics, ParamRow, RunRow, TagRow
from trackhouse.ingest.codec import DecodedRequest, encode_request
from trackhouse.ingest.errors import RetryableError
from trackhouse.ingest.sink import ClickHouseSink, flush_token
from trackhouse.query import schema
from trackhouse.query.connection import Client
from trackhouse.query.migration_lock import LOCKS_TABLE
from trackhouse.v1 import ingest_pb2

DB = "trackhouse"
TABLES = (schema.EXPERIMENTS, schema.RUNS, schema.PARAMS, schema.TAGS)
SUMMARIES = (schema.METRICS, schema.LATEST_METRICS, schema.METRIC_BUCKETS)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server for the file (chDB opens one directory per process); the sink tests write beside it."""
    running = start_in_process(Path(tmp_path_factory.mktemp("dedup")) / "data")
    assert running.sql is not None
    for table in TABLES + SUMMARIES:
        running.sql.command(f"SYSTEM STOP MERGES {DB}.{table}")
    yield running
    running.stop()
    running.sql.close()


@pytest.fixture
def sql(server: RunningServer) -> Client:
    assert server.sql is not None
    return server.sql


def batch(run: str, origins: tuple[str, ...], points: int = 1000) -> Batch:
    return Batch(
        metrics=Metrics(
            run_ids=(run,),
            keys=("loss", "acc"),
            run_index=np.zeros(points, np.int32),
            key_index=(np.arange(points) % 2).astype(np.int32),
            step=np.arange(points, dtype=np.int64),
            timestamp=np.full(points, 1_700_000_000_000, np.int64),
            value=np.linspace(0, 1, points),
        ),
        experiments=(ExperimentRow(f"exp-{run}", f"name-{run}", 1),),
        runs=(RunRow(run, f"exp-{run}", "r", "RUNNING", 1, 0, "u", 1),),
        params=(ParamRow(run, "lr", "0.1"),),
        tags=(TagRow(run, "t", "v", 1),),
        origins=origins,
    )


def stored(sql: Client, run: str) -> dict[str, int]:
    """Rows as stored (no FINAL, merges stopped) per table, for `run`."""
    counts = {}
    for table in TABLES + SUMMARIES:
        column, value = ("experiment_id", f"exp-{run}") if table == schema.EXPERIMENTS else ("run_id", run)
        query = f"SELECT count() FROM {DB}.{table} WHERE {column} = {{v:String}}"
        counts[table] = int(sql.query(query, parameters={"v": value}).result_rows[0][0])
    return counts


def test_the_same_flush_inserted_twice_is_stored_once(sql: Client) -> None:
    sink = ClickHouseSink(sql, DB)
    sink.write(batch("once", ("grpc:w:1", "kafka:t:0:7:99")))
    first = stored(sql, "once")
    assert first[schema.METRICS] == 1000 and all(first.values())
    # The same requests, listed in another order and with a repeat: the same flush, so the same tokens.
    sink.write(batch("once", ("kafka:t:0:7:99", "grpc:w:1", "grpc:w:1")))
    assert stored(sql, "once") == first


def test_another_flush_of_the_same_rows_is_stored(sql: Client) -> None:
    """Deduplication is by what the flush holds (its requests), not by content: other requests' identical points
    are stored, and left to reads and merges as before."""
    sink = ClickHouseSink(sql, DB)
    sink.write(batch("twice", ("grpc:w:1",)))
    first = stored(sql, "twice")
    sink.write(batch("twice", ("grpc:w:2",)))
    assert stored(sql, "twice") == {table: 2 * count for table, count in first.items()}


def test_a_batch_from_no_request_is_never_deduplicated(sql: Client) -> None:
    sink = ClickHouseSink(sql, DB)
    sink.write(batch("anonymous", ()))
    first = stored(sql, "anonymous")
    sink.write(batch("anonymous", ()))
    assert stored(sql, "anonymous") == {table: 2 * count for table, count in first.items()}


def test_a_retry_after_a_partial_write_stores_only_what_was_missing(sql: Client) -> None:
    """The write fails after the points went in but before their summaries did (too many parts in metric_latest);
    the retry under the same tokens skips every table already written and completes the rest."""
    sink = ClickHouseSink(sql, DB)
    sink.write(batch("filler", ("grpc:filler:1",), points=10))  # metric_latest has a part now
    sql.command(f"ALTER TABLE {DB}.{schema.LATEST_METRICS} MODIFY SETTING parts_to_throw_insert = 1")
    try:
        with pytest.raises(RetryableError, match="Code: 252"):
            sink.write(batch("partial", ("grpc:w:9",)))
        partial = stored(sql, "partial")
        assert partial[schema.METRICS] == 1000 and partial[schema.LATEST_METRICS] == 0
    finally:
        sql.command(f"ALTER TABLE {DB}.{schema.LATEST_METRICS} MODIFY SETTING parts_to_throw_insert = 3000")
    sink.write(batch("partial", ("grpc:w:9",)))
    complete = stored(sql, "partial")
    assert complete[schema.METRICS] == 1000  # not 2000: the retry's points were dropped at insert
    assert complete[schema.LATEST_METRICS] == 2 and complete[schema.METRIC_BUCKETS] > 0
    assert {table: complete[table] for table in TABLES} == {table: 1 for table in TABLES}


def test_every_table_remembers_tokens(sql: Client) -> None:
    """Migration 12 reached every MergeTree table; a table created later must declare the setting itself."""
    rows = sql.query(
        "SELECT name, create_table_query FROM system.tables WHERE database = {db:String} AND engine LIKE '%MergeTree'"
        " AND name NOT IN ({migrations:String}, {locks:String})",
        parameters={"db": DB, "migrations": schema.MIGRATIONS_TABLE, "locks": LOCKS_TABLE},
    ).result_rows
    missing = [
        name for name, ddl in rows if f"non_replicated_deduplication_window = {schema.DEDUPLICATION_WINDOW}" not in ddl
    ]
    assert rows and not missing, f"tables without insert deduplication (add SETTINGS or to migration 12): {missing}"
    # The migration lease's renewals insert the same claim again and again: they must all be stored.
    locks = sql.query(
        f"SELECT create_table_query FROM system.tables WHERE database = '{DB}' AND name = 'schema_migration_locks'"
    )
    assert "deduplication_window" not in locks.result_rows[0][0]


def test_every_summary_aggregate_is_idempotent(sql: Client) -> None:
    """A repeated insert the tokens do not catch (a retry batched differently) must not change any summary: only
    min/max-like aggregates and bitwise ORs are stored, never sums or counts, so the AggregatingMergeTree tables
    are as duplicate-insensitive as the points."""
    types = sql.query(
        "SELECT table, name, type FROM system.columns"
        " WHERE database = {db:String} AND type LIKE '%AggregateFunction(%'",
        parameters={"db": DB},
    ).result_rows
    assert types
    for table, name, column_type in types:
        function = column_type.split("(", 2)[1].split(",")[0].strip()
        # groupBitOr: OR-ing the same bits in again changes nothing (the rank summaries' step bit maps).
        idempotent = ("min", "max", "argMin", "argMax", "any", "groupBitOr")
        assert function in idempotent, f"{table}.{name} is {column_type}"


def test_the_token_names_the_set_of_requests() -> None:
    assert flush_token(["a", "b"]) == flush_token(["b", "a", "b"])
    assert flush_token(["a", "b"]) != flush_token(["a"])
    assert flush_token(["a,b"]) != flush_token(["a", "b"])  # no two sets share one canonical text


def test_origins_name_what_retries_repeat() -> None:
    record: ConsumerRecord[bytes, bytes] = ConsumerRecord(
        topic="writes",
        partition=3,
        offset=41,
        timestamp=1_700_000_000_123,
        timestamp_type=0,
        key=b"run",
        value=b"",
        checksum=None,
        serialized_key_size=3,
        serialized_value_size=0,
        headers=(),
    )
    assert receiver_kafka.origin(record) == "kafka:writes:3:41:1700000000123"
    grpc = DecodedRequest(writer_id="w", sequence=5, batch=Batch(), raw=b"bytes")
    assert pipeline.origin(grpc) == f"grpc:w:5:{zlib.crc32(b'bytes'):08x}"
    reused = DecodedRequest(writer_id="w", sequence=5, batch=Batch(), raw=b"other bytes")
    assert pipeline.origin(reused) != pipeline.origin(grpc)  # a reused sequence number never drops data
    kafka = DecodedRequest(writer_id="w", sequence=5, batch=Batch(), origin="kafka:writes:3:41:1")
    assert pipeline.origin(kafka) == "kafka:writes:3:41:1"  # the offset, which a redelivery repeats
    rest = DecodedRequest(writer_id="rest", sequence=0, batch=Batch())
    assert pipeline.origin(rest).startswith("once:") and pipeline.origin(rest) != pipeline.origin(rest)
    merged = Batch.merge([Batch(origins=("a",)), Batch(origins=("b",))])
    assert merged.origins == ("a", "b")


def test_a_client_retry_of_a_request_is_dropped_at_insert(server: RunningServer) -> None:
    """Through a real server: the same request (writer, sequence) sent three times, each acknowledged before the
    next, is stored once, not three times left for merges to fold (merges are stopped)."""
    assert server.sql is not None
    write = raw_write(server.target)
    rid = "d3" * 16
    request = encode_request(
        ingest_pb2.WriteRequest(runs=[run_upsert(rid)], writer_id="w" * 32, sequence=1), [points(rid, 1000)]
    )
    for _ in range(3):
        write(request)
    assert stored_rows.raw_rows(server.sql, rid) == 1000
    other = encode_request(
        ingest_pb2.WriteRequest(runs=[run_upsert(rid)], writer_id="w" * 32, sequence=2), [points(rid, 1000)]
    )
    write(other)  # the same points in another request: stored, and left to reads and merges
    assert stored_rows.raw_rows(server.sql, rid) == 2000
    reused = encode_request(
        ingest_pb2.WriteRequest(runs=[run_upsert(rid)], writer_id="w" * 32, sequence=1), [points(rid, 1000, start=5000)]
    )
    write(reused)  # a writer reusing a sequence number for other points loses nothing
    assert stored_rows.raw_rows(server.sql, rid) == 3000
