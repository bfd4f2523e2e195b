"""The bounded batcher: many small write requests in, one large insert per flush out.

Capacity is counted in points (Batch.size). `submit` either takes a batch and
returns a future that completes once the insert holding it has returned, or
refuses at once with QueueFullError: it never drops data and never grows past
its bound. A flush happens at `flush_points` or `flush_interval_ms` after the
oldest pending point, whichever comes first; one insert runs at a time, in a
worker thread, while the next batch accumulates on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

from trackhouse.ingest.batch import Batch
from trackhouse.ingest.config import BatcherConfig
from trackhouse.ingest.errors import (
    InvalidArgumentError,
    PermanentError,
    QueueFullError,
    RetryableError,
    UnavailableError,
)
from trackhouse.ingest.sink import Sink
from trackhouse.ingest.telemetry import Telemetry

log = logging.getLogger(__name__)

_FIRST_BACKOFF_S = 0.05


class Batcher:
    def __init__(self, sink: Sink, config: BatcherConfig, telemetry: Telemetry) -> None:
        self._sink = sink
        self._config = config
        self._telemetry = telemetry
        self._pending: list[tuple[Batch, asyncio.Future[None]]] = []
        self._pending_size = 0
        self._held = 0  # pending plus being inserted: what the bound applies to
        self._oldest_at = 0.0
        self._flush_at = 0.0  # the earliest deadline any pending batch asked for
        self._wake = asyncio.Event()
        self._closing = False
        self._drain_deadline = float("inf")
        self._task: asyncio.Task[None] | None = None
        self._inserting_since: float | None = None  # arrival of the oldest point in the insert under way
        telemetry.oldest_unflushed_seconds.set_function(self.oldest_age)

    def oldest_age(self) -> float:
        """Seconds since the oldest point still held arrived; 0 when nothing is held."""
        oldest = [t for t in (self._inserting_since, self._oldest_at if self._pending else None) if t is not None]
        return time.monotonic() - min(oldest) if oldest else 0.0

    @property
    def held_points(self) -> int:
        return self._held

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="batcher")

    def submit(self, batch: Batch, flush_within_ms: int | None = None) -> asyncio.Future[None]:
        """Queue `batch`; the future completes once it is durable. Raises at once when it cannot be taken.

        `flush_within_ms` shortens the wait for this batch: an MLflow client makes one
        synchronous call per logged value, so it cannot wait out a long flush interval.
        """
        size = batch.size
        if self._closing:
            raise UnavailableError("server is shutting down", retry_after_ms=1000)
        if size > self._config.max_queue_points:
            raise InvalidArgumentError(
                f"request holds {size} points, more than the server's whole queue"
                f" ({self._config.max_queue_points}); split it"
            )
        if self._held + size > self._config.max_queue_points:
            raise QueueFullError(
                f"write queue is full ({self._held} of {self._config.max_queue_points} points)",
                retry_after_ms=self._config.flush_interval_ms,
            )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        now = time.monotonic()
        flush_at = now + (flush_within_ms if flush_within_ms is not None else self._config.flush_interval_ms) / 1000
        if not self._pending:
            self._oldest_at = now
            self._flush_at = flush_at
            self._wake.set()  # starts the flush timer
        elif flush_at < self._flush_at:
            self._flush_at = flush_at
            self._wake.set()
        self._pending.append((batch, future))
        self._pending_size += size
        self._held += size
        self._telemetry.queue_points.set(self._held)
        if self._pending_size >= self._config.flush_points:
            self._wake.set()
        return future

    async def stop(self) -> None:
        """Stop taking batches, flush everything pending, then return. Idempotent; works without start()."""
        if not self._closing:
            self._closing = True
            self._drain_deadline = time.monotonic() + self._config.drain_timeout_ms / 1000
            self._wake.set()
        if self._task is not None:
            await self._task
        for _, future in self._pending:  # only when start() never ran
            if not future.done():
                future.set_exception(UnavailableError("server stopped before this write was stored"))
        self._pending = []

    async def _run(self) -> None:
        while self._pending or not self._closing:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            remaining = self._flush_at - time.monotonic()
            if not self._closing and self._pending_size < self._config.flush_points and remaining > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), remaining)
                continue
            items, self._pending, self._pending_size = self._pending, [], 0
            self._inserting_since = self._oldest_at
            try:
                await self._flush(items)
            finally:
                self._inserting_since = None

    async def _flush(self, items: list[tuple[Batch, asyncio.Future[None]]]) -> None:
        size = sum(batch.size for batch, _ in items)
        try:
            try:
                await self._write(Batch.merge([batch for batch, _ in items]))
                outcomes: list[BaseException | None] = [None] * len(items)
            except PermanentError:
                # One bad request must not fail the others it was merged with: retry each alone.
                outcomes = [await self._write_alone(batch) for batch, _ in items]
            except RetryableError as exc:
                outcomes = [UnavailableError(f"not stored before shutdown: {exc}")] * len(items)
        finally:
            self._held -= size
            self._telemetry.queue_points.set(self._held)
        for (_, future), outcome in zip(items, outcomes, strict=True):
            if future.done():  # the writer went away; the data is stored regardless
                continue
            if outcome is None:
                future.set_result(None)
            else:
                future.set_exception(outcome)

    async def _write_alone(self, batch: Batch) -> BaseException | None:
        try:
            await self._write(batch)
        except (PermanentError, RetryableError) as exc:
            return exc
        return None

    async def _write(self, batch: Batch) -> None:
        """Insert with exponential backoff and jitter on retryable errors, until shutdown's deadline."""
        attempt = 0
        while True:
            started = time.perf_counter()
            try:
                await asyncio.to_thread(self._sink.write, batch)
            except RetryableError as exc:
                attempt += 1
                self._telemetry.insert_retries.inc()
                delay = min(self._config.max_backoff_ms / 1000, _FIRST_BACKOFF_S * 2**attempt)
                delay *= random.uniform(0.5, 1.0)
                if self._closing and time.monotonic() + delay > self._drain_deadline:
                    raise
                log.warning("insert failed (attempt %d), retrying in %.2fs: %s", attempt, delay, exc)
                await asyncio.sleep(delay)
                continue
            except PermanentError:
                self._telemetry.insert_failures.inc()
                raise
            except Exception as exc:  # a bug or an unclassified driver error must fail the batch, not hang it
                self._telemetry.insert_failures.inc()
                log.exception("insert failed unexpectedly")
                raise PermanentError(f"insert failed: {exc}") from exc
            self._telemetry.insert_seconds.observe(time.perf_counter() - started)
            self._telemetry.batch_points.observe(batch.points)
            self._telemetry.inserted_points.inc(batch.points)
            return
