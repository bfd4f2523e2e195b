"""The write path's summaries (latest points, chart extremes): numpy against brute force, against
ClickHouse's own aggregation of the same points, and across the migration that introduced them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trackhouse.ingest.batch import Batch, Metrics
from trackhouse.ingest.sink import ClickHouseSink
from trackhouse.ingest.summaries import order_value, pack, summarize, value_order
from trackhouse.query import metrics, schema
from trackhouse.query.connection import Client, StoreConfig, connect

DB = "trackhouse"
SPECIALS = np.array([math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324, -5e-324, 1.7976931348623157e308, -1.5])

Point = tuple[int, int, float]


def random_metrics(seed: int, n: int, runs: int = 3, keys: int = 4, step_span: int = 20_000) -> Metrics:
    """Points with repeats, negative steps, equal steps with different timestamps, NaN, infinities and -0.0."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(n).round(1)  # rounding makes equal values, so ties are exercised
    specials = rng.random(n) < 0.1
    values[specials] = rng.choice(SPECIALS, specials.sum())
    step = rng.integers(-step_span // 4, step_span, n)
    step[: n // 10] = step[n // 10 : 2 * (n // 10)]  # repeated steps
    timestamp = 1_700_000_000_000 + rng.integers(0, 5, n)
    m = Metrics(
        run_ids=tuple(f"run{i}" for i in range(runs)),
        keys=tuple(f"key{i}" for i in range(keys)),
        run_index=rng.integers(0, runs, n).astype(np.int32),
        key_index=rng.integers(0, keys, n).astype(np.int32),
        step=step.astype(np.int64),
        timestamp=timestamp.astype(np.int64),
        value=values,
    )
    return m


def _ordered(value: float, nan_last: bool) -> tuple[int, int]:
    """A sort key for floats: NaN after (or before) every number; -0.0 just below 0.0."""
    if math.isnan(value):
        return (1, 0) if nan_last else (-1, 0)
    return 0, int(value_order(np.array([value]), 0)[0])


def brute_force(m: Metrics, width: int) -> dict[tuple[str, str, int], tuple[Point, Point]]:
    """Each bucket's lowest point (NaN only when nothing else) and highest, ties to the lowest and highest
    (step, timestamp), one point at a time in plain Python."""
    groups: dict[tuple[str, str, int], list[Point]] = {}
    for i in range(len(m)):
        step = int(m.step[i])
        key = (m.run_ids[m.run_index[i]], m.keys[m.key_index[i]], step // width)
        groups.setdefault(key, []).append((step, int(m.timestamp[i]), float(m.value[i])))
    return {
        key: (
            min(points, key=lambda p: (_ordered(p[2], nan_last=True), p[0], p[1])),
            max(points, key=lambda p: (_ordered(p[2], nan_last=False), p[0], p[1])),
        )
        for key, points in groups.items()
    }


def same_point(a: Point, b: Point) -> bool:
    return a[:2] == b[:2] and (a[2] == b[2] or (math.isnan(a[2]) and math.isnan(b[2])))


def summarised(m: Metrics, level: int) -> dict[tuple[str, str, int], tuple[Point, Point]]:
    extremes = summarize(m).extremes[level]
    low_values, high_values = order_value(extremes.low[0]), order_value(extremes.high[0])
    return {
        (m.run_ids[extremes.run_index[i]], m.keys[extremes.key_index[i]], int(extremes.bucket[i])): (
            (int(extremes.low[1][i]), int(extremes.low[2][i]), float(low_values[i])),
            (int(extremes.high[1][i]), int(extremes.high[2][i]), float(high_values[i])),
        )
        for i in range(len(extremes))
    }


def test_value_order_keeps_float_order_and_inverts_exactly() -> None:
    values = np.array([-math.inf, -1e308, -1.5, -5e-324, -0.0, 0.0, 5e-324, 1.5, 1e308, math.inf])
    for nan in (schema.NAN_LOW, schema.NAN_HIGH):
        orders = value_order(values, nan)
        assert (np.diff(orders) > 0).all()
        assert (order_value(orders).view(np.int64) == values.view(np.int64)).all()  # bit for bit, -0.0 too
    assert value_order(np.array([math.nan]), schema.NAN_LOW)[0] > value_order(np.array([math.inf]), 0)[0]
    assert value_order(np.array([math.nan]), schema.NAN_HIGH)[0] < value_order(np.array([-math.inf]), 0)[0]
    assert np.isnan(order_value(np.array([schema.NAN_LOW, schema.NAN_HIGH], np.int64))).all()


INT64 = st.integers(-(2**63), 2**63 - 1)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(INT64, INT64, INT64), min_size=1, max_size=20))
def test_packed_points_sort_as_their_triples(triples: list[tuple[int, int, int]]) -> None:
    """What lets ClickHouse take a bucket's extremes as plain Int256 minima and maxima."""
    columns = [np.array(column, np.int64) for column in zip(*triples, strict=True)]
    raw = pack(columns[0], columns[1], columns[2])
    packed = [int.from_bytes(raw[i * 32 : (i + 1) * 32], "little", signed=True) for i in range(len(triples))]
    assert sorted(range(len(triples)), key=packed.__getitem__) == sorted(range(len(triples)), key=triples.__getitem__)


@pytest.mark.parametrize("seed", range(4))
def test_extremes_are_each_buckets_lowest_and_highest_point(seed: int) -> None:
    m = random_metrics(seed, 5_000)
    for level, width in enumerate((schema.FINE_WIDTH, schema.COARSE_WIDTH)):
        expected, got = brute_force(m, width), summarised(m, level)
        assert got.keys() == expected.keys()
        for bucket, (low, high) in expected.items():
            assert same_point(got[bucket][0], low) and same_point(got[bucket][1], high), bucket


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 2),
            INT64 | st.integers(-600, 600),
            INT64 | st.integers(0, 3),
            st.floats(allow_nan=True) | st.sampled_from([0.0, -0.0, 1.0]),
        ),
        min_size=1,
        max_size=60,
    )
)
def test_summaries_hold_for_any_points(points: list[tuple[int, int, int, float]]) -> None:
    """Extreme steps and timestamps (the whole int64 range) and any float, including several NaN payloads."""
    m = Metrics(
        run_ids=("a", "b", "c"),
        keys=("k",),
        run_index=np.array([p[0] for p in points], np.int32),
        key_index=np.zeros(len(points), np.int32),
        step=np.array([p[1] for p in points], np.int64),
        timestamp=np.array([p[2] for p in points], np.int64),
        value=np.array([p[3] for p in points], np.float64),
    )
    for level, width in enumerate((schema.FINE_WIDTH, schema.COARSE_WIDTH)):
        expected, got = brute_force(m, width), summarised(m, level)
        assert got.keys() == expected.keys()
        assert all(same_point(got[b][0], e[0]) and same_point(got[b][1], e[1]) for b, e in expected.items())
    latest = summarize(m).latest
    # One latest point for each run that has points: an empty answer must not pass the loop below by skipping it.
    assert sorted(latest.run_index.tolist()) == sorted({p[0] for p in points})
    for i, run_index in enumerate(latest.run_index):
        mine = [(p[1], p[2], p[3]) for p in points if p[0] == run_index]
        best = max(mine, key=lambda p: (p[0], p[1], _ordered(p[2], nan_last=True)))
        assert same_point((int(latest.step[i]), int(latest.timestamp[i]), float(latest.value[i])), best)


def _stored_extremes(sql: Client, source: str) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    rows = sql.query(
        f"SELECT run_id, key, width, bucket, min(low), max(high) FROM ({source}) GROUP BY run_id, key, width, bucket"
    ).result_rows
    return {tuple(r[:4]): tuple(r[4:]) for r in rows}


def test_sink_and_sql_backfill_agree(sql: Client) -> None:
    """The sink's numpy summaries (extremes and latest points) equal the migration's SQL over the same points,
    written in three flushes (one repeated): the backfill and the write path can be mixed in one table."""
    m = random_metrics(7, 20_000, step_span=200_000)
    sink = ClickHouseSink(sql, DB)
    thirds = np.array_split(np.arange(len(m)), 3)
    for part in (*thirds, thirds[0]):
        sink.write(Batch(metrics=_take(m, part)))
    table = f"{DB}.{schema.METRIC_EXTREMES}"
    backfill = " UNION ALL ".join(
        f"SELECT {schema.extremes_select(width)} FROM {DB}.{schema.METRICS} GROUP BY run_id, key, bucket"
        for width in (schema.FINE_WIDTH, schema.COARSE_WIDTH)
    )
    stored = _stored_extremes(sql, f"SELECT * FROM {table}")
    assert stored == _stored_extremes(sql, backfill)
    latest = "SELECT run_id, key, max(latest) FROM ({}) GROUP BY run_id, key ORDER BY run_id, key"
    from_sink = sql.query(latest.format(f"SELECT * FROM {DB}.{schema.LATEST_METRICS}")).result_rows
    from_sql = f"SELECT {schema.latest_select()} FROM {DB}.{schema.METRICS} GROUP BY run_id, key"
    assert from_sink == sql.query(latest.format(from_sql)).result_rows
    assert len(from_sink) == 12
    assert len(stored) == len(brute_force(m, schema.FINE_WIDTH)) + len(brute_force(m, schema.COARSE_WIDTH))


def _take(m: Metrics, rows: np.ndarray) -> Metrics:
    return Metrics(
        run_ids=m.run_ids,
        keys=m.keys,
        run_index=m.run_index[rows],
        key_index=m.key_index[rows],
        step=m.step[rows],
        timestamp=m.timestamp[rows],
        value=m.value[rows],
    )


def test_upgrade_from_views_backfills_extremes_and_drops_the_views(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database made by schema version 4 (summaries kept by materialized views) upgrades in place:
    its points chart the same afterwards, and later writes summarise without views."""
    client = connect(StoreConfig.for_data_dir(tmp_path / "old"))
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:4])
    assert schema.migrate(client, DB) == 4
    steps = np.arange(300_000)
    values = np.sin(steps / 5_000.0)
    values[123_456] = 50.0  # a spike the chart must keep
    rows = [("r", "loss", int(s), 1_700_000_000_000 + int(s), float(v)) for s, v in zip(steps, values, strict=True)]
    client.insert(
        schema.METRICS, rows, column_names=["run_id", "key", "step", "timestamp", "value"], database=DB
    )  # the old write path: the views summarise
    old_latest = client.query(f"SELECT key, latest.1, latest.2, latest.3 FROM {DB}.latest_metrics FINAL").result_rows
    assert old_latest == [("loss", 299_999, 1_700_000_299_999, values[-1])]
    monkeypatch.undo()

    assert schema.migrate(client, DB) == schema.MIGRATIONS[-1][0]
    tables = {r[0] for r in client.query(f"SELECT name FROM system.tables WHERE database = '{DB}'").result_rows}
    gone = {"metric_rollups", "metric_rollups_coarse", "metric_rollups_mv", "latest_metrics", "latest_metrics_mv"}
    assert not tables & gone
    assert metrics.latest(client, DB, ["r"]) == {"r": {"loss": (299_999, 1_700_000_299_999, values[-1])}}
    chart = metrics.sampled(client, DB, ["r"], "loss", max_points=320)["r"]
    assert (123_456, 1_700_000_000_000 + 123_456, 50.0) in chart
    assert 250 <= len(chart) <= 320

    ClickHouseSink(client, DB).write(
        Batch(
            metrics=Metrics(
                run_ids=("r",),
                keys=("loss",),
                run_index=np.zeros(1, np.int32),
                key_index=np.zeros(1, np.int32),
                step=np.array([400_000]),
                timestamp=np.array([1]),
                value=np.array([-7.0]),
            )
        )
    )
    assert metrics.latest(client, DB, ["r"]) == {"r": {"loss": (400_000, 1, -7.0)}}
    assert (400_000, 1, -7.0) in metrics.sampled(client, DB, ["r"], "loss", max_points=320)["r"]
    client.close()
