"""Series reads on real chDB, with data written through the real sink. Every read ignores duplicates."""

from __future__ import annotations

import math
import uuid
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trackhouse.ingest.batch import Batch, Metrics
from trackhouse.ingest.sink import ClickHouseSink
from trackhouse.query import metrics, sampling
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


def test_a_long_series_pages_to_its_stored_points_in_bounded_reads(sql: Client) -> None:
    """Pages concatenate to the unpaged answer and to the stored points, retried points shown once, and no
    query fetches more rows than a page and one (memory per response stays flat in the series length)."""
    n, page_size = 200_000, 10_000
    steps = np.arange(n)
    values = np.cumsum(np.random.default_rng(7).standard_normal(n))
    stamps = 1_700_000_000_000 + steps * 10
    write(sql, "long", "loss", steps, values, stamps)
    retried = slice(n // 2, n // 2 + 3 * page_size // 2)  # unmerged duplicates across a page boundary
    write(sql, "long", "loss", steps[retried], values[retried], stamps[retried])
    whole = metrics.history(sql, DB, "long", "loss", limit=n + 1)
    assert whole.next_after is None
    assert (whole.step == steps).all() and (whole.timestamp == stamps).all() and (whole.value == values).all()
    counting = _RowCounting(sql)
    pages, after = [], None
    while True:
        page = metrics.history(counting, DB, "long", "loss", limit=page_size, after=after)
        pages.append(page)
        if page.next_after is None:
            break
        after = page.next_after
    assert [len(p) for p in pages] == [page_size] * (n // page_size)
    for column in ("step", "timestamp", "value"):
        assert (np.concatenate([getattr(p, column) for p in pages]) == getattr(whole, column)).all()
    assert max(counting.fetched) == page_size + 1


class _RowCounting:
    """The real client, noting how many rows each query fetched."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self.fetched: list[int] = []

    def query_np(self, *args: Any, **kwargs: Any) -> Any:
        rows = self._client.query_np(*args, **kwargs)
        self.fetched.append(len(rows))
        return rows

    def query(self, *args: Any, **kwargs: Any) -> Any:
        result = self._client.query(*args, **kwargs)
        self.fetched.append(len(result.result_rows))
        return result


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
    # 20 points in the range, 10 asked for: 10 come back (as stock), both ends included, none from outside.
    steps = [p[0] for p in window]
    assert len(steps) == 10 and steps == sorted(set(steps)) and steps[0] == 20 and steps[-1] == 39
    assert all(20 <= s <= 39 for s in steps)
    assert all(p[2] == p[0] / 100 for p in window)
    assert metrics.sampled(sql, DB, ["s"], "nothing", max_points=10) == {"s": []}


def test_latest_follows_mlflow_rule(sql: Client) -> None:
    # Highest step wins; on a tie, the later timestamp; on a tie of both, the larger value.
    write(sql, "l", "m", np.array([5, 9, 9, 9, 3]), np.array([1.0, 2.0, 3.0, 0.5, 99.0]), np.array([1, 10, 10, 5, 100]))
    write(sql, "l", "m", np.array([9]), np.array([3.0]), np.array([10]))  # duplicate
    assert metrics.latest(sql, DB, ["l", "none"]) == {"l": {"m": (9, 10, 3.0)}, "none": {}}


def check_chart_rules(points: list[tuple[int, int, float]], chart: sampling.Chart, max_points: int) -> None:
    """The README's sampling rules, checked against every stored point of the range (numpy, exact)."""
    if points:
        steps, stamps, values = (np.array(c) for c in zip(*points, strict=True))
        rows = np.column_stack((steps, stamps, metrics._value_order(values.astype(np.float64))))
        distinct = np.unique(rows, axis=0)
    else:
        distinct = np.empty((0, 3), np.int64)
    got = chart.rows
    assert (np.unique(got, axis=0) == got).all(), "in MLflow's order, each point once"
    as_set = set(map(tuple, distinct.tolist()))
    assert all(tuple(r) in as_set for r in got.tolist()), "only stored points of the range"
    assert len(got) <= max_points
    if not len(distinct):
        assert not len(got)
        return
    if max_points == 1:
        assert got.tolist() == distinct[-1:].tolist()
        return
    shown = set(map(tuple, got.tolist()))
    assert tuple(distinct[0]) in shown and tuple(distinct[-1]) in shown, "both ends of the range"
    if len(distinct) <= max_points:
        assert got.tolist() == distinct.tolist()  # no more points than asked for: whole, as in stock
        return
    assert len(got) >= min(max_points, len(distinct)) // 2, "about as many points as stock answers"
    if max_points < 7:
        return  # too few points for every kind in a group; the ends and the cap still hold
    special = {
        kind: sampling.SPECIAL_ORDERS[name]
        for kind, name in (("NaN", "nan_at"), ("+Inf", "pinf_at"), ("-Inf", "ninf_at"))
    }
    bounds = np.searchsorted(distinct[:, 0], np.append(chart.group_starts, 2**62))
    got_bounds = np.searchsorted(got[:, 0], np.append(chart.group_starts, 2**62))
    assert chart.group_starts[0] <= distinct[0, 0]
    for g in range(len(chart.group_starts)):
        mine, mine_shown = distinct[bounds[g] : bounds[g + 1]], got[got_bounds[g] : got_bounds[g + 1]]
        finite = mine[~np.isin(mine[:, 2], list(special.values()))]
        if len(finite):
            by_value = finite[np.lexsort((finite[:, 1], finite[:, 0], finite[:, 2]))]
            for extreme in (by_value[0], by_value[-1]):
                assert tuple(extreme) in shown, ("group's lowest and highest finite point", g)
        for kind, order in special.items():
            occurs = bool((mine[:, 2] == order).any())
            assert int((mine_shown[:, 2] == order).sum()) == int(occurs), (kind, "once per group", g)


VALUES = st.floats(allow_nan=False, allow_infinity=False, width=32) | st.sampled_from([math.nan, math.inf, -math.inf])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.tuples(st.integers(-50, 300_000), st.integers(0, 4), VALUES), min_size=1, max_size=150),
    st.integers(1, 60),
    st.integers(1, 4),
    st.one_of(st.none(), st.tuples(st.integers(-100, 200_000), st.integers(0, 200_000))),
    st.randoms(use_true_random=False),
)
def test_sampled_charts_keep_the_rules_on_any_series(
    sql: Client,
    rows: list[tuple[int, int, float]],
    max_points: int,
    flushes: int,
    window: tuple[int, int] | None,
    rng: Any,
) -> None:
    """Random series with NaN, ±Inf, gaps, repeated steps and equal values, arriving out of order in several
    flushes (one repeated), charted whole or over a step range: the README's rules hold against the points."""
    run_id = uuid.uuid4().hex
    rows = [(s, 1_700_000_000_000 + s * 7 + t, v) for s, t, v in rows]
    rows += [(s, t + 1, v) for s, t, v in rows[: len(rows) // 4]]  # repeated steps, later timestamps
    rng.shuffle(rows)
    parts = [rows[i::flushes] for i in range(flushes)]
    for part in [*parts, parts[0]]:
        if part:
            steps, stamps, values = (np.array(c) for c in zip(*part, strict=True))
            write(sql, run_id, "loss", steps, values.astype(np.float64), stamps)
    start, end = (min(window), max(window)) if window else (None, None)
    inside = [r for r in rows if start is None or start <= r[0] <= end]  # type: ignore[operator]
    chart = metrics.charts(sql, DB, [run_id], "loss", max_points, start, end)[run_id]
    check_chart_rules(inside, chart, max_points)


def test_sampled_long_series_reads_stored_buckets_and_keeps_the_rules(sql: Client) -> None:
    """Series long enough to chart from stored buckets, with special values and a spike, whole and in a range."""
    rng = np.random.default_rng(3)
    for run_id, n in (("long", 300_000), ("medium", 60_000)):
        steps = np.arange(n) + 7  # not aligned to a bucket
        values = rng.standard_normal(n)
        values[rng.choice(n, 40, replace=False)] = rng.choice([math.nan, math.inf, -math.inf], 40)
        values[n // 3] = 1e6
        timestamps = 1_700_000_000_000 + steps * 3
        write(sql, run_id, "loss", steps, values, timestamps)
        write(sql, run_id, "loss", steps[: n // 3], values[: n // 3], timestamps[: n // 3])  # duplicates
        points = list(zip(steps.tolist(), timestamps.tolist(), values.tolist(), strict=True))
        for max_points, window in ((320, None), (2500, None), (320, (n // 5, n // 2 + 13))):
            start, end = window or (None, None)
            chart = metrics.charts(sql, DB, [run_id], "loss", max_points, start, end)[run_id]
            inside = [p for p in points if start is None or start <= p[0] <= end]  # type: ignore[operator]
            check_chart_rules(inside, chart, max_points)
            assert len(chart.rows) == max_points  # as many as stock answers
        assert (n // 3 + 7, 1_700_000_000_000 + (n // 3 + 7) * 3, 1e6) in metrics.sampled(
            sql, DB, [run_id], "loss", 320
        )[run_id]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(st.integers(0, 30), st.integers(0, 30), st.sampled_from([0.0, -0.0, -1.5, 2.0, math.nan, math.inf])),
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
    (the step-order fast path) or not (the sorted read), with duplicates stored twice; -0.0 is 0.0's point."""
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


@pytest.mark.parametrize("max_points", [7, 320, 2500])
def test_special_values_show_once_per_group_even_at_the_ends(sql: Client, max_points: int) -> None:
    """A series ending on NaN with another NaN just before, and buckets that start on NaN or ±Inf: the end
    point stands for its group's NaN, and special values never fill the answer."""
    n = 20_000
    steps = np.arange(n)
    values = np.sin(steps / 300.0)
    values[steps % 16 == 0] = math.nan
    values[steps % 97 == 0] = math.inf
    values[steps % 89 == 0] = -math.inf
    values[[n - 4, n - 1]] = math.nan
    stamps = 1_700_000_000_000 + steps
    write(sql, "ends", "loss", steps, values, stamps)
    chart = metrics.charts(sql, DB, ["ends"], "loss", max_points)["ends"]
    check_chart_rules(list(zip(steps.tolist(), stamps.tolist(), values.tolist(), strict=True)), chart, max_points)
