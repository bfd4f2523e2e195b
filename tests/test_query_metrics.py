"""Series reads on real chDB, with data written through the real sink. Every read ignores duplicates."""

from __future__ import annotations

import math
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trackhouse.ingest.batch import Batch, Metrics
from trackhouse.ingest.sink import ClickHouseSink
from trackhouse.query import metrics
from trackhouse.query.connection import Client

DB = "trackhouse"


def write(
    sql: Client, run_id: str, key: str, steps: np.ndarray, values: np.ndarray, timestamps: np.ndarray | None = None
) -> None:
    n = len(steps)
    ts = np.full(n, 1_700_000_000_000, np.int64) if timestamps is None else timestamps
    batch = Batch(
        metrics=Metrics(
            run_ids=(run_id,),
            keys=(key,),
            run_index=np.zeros(n, np.int32),
            key_index=np.zeros(n, np.int32),
            step=steps.astype(np.int64),
            timestamp=ts.astype(np.int64),
            value=values.astype(np.float64),
        )
    )
    ClickHouseSink(sql, DB).write(batch)


def test_history_pages_through_distinct_points_in_order(sql: Client) -> None:
    steps = np.arange(2_500)
    write(sql, "r", "loss", steps, steps * 0.5)
    write(sql, "r", "loss", steps[:1_000], steps[:1_000] * 0.5)  # a retried batch
    pages, after = [], None
    while True:
        page = metrics.history(sql, DB, "r", "loss", limit=1_000, after=after)
        pages.append(page.points)
        if page.next_after is None:
            break
        after = page.next_after
    assert [len(p) for p in pages] == [1_000, 1_000, 500]
    flat = [p for page in pages for p in page]
    assert [s for s, _, _ in flat] == list(range(2_500))
    assert metrics.history(sql, DB, "r", "other", limit=10).points == []


def test_sampled_series_keeps_spikes_extremes_and_alignment(sql: Client) -> None:
    n = 100_000
    steps = np.arange(n)
    values = np.sin(steps / 1000)
    values[54_321] = 1_000.0  # a one-point spike the chart must show
    values[77_777] = -1_000.0
    write(sql, "a", "loss", steps, values)
    write(sql, "a", "loss", steps[:50_000], values[:50_000])  # duplicates change nothing
    write(sql, "b", "loss", steps[::10], values[::10])
    series = metrics.sampled(sql, DB, ["a", "b", "missing"], "loss", max_points=320)
    a = series["a"]
    assert 0 < len(a) <= 320
    assert [p[0] for p in a] == sorted(p[0] for p in a)
    assert (54_321, 1_700_000_000_000, 1_000.0) in a
    assert (77_777, 1_700_000_000_000, -1_000.0) in a
    assert series["missing"] == []
    assert 160 <= len(series["b"]) <= 320  # 160 buckets over b's steps, each holding points
    assert metrics.sampled(sql, DB, ["a"], "loss", max_points=320) == {"a": a}  # deterministic


def test_sampled_short_series_and_step_range(sql: Client) -> None:
    write(sql, "s", "acc", np.arange(100), np.arange(100) / 100)
    whole = metrics.sampled(sql, DB, ["s"], "acc", max_points=320)["s"]
    assert [p[0] for p in whole] == list(range(100))
    window = metrics.sampled(sql, DB, ["s"], "acc", max_points=10, start_step=20, end_step=39)["s"]
    # 20 steps in 5 buckets of 4; values rise with the step, so each bucket's lowest is its first step and its
    # highest its last. An empty answer, or one from outside the range, fails here.
    assert [p[0] for p in window] == [20, 23, 24, 27, 28, 31, 32, 35, 36, 39]
    assert all(p[2] == p[0] / 100 for p in window)
    assert metrics.sampled(sql, DB, ["s"], "nothing", max_points=10) == {"s": []}


def test_latest_follows_mlflow_rule(sql: Client) -> None:
    # Highest step wins; on a tie, the later timestamp; on a tie of both, the larger value.
    write(sql, "l", "m", np.array([5, 9, 9, 9, 3]), np.array([1.0, 2.0, 3.0, 0.5, 99.0]), np.array([1, 10, 10, 5, 100]))
    write(sql, "l", "m", np.array([9]), np.array([3.0]), np.array([10]))  # duplicate
    assert metrics.latest(sql, DB, ["l", "none"]) == {"l": {"m": (9, 10, 3.0)}, "none": {}}


@pytest.mark.parametrize(("n", "width"), [(1_000_000, 4096), (100_000, 256)])
def test_sampled_series_from_extremes_is_each_buckets_exact_min_and_max(sql: Client, n: int, width: int) -> None:
    """A long series (coarse extremes) and a medium one (fine extremes) give exactly the brute-force extremes."""
    rng = np.random.default_rng(n)
    steps = np.arange(n) + 7  # not aligned to a bucket
    values = rng.standard_normal(n)
    timestamps = 1_700_000_000_000 + steps * 3
    write(sql, "long", "loss", steps, values, timestamps)
    write(sql, "long", "loss", steps[: n // 3], values[: n // 3], timestamps[: n // 3])  # duplicates change nothing
    series = metrics.sampled(sql, DB, ["long"], "loss", max_points=320)["long"]
    stored_bucket = steps // width
    per = -(-(int(stored_bucket[-1]) - int(stored_bucket[0]) + 1) // 160)
    chart_bucket = (stored_bucket - stored_bucket[0]) // per
    expected = set()
    for bucket in np.unique(chart_bucket):
        mask = chart_bucket == bucket
        for pick in (np.argmin(values[mask]), np.argmax(values[mask])):
            expected.add((int(steps[mask][pick]), int(timestamps[mask][pick]), float(values[mask][pick])))
    assert set(series) == expected
    assert len(series) <= 320


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(st.integers(0, 30), st.integers(0, 30), st.sampled_from([0.0, -1.5, 2.0, math.nan, math.inf])),
        min_size=0,
        max_size=80,
    ),
    st.integers(1, 12),
    st.booleans(),
)
def test_history_pages_are_stocks_order_whatever_the_arrival(
    sql: Client, rows: list[tuple[int, int, float]], limit: int, monotone: bool
) -> None:
    """Paged in (timestamp, step, value) order, each distinct point once, whether timestamps grow with steps
    (the step-order fast path) or not (the sorted read), with duplicates stored twice."""
    run_id = uuid.uuid4().hex
    if monotone:  # timestamps that grow with steps: every page takes the fast path
        rows = [(s, s * 100 + t, v) for s, t, v in rows]
    if rows:
        steps, stamps, values = (np.array(c) for c in zip(*rows, strict=True))
        write(sql, run_id, "loss", steps, values, stamps)
        write(sql, run_id, "loss", steps[::2], values[::2], stamps[::2])  # a retried flush
    expected = sorted(
        {(s, t, _order(v)): (s, t, v) for s, t, v in rows}.items(), key=lambda i: (i[0][1], i[0][0], i[0][2])
    )
    got: list[tuple[int, int, float]] = []
    after = None
    while True:
        page = metrics.history(sql, DB, run_id, "loss", limit=limit, after=after)
        assert len(page) <= limit
        got += page.points
        if page.next_after is None:
            break
        after = page.next_after
    assert [(s, t, _order(v)) for s, t, v in got] == [k for k, _ in expected]


def _order(value: float) -> tuple[int, float]:
    return (1, 0.0) if math.isnan(value) else (0, value)  # NaN sorts after every number, and equals itself here
