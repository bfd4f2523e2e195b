"""What the caller touches: Client, Run, their config and stats. Logging never waits on the network.

`log_*` calls append to per-run columnar buffers (array.array, no object kept
per point). A background thread drains them every `linger_ms`, or sooner when
`request_points` are waiting, into WriteRequests, and streams them over one
gRPC WriteStream, each request sized to the limits the server announced
in the connection's handshake (points and bytes). A request stays in memory until the server acknowledges
it, which it does only once the data is stored; after a disconnect or a
retryable refusal the client reconnects with backoff and resends every
unacknowledged request in order, with its original sequence number.

Memory is bounded: buffered plus unacknowledged points never exceed
`max_buffer_points`. When full, `full_policy="block"` (the default) makes the
logging call wait for acknowledgements, `full_policy="raise"` raises
BufferFullError, and `full_policy="drop"` discards the new points and counts
them in `stats().dropped_points`.

With a spool (`spool_dir=` or TRACKHOUSE_SPOOL_DIR; see spool.py), requests the
server cannot take (it is unreachable, restarting, or answers RESOURCE_EXHAUSTED)
move from memory to disk on the sender thread, fsynced per batch, so the logging
call keeps running at memory speed until the spool's `spool_max_bytes` are used
too; only then does `full_policy` apply. Spooled requests are resent in order
when the server is back, and a client that starts on the same directory replays
what a dead one left there.

A request the server refuses for good (invalid, too large) is never resent:
its points count in `stats().failed_points`, and the next flush() raises
saying how many points failed and why.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import getpass
import logging
import os
import random
import socket
import threading
import time
import uuid
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

import numpy as np
import numpy.typing as npt

from trackhouse.ingest import validation
from trackhouse.ingest.batch import NO_SOURCE, Source
from trackhouse.ingest.client import runs as client_runs
from trackhouse.ingest.client.buffers import RunBuffer, by_run, shape
from trackhouse.ingest.client.spool import SPOOL_DIR_ENV, Spool, SpoolDepth
from trackhouse.ingest.client.transport import (
    Credentials,
    GrpcSession,
    KafkaSession,
    Limits,
    Refused,
    Request,
    RetryLater,
    Target,
    channel_credentials,
)
from trackhouse.ingest.codec import STATUS_VALUES, BlockColumns
from trackhouse.ingest.errors import IngestError, InvalidArgumentError
from trackhouse.v1 import ingest_pb2, runs_pb2

log = logging.getLogger(__name__)

FullPolicy = Literal["block", "raise", "drop"]
_LATENCY_SAMPLES = 100_000
#: With a spool: how long a first connection may take before points go to disk meanwhile.
_AWAY_GRACE_S = 1.0
#: Once close() has begun: how long the connection may take to end on its own before the sender cuts it.
_CLOSE_GRACE_S = 2.0


class BufferFullError(IngestError):
    """No room for the points logged: full_policy="raise", or "block" waited `block_timeout_s`.

    The call's points were not taken (all or nothing); everything logged before it still is.
    """


@dataclass(frozen=True, slots=True)
class ClientConfig:
    #: Bound on points buffered plus sent-but-unacknowledged (about 28 bytes each).
    max_buffer_points: int = 2_000_000
    #: What a logging call does when the bound (and the spool's cap, with a spool) is reached: "block" until room
    #: frees, "raise" BufferFullError, or "drop" the points and count them in stats().dropped_points.
    full_policy: FullPolicy = "block"
    #: With "block": raise BufferFullError after waiting this long. None waits indefinitely.
    block_timeout_s: float | None = None
    #: Most points in one request; the server's limits (learned on connecting) may make requests smaller.
    request_points: int = 250_000
    #: Buffered points are sent at least this often.
    linger_ms: int = 50
    #: Longest wait between reconnect attempts.
    max_backoff_s: float = 5.0
    #: How long close() (and so the context manager and atexit) waits for acknowledgements.
    close_timeout_s: float = 120.0
    #: With a spool: the most bytes it holds on disk (segments of up to 64 MiB). Then full_policy applies.
    spool_max_bytes: int = 1024 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.full_policy not in ("block", "raise", "drop"):
            raise ValueError(f"full_policy must be 'block', 'raise' or 'drop', not {self.full_policy!r}")
        if self.spool_max_bytes <= 0:
            raise ValueError("spool_max_bytes must be positive")
        if not 0 < self.request_points <= self.max_buffer_points:
            raise ValueError("request_points must be positive and at most max_buffer_points")


@dataclass(frozen=True, slots=True)
class ClientStats:
    buffered_points: int
    unacknowledged_points: int
    acknowledged_points: int
    dropped_points: int
    rejected_requests: int
    reconnects: int
    #: Points (and run, param, tag rows) the server refused for good; flush() and close() report them.
    failed_points: int = 0
    #: On disk in the spool, waiting for the server (points count run, param and tag rows too).
    spooled_bytes: int = 0
    spooled_requests: int = 0
    spooled_points: int = 0
    #: Seconds since the oldest request still spooled was written; 0 when the spool is empty.
    spool_oldest_age_s: float = 0.0


class Client:
    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        config: ClientConfig | None = None,
        *,
        token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        tls: bool | None = None,
        ca_bundle: str | os.PathLike[str] | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """Log to `target`: host:port, grpcs://host:port (TLS), or kafka://host:port[,host:port]/topic.

        Credentials go in every call's `authorization` metadata: `token` (Bearer), or
        `username` and `password` (Basic). Without arguments, MLflow's variables apply:
        MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD.
        `tls=True` (or grpcs://) verifies the server against `ca_bundle` (PEM), else
        MLFLOW_TRACKING_SERVER_CERT_PATH, else the system's roots.

        `spool_dir` (else TRACKHOUSE_SPOOL_DIR) keeps what the server cannot take yet on disk, and replays what
        an earlier client left there. Kafka targets need none: the broker is the durable buffer.
        """
        self._target = target
        self._config = config or ClientConfig()
        parsed = Target.parse(target, tls)
        self._kafka = parsed.kafka_topic is not None
        linger_s = self._config.linger_ms / 1000
        self._transport: GrpcSession | KafkaSession
        if self._kafka:
            self._transport = KafkaSession(parsed, linger_s)
        else:
            credentials = Credentials.resolve(token, username, password)
            if parsed.exposes(credentials):
                log.warning("trackhouse client: sending credentials to %s without TLS; use grpcs://", parsed.address)
            secure = channel_credentials(ca_bundle) if parsed.tls else None
            self._transport = GrpcSession(parsed, credentials, secure, linger_s)
        self.writer_id = uuid.uuid4().hex
        self._lock = threading.Condition()
        # Guarded by _lock:
        self._runs: dict[tuple[str, Source], RunBuffer] = {}
        self._head = ingest_pb2.WriteRequest()  # run upserts, params, tags waiting to be sent
        self._buffered = 0
        self._inflight: OrderedDict[int, Request] = OrderedDict()
        self._inflight_size = 0
        self._next_sequence = 1
        self._drains_started = 0  # a drain takes the buffer when it starts...
        self._drains_done = 0  # ...and its requests exist once it is done
        self._acked = 0
        self._dropped = 0
        self._rejected: list[str] = []  # why, since the last flush
        self._rejected_points = 0  # how many, since the last flush
        self._rejected_total = 0
        self._failed_points = 0
        self._reconnects = 0
        self._ack_latencies: deque[float] = deque(maxlen=_LATENCY_SAMPLES)
        self._closing = False
        self._stopped = False
        self._failure: Exception | None = None
        self._wake_requested = False
        # Learned from the server on each connection; until then nothing is encoded, so nothing is too large.
        # Kafka has no handshake: its producer's own limits apply from the start.
        self._limits: Limits | None = KafkaSession.LIMITS if self._kafka else None
        self._spool = self._open_spool(spool_dir)
        self._spooled = 0  # points (and rows) in requests whose bytes are on disk, not in memory
        self._spool_full = False
        self._spooling_since: float | None = None
        self._spooled_total = 0  # points (and rows) that went through the spool since it was last empty
        self._connected = False  # the current connection's handshake succeeded, and nothing failed since
        self._away_since: float | None = time.monotonic()  # not connected since (monotonic seconds)
        self._room_wanted = 0  # logging calls waiting for room under the bound
        self._retry_reason = ""
        if self._spool is not None:
            self._recover()
        self._loop = asyncio.new_event_loop()
        self._wake = asyncio.Event()
        self._close_begun = asyncio.Event()  # set on the loop when close() begins; cuts a connection that hangs
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._run(),), daemon=True)
        self._thread.name = f"trackhouse-client-{self.writer_id[:8]}"
        self._thread.start()
        self._atexit = _close_at_exit(weakref.ref(self))
        atexit.register(self._atexit)

    # ----- the caller's side -----

    def start_run(
        self,
        experiment: str = "Default",
        name: str | None = None,
        params: Mapping[str, object] | None = None,
        tags: Mapping[str, object] | None = None,
        run_id: str | None = None,
        *,
        rank: int | None = None,
        node: str | None = None,
        resume: str | None = None,
    ) -> Run:
        """Create a run (status RUNNING) in `experiment`, created if missing. Returns at once.

        In a distributed job, rank 0 starts the run and the other ranks `attach_run` to it. `rank` and
        `node` label this process's points; by default they come from the launcher's variables (see
        `launcher_source`).

        `resume=run_id` reopens that run instead (after a preemption, say) as its next attempt, which the
        server numbers: a blocking call. From the first step the new attempt logs of a key, its points
        supersede the earlier attempts' in every read. Hand `run.attempt` to other ranks' `attach_run`.
        """
        if resume is not None:
            return self._resume(resume, params or {}, tags or {}, launcher_source(rank, node))
        validation.check_experiment_name(experiment)
        run_id = run_id or uuid.uuid4().hex
        validation.check_run_id(run_id)
        upsert = ingest_pb2.RunUpsert(
            run_id=run_id,
            experiment_name=experiment,
            name=name or f"run-{run_id[:8]}",
            status=ingest_pb2.RUNNING,
            start_time_ms=_now_ms(),
            user=_user(),
            version=time.time_ns(),
        )
        run = Run(self, run_id, upsert, launcher_source(rank, node))
        # MLflow keeps the run name as a tag too; its UI and clients read it there.
        run._add_meta(upsert, params or {}, {"mlflow.runName": upsert.name, **(tags or {})})
        return run

    def attach_run(self, run_id: str, *, rank: int | None = None, node: str | None = None, attempt: int = 0) -> Run:
        """Log into a run another process started (e.g. rank 0 of a distributed job).

        The run must be stored before its points arrive: have the starting
        process call `flush()` before it hands out the run id. `rank` and `node`
        label this process's points; by default they come from the launcher's
        variables (see `launcher_source`). `attempt` is the one the resuming
        process got (`Run.attempt`); 0 is the run's first.
        """
        validation.check_run_id(run_id)
        rank_, node_, _ = launcher_source(rank, node)
        if not 0 <= attempt < 2**32:
            raise InvalidArgumentError(f"attempt {attempt} is out of range: 0 to 2**32-1")
        return Run(self, run_id, None, (rank_, node_, attempt))

    def fork_run(
        self,
        parent_run_id: str,
        at_step: int,
        name: str | None = None,
        params: Mapping[str, object] | None = None,
        tags: Mapping[str, object] | None = None,
        *,
        run_id: str | None = None,
        rank: int | None = None,
        node: str | None = None,
    ) -> Run:
        """Create a child run, in the parent's experiment, whose reads show the parent's points at steps up
        to and including `at_step` (not copied), then its own. From the first step the child logs of a key,
        its points replace the parent's. A blocking call; this client's points logged so far are flushed first,
        so the parent may be a run it just started."""
        validation.check_run_id(parent_run_id)
        if run_id is not None:
            validation.check_run_id(run_id)
        self.flush()
        reply = client_runs.fork_run(self._transport, parent_run_id, int(at_step), name or "", run_id or "")
        run = Run(self, reply.run.run_id, _upsert_of(reply.run), launcher_source(rank, node))
        if params or tags:
            run._add_meta(None, params or {}, tags or {})
        return run

    def _resume(self, run_id: str, params: Mapping[str, object], tags: Mapping[str, object], source: Source) -> Run:
        validation.check_run_id(run_id)
        reply = client_runs.resume_run(self._transport, run_id)
        run = Run(self, run_id, _upsert_of(reply.run), (source[0], source[1], reply.attempt))
        if params or tags:
            run._add_meta(None, params, tags)
        return run

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything logged before this call is acknowledged.

        Raises TimeoutError when `timeout` passes first, and InvalidArgumentError,
        naming how many points failed and why, when the server permanently
        refused requests since the last flush.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            # The first drain to start after this call takes everything logged before it.
            drain = self._drains_started + 1
            self._request_send()
            self._wait(lambda: self._drains_done >= drain or self._stopped, deadline)
            last = self._next_sequence - 1
            self._wait(lambda: not self._inflight or next(iter(self._inflight)) > last or self._stopped, deadline)
            self._raise_failure()
            self._raise_rejected()

    def close(self, timeout: float | None = None) -> None:
        """Flush, then stop the sender. Raises if data could not be delivered within the timeout."""
        timeout = self._config.close_timeout_s if timeout is None else timeout
        atexit.unregister(self._atexit)
        try:
            if not self._stopped:
                self.flush(timeout)
        except TimeoutError:
            if self._spool is None:
                raise
            # Not lost: the sender spools whatever is left as it stops, and a later client replays it.
        finally:
            with self._lock:
                self._closing = True
                self._request_send()
                if not self._loop.is_closed():
                    self._loop.call_soon_threadsafe(self._close_begun.set)
            # With a spool, the sender writes what memory holds (at most max_buffer_points) before it stops.
            self._thread.join(timeout=5 if self._spool is None else 120)
            with self._lock:
                lost = self._buffered + self._inflight_size
                kept = self._spooled
                failure = self._failure
            if not self._thread.is_alive():
                self._loop.close()
                if self._spool is not None:
                    where = ", ".join(str(d) for d in self._spool.directories())
                    self._spool.close()
                    if kept:
                        log.warning(
                            "trackhouse client: closed with %d points kept in the spool (%s); a client started on"
                            " %s, or `trackhouse replay %s`, delivers them",
                            kept,
                            where,
                            self._spool.root,
                            self._spool.root,
                        )
            if lost:
                why = f": {failure}" if failure else ""
                raise IngestError(f"closed with {lost} points not acknowledged by {self._target}{why}")

    def ack_latencies(self) -> list[float]:
        """Seconds from first sending a request to its acknowledgement, for the latest requests."""
        with self._lock:
            return list(self._ack_latencies)

    def stats(self) -> ClientStats:
        depth = self._spool.depth() if self._spool is not None else SpoolDepth(0, 0, 0, 0.0)
        with self._lock:
            return ClientStats(
                buffered_points=self._buffered,
                unacknowledged_points=self._inflight_size,
                acknowledged_points=self._acked,
                dropped_points=self._dropped,
                rejected_requests=self._rejected_total,
                reconnects=self._reconnects,
                failed_points=self._failed_points,
                spooled_bytes=depth.bytes,
                spooled_requests=depth.requests,
                spooled_points=depth.points,
                spool_oldest_age_s=depth.oldest_age_s,
            )

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ----- buffering (called by Run under no lock) -----

    def _append_metrics(
        self, run_id: str, source: Source, metrics: Mapping[str, float], step: int, timestamp_ms: int
    ) -> None:
        n = len(metrics)
        with self._lock:
            if not self._reserve(n):
                return
            buffer = self._buffer_for(run_id, source)
            key_index, values = buffer.key_index, buffer.values
            mark = len(values)
            try:
                for key, value in metrics.items():  # bools, Python's or numpy's, store as 1.0 and 0.0, as in MLflow
                    key_index.append(buffer.key_id(key))
                    values.append(value)
            except (TypeError, InvalidArgumentError) as exc:
                del key_index[mark:], values[mark:]  # all or nothing, as MLflow's log_metrics
                self._buffered -= n
                if isinstance(exc, TypeError):
                    raise InvalidArgumentError(f"metric value {value!r} for {key!r} is not a number") from None
                raise
            buffer.steps.append(step)
            buffer.timestamps.append(timestamp_ms)
            buffer.counts.append(n)
            if self._buffered >= self._config.request_points:
                self._request_send()

    def _append_series(
        self,
        run_id: str,
        source: Source,
        key: str,
        steps: npt.NDArray[np.int64],
        values: npt.NDArray[np.float64],
        timestamps: npt.NDArray[np.int64],
    ) -> None:
        # In request-sized pieces, so a series larger than the whole buffer still fits piece by piece.
        chunk = self._config.request_points
        for start in range(0, len(values), chunk):
            end = start + chunk
            with self._lock:
                if not self._reserve(len(values[start:end])):
                    continue
                buffer = self._buffer_for(run_id, source)
                buffer.series.append((buffer.key_id(key), steps[start:end], values[start:end], timestamps[start:end]))
                if self._buffered >= self._config.request_points:
                    self._request_send()

    def _append_meta(
        self, runs: list[ingest_pb2.RunUpsert], params: list[ingest_pb2.Param], tags: list[ingest_pb2.Tag]
    ) -> None:
        with self._lock:
            if not self._reserve(len(runs) + len(params) + len(tags), droppable=False):
                return
            self._head.runs.extend(runs)
            self._head.params.extend(params)
            self._head.tags.extend(tags)

    def _buffer_for(self, run_id: str, source: Source) -> RunBuffer:
        buffer = self._runs.get((run_id, source))
        if buffer is None:
            buffer = self._runs[run_id, source] = RunBuffer(run_id, source)
        return buffer

    def _reserve(self, n: int, droppable: bool = True) -> bool:
        """Make room for n points under the bound (lock held). False when the points are dropped."""
        if self._closing:
            raise IngestError("client is closed")
        self._raise_failure()
        limit = self._config.max_buffer_points
        policy = "block" if not droppable and self._config.full_policy == "drop" else self._config.full_policy

        def room() -> bool:
            used = self._buffered + self._inflight_size
            # Anything is admitted into an empty buffer, so an oversized call cannot wait forever.
            return used + n <= limit or used == 0

        if not room():
            # With a spool that has room, the sender moves requests to disk: wait for that, whatever the policy.
            self._room_wanted += 1
            self._request_send()
            try:
                gave_up = self._spool is None or self._spool_full
                if not (policy != "block" and gave_up):
                    waited = self._lock.wait_for(
                        lambda: room() or self._stopped or (policy != "block" and self._spool_full),
                        self._config.block_timeout_s,
                    )
                    if not waited:
                        raise BufferFullError(f"{self._full()} for {self._config.block_timeout_s}s")
            finally:
                self._room_wanted -= 1
            if self._stopped:
                raise IngestError("client is closed")
            if not room():
                if policy == "drop":
                    self._dropped += n
                    return False
                raise BufferFullError(f"{self._full()}: these {n} points were not logged")
        self._buffered += n
        return True

    def _full(self) -> str:
        memory = f"buffer full ({self._config.max_buffer_points} points in memory"
        if self._spool is None:
            return memory + ")"
        return f"{memory}, and the spool's {self._spool.max_bytes} bytes under {self._spool.root})"

    def _request_send(self) -> None:
        if not self._wake_requested and not self._loop.is_closed():
            self._wake_requested = True
            self._loop.call_soon_threadsafe(self._wake.set)

    def _wait(self, predicate: Callable[[], bool], deadline: float | None) -> None:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._lock.wait_for(predicate, remaining):
            left = self._buffered + self._inflight_size + self._spooled
            raise TimeoutError(f"{left} points still unacknowledged by {self._target}")

    def _raise_failure(self) -> None:
        if self._failure is not None:
            lost = self._buffered + self._inflight_size
            raise IngestError(
                f"the client's sender stopped, {lost} points not delivered: {self._failure}"
            ) from self._failure

    def _raise_rejected(self) -> None:
        if self._rejected:
            errors, self._rejected = self._rejected, []
            points, self._rejected_points = self._rejected_points, 0
            raise InvalidArgumentError(
                f"{points} points in {len(errors)} write request(s) rejected by the server; first: {errors[0]}"
            )

    # ----- the sender thread -----

    def _drain(self) -> None:
        """Turn everything buffered into requests, in order, and hold them until acknowledged.

        Points move from buffered to in flight in one locked step, so the bound
        holds throughout, and flush() never sees a drain before its requests exist.
        """
        limits = self._limits
        if limits is None and self._spool is not None:
            limits = Limits()  # never connected yet, so the defaults: a request the server finds too large fails
        if limits is None:
            return  # not yet connected: the requests' size depends on the server's limits
        with self._lock:
            self._drains_started += 1
            drain = self._drains_started
            self._wake_requested = False
            head, self._head = self._head, ingest_pb2.WriteRequest()
            blocks = [b for b in (buf.take() for buf in self._runs.values()) if b is not None]
            size = len(head.runs) + len(head.params) + len(head.tags) + sum(len(b.value) for b in blocks)
        requests = self._encode(head, blocks, limits) if size else []
        assert sum(r.size for r in requests) == size
        with self._lock:
            for request in requests:
                self._inflight[self._next_sequence] = request
                self._next_sequence += 1
            self._buffered -= size
            self._inflight_size += size
            self._drains_done = drain
            self._lock.notify_all()

    def _encode(self, head: ingest_pb2.WriteRequest, blocks: list[BlockColumns], limits: Limits) -> list[Request]:
        """Requests that fit the server's limits; metadata goes first, ahead of the points that need it."""
        groups = by_run(head, blocks) if self._kafka else [(head, blocks)]  # Kafka: the run_id key keeps order
        points = limits.request_points(self._config.request_points)
        requests: list[Request] = []
        for head_, blocks_ in groups:
            sequence = self._next_sequence + len(requests)  # only this thread assigns sequences
            encoded = shape(head_, blocks_, points, limits.request_bytes(), self.writer_id, sequence)
            requests += [Request(e.raw, e.size, e.run_id) for e in encoded]
        return requests

    async def _run(self) -> None:
        # A connection attempt can hang for the handshake's timeout (a host that is down answers nothing); the
        # spool keeps taking points meanwhile, so the logging call never waits on the network.
        keeper = asyncio.create_task(self._spool_while_away()) if self._spool is not None else None
        try:
            attempt = 0
            while True:
                try:
                    await self._transport_until_closed()
                    return
                except RetryLater as exc:
                    self._connected = False
                    self._away_since = self._away_since or time.monotonic()
                    self._retry_reason = str(exc)
                    if self._closing:  # close() has already waited as long as it was allowed to
                        return
                    with self._lock:
                        self._reconnects += 1
                    attempt += 1
                    delay = min(self._config.max_backoff_s, 0.05 * 2**attempt) * random.uniform(0.5, 1.0)
                    if exc.retry_after_ms:
                        delay = max(delay, exc.retry_after_ms / 1000)  # the server's hint, not a failure
                        attempt = 0
                    log.debug("trackhouse client: retrying in %.2fs: %s", delay, exc)
                    await self._sleep_draining(delay)
        except Refused as exc:
            log.error("trackhouse client: %s refused the connection for good: %s", self._target, exc)
            self._failure = exc
        except Exception as exc:
            log.exception("trackhouse client: sender stopped unexpectedly")
            self._failure = exc
        finally:
            if keeper is not None:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)
            # Closing, or refused for good (credentials, say): what memory holds is kept for a later replay.
            if self._spool is not None and (self._closing or isinstance(self._failure, Refused)):
                try:
                    self._drain()
                    self._spool_inflight()
                except Exception:
                    log.exception("trackhouse client: could not spool what was left at close")
            with self._lock:
                self._stopped = True
                self._lock.notify_all()

    async def _transport_until_closed(self) -> None:
        """Run one connection; once close() has begun, let it end on its own for a grace period, then cut it.

        A connection normally ends by itself when the client closes. But a handshake with a host that accepts and
        never answers was seen to outlive its own 10 s deadline on a loaded machine, and close() must not wait on
        the network longer than it was allowed to: what is left then goes to the spool, or is reported lost.
        """
        connection = asyncio.create_task(self._transport.run(self))
        closing = asyncio.create_task(self._close_begun.wait())
        try:
            await asyncio.wait({connection, closing}, return_when=asyncio.FIRST_COMPLETED)
            if not connection.done():
                await asyncio.wait({connection}, timeout=_CLOSE_GRACE_S)
            if not connection.done():
                connection.cancel()
                await asyncio.gather(connection, return_exceptions=True)
                raise RetryLater(f"closed while the connection to {self._target} had not ended after {_CLOSE_GRACE_S}s")
            connection.result()
        finally:
            closing.cancel()
            if not connection.done():  # this coroutine itself was cancelled
                connection.cancel()

    async def _spool_while_away(self) -> None:
        linger = self._config.linger_ms / 1000
        while True:
            away = self._away_since
            if away is None or self._closing or time.monotonic() - away < _AWAY_GRACE_S:
                await asyncio.sleep(linger)
            else:
                await self.linger_then_drain(linger)

    async def _sleep_draining(self, delay: float) -> None:
        """Back off, still turning logged points into requests so that flush() can account for them."""
        deadline = time.monotonic() + delay
        while (remaining := deadline - time.monotonic()) > 0 and not self._closing:
            await self.linger_then_drain(min(remaining, self._config.linger_ms / 1000))

    # ----- the transport's side (transport.Outbox), on the sender thread -----

    async def linger_then_drain(self, timeout: float) -> None:
        """Wait until woken or `timeout` passes, then turn what was logged into requests."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)
        self._drain()
        if self._spool is not None and (not self._connected or self._room_wanted):
            self._spool_inflight()

    def unsent_after(self, sent: int) -> list[tuple[int, Request]] | None:
        """In-flight requests after sequence `sent`, in order; None once close() has begun."""
        with self._lock:
            if self._closing:
                return None
            return [(q, r) for q, r in self._inflight.items() if q > sent]

    def use_limits(self, limits: Limits) -> None:
        log.debug("trackhouse client: server limits %s", limits)
        self._limits = limits
        self._connected = True
        self._away_since = None

    def settle(self, sequence: int, code: int, message: str) -> None:
        with self._lock:
            request = self._inflight.pop(sequence, None)
            if request is None:
                return  # an ack for a resent request that was already acknowledged
            if request.record is None:
                self._inflight_size -= request.size
            else:
                self._unspool(request)
            if code == 0:
                self._acked += request.size
                self._ack_latencies.append(time.monotonic() - request.sent_at)
            else:
                self._rejected.append(message)
                self._rejected_points += request.size
                self._rejected_total += 1
                self._failed_points += request.size
                log.error("trackhouse refused a write request of %d points for good: %s", request.size, message)
            self._lock.notify_all()

    # ----- the spool (on the sender thread, except while the client is built) -----

    def _open_spool(self, spool_dir: str | os.PathLike[str] | None) -> Spool | None:
        path = spool_dir if spool_dir is not None else os.environ.get(SPOOL_DIR_ENV) or None
        if path is None:
            return None
        if self._kafka:
            if spool_dir is not None:
                raise ValueError("kafka:// targets need no spool: the broker is the durable buffer")
            log.info("trackhouse client: %s is ignored for kafka:// targets (the broker is the buffer)", SPOOL_DIR_ENV)
            return None
        return Spool(Path(path), self._config.spool_max_bytes)

    def _recover(self) -> None:
        """Queue, ahead of anything new, what dead clients left in the spool, under this client's sequences."""
        assert self._spool is not None
        records, live = self._spool.adopt()
        for record in records:
            sequence = self._next_sequence
            self._next_sequence += 1
            self._inflight[sequence] = Request(b"", record.size, record=record, suffix=_sequence_field(sequence))
            self._spooled += record.size
        if records:
            self._spooling_since = time.monotonic()
            self._spooled_total = self._spooled
            depth = self._spool.depth()
            log.warning(
                "trackhouse client: replaying %d requests (%d points, %d bytes, oldest %.0fs old) that an earlier"
                " client left in %s",
                depth.requests,
                depth.points,
                depth.bytes,
                depth.oldest_age_s,
                self._spool.root,
            )
        if live:
            log.info("trackhouse client: %d spool directories under %s belong to live clients", live, self._spool.root)

    def _spool_inflight(self) -> None:
        """Move the requests memory holds to disk, in order, as far as the cap allows; fsynced before memory frees."""
        assert self._spool is not None
        with self._lock:
            pending = [(q, r) for q, r in self._inflight.items() if r.record is None]
        if not pending:
            return
        records = self._spool.append([(r.raw, r.size) for _, r in pending])
        with self._lock:
            if records and self._spooling_since is None:
                self._spooling_since = time.monotonic()
                log.warning(
                    "trackhouse client: %s cannot take points (%s); spooling to %s (cap %d bytes)",
                    self._target,
                    self._retry_reason or "memory bound reached",
                    self._spool.root,
                    self._spool.max_bytes,
                )
            for (sequence, request), record in zip(pending, records, strict=False):
                if self._inflight.get(sequence) is request:
                    request.record, request.raw = record, b""
                    self._inflight_size -= request.size
                    self._spooled += request.size
                    self._spooled_total += request.size
                else:
                    self._spool.release(record)  # settled while it was being written
            self._spool_full = len(records) < len(pending)
            self._lock.notify_all()

    def _unspool(self, request: Request) -> None:
        """A spooled request is settled (lock held): free its record, and say so when the spool is empty again."""
        assert self._spool is not None and request.record is not None
        self._spooled -= request.size
        self._spool.release(request.record)
        self._spool_full = False
        if self._spooled == 0 and self._spooling_since is not None:
            log.warning(
                "trackhouse client: spool empty again: %d points replayed to %s, %.1fs after spooling began",
                self._spooled_total,
                self._target,
                time.monotonic() - self._spooling_since,
            )
            self._spooling_since = None
            self._spooled_total = 0


class Run:
    """A handle for logging into one run. Thread-safe: many threads may log into the same run."""

    def __init__(
        self, client: Client, run_id: str, upsert: ingest_pb2.RunUpsert | None, source: Source = NO_SOURCE
    ) -> None:
        self.run_id = run_id
        #: (rank, node, attempt) that every point logged through this handle carries.
        self.source = source
        #: The run's attempt this handle logs under: 0 for a new run, the server's number after a resume.
        self.attempt = source[2]
        self._client = client
        self._upsert = upsert
        self._params: dict[str, str] = {}
        self._params_lock = threading.Lock()

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0, timestamp_ms: int | None = None) -> None:
        """Buffer one value per key at `step`. Returns at once (unless the buffer is full and the policy blocks)."""
        timestamp = time.time_ns() // 1_000_000 if timestamp_ms is None else int(timestamp_ms)
        self._client._append_metrics(self.run_id, self.source, metrics, int(step), timestamp)

    def log_metric(self, key: str, value: float, step: int = 0, timestamp_ms: int | None = None) -> None:
        self.log_metrics({key: value}, step, timestamp_ms)

    def log_series(
        self,
        key: str,
        steps: npt.ArrayLike,
        values: npt.ArrayLike,
        timestamps_ms: npt.ArrayLike | None = None,
    ) -> None:
        """Buffer a whole series at once, columnar. The arrays are copied, so the caller may reuse them."""
        validation.check_key(key)
        value_array = np.asarray(values)
        step_array = np.asarray(steps)
        if value_array.dtype != np.bool_ and not np.issubdtype(value_array.dtype, np.number):
            raise InvalidArgumentError(f"metric {key!r}: values must be numbers, not {value_array.dtype}")
        if not np.issubdtype(step_array.dtype, np.integer):
            raise InvalidArgumentError(f"metric {key!r}: steps must be integers, not {step_array.dtype}")
        n = len(value_array)
        ts = np.full(n, _now_ms(), np.int64) if timestamps_ms is None else np.array(timestamps_ms, dtype=np.int64)
        if not (len(step_array) == n == len(ts)):
            raise InvalidArgumentError(
                f"metric {key!r}: steps, values and timestamps differ in length ({len(step_array)}, {n}, {len(ts)})"
            )
        self._client._append_series(
            self.run_id,
            self.source,
            key,
            step_array.astype(np.int64, copy=True),
            value_array.astype(np.float64, copy=True),
            ts,
        )

    def log_params(self, params: Mapping[str, object]) -> None:
        """Params are immutable: the same value again is fine, another value raises at once."""
        self._add_meta(None, params, {})

    def set_tags(self, tags: Mapping[str, object]) -> None:
        self._add_meta(None, {}, tags)
        if self._upsert is not None and "mlflow.runName" in tags:  # the server renames the run; so must finish()
            renamed = ingest_pb2.RunUpsert()
            renamed.CopyFrom(self._upsert)
            renamed.name = str(tags["mlflow.runName"])
            self._upsert = renamed

    def finish(self, status: str = "FINISHED") -> None:
        """End the run: status FINISHED (or FAILED, KILLED) and the end time."""
        if self._upsert is None:
            raise IngestError("only the process that started the run can finish it")
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise InvalidArgumentError(f"status must be FINISHED, FAILED or KILLED, not {status!r}")
        upsert = ingest_pb2.RunUpsert()
        upsert.CopyFrom(self._upsert)
        upsert.status = STATUS_VALUES[status]
        upsert.end_time_ms = _now_ms()
        upsert.version = max(time.time_ns(), self._upsert.version + 1)
        self._upsert = upsert
        self._add_meta(upsert, {}, {})

    def _add_meta(
        self, upsert: ingest_pb2.RunUpsert | None, params: Mapping[str, object], tags: Mapping[str, object]
    ) -> None:
        param_msgs, tag_msgs = [], []
        version = time.time_ns()
        with self._params_lock:
            fresh: dict[str, str] = {}
            for key, raw in params.items():
                validation.check_key(key, "param")
                value = validation.fit_value("param", key, str(raw), validation.MAX_PARAM_VALUE_LENGTH)
                old = self._params.get(key, fresh.get(key))
                if old is not None and old != value:
                    raise InvalidArgumentError(f"param {key!r} was already logged as {old!r}; params are immutable")
                if old is None:
                    fresh[key] = value
                    param_msgs.append(ingest_pb2.Param(run_id=self.run_id, key=key, value=value))
            for key, raw in tags.items():
                validation.check_key(key, "tag")
                value = validation.fit_value("tag", key, str(raw), validation.MAX_TAG_VALUE_LENGTH)
                tag_msgs.append(ingest_pb2.Tag(run_id=self.run_id, key=key, value=value, version=version))
            self._client._append_meta([upsert] if upsert else [], param_msgs, tag_msgs)
            self._params.update(fresh)


def _upsert_of(run: runs_pb2.RunRef) -> ingest_pb2.RunUpsert:
    """The run's row as the server has it, so that this process may finish it."""
    return ingest_pb2.RunUpsert(
        run_id=run.run_id,
        experiment_id=run.experiment_id,
        name=run.name,
        status=ingest_pb2.RUNNING,
        start_time_ms=run.start_time_ms,
        user=run.user,
        version=time.time_ns(),
    )


def _close_at_exit(ref: weakref.ref[Client]) -> Callable[[], None]:
    def close() -> None:
        client = ref()
        if client is not None:
            try:
                client.close()
            except (IngestError, TimeoutError) as exc:
                log.error("trackhouse client at exit: %s", exc)

    return close


#: Set by torchrun, torch.distributed.launch, Lightning, Accelerate, DeepSpeed and most MPI wrappers.
_LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE")


def launcher_source(rank: int | None = None, node: str | None = None) -> Source:
    """The (rank, node, attempt) a process logs as: the arguments, else what the launcher says.

    - rank: `RANK` (the global rank torchrun sets); else `NODE_RANK` or `GROUP_RANK` times
      `LOCAL_WORLD_SIZE` plus `LOCAL_RANK`; else `LOCAL_RANK`; else 0.
    - node: the host name when any launcher variable is set, else "" (not distributed).

    Outside a launcher both stay unset, so a single process's points carry no source at all.
    """
    env = os.environ
    if rank is None:
        rank = _launcher_rank(env)
    if node is None:
        node = socket.gethostname() if any(v in env for v in _LAUNCHER_VARIABLES) else ""
    if not 0 <= rank < 2**32:
        raise InvalidArgumentError(f"rank {rank} is out of range: 0 to 2**32-1")
    validation.check_node(node)
    return (rank, node, 0)


def _launcher_rank(env: Mapping[str, str]) -> int:
    def number(name: str) -> int | None:
        raw = env.get(name)
        if raw is None:
            return None
        try:
            return int(raw)
        except ValueError:
            raise InvalidArgumentError(f"{name}={raw!r} is not a rank number") from None

    global_rank = number("RANK")
    if global_rank is not None:
        return global_rank
    local_rank = number("LOCAL_RANK")
    node_rank = number("NODE_RANK")
    node_rank = number("GROUP_RANK") if node_rank is None else node_rank
    local_world = number("LOCAL_WORLD_SIZE")
    if local_rank is not None and node_rank is not None and local_world is not None:
        return node_rank * local_world + local_rank
    return local_rank or 0


def _sequence_field(sequence: int) -> bytes:
    """WriteRequest.sequence (field 3, varint) as bytes to append: protobuf keeps a scalar field's last value."""
    out = bytearray(b"\x18")
    while True:
        byte, sequence = sequence & 0x7F, sequence >> 7
        out.append(byte | (0x80 if sequence else 0))
        if not sequence:
            return bytes(out)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
