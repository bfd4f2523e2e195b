"""What the Kafka forwarder and receiver share: topic set-up and the error split."""

from __future__ import annotations

import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, TopicAlreadyExistsError

from trackhouse.ingest.config import KafkaConfig
from trackhouse.ingest.errors import IngestError, InvalidArgumentError, UnavailableError

log = logging.getLogger(__name__)


async def ensure_topics(config: KafkaConfig) -> None:
    """Create the write and dead-letter topics when missing. Existing topics are left as they are."""
    admin = AIOKafkaAdminClient(**config.connection_args())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(config.topic, num_partitions=config.partitions, replication_factor=config.replication_factor),
            NewTopic(config.dead_letters, num_partitions=1, replication_factor=config.replication_factor),
        ]
        missing = [t for t in wanted if t.name not in existing]
        if missing:
            try:
                await admin.create_topics(missing)
                log.info("created Kafka topics %s", [t.name for t in missing])
            except TopicAlreadyExistsError:  # another node won the race
                pass
    finally:
        await admin.close()


def classify(exc: KafkaError) -> IngestError:
    """A message too large for the broker can never succeed; anything else is the broker's state."""
    if isinstance(exc, MessageSizeTooLargeError):
        return InvalidArgumentError(f"request is too large for the Kafka broker: {exc}")
    return UnavailableError(f"Kafka unavailable: {exc!r}", retry_after_ms=500)
