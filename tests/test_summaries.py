"""The write path's summaries (latest points, chart extremes): numpy against brute force, against
ClickHouse's own aggregation of the same points, and across the migration that introduced them."""

from __future__ import annotations

import math
from collections.abc import Callable
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


#: A bucket's summary as plain Python: column -> point, or (step, timestamp) for special kinds, or None.
Summary = dict[str, Any]


def brute_force(m: Metrics, width: int) -> dict[tuple[str, str, int], Summary]:
    """Each bucket's first and last point, lowest and highest finite point (ties to the lowest and highest
    (step, timestamp)) and first NaN, +Inf and -Inf point, one point at a time in plain Python."""
    groups: dict[tuple[str, str, int], list[Point]] = {}
    for i in range(len(m)):
        step = int(m.step[i])
        key = (m.run_ids[m.run_index[i]], m.keys[m.key_index[i]], step // width)
        groups.setdefault(key, []).append((step, int(m.timestamp[i]), float(m.value[i])))

    def summary(points: list[Point]) -> Summary:
        finite = [p for p in points if math.isfinite(p[2])]
        in_order = sorted(points, key=lambda p: (p[0], p[1], _ordered(p[2], nan_last=True)))
        kinds: dict[str, Callable[[float], bool]] = {
            "nan_at": math.isnan,
            "pinf_at": lambda v: v == math.inf,
            "ninf_at": lambda v: v == -math.inf,
        }
        return {
            "first": in_order[0],
            "last": in_order[-1],
            "low": min(finite, key=lambda p: (_ordered(p[2], True), p[0], p[1])) if finite else None,
            "high": max(finite, key=lambda p: (_ordered(p[2], True), p[0], p[1])) if finite else None,
            **{k: min(((p[0], p[1]) for p in points if test(p[2])), default=None) for k, test in kinds.items()},
        }

    return {key: summary(points) for key, points in groups.items()}


def same_point(a: Any, b: Any) -> bool:
    if a is None or b is None or len(a) == 2:
        return bool(a == b)
    return bool(a[:2] == b[:2] and (a[2] == b[2] or (math.isnan(a[2]) and math.isnan(b[2]))))


def decoded(name: str, words: tuple[int, int, int]) -> Any:
    """A metric_buckets column's packed words back as brute_force's shapes."""
    a, b, c = words
    if name in ("first", "last"):
        return (a, b, float(order_value(np.array([c], np.int64))[0]))
    if name in ("low", "high"):
        if a in (schema.NAN_LOW, schema.NAN_HIGH):
            return None
        return (b, c, float(order_value(np.array([a], np.int64))[0]))
    return None if (a, b, c) == schema.NO_SPECIAL else (b, c)


def summarised(m: Metrics, level: int) -> dict[tuple[str, str, int], Summary]:
    buckets = summarize(m).buckets[level]
    return {
        (m.run_ids[buckets.run_index[i]], m.keys[buckets.key_index[i]], int(buckets.bucket[i])): {
            name: decoded(name, (int(column[0][i]), int(column[1][i]), int(column[2][i])))
            for name, column in buckets.columns.items()
        }
        for i in range(len(buckets))
    }


def same_summaries(got: dict[tuple[str, str, int], Summary], expected: dict[tuple[str, str, int], Summary]) -> None:
    assert got.keys() == expected.keys()
    for bucket, summary in expected.items():
        for name, point in summary.items():
            assert same_point(got[bucket][name], point), (bucket, name, got[bucket][name], point)


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
def test_buckets_hold_each_buckets_ends_extremes_and_special_values(seed: int) -> None:
    m = random_metrics(seed, 5_000)
    for level, width in enumerate((schema.FINE_WIDTH, schema.COARSE_WIDTH)):
        same_summaries(summarised(m, level), brute_force(m, width))


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
        same_summaries(summarised(m, level), brute_force(m, width))
    latest = summarize(m).latest
    # One latest point for each run that has points: an empty answer must not pass the loop below by skipping it.
    assert sorted(latest.run_index.tolist()) == sorted({p[0] for p in points})
    for i, run_index in enumerate(latest.run_index):
        mine = [(p[1], p[2], p[3]) for p in points if p[0] == run_index]
        best = max(mine, key=lambda p: (p[0], p[1], _ordered(p[2], nan_last=True)))
        assert same_point((int(latest.step[i]), int(latest.timestamp[i]), float(latest.value[i])), best)


def _stored_buckets(sql: Client, source: str) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    merged = ", ".join(f"{merge}({name})" for name, merge in schema.BUCKET_MERGES.items())
    rows = sql.query(
        f"SELECT run_id, key, width, bucket, {merged} FROM ({source}) GROUP BY run_id, key, width, bucket"
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
    table = f"{DB}.{schema.METRIC_BUCKETS}"
    backfill = " UNION ALL ".join(
        f"SELECT {schema.buckets_select(width)} FROM {DB}.{schema.METRICS} GROUP BY run_id, key, bucket"
        for width in (schema.FINE_WIDTH, schema.COARSE_WIDTH)
    )
    stored = _stored_buckets(sql, f"SELECT * FROM {table}")
    assert stored == _stored_buckets(sql, backfill)
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
