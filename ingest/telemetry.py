"""The write path's own counts, exposed on the HTTP `/metrics` endpoint in Prometheus format.

Each server owns a registry, so several servers in one process (tests) keep separate counts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_POINT_BUCKETS = (1e3, 1e4, 5e4, 1e5, 2.5e5, 5e5, 1e6, 2.5e6)
_SECOND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Telemetry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received_requests = Counter("trackhouse_received_requests", "Write requests received", registry=r)
        self.received_points = Counter(
            "trackhouse_received_points", "Metric points accepted into the queue", registry=r
        )
        self.rejected_requests = Counter(
            "trackhouse_rejected_requests", "Write requests rejected, by reason", ["reason"], registry=r
        )
        self.queue_points = Gauge(
            "trackhouse_queue_points", "Points held by the batcher (pending and inserting)", registry=r
        )
        self.batch_points = Histogram(
            "trackhouse_batch_points", "Points per insert", buckets=_POINT_BUCKETS, registry=r
        )
        self.insert_seconds = Histogram(
            "trackhouse_insert_seconds", "Duration of one batch insert", buckets=_SECOND_BUCKETS, registry=r
        )
        self.inserted_points = Counter("trackhouse_inserted_points", "Metric points durably inserted", registry=r)
        self.insert_retries = Counter(
            "trackhouse_insert_retries", "Insert attempts retried after a retryable error", registry=r
        )
        self.insert_failures = Counter("trackhouse_insert_failures", "Batches that failed permanently", registry=r)

        self.dead_lettered = Counter(
            "trackhouse_dead_lettered",
            "Kafka messages sent to the dead-letter topic, by reason",
            ["reason"],
            registry=r,
        )
        self.kafka_fetch_pauses = Counter(
            "trackhouse_kafka_fetch_pauses",
            "Times the Kafka worker paused fetching because the batcher's queue was full",
            registry=r,
        )
        self.kafka_committed_messages = Counter(
            "trackhouse_kafka_committed_messages",
            "Kafka messages the worker committed past: stored or dead-lettered, never redelivered after a crash",
            registry=r,
        )
        self.kafka_lag = Gauge(
            "trackhouse_kafka_lag",
            "Messages in the log not yet durably consumed, per partition",
            ["partition"],
            registry=r,
        )
        self.oldest_unflushed_seconds = Gauge(
            "trackhouse_oldest_unflushed_seconds",
            "Age of the oldest point held by the batcher, 0 when empty",
            registry=r,
        )

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
