"""A page known to hold many metric keys has its latest metrics read in two halves at once
(query.runs.latest_metrics_reads), on a backend of two real chDB clients: the runs come back as one read gives them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from trackhouse.compat.artifact_roots import ArtifactRoots
from trackhouse.compat.backend import Backend, BackendConfig
from trackhouse.compat.experiments import ExperimentsApi
from trackhouse.compat.runs import RunsApi
from trackhouse.ingest.batch import Batch, Metrics, RunRow
from trackhouse.ingest.sink import ClickHouseSink
from trackhouse.query import runs, schema
from trackhouse.query.connection import Client, StoreConfig, connect

DB = "trackhouse"
RUNS = ["h1", "h2", "h3", "h4", "h5"]
KEYS = 6


class RecordingBackend(Backend):
    """A real backend that also keeps which runs each latest-metrics read asked for."""

    def __init__(self, clients: list[Client]) -> None:
        super().__init__(clients, BackendConfig(DB), None)
        self.rendered: list[list[str]] = []

    async def read(self, query: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if query is runs.latest_metrics_json:
            self.rendered.append(list(args[0]))
        return await super().read(query, *args, **kwargs)


@pytest.fixture
def clients(tmp_path: Path) -> Iterator[list[Client]]:
    config = StoreConfig.for_data_dir(tmp_path / "data")
    opened = [connect(config), connect(config)]
    schema.migrate(opened[0], DB)
    sink = ClickHouseSink(opened[0], DB)
    n = len(RUNS) * KEYS
    sink.write(
        Batch(
            runs=tuple(RunRow(r, "0", r, "FINISHED", 1_700_000_000_000 + i, 0, "u", 1) for i, r in enumerate(RUNS)),
            metrics=Metrics(
                run_ids=tuple(RUNS),
                keys=tuple(f"layer.{k}.norm" for k in range(KEYS)),
                run_index=np.repeat(np.arange(len(RUNS), dtype=np.int32), KEYS),
                key_index=np.tile(np.arange(KEYS, dtype=np.int32), len(RUNS)),
                step=np.arange(n, dtype=np.int64),
                timestamp=np.full(n, 1_700_000_000_000, np.int64),
                value=np.linspace(-1, 1, n),
            ),
        )
    )
    runs.forget_keys()
    yield opened
    runs.forget_keys()
    for client in opened:
        client.close()


def test_a_page_known_to_hold_many_keys_is_read_in_halves_with_the_same_answer(
    clients: list[Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runs, "SPLIT_METRICS_KEYS", len(RUNS) * KEYS - 1)
    asyncio.run(_reads_in_halves(clients))


async def _reads_in_halves(clients: list[Client]) -> None:
    backend = RecordingBackend(clients)  # in this loop: its client queue belongs to it
    api = RunsApi(backend, ExperimentsApi(backend, ArtifactRoots(None)))
    page = ["h3", "h1", "absent", "h5", "h2", "h4"]

    first = await api._wire_runs(page)  # nothing known of these runs yet: one read, which learns their keys
    second = await api._wire_runs(page)
    assert backend.rendered == [page, page[:3], page[3:]]
    assert orjson.dumps(second) == orjson.dumps(first)  # the rendered metrics are orjson fragments
    answer = orjson.loads(orjson.dumps(first))
    assert [run["info"]["run_id"] for run in answer] == ["h3", "h1", "h5", "h2", "h4"]
    assert all(len(run["data"]["metrics"]) == KEYS for run in answer)

    # A page under the bound, and a single run however heavy, are read whole.
    backend.rendered.clear()
    await api._wire_runs(["h1", "h2"])
    await api._wire_runs(["h4"])
    assert backend.rendered == [["h1", "h2"], ["h4"]]
