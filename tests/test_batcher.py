"""The batcher against the real ClickHouse sink on chDB.

Where a test needs storage to fail, it wraps the real sink at the Sink protocol
boundary; the database itself is never replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np
import pytest

from trackhouse.ingest.batch import Batch, Metrics
from trackhouse.ingest.batcher import Batcher
from trackhouse.ingest.config import BatcherConfig, ConfigError
from trackhouse.ingest.errors import (
    InvalidArgumentError,
    PermanentError,
    QueueFullError,
    RetryableError,
    UnavailableError,
)
from trackhouse.ingest.sink import ClickHouseSink
from trackhouse.ingest.telemetry import Telemetry
from trackhouse.query.connection import Client


class RecordingSink:
    """The real sink, plus a record of insert sizes and optional injected failures."""

    def __init__(self, inner: ClickHouseSink, fail_retryable: int = 0, poison_run: str = "") -> None:
        self.inner = inner
        self.inserts: list[int] = []
        self.fail_retryable = fail_retryable
        self.poison_run = poison_run

    def write(self, batch: Batch) -> None:
        if self.fail_retryable:
            self.fail_retryable -= 1
            raise RetryableError("storage restarting")
        if self.poison_run and self.poison_run in batch.metrics.run_ids:
            raise PermanentError("storage rejected the batch")
        self.inner.write(batch)
        self.inserts.append(batch.points)

    def close(self) -> None:
        self.inner.close()


def points(run_id: str, n: int, start: int = 0) -> Batch:
    return Batch(
        metrics=Metrics(
            run_ids=(run_id,),
            keys=("loss",),
            run_index=np.zeros(n, np.int32),
            key_index=np.zeros(n, np.int32),
            step=np.arange(start, start + n, dtype=np.int64),
            timestamp=np.zeros(n, np.int64),
            value=np.ones(n),
        )
    )


def stored(sql: Client, run_id: str) -> int:
    query = "SELECT count() FROM trackhouse.metrics WHERE run_id = {r:String}"
    return int(sql.query(query, parameters={"r": run_id}).result_rows[0][0])


def sink_for(sql: Client, **kwargs: object) -> RecordingSink:
    return RecordingSink(ClickHouseSink(sql, "trackhouse"), **kwargs)  # type: ignore[arg-type]


def test_flushes_at_n_points_without_waiting_for_the_timer(sql: Client) -> None:
    sink = sink_for(sql)

    async def scenario() -> float:
        batcher = Batcher(sink, BatcherConfig(flush_points=1_000, flush_interval_ms=60_000), Telemetry())
        await batcher.start()
        started = time.monotonic()
        futures = [batcher.submit(points("n", 250, i * 250)) for i in range(4)]
        await asyncio.gather(*futures)
        elapsed = time.monotonic() - started
        await batcher.stop()
        return elapsed

    assert asyncio.run(scenario()) < 30  # far below the 60 s timer
    assert sink.inserts == [1_000]  # four requests, one insert
    assert stored(sql, "n") == 1_000


def test_flushes_after_t_ms_when_points_trickle(sql: Client) -> None:
    sink = sink_for(sql)

    async def scenario() -> float:
        batcher = Batcher(sink, BatcherConfig(flush_points=1_000_000, flush_interval_ms=100), Telemetry())
        await batcher.start()
        started = time.monotonic()
        # Bounded: a batcher that ignored the interval would leave this waiting until stop(), which never comes.
        await asyncio.wait_for(batcher.submit(points("t", 10)), timeout=30)
        elapsed = time.monotonic() - started
        await batcher.stop()
        return elapsed

    assert 0.1 <= asyncio.run(scenario()) < 30  # the 100 ms timer, far below the bound
    assert sink.inserts == [10]


def test_a_short_deadline_flushes_early_and_takes_waiting_batches_along(sql: Client) -> None:
    sink = sink_for(sql)

    async def scenario() -> float:
        batcher = Batcher(sink, BatcherConfig(flush_points=1_000_000, flush_interval_ms=60_000), Telemetry())
        await batcher.start()
        started = time.monotonic()
        patient = batcher.submit(points("bulk", 100))
        await batcher.submit(points("rest", 10), flush_within_ms=5)  # an MLflow client waiting on its call
        elapsed = time.monotonic() - started
        assert patient.done()  # shared the same insert
        await batcher.stop()
        return elapsed

    assert asyncio.run(scenario()) < 30  # far below the 60 s timer
    assert sink.inserts == [110]


def test_a_full_queue_refuses_and_never_holds_more_than_its_bound(sql: Client) -> None:
    telemetry = Telemetry()

    async def scenario() -> None:
        batcher = Batcher(sink_for(sql), BatcherConfig(flush_points=500, max_queue_points=1_000), telemetry)
        # Not started: nothing drains, so the bound alone decides.
        accepted = [batcher.submit(points("q", 400, i * 400)) for i in range(2)]
        with pytest.raises(QueueFullError) as info:
            batcher.submit(points("q", 400, 800))
        assert info.value.retry_after_ms > 0
        with pytest.raises(InvalidArgumentError, match="more than the server's whole queue"):
            batcher.submit(points("q", 1_001))
        assert batcher.held_points == 800
        await batcher.start()
        await asyncio.gather(*accepted)
        assert batcher.held_points == 0
        await batcher.submit(points("q", 400, 800))  # room again
        await batcher.stop()

    asyncio.run(scenario())
    assert stored(sql, "q") == 1_200
    assert telemetry.queue_points._value.get() == 0


def test_stop_drains_pending_points_and_then_refuses(sql: Client) -> None:
    async def scenario() -> None:
        batcher = Batcher(sink_for(sql), BatcherConfig(flush_points=10_000, flush_interval_ms=60_000), Telemetry())
        await batcher.start()
        pending = batcher.submit(points("s", 123))
        await batcher.stop()
        assert pending.done() and pending.exception() is None
        with pytest.raises(UnavailableError):
            batcher.submit(points("s", 1))

    asyncio.run(scenario())
    assert stored(sql, "s") == 123


def test_stop_without_start_fails_what_it_holds() -> None:
    async def scenario() -> None:
        batcher = Batcher(RecordingSink(None), BatcherConfig(), Telemetry())  # type: ignore[arg-type]
        pending = batcher.submit(points("x", 5))
        await batcher.stop()
        with pytest.raises(UnavailableError):
            await pending

    asyncio.run(scenario())


def test_retryable_storage_errors_are_retried_until_they_pass(sql: Client) -> None:
    telemetry = Telemetry()
    sink = sink_for(sql, fail_retryable=2)

    async def scenario() -> None:
        batcher = Batcher(sink, BatcherConfig(flush_interval_ms=10, max_backoff_ms=50), telemetry)
        await batcher.start()
        await batcher.submit(points("r", 50))
        await batcher.stop()

    asyncio.run(scenario())
    assert stored(sql, "r") == 50
    assert telemetry.insert_retries._value.get() == 2


def test_one_poison_request_fails_alone_and_its_flush_mates_are_stored(sql: Client) -> None:
    sink = sink_for(sql, poison_run="poison")

    async def scenario() -> list[BaseException | None]:
        batcher = Batcher(sink, BatcherConfig(flush_points=1_000, flush_interval_ms=60_000), Telemetry())
        await batcher.start()
        futures = [batcher.submit(points(run, 250)) for run in ("good1", "poison", "good2", "good3")]
        results = await asyncio.gather(*futures, return_exceptions=True)
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    assert [r is None for r in results] == [True, False, True, True]
    assert isinstance(results[1], PermanentError)
    assert [stored(sql, r) for r in ("good1", "poison", "good2", "good3")] == [250, 0, 250, 250]


def test_contradictory_settings_fail_at_construction() -> None:
    with pytest.raises(ConfigError, match="at least flush_points"):
        BatcherConfig(flush_points=1_000, max_queue_points=999)


def test_shutdown_gives_up_on_a_failing_store_at_its_deadline(sql: Client) -> None:
    """While running, the batcher retries a store that keeps failing; at shutdown it retries only until the drain
    deadline, then fails what is left (so clients resend it elsewhere) instead of hanging."""
    sink = sink_for(sql, fail_retryable=10**9)  # storage that never comes back

    async def scenario() -> tuple[BaseException | None, int, int]:
        telemetry = Telemetry()
        config = BatcherConfig(flush_points=10, flush_interval_ms=10, max_backoff_ms=100, drain_timeout_ms=1_000)
        batcher = Batcher(sink, config, telemetry)
        await batcher.start()
        durable = batcher.submit(points("down", 10))
        while telemetry.insert_retries._value.get() < 5:  # bounded by the test's timeout
            await asyncio.sleep(0.01)
        assert not durable.done(), "it gave up before shutdown: a storage outage must be ridden out"
        retries_before_stop = int(telemetry.insert_retries._value.get())
        await asyncio.wait_for(batcher.stop(), timeout=30)  # returns: the deadline is 1 s
        with contextlib.suppress(BaseException):
            await durable
        return durable.exception(), retries_before_stop, int(telemetry.insert_retries._value.get())

    failure, before, after = asyncio.run(scenario())
    assert isinstance(failure, RetryableError)  # retryable: the client keeps the points and resends them
    assert after > before  # it kept trying during the drain, then stopped at the deadline
    assert sink.inserts == []
    assert stored(sql, "down") == 0
