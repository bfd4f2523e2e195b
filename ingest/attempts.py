"""Checks that points claim only attempts the server started (query.attempts numbers them on resume).

A client sends the attempt its resume was given (MetricBlock.attempt); 0 is a run's first attempt, so an
old client, or a late point of the attempt that was preempted (a Kafka backlog, a replayed spool), lands
in attempt 0, which the later attempts supersede. A number the server never gave out is refused
(INVALID_ARGUMENT; Kafka: the dead-letter topic), so no client can make up a row version that outranks
the real attempts. Attempts only grow, so a known one is cached for good.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

import numpy as np

from trackhouse.ingest.batch import Batch
from trackhouse.ingest.errors import InvalidArgumentError
from trackhouse.query import attempts
from trackhouse.query.connection import Client


class AttemptCheck:
    def __init__(self, client: Client, database: str, cache_entries: int) -> None:
        self._client = client
        self._database = database
        self._capacity = cache_entries
        self._known: OrderedDict[str, int] = OrderedDict()  # run_id -> highest attempt started

    async def check(self, batch: Batch) -> None:
        claims = claimed_attempts(batch)
        if not claims:
            return
        unknown = [run_id for run_id, attempt in claims.items() if self._known.get(run_id, 0) < attempt]
        if unknown:
            found = await asyncio.to_thread(attempts.known_attempts, self._client, self._database, unknown)
            for run_id, attempt in found.items():
                self._remember(run_id, attempt)
        for run_id, attempt in sorted(claims.items()):
            if self._known.get(run_id, 0) < attempt:
                raise InvalidArgumentError(
                    f"run {run_id!r}: attempt {attempt} was never started; resume the run to get an attempt"
                    " (Client.start_run(resume=...), or POST /api/2.0/trackhouse/runs/resume)"
                )

    def _remember(self, run_id: str, attempt: int) -> None:
        self._known[run_id] = max(attempt, self._known.get(run_id, 0))
        self._known.move_to_end(run_id)
        while len(self._known) > self._capacity:
            self._known.popitem(last=False)


def claimed_attempts(batch: Batch) -> dict[str, int]:
    """The highest attempt after the first that the batch's points claim, per run (numpy over the source and
    run dictionaries; empty without a look at the points in the usual case)."""
    metrics = batch.metrics
    if not metrics.sourced or not any(source[2] for source in metrics.sources):
        return {}
    per_source = np.array([source[2] for source in metrics.sources], np.int64)
    pairs = np.unique(metrics.run_index.astype(np.int64) * len(per_source) + metrics.source_index)
    claims: dict[str, int] = {}
    for pair in pairs.tolist():
        run_id, attempt = metrics.run_ids[pair // len(per_source)], int(per_source[pair % len(per_source)])
        if attempt:
            claims[run_id] = max(attempt, claims.get(run_id, 0))
    return claims
