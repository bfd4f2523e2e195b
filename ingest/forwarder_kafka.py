"""The gateway's Writer: forwards each validated request to Kafka, keyed by run_id.

A request counts as durable once the broker has acknowledged it with acks=all,
so the gateway acknowledges the gRPC write only then. If the broker cannot be
reached within `produce_timeout_ms`, the write fails with UNAVAILABLE and the
client keeps the data and retries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from trackhouse.ingest import kafka
from trackhouse.ingest.codec import DecodedRequest, split_by_run
from trackhouse.ingest.config import KafkaConfig
from trackhouse.ingest.errors import UnavailableError
from trackhouse.ingest.telemetry import Telemetry


class KafkaForwarder:
    def __init__(self, config: KafkaConfig, max_message_bytes: int, telemetry: Telemetry) -> None:
        self._config = config
        self._telemetry = telemetry
        self._closing = False
        self._producer = AIOKafkaProducer(
            **config.connection_args(),
            acks="all",
            linger_ms=5,
            max_request_size=max_message_bytes,
            request_timeout_ms=config.produce_timeout_ms,
            # Requests from different clients are independent; retries may reorder
            # only across runs, never within one request's sends.
            enable_idempotence=False,
        )

    async def start(self) -> None:
        await kafka.ensure_topics(self._config)
        await self._producer.start()

    async def stop(self) -> None:
        """Stop taking writes; sends already handed to the producer are flushed first."""
        self._closing = True
        await self._producer.stop()

    async def accept(self, request: DecodedRequest) -> Awaitable[None]:
        """Hand the request's messages to the producer now, in call order, so each run keeps its order."""
        if self._closing:
            raise UnavailableError("gateway is shutting down", retry_after_ms=1000)
        timeout = self._config.produce_timeout_ms / 1000
        try:
            deliveries = [
                await asyncio.wait_for(self._producer.send(self._config.topic, key=run_id.encode(), value=raw), timeout)
                for run_id, raw in split_by_run(request)
            ]
        except KafkaError as exc:
            raise kafka.classify(exc) from exc
        except TimeoutError:
            raise UnavailableError(f"Kafka metadata unavailable for {timeout:g}s", retry_after_ms=1000) from None
        self._telemetry.received_points.inc(request.batch.points)
        return asyncio.ensure_future(self._acknowledged(deliveries, timeout))

    @staticmethod
    async def _acknowledged(deliveries: list[asyncio.Future[object]], timeout: float) -> None:
        try:
            await asyncio.wait_for(asyncio.gather(*deliveries), timeout)
        except KafkaError as exc:
            raise kafka.classify(exc) from exc
        except TimeoutError:
            raise UnavailableError(f"Kafka did not acknowledge within {timeout:g}s", retry_after_ms=1000) from None
