"""The sink as nodes of an older trackhouse version run it, for tests of rolling upgrades and migrations."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from trackhouse.ingest.batch import Batch, Metrics
from trackhouse.ingest.sink import ClickHouseSink
from trackhouse.query import schema


@contextmanager
def sink_before_migration_15() -> Iterator[None]:
    """Inside, ClickHouseSink writes no by-key copy of the latest points, as before migration 15."""
    insert = ClickHouseSink._insert_arrow
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(
            ClickHouseSink,
            "_insert_arrow",
            lambda self, table, data: None if table == schema.LATEST_BY_KEY else insert(self, table, data),
        )
        yield


def falling_loss(run_id: str, points: int) -> Batch:
    """`points` steps of one key, "loss", falling from 1 to 0, all at timestamp 5."""
    return Batch(
        metrics=Metrics(
            run_ids=(run_id,),
            keys=("loss",),
            run_index=np.zeros(points, np.int32),
            key_index=np.zeros(points, np.int32),
            step=np.arange(points, dtype=np.int64),
            timestamp=np.full(points, 5, np.int64),
            value=np.linspace(1, 0, points),
        )
    )
