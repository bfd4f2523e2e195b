"""The Kafka receiver: a consumer group feeding the same write pipeline as gRPC.

- At-least-once: auto-commit is off. A partition's offset is committed only up
  to the last message whose insert has returned, with no gaps. Redelivered
  points are harmless, because every read deduplicates (see DESIGN.md); a
  redelivery batched as before is dropped at insert (its offsets name the token).
- Back-pressure: while the batcher is full, fetching pauses and the message is
  retried. Kafka keeps the backlog, and memory stays bounded by the fetch sizes.
- Poison messages (undecodable bytes, a wrong schema version, invalid keys, an
  unknown run) go to the dead-letter topic with the reason in headers. They are
  counted and committed past, and the rest of the partition keeps moving.
- Rebalance: before partitions are given away, what was taken from them is
  made durable and committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, replace

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError, MessageSizeTooLargeError
from aiokafka.structs import ConsumerRecord

from trackhouse.ingest import kafka
from trackhouse.ingest.codec import DecodedRequest, decode_request
from trackhouse.ingest.config import KafkaConfig
from trackhouse.ingest.errors import InvalidArgumentError, PermanentError, QueueFullError, RetryableError
from trackhouse.ingest.pipeline import Writer
from trackhouse.ingest.telemetry import Telemetry

log = logging.getLogger(__name__)

ERROR_HEADER = "trackhouse-error"
SOURCE_HEADER = "trackhouse-source"
#: Set instead of the value when the broker will not take a poison message back whole: its size in bytes.
DROPPED_BYTES_HEADER = "trackhouse-dropped-bytes"
DEAD_LETTER_HEADROOM = 64 * 1024
_POLL_MS = 100
_MAX_RECORDS = 1_000


@dataclass(slots=True)
class _Taken:
    """A message handed to the pipeline; done when `durable` completes (None: nothing to wait for)."""

    offset: int
    durable: asyncio.Future[None] | None
    record: ConsumerRecord[bytes, bytes]


class KafkaReceiver:
    def __init__(self, writer: Writer, config: KafkaConfig, max_message_bytes: int, telemetry: Telemetry) -> None:
        self._writer = writer
        self._config = config
        self._max_message_bytes = max_message_bytes
        self._telemetry = telemetry
        self._consumer: AIOKafkaConsumer[bytes, bytes] = AIOKafkaConsumer(
            **config.connection_args(),
            group_id=config.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=config.max_partition_fetch_bytes,
            fetch_max_bytes=2 * config.max_partition_fetch_bytes,
        )
        # A poison message can be as large as anything the consumer fetches, plus the headers saying why;
        # the producer's default limit (1 MB) would refuse a larger one for ever and stall its partition.
        self._dead_letter_producer = AIOKafkaProducer(
            **config.connection_args(),
            acks="all",
            max_request_size=max(config.max_partition_fetch_bytes, max_message_bytes) + DEAD_LETTER_HEADROOM,
        )
        self._taken: dict[TopicPartition, deque[_Taken]] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await kafka.ensure_topics(self._config)
        await self._dead_letter_producer.start()
        self._consumer.subscribe([self._config.topic], listener=_Rebalance(self))
        await self._consumer.start()
        self._task = asyncio.create_task(self._run(), name="kafka-receiver")

    async def stop(self) -> None:
        """Stop fetching, make everything taken durable, commit, leave the group. Idempotent."""
        self._stopping = True
        if self._task is not None:
            await self._task
            self._task = None
        with contextlib.suppress(KafkaError):
            await self._consumer.stop()
        with contextlib.suppress(KafkaError):
            await self._dead_letter_producer.stop()

    async def _run(self) -> None:
        try:
            while not self._stopping:
                records = await self._consumer.getmany(timeout_ms=_POLL_MS, max_records=_MAX_RECORDS)
                for tp, messages in records.items():
                    for message in messages:
                        if not await self._take(tp, message):
                            break  # shutting down: the rest is redelivered to whoever takes over
                await self._commit_durable()
                self._report_lag()
        except Exception:
            log.exception("Kafka receiver failed; uncommitted messages will be redelivered")
            raise
        finally:
            await self._settle(list(self._taken))

    async def _take(self, tp: TopicPartition, message: ConsumerRecord[bytes, bytes]) -> bool:
        """Hand one message to the pipeline. False when the server is shutting down."""
        try:
            request = replace(decode_request(message.value or b"", self._max_message_bytes), origin=origin(message))
            durable = await self._accept_when_room(request)
        except PermanentError as exc:  # undecodable, invalid, or refused by the catalog: poison
            await self._dead_letter(message, exc)
            self._remember(tp, _Taken(message.offset, None, message))
            return True
        if durable is None:
            return False
        self._remember(tp, _Taken(message.offset, asyncio.ensure_future(durable), message))
        return True

    async def _accept_when_room(self, request: DecodedRequest) -> Awaitable[None] | None:
        """Accept into the pipeline, pausing fetching while its queue is full. None when shutting down."""
        paused = False
        try:
            while True:
                try:
                    return await self._writer.accept(request)
                except QueueFullError as exc:
                    if not paused:  # Kafka holds the backlog meanwhile
                        self._consumer.pause(*self._consumer.assignment())
                        self._telemetry.kafka_fetch_pauses.inc()
                        paused = True
                    if self._stopping:
                        return None
                    await asyncio.sleep(exc.retry_after_ms / 1000)
                except RetryableError:
                    return None
        finally:
            if paused:
                self._consumer.resume(*self._consumer.assignment())

    def _remember(self, tp: TopicPartition, taken: _Taken) -> None:
        self._taken.setdefault(tp, deque()).append(taken)

    async def _commit_durable(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        """Commit, per partition, past the longest prefix of messages that are durable or dead-lettered."""
        offsets: dict[TopicPartition, int] = {}
        for tp in list(partitions if partitions is not None else self._taken):
            queue = self._taken.get(tp)
            while queue and (queue[0].durable is None or queue[0].durable.done()):
                taken = queue[0]
                failure = taken.durable.exception() if taken.durable is not None else None
                if isinstance(failure, PermanentError):  # storage refused it: it is poison, not a hold-up
                    await self._dead_letter(taken.record, failure)
                elif failure is not None:
                    break  # not stored (shutdown): leave it for redelivery
                queue.popleft()
                offsets[tp] = taken.offset + 1
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
            advanced = sum(offset - self._committed.get(tp, offset) for tp, offset in offsets.items())
            self._committed.update(offsets)
            self._telemetry.kafka_committed_messages.inc(max(0, advanced))
        except (CommitFailedError, KafkaError) as exc:  # a rebalance took them; the new owner redelivers
            log.warning("offset commit failed, messages will be redelivered: %r", exc)

    async def _settle(self, partitions: list[TopicPartition]) -> None:
        """Wait until everything taken from `partitions` is durable, commit it, and forget them."""
        waiting = [t.durable for tp in partitions for t in self._taken.get(tp, ()) if t.durable is not None]
        if waiting:
            await asyncio.wait(waiting)
        await self._commit_durable(partitions)
        for tp in partitions:
            self._taken.pop(tp, None)
            self._committed.pop(tp, None)

    async def _dead_letter(self, message: ConsumerRecord[bytes, bytes], exc: Exception) -> None:
        headers = [
            (ERROR_HEADER, str(exc)[:4000].encode()),
            (SOURCE_HEADER, f"{message.topic}/{message.partition}/{message.offset}".encode()),
        ]
        value = message.value
        while True:
            try:
                delivered = await self._dead_letter_producer.send(
                    self._config.dead_letters, key=message.key, value=value, headers=headers
                )
                await delivered
                break
            except MessageSizeTooLargeError:
                # Permanent: the broker's own limit for the dead-letter topic is lower than the message. Keep the
                # record of it (source, reason, size) without its value, so the partition moves on.
                if value is None:
                    raise
                log.error("the dead-letter topic refused %d bytes; keeping the record without the value", len(value))
                headers.append((DROPPED_BYTES_HEADER, str(len(value)).encode()))
                value = None
            except KafkaError as error:  # the partition cannot move past it until it is kept somewhere
                log.warning("dead-letter produce failed, retrying: %r", error)
                await asyncio.sleep(1)
        # A fixed set of labels, like gRPC's rejected{reason}: dashboards must not follow error class names.
        reason = "invalid_argument" if isinstance(exc, InvalidArgumentError) else "storage_rejected"
        self._telemetry.dead_lettered.labels(reason=reason).inc()
        log.warning("dead-lettered %s/%d@%d: %s", message.topic, message.partition, message.offset, exc)

    def _report_lag(self) -> None:
        """Consumer lag per partition: messages in the log not yet durably consumed (committed)."""
        for tp in self._consumer.assignment():
            highwater = self._consumer.highwater(tp)
            if highwater is not None and tp in self._committed:
                self._telemetry.kafka_lag.labels(partition=str(tp.partition)).set(
                    max(0, highwater - self._committed[tp])
                )

    async def _assigned(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._committed[tp] = await self._consumer.committed(tp) or 0


def origin(message: ConsumerRecord[bytes, bytes]) -> str:
    """A message's place in the log, which every redelivery repeats: its deduplication origin (ingest.pipeline)."""
    return f"kafka:{message.topic}:{message.partition}:{message.offset}:{message.timestamp}"


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka ships no types: Any base
    def __init__(self, receiver: KafkaReceiver) -> None:
        self._receiver = receiver

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._receiver._settle(list(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self._receiver._assigned(list(assigned))
