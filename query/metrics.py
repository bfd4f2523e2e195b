"""Reading metric series: full history, sampled chart series, latest values.

Every read is insensitive to duplicate points (client retries, Kafka redelivery):
history reads DISTINCT points; the sampled series keeps each bucket's minimum
and maximum, which duplicates cannot change; latest is a maximum.
User input travels only as bound parameters.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from trackhouse.query import schema
from trackhouse.query.connection import Client

#: (step, timestamp, value) of one point.
Point = tuple[int, int, float]
Int64Array = npt.NDArray[np.int64]
Float64Array = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """Points as numpy columns, in stock MLflow's order: (timestamp, step, value)."""

    step: Int64Array
    timestamp: Int64Array
    value: Float64Array
    #: Pass back as `after` for the next page; None on the last page.
    next_after: Point | None

    @property
    def points(self) -> list[Point]:
        """As tuples (tests and small answers; the hot path keeps the columns)."""
        return list(zip(self.step.tolist(), self.timestamp.tolist(), self.value.tolist(), strict=True))

    def __len__(self) -> int:
        return len(self.step)


def history(
    client: Client, database: str, run_id: str, key: str, limit: int, after: Point | None = None
) -> HistoryPage:
    """One page of at most `limit` points of a run's series in stock MLflow's order, (timestamp, step, value),
    each distinct point once.

    Keyset pagination: a page starts strictly after the last point of the previous one, so pages stay
    stable while points are being added. The table is sorted by step, so a page is first read in step
    order, which ClickHouse streams from the sort key. When timestamps grow with steps (nearly always),
    that is timestamp order too, and one count over the page's timestamp window proves it (a minmax
    index skips the rest of the series). Otherwise the page is read sorted by timestamp: exact, slower.
    """
    table = f"{database}.{schema.METRICS}"
    parameters: dict[str, object] = {"run": run_id, "key": key, "limit": limit + 1}
    if after is not None:
        parameters.update(_bound("a", after))
    read = _page(client, table, parameters, after is not None, by_step=True)
    if not _is_timestamp_page(client, table, parameters, after is not None, read, limit):
        read = _page(client, table, parameters, after is not None, by_step=False)
    if len(read) <= limit:
        return HistoryPage(read.step, read.timestamp, read.value, None)
    return HistoryPage(read.step[:limit], read.timestamp[:limit], read.value[:limit], read.point(limit - 1))


#: A value's place in MLflow's order (NaN after every number), comparable in a tuple; see schema.value_order_sql.
_VALUE_ORDER = schema.value_order_sql("value", schema.NAN_LOW)
_A_STEP_FIRST = "{a_s:Int64}, {a_t:Int64}, {a_o:Int64}"
_SERIES = "run_id = {run:String} AND key = {key:String}"


@dataclass(frozen=True, slots=True)
class _Columns:
    step: Int64Array
    timestamp: Int64Array
    value: Float64Array

    def __len__(self) -> int:
        return len(self.step)

    def point(self, index: int) -> Point:
        return int(self.step[index]), int(self.timestamp[index]), float(self.value[index])


def _page(client: Client, table: str, parameters: dict[str, object], has_after: bool, by_step: bool) -> _Columns:
    where = _SERIES
    if has_after and by_step:
        where += f" AND step >= {{a_s:Int64}} AND (step, timestamp, {_VALUE_ORDER}) > ({_A_STEP_FIRST})"
    elif has_after:
        where += f" AND timestamp >= {{a_t:Int64}} AND {_after_in_time('a', '>')}"
    order = "step, timestamp, value" if by_step else "timestamp, step, value"
    rows = client.query_np(
        f"SELECT DISTINCT step, timestamp, value FROM {table} WHERE {where} ORDER BY {order} LIMIT {{limit:UInt64}}",
        parameters=parameters,
    )
    if not len(rows):
        return _Columns(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64))
    return _Columns(
        np.ascontiguousarray(rows["step"], np.int64),
        np.ascontiguousarray(rows["timestamp"], np.int64),
        np.ascontiguousarray(rows["value"], np.float64),
    )


def _after_in_time(prefix: str, op: str) -> str:
    p = prefix
    return f"(timestamp, step, {_VALUE_ORDER}) {op} ({{{p}_t:Int64}}, {{{p}_s:Int64}}, {{{p}_o:Int64}})"


def _bound(prefix: str, point: Point) -> dict[str, object]:
    step, timestamp, value = point
    order = int(_value_order(np.array([value], np.float64))[0])
    return {f"{prefix}_s": step, f"{prefix}_t": timestamp, f"{prefix}_o": order}


def _value_order(value: Float64Array) -> Int64Array:
    """schema.value_order_sql with NaN last, in numpy."""
    bits = value.view(np.int64)
    order: Int64Array = np.where(bits >= 0, bits, bits ^ np.int64(2**63 - 1))
    order[np.isnan(value)] = schema.NAN_LOW
    return order


def _is_timestamp_page(
    client: Client, table: str, parameters: dict[str, object], has_after: bool, read: _Columns, limit: int
) -> bool:
    """Whether the page read in step order is also the page in (timestamp, step, value) order: its points are
    in that order, and no other point falls in its window of that order (after, its last point]."""
    page = _Columns(read.step[:limit], read.timestamp[:limit], read.value[:limit])
    order = _value_order(page.value)
    t, s = page.timestamp, page.step
    ascending = (t[1:] > t[:-1]) | (
        (t[1:] == t[:-1]) & ((s[1:] > s[:-1]) | ((s[1:] == s[:-1]) & (order[1:] > order[:-1])))
    )
    if not ascending.all():
        return False
    where = _SERIES
    bounds = dict(parameters)
    if has_after:
        if len(page) and (int(t[0]), int(s[0]), int(order[0])) <= (bounds["a_t"], bounds["a_s"], bounds["a_o"]):
            return False
        where += f" AND timestamp >= {{a_t:Int64}} AND {_after_in_time('a', '>')}"
    if len(read) > limit:  # more points follow in step order: the window ends at the page's last point
        bounds.update(_bound("l", page.point(len(page) - 1)))
        where += f" AND timestamp <= {{l_t:Int64}} AND {_after_in_time('l', '<=')}"
    count = client.query(
        f"SELECT count() FROM (SELECT DISTINCT step, timestamp, value FROM {table} WHERE {where})", parameters=bounds
    ).result_rows[0][0]
    return int(count) == len(page)


def sampled(
    client: Client,
    database: str,
    run_ids: Sequence[str],
    key: str,
    max_points: int,
    start_step: int | None = None,
    end_step: int | None = None,
) -> dict[str, list[Point]]:
    """At most `max_points` points per run, for charts, keeping spikes visible.

    The step range is cut into max_points // 2 equal buckets shared by every run, so
    the runs line up; each bucket contributes its lowest and highest point. A series
    with no more points than `max_points` comes back whole.

    Long ranges are answered from the extremes (one row per run, key and 256 or 4,096
    steps), so the cost follows the number of chart buckets, not the length of the series. With a
    step range, an extremes bucket straddling an end may contribute a point just outside
    it, which is dropped; its other points are then represented by the buckets inside.
    """
    if not run_ids or max_points <= 0:
        return {}
    buckets = max(1, max_points // 2)
    scope = _Scope(list(run_ids), key, start_step, end_step)
    series: dict[str, list[Point]] | None = None
    for width in _WIDTHS:  # coarsest first: the first width with a bucket per chart bucket answers
        first, last = _extremes_bounds(client, database, scope, width)
        if first is None or last is None:
            return {run_id: [] for run_id in run_ids}
        if last - first + 1 >= buckets:
            series = _from_extremes(client, database, scope, width, first, -(-(last - first + 1) // buckets))
            break
    if series is None:
        assert first is not None and last is not None  # the fine level's bounds, from the loop's last pass
        # Short range: the raw points within it are few (under buckets * FINE_WIDTH per run).
        lo = max(first * schema.FINE_WIDTH, start_step if start_step is not None else _MIN_STEP)
        hi = min((last + 1) * schema.FINE_WIDTH - 1, end_step if end_step is not None else _MAX_STEP)
        series = _from_points(client, database, _Scope(scope.run_ids, key, lo, hi), buckets)
    result: dict[str, list[Point]] = {run_id: [] for run_id in run_ids}
    for run_id, points in series.items():
        result[run_id] = points if scope.unbounded else [p for p in points if scope.contains(p[0])]
    return result


#: Bucket widths of the stored extremes, coarsest first.
_WIDTHS = (schema.COARSE_WIDTH, schema.FINE_WIDTH)
_MIN_STEP = -(2**63)
_MAX_STEP = 2**63 - 1


@dataclass(frozen=True, slots=True)
class _Scope:
    run_ids: list[str]
    key: str
    start_step: int | None
    end_step: int | None

    @property
    def unbounded(self) -> bool:
        return self.start_step is None and self.end_step is None

    def contains(self, step: int) -> bool:
        return (self.start_step is None or step >= self.start_step) and (self.end_step is None or step <= self.end_step)

    def where(self, step_column: str, width: int | None = None) -> tuple[str, dict[str, object]]:
        """The WHERE clause for these runs and this key: points, or extremes `width` steps wide."""
        sql = "run_id IN {runs:Array(String)} AND key = {key:String}"
        parameters: dict[str, object] = {"runs": self.run_ids, "key": self.key}
        if width is not None:
            sql += " AND width = {width:UInt16}"
            parameters["width"] = width
        width = width or 1
        if self.start_step is not None:
            sql += f" AND {step_column} >= {{lo:Int64}}"
            parameters["lo"] = self.start_step // width
        if self.end_step is not None:
            sql += f" AND {step_column} <= {{hi:Int64}}"
            parameters["hi"] = self.end_step // width
        return sql, parameters


def _extremes_bounds(client: Client, database: str, scope: _Scope, width: int) -> tuple[int | None, int | None]:
    """The first and last bucket `width` steps wide holding points of the scope, or None when there are none."""
    where, parameters = scope.where("bucket", width)
    count, first, last = client.query(
        f"SELECT count(), min(bucket), max(bucket) FROM {database}.{schema.METRIC_EXTREMES} WHERE {where}",
        parameters=parameters,
    ).result_rows[0]
    return (int(first), int(last)) if count else (None, None)


def _from_extremes(
    client: Client, database: str, scope: _Scope, width: int, first: int, per_bucket: int
) -> dict[str, list[Point]]:
    where, parameters = scope.where("bucket", width)
    rows = client.query(
        f"SELECT run_id, b, {', '.join(schema.extreme_point_sql('l'))}, {', '.join(schema.extreme_point_sql('h'))}"
        " FROM (SELECT run_id, intDiv(bucket - {first:Int64}, {per:Int64}) AS b, min(low) AS l, max(high) AS h"
        f" FROM {database}.{schema.METRIC_EXTREMES} WHERE {where} GROUP BY run_id, b) ORDER BY run_id, b",
        parameters={**parameters, "first": first, "per": per_bucket},
    ).result_rows
    return _in_order(
        (run_id, (int(ls), int(lt), float(lv)), (int(hs), int(ht), float(hv)))
        for run_id, _, ls, lt, lv, hs, ht, hv in rows
    )


def _in_order(buckets: Iterable[tuple[str, Point, Point]]) -> dict[str, list[Point]]:
    """Series from (run_id, lowest, highest) per bucket, buckets in step order: each bucket's two points
    in (step, timestamp, value) order, once if they are the same point. Buckets never share steps, so
    the whole series is in order without sorting (sorting 32,000 points cost a chart call 10 ms)."""
    series: dict[str, list[Point]] = {}
    for run_id, low, high in buckets:
        points = series.setdefault(run_id, [])
        if low == high:
            points.append(low)
        elif low < high:
            points += (low, high)
        else:
            points += (high, low)
    return series


def _from_points(client: Client, database: str, scope: _Scope, buckets: int) -> dict[str, list[Point]]:
    where, parameters = scope.where("step")
    table = f"{database}.{schema.METRICS}"
    count, first, last = client.query(
        f"SELECT count(), min(step), max(step) FROM {table} WHERE {where}", parameters=parameters
    ).result_rows[0]
    if not count:
        return {}
    width = max(1, -(-(int(last) - int(first) + 1) // buckets))  # ceiling division
    rows = client.query(
        "SELECT run_id, intDiv(step - {first:Int64}, {width:Int64}) AS bucket,"
        " argMin((step, timestamp, value), value) AS low, argMax((step, timestamp, value), value) AS high"
        f" FROM {table} WHERE {where} GROUP BY run_id, bucket ORDER BY run_id, bucket",
        parameters={**parameters, "first": int(first), "width": width},
    ).result_rows
    return _in_order((run_id, _point(low), _point(high)) for run_id, _, low, high in rows)


def latest(client: Client, database: str, run_ids: Collection[str]) -> dict[str, dict[str, Point]]:
    """Each run's latest point per key: the maximum by (step, timestamp, value), as MLflow defines it."""
    if not run_ids:
        return {}
    rows = client.query(
        f"SELECT run_id, key, {', '.join(schema.latest_point_sql('l'))} FROM (SELECT run_id, key, max(latest) AS l"
        f" FROM {database}.{schema.LATEST_METRICS} WHERE run_id IN {{runs:Array(String)}} GROUP BY run_id, key)",
        parameters={"runs": list(run_ids)},
    ).result_rows
    result: dict[str, dict[str, Point]] = {run_id: {} for run_id in run_ids}
    for run_id, key, step, timestamp, value in rows:
        result[run_id][key] = (int(step), int(timestamp), float(value))
    return result


def _point(value: Any) -> Point:
    """A (step, timestamp, value) tuple from ClickHouse: named tuples arrive as dicts, plain ones as tuples."""
    step, timestamp, number = value.values() if isinstance(value, dict) else value
    return int(step), int(timestamp), float(number)
