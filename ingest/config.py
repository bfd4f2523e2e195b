"""Configuration of the write path: frozen, validated at construction, documented per field."""

from __future__ import annotations

from dataclasses import dataclass, field

from trackhouse.ingest.errors import PermanentError

DEFAULT_FLUSH_POINTS = 250_000
DEFAULT_FLUSH_INTERVAL_MS = 200
DEFAULT_MAX_QUEUE_POINTS = 4_000_000
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class ConfigError(PermanentError):
    """A setting is out of range, or two settings contradict each other."""


@dataclass(frozen=True, slots=True)
class BatcherConfig:
    #: Flush once this many points are pending. Bigger inserts are cheaper per row in ClickHouse.
    flush_points: int = DEFAULT_FLUSH_POINTS
    #: Flush at the latest this long after the oldest pending point arrived.
    flush_interval_ms: int = DEFAULT_FLUSH_INTERVAL_MS
    #: Most points held (pending plus being inserted). A write past it gets RESOURCE_EXHAUSTED.
    max_queue_points: int = DEFAULT_MAX_QUEUE_POINTS
    #: Longest wait between insert retries after a retryable storage error.
    max_backoff_ms: int = 5_000
    #: How long shutdown may spend draining before it fails what is left (clients then resend).
    drain_timeout_ms: int = 30_000

    def __post_init__(self) -> None:
        if self.flush_points <= 0 or self.flush_interval_ms <= 0:
            raise ConfigError("flush_points and flush_interval_ms must be positive")
        if self.max_queue_points < self.flush_points:
            raise ConfigError(
                f"max_queue_points ({self.max_queue_points}) must be at least flush_points ({self.flush_points})"
            )


#: How long a storing node trusts what it learnt of runs' and experiments' existence and names: the bound on how
#: long another node's delete, restore or rename can go unnoticed by this node's writes.
DEFAULT_CATALOG_CACHE_SECONDS = 2


@dataclass(frozen=True, slots=True)
class ReceiverConfig:
    #: Largest WriteRequest accepted, in bytes. gRPC itself is allowed twice this, so that a request
    #: between the two gets a clear INVALID_ARGUMENT from us rather than gRPC's generic error.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: Run ids and params remembered to skip a storage lookup per request.
    catalog_cache_entries: int = 100_000
    #: Seconds a node trusts what it learnt of runs' and experiments' existence and names (other nodes may
    #: delete, restore or rename them); param winners are final and kept regardless.
    catalog_cache_seconds: float = DEFAULT_CATALOG_CACHE_SECONDS

    def __post_init__(self) -> None:
        if self.max_message_bytes < 1024:
            raise ConfigError("max_message_bytes must be at least 1024")
        if self.catalog_cache_seconds < 0:
            raise ConfigError("catalog_cache_seconds must not be negative")


DEFAULT_KAFKA_TOPIC = "trackhouse.writes"
DEFAULT_KAFKA_GROUP_ID = "trackhouse-workers"
DEFAULT_KAFKA_PARTITIONS = 12


@dataclass(frozen=True, slots=True)
class KafkaConfig:
    #: Comma-separated host:port list.
    bootstrap: str
    #: The topic carrying WriteRequest bytes, keyed by run_id.
    topic: str = DEFAULT_KAFKA_TOPIC
    #: Where undecodable or invalid messages go, with the reason in headers. Empty: "<topic>.dlq".
    dead_letter_topic: str = ""
    #: The workers' consumer group.
    group_id: str = DEFAULT_KAFKA_GROUP_ID
    client_id: str = "trackhouse"
    #: Partitions of the topic when trackhouse has to create it. Runs spread over partitions by key.
    partitions: int = DEFAULT_KAFKA_PARTITIONS
    #: Replicas when trackhouse creates the topics: 1 suits one broker; use 3 on a production cluster.
    replication_factor: int = 1
    #: Passed through to aiokafka: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    #: Never printed: kept out of the config's repr.
    sasl_password: str = field(default="", repr=False)
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    #: Most bytes fetched per partition per request (bounds the worker's read-ahead memory).
    max_partition_fetch_bytes: int = 32 * 1024 * 1024
    #: How long a gateway waits for the broker's acks=all before answering UNAVAILABLE.
    produce_timeout_ms: int = 10_000

    def __post_init__(self) -> None:
        if not self.bootstrap:
            raise ConfigError("Kafka needs a bootstrap server list")
        if self.partitions <= 0:
            raise ConfigError("partitions must be positive")

    @property
    def dead_letters(self) -> str:
        return self.dead_letter_topic or f"{self.topic}.dlq"

    def connection_args(self) -> dict[str, object]:
        """Arguments every aiokafka client here shares: servers, identity, security."""
        args: dict[str, object] = {
            "bootstrap_servers": self.bootstrap,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            args.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        if self.security_protocol.endswith("SSL"):
            from aiokafka.helpers import create_ssl_context

            args["ssl_context"] = create_ssl_context(
                cafile=self.ssl_cafile or None, certfile=self.ssl_certfile or None, keyfile=self.ssl_keyfile or None
            )
        return args
