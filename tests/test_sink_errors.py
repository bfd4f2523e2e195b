"""ingest/sink.py's storage-error classification, fed the exceptions clickhouse-connect really raises.

Retryable means the server's state (connection, load, too many parts): the batcher retries and nothing is lost.
Permanent means the data or the schema: retrying cannot help, so the write fails at once.
"""

from __future__ import annotations

import asyncio

import clickhouse_connect
import numpy as np
import pytest
from clickhouse_connect.driver import exceptions as ch_errors

from tests.tansu import free_port
from trackhouse.ingest.batch import Batch, Metrics
from trackhouse.ingest.batcher import Batcher
from trackhouse.ingest.config import BatcherConfig
from trackhouse.ingest.errors import PermanentError, RetryableError
from trackhouse.ingest.sink import ClickHouseSink, classify
from trackhouse.ingest.telemetry import Telemetry
from trackhouse.query.connection import Client

DB = "trackhouse"


def points(n: int, start: int = 0) -> Batch:
    return Batch(
        metrics=Metrics(
            run_ids=("run",),
            keys=("loss",),
            run_index=np.zeros(n, np.int32),
            key_index=np.zeros(n, np.int32),
            step=np.arange(start, start + n, dtype=np.int64),
            timestamp=np.zeros(n, np.int64),
            value=np.ones(n),
        )
    )


def stored(sql: Client) -> int:
    return int(sql.query(f"SELECT count() FROM {DB}.metrics").result_rows[0][0])


def test_a_connection_failure_is_retryable() -> None:
    with pytest.raises(ch_errors.OperationalError) as caught:  # nothing listens there
        clickhouse_connect.get_client(host="127.0.0.1", port=free_port(), connect_timeout=5)
    assert isinstance(classify(caught.value), RetryableError)


def test_a_missing_database_is_permanent(sql: Client) -> None:
    with pytest.raises(PermanentError, match="UNKNOWN_DATABASE") as caught:
        ClickHouseSink(sql, "no_such_database").write(points(5))
    assert isinstance(caught.value.__cause__, ch_errors.DatabaseError)


def test_too_many_parts_is_retried_until_the_store_recovers(sql: Client) -> None:
    """Code 252 from the real server: the batcher backs off and retries, and the batch lands once parts are allowed."""
    sql.command(f"SYSTEM STOP MERGES {DB}.metrics")
    sql.command(f"ALTER TABLE {DB}.metrics MODIFY SETTING parts_to_throw_insert = 1")
    sink = ClickHouseSink(sql, DB)
    sink.write(points(5))  # the one part allowed
    with pytest.raises(RetryableError, match="Code: 252") as caught:
        sink.write(points(5, 5))
    assert isinstance(caught.value.__cause__, ch_errors.DatabaseError)

    async def scenario() -> int:
        telemetry = Telemetry()
        batcher = Batcher(sink, BatcherConfig(flush_points=5, flush_interval_ms=10, max_backoff_ms=100), telemetry)
        await batcher.start()
        durable = batcher.submit(points(5, 5))
        while telemetry.insert_retries._value.get() < 2:  # bounded by the test's timeout
            await asyncio.sleep(0.01)
        assert not durable.done()
        await asyncio.to_thread(sql.command, f"ALTER TABLE {DB}.metrics MODIFY SETTING parts_to_throw_insert = 3000")
        await asyncio.wait_for(durable, timeout=60)
        await batcher.stop()
        return int(telemetry.insert_failures._value.get())

    assert asyncio.run(scenario()) == 0
    assert stored(sql) == 10


def test_a_permanent_error_fails_the_write_without_retries(sql: Client) -> None:
    async def scenario() -> tuple[BaseException | None, float]:
        telemetry = Telemetry()
        batcher = Batcher(ClickHouseSink(sql, "no_such_database"), BatcherConfig(flush_interval_ms=10), telemetry)
        await batcher.start()
        durable = batcher.submit(points(5))
        with pytest.raises(PermanentError):
            await asyncio.wait_for(durable, timeout=60)
        await batcher.stop()
        return durable.exception(), telemetry.insert_retries._value.get()

    failure, retries = asyncio.run(scenario())
    assert isinstance(failure, PermanentError) and "UNKNOWN_DATABASE" in str(failure)
    assert retries == 0
