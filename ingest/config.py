"""Configuration of the write path: frozen, validated at construction, documented per field."""

from __future__ import annotations

from dataclasses import dataclass

from ingest.errors import PermanentError

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


@dataclass(frozen=True, slots=True)
class ReceiverConfig:
    #: Largest WriteRequest accepted, in bytes. gRPC itself is allowed twice this, so that a request
    #: between the two gets a clear INVALID_ARGUMENT from us rather than gRPC's generic error.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: Run ids and params remembered to skip a storage lookup per request.
    catalog_cache_entries: int = 100_000

    def __post_init__(self) -> None:
        if self.max_message_bytes < 1024:
            raise ConfigError("max_message_bytes must be at least 1024")
