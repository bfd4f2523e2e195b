"""The rank API (issue 16): a real server, ranks logging from their own processes, answers against numpy.

Four rank processes log `loss` into one run with their own synthetic clocks: rank 1 turns to NaN, rank 2 steps
four times slower, rank 3 stops early (stalled). The answers of runs/ranks, metrics/aggregate and
runs/stragglers are recomputed here from the same values with numpy.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT, RunningServer, start_in_process
from trackhouse import Client
from trackhouse.ingest.batch import Batch, Metrics
from trackhouse.ingest.sink import ClickHouseSink
from trackhouse.query import schema

RANKS = 4
#: Long enough for the step rate's 256-step windows to matter.
STEPS = 400
T0 = 1_700_000_000_000
NAN_RANK, SLOW_RANK, STALLED_RANK = 1, 2, 3
NAN_FROM, STALLED_AT = 150, 80
#: Milliseconds per step: 10, but the slow rank takes 40 until SPEEDS_UP_AT and 20 after.
SPEEDS_UP_AT = 300


def node_of(rank: int) -> str:
    return f"node{rank // 2}"


def rank_points(rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, timestamps, values) rank `rank` logs."""
    last = STALLED_AT if rank == STALLED_RANK else STEPS - 1
    steps = np.arange(last + 1, dtype=np.int64)
    values = 2.0 * np.exp(-steps / 100) + np.random.default_rng(rank).random(len(steps)) * 0.1
    if rank == NAN_RANK:
        values[steps >= NAN_FROM] = np.nan
    if rank == SLOW_RANK:
        return steps, T0 + np.cumsum(np.where(steps <= SPEEDS_UP_AT, 40, 20)) - 40, values
    return steps, T0 + steps * 10, values


def expected_rate(rank: int) -> float:
    """The step rate's definition (query.ranks): from the first point of the older of the 256-step windows
    [k*256, ...) and [k*256 - 128, ...) holding the latest step, to the latest point."""
    steps, timestamps, _ = rank_points(rank)
    last = int(steps[-1])
    start = max(min(last // 256 * 256, (last + 128) // 256 * 256 - 128), 0)
    if start == last:
        start = 0
    return float((last - start) * 1000 / (timestamps[-1] - timestamps[start]))


def log_as_rank(target: str, run_id: str, rank: int) -> None:
    """A rank process: attaches to the run as `rank` on its node and logs its points."""
    steps, timestamps, values = rank_points(rank)
    with Client(target) as client:
        run = client.attach_run(run_id, rank=rank, node=node_of(rank))
        for step, timestamp, value in zip(steps.tolist(), timestamps.tolist(), values.tolist(), strict=True):
            run.log_metrics({"loss": value}, step=step, timestamp_ms=timestamp)


@pytest.fixture(scope="module")
def ranked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, str]]:
    server = start_in_process(tmp_path_factory.mktemp("ranks") / "data")
    try:
        with Client(server.target) as client:
            run_id = client.start_run(experiment="distributed", rank=0, node=node_of(0)).run_id
        with multiprocessing.get_context("spawn").Pool(RANKS) as pool:
            pool.starmap(log_as_rank, [(server.target, run_id, rank) for rank in range(RANKS)])
        yield server, run_id
    finally:
        server.stop()
        if server.sql is not None:
            server.sql.close()


def get(server: RunningServer, path: str, **query: Any) -> tuple[int, dict[str, Any]]:
    url = f"{server.http_url}/api/2.0/trackhouse/{path}?{urllib.parse.urlencode(query, doseq=True)}"
    try:
        with urllib.request.urlopen(url, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_ranks_match_numpy(ranked: tuple[RunningServer, str]) -> None:
    server, run_id = ranked
    status, body = get(server, "runs/ranks", run_id=run_id, metric_key="loss")
    assert status == 200
    assert [(r["rank"], r["node"]) for r in body["ranks"]] == [(r, node_of(r)) for r in range(RANKS)]
    for row in body["ranks"]:
        steps, timestamps, values = rank_points(row["rank"])
        assert row["key"] == "loss"
        assert (row["first_step"], row["last_step"]) == (0, steps[-1])
        assert row["last_timestamp"] == timestamps[-1]
        assert row["last_value"] == values[-1] or (math.isnan(row["last_value"]) and math.isnan(values[-1]))
        assert row["points"] == len(steps)
        assert row["nan_count"] == int(np.isnan(values).sum())
        assert row["inf_count"] == 0
        assert row["step_rate"] == pytest.approx(expected_rate(row["rank"]))


def _expected_bands(width: int) -> list[dict[str, Any]]:
    """Per bucket of `width` steps: each rank's value at its highest step in the bucket, then statistics."""
    by_bucket: dict[int, list[float]] = {}
    for rank in range(RANKS):
        steps, _, values = rank_points(rank)
        for bucket in np.unique(steps // width).tolist():
            by_bucket.setdefault(bucket, []).append(float(values[steps // width == bucket][-1]))
    bands = []
    for bucket, chosen in sorted(by_bucket.items()):
        finite = np.sort([v for v in chosen if math.isfinite(v)])
        n = len(finite)
        bands.append(
            {
                "start_step": bucket * width,
                "count": n,
                "nan": sum(math.isnan(v) for v in chosen),
                "mean": float(finite.mean()),
                "min": float(finite[0]),
                "max": float(finite[-1]),
                # quantilesExact: the value at position floor(n * q) of the sorted values.
                "p50": float(finite[min(n - 1, int(n * 0.5))]),
                "p95": float(finite[min(n - 1, int(n * 0.95))]),
            }
        )
    return bands


@pytest.mark.parametrize(("max_results", "width"), [(500, 1), (13, 32), (7, 64)])
def test_aggregate_matches_numpy(ranked: tuple[RunningServer, str], max_results: int, width: int) -> None:
    """One bucket per step from the points when the series is short enough; whole 32-step summary rows
    otherwise: one per bucket (13 rows, read merged with FINAL), or two (13 rows into at most 7 buckets)."""
    server, run_id = ranked
    status, body = get(server, "metrics/aggregate", run_id=run_id, metric_key="loss", max_results=max_results)
    assert status == 200
    answered = body["buckets"]
    expected = _expected_bands(width)
    assert len(answered) == len(expected) <= max_results
    for got, want in zip(answered, expected, strict=True):
        assert got["start_step"] == want["start_step"]
        assert (got["count"], got["nan"], got["inf"]) == (want["count"], want["nan"], 0)
        for stat in ("mean", "min", "max", "p50", "p95"):
            assert got[stat] == pytest.approx(want[stat], rel=1e-12), (got, stat)


def test_stragglers_are_the_slow_and_the_stalled_rank(ranked: tuple[RunningServer, str]) -> None:
    server, run_id = ranked
    status, body = get(server, "runs/stragglers", run_id=run_id)
    assert status == 200
    assert body["ranks"] == RANKS
    assert body["median_step"] == float(np.median([rank_points(r)[0][-1] for r in range(RANKS)]))
    assert body["median_step_rate"] == pytest.approx(100.0)
    found = body["stragglers"]
    assert [s["rank"] for s in found] == [STALLED_RANK, SLOW_RANK]  # most behind first
    stalled, slow = found
    assert stalled["stalled"] and stalled["lag_steps"] == STEPS - 1 - STALLED_AT
    assert stalled["reasons"][0].startswith("stalled")
    assert not slow["stalled"] and slow["rate_ratio"] == pytest.approx(expected_rate(SLOW_RANK) / 100)
    assert 0.3 < slow["rate_ratio"] < 0.5  # the window sees its recent pace (38 steps/s), not its average (29)
    assert [r.split(":")[0] for r in slow["reasons"]] == ["slow"]


def test_nan_rank_is_found(ranked: tuple[RunningServer, str]) -> None:
    server, run_id = ranked
    _, body = get(server, "runs/ranks", run_id=run_id, metric_key="loss")
    assert [r["rank"] for r in body["ranks"] if r["nan_count"]] == [NAN_RANK]
    assert math.isnan(body["ranks"][NAN_RANK]["last_value"])  # exact values: NaN travels as NaN


def test_mlflow_sees_every_ranks_points(ranked: tuple[RunningServer, str]) -> None:
    server, run_id = ranked
    history = MlflowClient(server.http_url).get_metric_history(run_id, "loss")
    got = sorted((m.step, m.timestamp, math.isnan(m.value), 0.0 if math.isnan(m.value) else m.value) for m in history)
    want = sorted(
        (s, t, math.isnan(v), 0.0 if math.isnan(v) else v)
        for rank in range(RANKS)
        for s, t, v in zip(*(c.tolist() for c in rank_points(rank)), strict=True)
    )
    assert got == want


@pytest.mark.parametrize(
    ("path", "query", "status"),
    [
        ("runs/ranks", {"metric_key": "loss"}, 400),
        ("runs/ranks", {"run_id": "x' OR 1=1 --", "metric_key": "loss"}, 400),
        ("runs/ranks", {"run_id": "f" * 32}, 404),
        ("runs/ranks", {"run_id": "RUN"}, 400),
        ("runs/ranks", {"run_id": "RUN", "metric_key": "../etc"}, 400),
        ("runs/ranks", {"run_id": "RUN", "metric_key": "k" * 251}, 400),
        ("runs/ranks", {"run_id": ["RUN", "RUN"], "metric_key": "loss"}, 400),
        ("metrics/aggregate", {"run_id": "RUN", "metric_key": "loss", "max_results": "0"}, 400),
        ("metrics/aggregate", {"run_id": "RUN", "metric_key": "loss", "max_results": "-1"}, 400),
        ("metrics/aggregate", {"run_id": "RUN", "metric_key": "loss", "max_results": "1e3"}, 400),
        ("metrics/aggregate", {"run_id": "RUN", "metric_key": "loss", "max_results": "9" * 40}, 400),
        ("metrics/aggregate", {"run_id": "RUN", "metric_key": "loss", "max_results": "2501"}, 400),
        ("metrics/aggregate", {"run_id": "RUN", "metric_key": "loss", "rank": "-1"}, 400),
        ("metrics/aggregate", {"run_id": "RUN", "metric_key": "loss", "rank": str(2**32)}, 400),
        ("metrics/aggregate", {"run_id": "RUN", "metric_key": "loss", "rank": [str(r) for r in range(17)]}, 400),
        ("runs/stragglers", {"run_id": "RUN", "metric_key": "bad\x00key"}, 400),
    ],
)
def test_hostile_parameters_get_mlflow_errors(
    ranked: tuple[RunningServer, str], path: str, query: dict[str, Any], status: int
) -> None:
    server, run_id = ranked
    query = {k: ([run_id if x == "RUN" else x for x in v] if isinstance(v, list) else v) for k, v in query.items()}
    query = {k: (run_id if v == "RUN" else v) for k, v in query.items()}
    got, body = get(server, path, **query)
    assert got == status
    assert body["error_code"] == ("RESOURCE_DOES_NOT_EXIST" if status == 404 else "INVALID_PARAMETER_VALUE")
    assert body["message"]


def test_curves_of_chosen_ranks_come_with_the_band(ranked: tuple[RunningServer, str]) -> None:
    server, run_id = ranked
    _, body = get(server, "metrics/aggregate", run_id=run_id, metric_key="loss", max_results=500, rank=[SLOW_RANK, 99])
    (curve,) = body["curves"]
    steps, _, values = rank_points(SLOW_RANK)
    assert (curve["rank"], curve["node"]) == (SLOW_RANK, node_of(SLOW_RANK))
    assert curve["steps"] == steps.tolist() and curve["values"] == values.tolist()


def test_system_metrics_stay_apart_per_node(ranked: tuple[RunningServer, str]) -> None:
    """MLflow's system-metrics logger with a node id logs `system/<node_id>/<metric>` through log-batch (its
    BatchMetricsLogger; SystemMetricsMonitor.publish_metrics makes the keys), with no rank or node on the wire;
    trackhouse's client sets the node column instead. The rank API shows both per node."""
    from mlflow.utils.autologging_utils import BatchMetricsLogger

    server, run_id = ranked
    key = "system/cpu_utilization_percentage"
    for node, base in (("node_0", 10.0), ("node_1", 50.0)):
        logger = BatchMetricsLogger(run_id, tracking_uri=server.http_url)  # type: ignore[no-untyped-call]
        for step in range(3):
            logger.record_metrics({f"system/{node}/cpu_utilization_percentage": base + step}, step)  # type: ignore[no-untyped-call]
        logger.flush()  # type: ignore[no-untyped-call]
    with Client(server.target) as client:
        run = client.attach_run(run_id, rank=0, node="trainer-7")
        for step in range(3):
            run.log_metrics({key: 90.0 + step}, step=step)
    _, body = get(server, "runs/ranks", run_id=run_id, metric_key=key)
    by_node = {r["node"]: (r["key"], r["last_value"], r["points"]) for r in body["ranks"]}
    assert by_node == {
        "node_0": ("system/node_0/cpu_utilization_percentage", 12.0, 3),
        "node_1": ("system/node_1/cpu_utilization_percentage", 52.0, 3),
        "trainer-7": (key, 92.0, 3),
    }
    # System metrics follow the clock, not training steps: they do not make anyone a straggler.
    _, stragglers = get(server, "runs/stragglers", run_id=run_id)
    assert [s["rank"] for s in stragglers["stragglers"]] == [STALLED_RANK, SLOW_RANK]


def test_trackhouse_ranks_prints_the_table_and_draws_the_band(
    ranked: tuple[RunningServer, str], tmp_path: Path
) -> None:
    import matplotlib.image

    server, run_id = ranked
    png = tmp_path / "band.png"
    command = [sys.executable, "-m", "trackhouse.cli", "ranks", run_id, "--metric", "loss", "--png", str(png)]
    done = subprocess.run(
        [*command, "--tracking-uri", server.http_url], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert f"{RANKS} ranks" in lines[0] and "2 straggler(s)" in lines[0]
    assert lines[1].split()[:2] == ["rank", "node"]
    assert lines[2].split()[:3] == [str(STALLED_RANK), node_of(STALLED_RANK), str(STALLED_AT)] and "stalled" in lines[2]
    assert lines[3].split()[:2] == [str(SLOW_RANK), node_of(SLOW_RANK)] and "slow" in lines[3]
    image = matplotlib.image.imread(png)
    assert image.shape[:2] == (500, 1000)
    assert len(np.unique(image.reshape(-1, image.shape[2]), axis=0)) > 10  # drawn, not blank


def test_trackhouse_ranks_reports_api_errors(ranked: tuple[RunningServer, str]) -> None:
    server, _ = ranked
    command = [sys.executable, "-m", "trackhouse.cli", "ranks", "f" * 32, "--tracking-uri", server.http_url]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "404" in done.stderr and "not found" in done.stderr


def test_summaries_match_the_sql_backfill(ranked: tuple[RunningServer, str]) -> None:
    """ingest.rank_summaries (numpy, per flush) and migration 10's backfill (SQL) give the same rows, over
    flushes that split buckets, repeat points, and hold NaN, ±Inf and negative steps. (chDB opens one directory
    per process: this uses the server's, in a database of its own.)"""
    sql = ranked[0].sql
    assert sql is not None
    db = "backfill"
    schema.migrate(sql, db)
    rng = np.random.default_rng(7)
    n = 5_000
    step = rng.integers(-40, 700, n)
    value = rng.normal(size=n)
    value[rng.random(n) < 0.05] = np.nan
    value[rng.random(n) < 0.03] = np.inf
    value[rng.random(n) < 0.03] = -np.inf
    metrics = Metrics(
        run_ids=("r1", "r2"),
        keys=("a", "b"),
        run_index=rng.integers(0, 2, n).astype(np.int32),
        key_index=rng.integers(0, 2, n).astype(np.int32),
        step=step,
        timestamp=T0 + step * 7 + rng.integers(0, 3, n),
        value=value,
        sources=((0, "n0", 0), (1, "n0", 0), (1, "n0", 1), (9, "n1", 0)),
        source_index=rng.integers(0, 4, n).astype(np.int32),
    )
    sink = ClickHouseSink(sql, db)
    for part in (slice(0, 2_000), slice(1_500, 4_000), slice(3_000, n)):  # overlapping: duplicates
        sink.write(Batch(metrics=_slice(metrics, part)))
    stored = sql.query(
        f"SELECT run_id, key, rank, node, min(first), max(last), max(window_a), max(window_b) FROM {db}.metric_ranks"
        " GROUP BY run_id, key, rank, node ORDER BY ALL"
    ).result_rows
    backfill = sql.query(
        f"SELECT {schema.rank_series_select()} FROM {db}.metrics GROUP BY run_id, key, rank, node ORDER BY ALL"
    ).result_rows
    assert stored == backfill and len(stored) == 2 * 2 * 3
    stored = sql.query(
        f"SELECT run_id, key, bucket, rank, node, max(last) FROM {db}.metric_rank_buckets"
        " GROUP BY run_id, key, bucket, rank, node ORDER BY ALL"
    ).result_rows
    backfill = sql.query(
        f"SELECT {schema.rank_buckets_select()} FROM {db}.metrics GROUP BY run_id, key, bucket, rank, node ORDER BY ALL"
    ).result_rows
    assert stored == backfill and len(stored) > 100
    stored = sql.query(
        f"SELECT run_id, key, rank, node, span, groupBitOr(steps), groupBitOr(nan_steps), groupBitOr(inf_steps)"
        f" FROM {db}.metric_rank_spans GROUP BY run_id, key, rank, node, span ORDER BY ALL"
    ).result_rows
    backfill = sql.query(
        f"SELECT {schema.rank_spans_select()} FROM {db}.metrics GROUP BY run_id, key, rank, node, span ORDER BY ALL"
    ).result_rows
    assert stored == backfill and len(stored) > 20
    assert any(nan for *_, nan, _ in stored) and any(inf for *_, inf in stored)


def _slice(metrics: Metrics, part: slice) -> Metrics:
    return Metrics(
        run_ids=metrics.run_ids,
        keys=metrics.keys,
        run_index=metrics.run_index[part],
        key_index=metrics.key_index[part],
        step=metrics.step[part],
        timestamp=metrics.timestamp[part],
        value=metrics.value[part],
        sources=metrics.sources,
        source_index=metrics.source_index[part],
    )
