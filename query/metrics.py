"""Reading metric series: full history, sampled chart series, latest values.

Every read is insensitive to duplicate points (client retries, Kafka redelivery):
history drops repeats of a point as it reads; the sampled series keeps each bucket's minimum
and maximum, which duplicates cannot change; latest is a maximum.
User input travels only as bound parameters.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from trackhouse.query import attempts, sampling, schema
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
    order, which ClickHouse reads from the sort key, stopping after the page. When timestamps grow with
    steps (nearly always), that is timestamp order too, and one count over the page's timestamp window
    proves it (a minmax index skips the rest of the series). Otherwise the page is read sorted by
    timestamp: exact, slower. Each query fetches at most `limit + 1` rows.
    """
    table = f"{database}.{schema.METRICS}"
    view = attempts.series_view(client, database, run_id, key)
    if view is not None:  # resumed or forked: the points the attempts and the lineage show
        return _history_in_view(client, table, view, limit, after)
    series: dict[str, object] = {"run": run_id, "key": key}
    read = _distinct_rows(client, table, series, after, limit + 1, by_step=True)
    if read is None or not _is_timestamp_page(client, table, series, after, read, limit):
        read = _distinct_rows(client, table, series, after, limit + 1, by_step=False)
        assert read is not None, "the time-ordered read sorts by the value order itself"
    if len(read) <= limit:
        return HistoryPage(read.step, read.timestamp, read.value, None)
    return HistoryPage(read.step[:limit], read.timestamp[:limit], read.value[:limit], read.point(limit - 1))


#: A value's place in MLflow's order (NaN after every number), comparable in a tuple; see schema.value_order_sql.
_VALUE_ORDER = schema.value_order_sql("value", schema.NAN_LOW)
_SERIES = "run_id = {run:String} AND key = {key:String}"
_IN_STEP_ORDER = "step, timestamp, value"
#: Sorting by the value order itself costs the step-ordered read its early stop (measured: 4x slower per page);
#: the time-ordered read sorts anyway.
_IN_TIME_ORDER = f"timestamp, step, {_VALUE_ORDER}"


@dataclass(frozen=True, slots=True)
class _Columns:
    step: Int64Array
    timestamp: Int64Array
    value: Float64Array

    def __len__(self) -> int:
        return len(self.step)

    def point(self, index: int) -> Point:
        return int(self.step[index]), int(self.timestamp[index]), float(self.value[index])

    def __getitem__(self, rows: Any) -> _Columns:
        return _Columns(self.step[rows], self.timestamp[rows], self.value[rows])


def _distinct_rows(
    client: Client, table: str, series: dict[str, object], after: Point | None, wanted: int, by_step: bool
) -> _Columns | None:
    """Up to `wanted` distinct points strictly after `after`, in (step, timestamp, value) or (timestamp, step,
    value) order; None if the step-ordered rows are not in that order by the value order (ClickHouse sorts
    -0.0 and 0.0 as equal, the value order does not).

    Rows are read without DISTINCT, which reads the rest of the series before its LIMIT applies (measured:
    350 ms per page at the start of a 10^7-point series, 27 ms near its end). Duplicates are adjacent in
    this order and dropped here; a query fetches at most `wanted` rows, and another follows from the last
    row only when duplicates were dropped (as many as there are copies of a point, at most)."""
    parts: list[_Columns] = []
    found = 0
    start = after
    while found < wanted:
        rows = _rows(client, table, series, start, wanted, by_step)
        kept = _distinct_in_order(rows, by_step)
        if kept is None:
            return None
        parts.append(kept)
        found += len(kept)
        if len(rows) < wanted:
            break
        start = rows.point(len(rows) - 1)
    if len(parts) == 1:
        return parts[0][:wanted]
    return _Columns(*(np.concatenate([getattr(p, c) for p in parts])[:wanted] for c in ("step", "timestamp", "value")))


def _rows(
    client: Client, table: str, series: dict[str, object], after: Point | None, limit: int, by_step: bool
) -> _Columns:
    """At most `limit` stored rows strictly after `after` in step or time order, duplicates included."""
    where = _SERIES
    parameters = {**series, "limit": limit}
    if after is not None:
        parameters.update(_bound("a", after))
        where += (
            f" AND step >= {{a_s:Int64}} AND {_after_in_steps('a')}"
            if by_step
            else f" AND timestamp >= {{a_t:Int64}} AND {_after_in_time('a', '>')}"
        )
    order = _IN_STEP_ORDER if by_step else _IN_TIME_ORDER
    rows = client.query_np(
        f"SELECT step, timestamp, value FROM {table} WHERE {where} ORDER BY {order} LIMIT {{limit:UInt64}}",
        parameters=parameters,
        settings=ONE_THREAD,
    )
    if not len(rows):
        return _Columns(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64))
    return _Columns(
        np.ascontiguousarray(rows["step"], np.int64),
        np.ascontiguousarray(rows["timestamp"], np.int64),
        # -0.0 is 0.0, as in stock MLflow's SQL (its key holds the value): one point, one place in the order.
        np.ascontiguousarray(rows["value"], np.float64) + 0.0,
    )


def _distinct_in_order(rows: _Columns, by_step: bool) -> _Columns | None:
    """`rows` without repeats of a point, if they are in order (None otherwise)."""
    if len(rows) < 2:
        return rows
    first, second = (rows.step, rows.timestamp) if by_step else (rows.timestamp, rows.step)
    order = _value_order(rows.value)
    later = _ascending(first, second, order)
    if later.all():
        return rows
    same = (first[1:] == first[:-1]) & (second[1:] == second[:-1]) & (order[1:] == order[:-1])
    if not (later | same).all():
        return None
    return rows[np.append(True, later)]


def _ascending(first: Int64Array, second: Int64Array, third: Int64Array) -> npt.NDArray[np.bool_]:
    """Whether each row is strictly after the one before it, ordered by (first, second, third)."""
    a, b, c = first, second, third
    result: npt.NDArray[np.bool_] = (a[1:] > a[:-1]) | (
        (a[1:] == a[:-1]) & ((b[1:] > b[:-1]) | ((b[1:] == b[:-1]) & (c[1:] > c[:-1])))
    )
    return result


def _after_in_steps(prefix: str) -> str:
    p = prefix
    return f"(step, timestamp, {_VALUE_ORDER}) > ({{{p}_s:Int64}}, {{{p}_t:Int64}}, {{{p}_o:Int64}})"


def _after_in_time(prefix: str, op: str) -> str:
    p = prefix
    return f"(timestamp, step, {_VALUE_ORDER}) {op} ({{{p}_t:Int64}}, {{{p}_s:Int64}}, {{{p}_o:Int64}})"


def _bound(prefix: str, point: Point) -> dict[str, object]:
    step, timestamp, value = point
    order = int(_value_order(np.array([value + 0.0], np.float64))[0])  # -0.0 is 0.0, as in _rows
    return {f"{prefix}_s": step, f"{prefix}_t": timestamp, f"{prefix}_o": order}


def _value_order(value: Float64Array) -> Int64Array:
    """schema.value_order_sql with NaN last, in numpy."""
    bits = value.view(np.int64)
    order: Int64Array = np.where(bits >= 0, bits, bits ^ np.int64(2**63 - 1))
    order[np.isnan(value)] = schema.NAN_LOW
    return order


def _is_timestamp_page(
    client: Client, table: str, series: dict[str, object], after: Point | None, read: _Columns, limit: int
) -> bool:
    """Whether the page read in step order is also the page in (timestamp, step, value) order.

    The page holds the points strictly after `after` up to its last point in step order. It is the window
    (after, its last point] of time order when its points are in that order, and no point outside it in step
    order falls in the window. For a point before the page in steps, that means a smaller step than
    `after`'s and a later timestamp; for one after it, a larger step than the last point's and an earlier
    timestamp (an equal step cannot fall in the window either way). So one count of plain step and timestamp
    ranges decides, and when timestamps grow with steps the sort key and the timestamp index leave it a
    granule or two to read. It counts points that must not exist, so duplicates cannot mislead it."""
    page = read[:limit]
    order = _value_order(page.value)
    if not _ascending(page.timestamp, page.step, order).all():
        return False
    more = len(read) > limit  # more points follow in step order: the window ends at the page's last point
    parameters = dict(series)
    outside = []
    if after is not None:
        parameters.update(_bound("a", after))
        first = (int(page.timestamp[0]), int(page.step[0]), int(order[0])) if len(page) else None
        if first is not None and first <= (after[1], after[0], parameters["a_o"]):
            return False
        before = "step < {a_s:Int64} AND timestamp > {a_t:Int64}"
        outside.append(before + " AND timestamp <= {l_t:Int64}" if more else before)
    if more:
        parameters.update(_bound("l", page.point(len(page) - 1)))
        beyond = "step > {l_s:Int64} AND timestamp < {l_t:Int64}"
        outside.append(beyond + " AND timestamp >= {a_t:Int64}" if after is not None else beyond)
    if not outside:
        return True
    # One statement with OR: the key prunes the page's own steps, the timestamp index all but its window.
    where = " OR ".join(f"({side})" for side in outside)
    count = client.query(
        f"SELECT count() FROM {table} WHERE {_SERIES} AND ({where})", parameters=parameters, settings=ONE_THREAD
    )
    return int(count.result_rows[0][0]) == 0


def sampled(
    client: Client,
    database: str,
    run_ids: Sequence[str],
    key: str,
    max_points: int,
    start_step: int | None = None,
    end_step: int | None = None,
) -> dict[str, list[Point]]:
    """At most `max_points` points per run, for charts, by query.sampling's rules: both ends of the range,
    each group's lowest and highest finite point, each special value once per group where it occurs, and
    as many points as stock MLflow answers where the data has them. A run with no more points than
    `max_points` in the range comes back whole.

    Long ranges are answered from metric_buckets (one row per run, key and 256 or 4,096 steps), so the cost
    follows the number of chart buckets, not the length of the series. With a step range, the stored buckets
    straddling its ends are recomputed from the points inside the range, so both ends are exact.
    """
    result: dict[str, list[Point]] = {}
    for run_id, chart in charts(client, database, run_ids, key, max_points, start_step, end_step).items():
        rows = chart.rows
        values = _order_value(np.ascontiguousarray(rows[:, 2]))
        result[run_id] = list(zip(rows[:, 0].tolist(), rows[:, 1].tolist(), values.tolist(), strict=True))
    return result


def charts(
    client: Client,
    database: str,
    run_ids: Sequence[str],
    key: str,
    max_points: int,
    start_step: int | None = None,
    end_step: int | None = None,
) -> dict[str, sampling.Chart]:
    """`sampled`, as query.sampling's charts: rows of (step, timestamp, value order) and the groups' starts."""
    if not run_ids or max_points <= 0:
        return {}
    empty = sampling.Chart(np.empty((0, 3), np.int64), np.empty(0, np.int64))
    result = dict.fromkeys(run_ids, empty)
    special = {}
    for run_id, lineage in attempts.lineages(client, database, run_ids).items():
        shown = attempts.intervals(client, database, lineage, key)
        if shown != [attempts.Interval(run_id, None, None, None)]:  # else: a key later attempts never logged
            special[run_id] = _lineage_chart(client, database, run_id, shown, key, max_points, start_step, end_step)
    result.update(special)
    run_ids = [run_id for run_id in run_ids if run_id not in special]
    if not run_ids:
        return result
    scope = _Scope(list(run_ids), key, start_step, end_step)
    summaries, whole = _chart_buckets(client, database, scope, max_points)
    result.update(whole)
    for run_id, run_summaries in summaries.items():
        result[run_id] = sampling.choose(run_summaries, max_points)
    short = [run_id for run_id in summaries if len(result[run_id].rows) < max_points]
    result.update(_sparse(client, database, scope, short, max_points))
    return result


#: Small reads run on one thread: on a loaded 2-core machine a second one costs a small query more than it saves
#: (measured: a 25,000-point history page 9 ms instead of 13 ms, its check 4 ms instead of 6 ms).
ONE_THREAD = {"max_threads": 1}

#: Bucket widths of the stored summaries, coarsest first.
_WIDTHS = (schema.COARSE_WIDTH, schema.FINE_WIDTH)
_SUMMARY = tuple(schema.BUCKET_MERGES)


@dataclass(frozen=True, slots=True)
class _Scope:
    run_ids: list[str]
    key: str
    start_step: int | None
    end_step: int | None

    def where(self, step_column: str, width: int | None = None, prefix: str = "") -> tuple[str, dict[str, object]]:
        """The WHERE clause for these runs and this key: points, or buckets `width` steps wide that overlap
        the range."""
        sql = "run_id IN {runs:Array(String)} AND key = {key:String}"
        parameters: dict[str, object] = {"runs": self.run_ids, "key": self.key}
        if width is not None:
            sql += " AND width = {width:UInt16}"
            parameters["width"] = width
        in_range, range_parameters = self.in_range(step_column, width or 1, prefix)
        return sql + in_range, {**parameters, **range_parameters}

    def in_range(self, step_column: str, width: int, prefix: str) -> tuple[str, dict[str, object]]:
        """` AND` the condition that `step_column` (steps, or buckets `width` steps wide) overlaps the range."""
        sql = ""
        parameters: dict[str, object] = {}
        if self.start_step is not None:
            sql += f" AND {step_column} >= {{{prefix}lo:Int64}}"
            parameters[f"{prefix}lo"] = self.start_step // width
        if self.end_step is not None:
            sql += f" AND {step_column} <= {{{prefix}hi:Int64}}"
            parameters[f"{prefix}hi"] = self.end_step // width
        return sql, parameters


def _chart_buckets(
    client: Client, database: str, scope: _Scope, max_points: int
) -> tuple[dict[str, sampling.Summaries], dict[str, sampling.Chart]]:
    """Per run, the summaries of up to max_points chart buckets of equal step width shared by every run,
    from the coarsest stored width with enough buckets in the range, or from the points of a short range;
    and the runs whose range holds no more than max_points points, whole."""
    bounds = _bucket_bounds(client, database, scope)
    for width in _WIDTHS:
        if width not in bounds:
            return {}, {}
        first, last = bounds[width]
        stored = last - first + 1
        if stored >= max_points or (width == schema.FINE_WIDTH and stored >= max(2, max_points // 2)):
            per = -(-stored // max_points)  # ceiling division
            return _from_buckets(client, database, scope, width, first, per), {}
    return _from_points(client, database, scope, max_points)


def _bucket_bounds(client: Client, database: str, scope: _Scope) -> dict[int, tuple[int, int]]:
    """Per stored width, the first and last bucket overlapping the scope; widths without any are left out.
    One query for every width: each query costs chDB a few milliseconds beyond its rows (measured)."""
    terms = []
    parameters: dict[str, object] = {"runs": scope.run_ids, "key": scope.key}
    for width in _WIDTHS:
        in_range, range_parameters = scope.in_range("bucket", width, f"w{width}_")
        terms.append(f"(width = {width}{in_range})")
        parameters.update(range_parameters)
    rows = client.query(
        f"SELECT width, min(bucket), max(bucket) FROM {database}.{schema.METRIC_BUCKETS}"
        f" WHERE run_id IN {{runs:Array(String)}} AND key = {{key:String}} AND ({' OR '.join(terms)}) GROUP BY width",
        parameters=parameters,
        settings=ONE_THREAD,
    ).result_rows
    return {int(width): (int(first), int(last)) for width, first, last in rows}


def _from_buckets(
    client: Client, database: str, scope: _Scope, width: int, first: int, per: int
) -> dict[str, sampling.Summaries]:
    """Stored buckets merged `per` at a time; with a step range, the stored buckets that straddle an end are
    replaced by the same summaries of the points inside the range."""
    where, parameters = scope.where("bucket", width)
    shift = width.bit_length() - 1
    columns = ", ".join(_SUMMARY)
    sources = [f"SELECT run_id, bucket, {columns} FROM {database}.{schema.METRIC_BUCKETS} WHERE {where}"]
    straddling = []
    if scope.start_step is not None:
        straddling.append("bucket < {inside_lo:Int64}")
        parameters["inside_lo"] = -(-scope.start_step // width)
    if scope.end_step is not None:
        straddling.append("bucket > {inside_hi:Int64}")
        parameters["inside_hi"] = (scope.end_step + 1) // width - 1
    if straddling:
        partial = " OR ".join(straddling)
        sources[0] += f" AND NOT ({partial})"
        points_where, points_parameters = scope.where("step", prefix="step_")
        aggregates = ", ".join(f"{sql} AS {column}" for column, sql in schema.bucket_aggregates_sql())
        sources.append(
            f"SELECT run_id, bitShiftRight(step, {shift}) AS bucket, {aggregates} FROM {database}.{schema.METRICS}"
            f" WHERE {points_where} AND ({partial}) GROUP BY run_id, bucket"
        )
        parameters.update(points_parameters)
    merged = ", ".join(f"{merge}({column}) AS {column}" for column, merge in schema.BUCKET_MERGES.items())
    return _summaries(
        client,
        f"SELECT run_id, intDiv(bucket - {{first:Int64}}, {{per:Int64}}) AS b, {merged}"
        f" FROM ({' UNION ALL '.join(sources)}) GROUP BY run_id, b",
        {**parameters, "first": first, "per": per},
        origin=first * width,
        scale=per * width,
    )


def _from_points(
    client: Client, database: str, scope: _Scope, max_points: int
) -> tuple[dict[str, sampling.Summaries], dict[str, sampling.Chart]]:
    """A short range, straight from its points (under max_points * FINE_WIDTH steps per run)."""
    where, parameters = scope.where("step")
    table = f"{database}.{schema.METRICS}"
    counts, whole = _counted(client, table, where, parameters, max_points)
    if not counts:
        return {}, {}
    large = [run_id for run_id, (count, _, _) in counts.items() if count > max_points]
    if not large:
        return {}, whole
    first = min(low for _, low, _ in counts.values())
    last = max(high for _, _, high in counts.values())
    width = max(1, -(-(last - first + 1) // max_points))  # ceiling division
    aggregates = ", ".join(f"{sql} AS {column}" for column, sql in schema.bucket_aggregates_sql())
    summaries = _summaries(
        client,
        f"SELECT run_id, intDiv(step - {{first:Int64}}, {{width:Int64}}) AS b, {aggregates} FROM {table}"
        f" WHERE {where} AND run_id IN {{large:Array(String)}} GROUP BY run_id, b",
        {**parameters, "large": large, "first": first, "width": width},
        origin=first,
        scale=width,
    )
    return summaries, whole


def _counted(
    client: Client, table: str, where: str, parameters: dict[str, object], max_points: int
) -> tuple[dict[str, tuple[int, int, int]], dict[str, sampling.Chart]]:
    """Per run with points matching `where`: its distinct points, lowest and highest step; and the runs with at
    most max_points distinct points, whole, as charts. One read: each run collects at most max_points + 1
    distinct points (bounded memory), which are all of them when it has no more than max_points."""
    cap = int(max_points) + 1
    rows = client.query_np(
        f"SELECT run_id, n, low, high, p.1 AS step, p.2 AS timestamp, p.3 AS o FROM (SELECT run_id,"
        f" uniqExact(step, timestamp, value) AS n, min(step) AS low, max(step) AS high,"
        f" groupUniqArray({cap})((step, timestamp, {_VALUE_ORDER})) AS points FROM {table} WHERE {where}"
        " GROUP BY run_id) LEFT ARRAY JOIN if(n <= {most:UInt64}, points, []) AS p ORDER BY run_id, step, timestamp, o",
        parameters={**parameters, "most": max_points},
        settings=ONE_THREAD,
    )
    counts: dict[str, tuple[int, int, int]] = {}
    whole = {}
    for run_id, begin, end in _runs_in(rows["run_id"]) if len(rows) else []:
        part = rows[begin:end]
        count = int(part["n"][0])
        counts[run_id] = (count, int(part["low"][0]), int(part["high"][0]))
        if count <= max_points:
            points = np.column_stack([np.asarray(part[c], np.int64) for c in ("step", "timestamp", "o")])
            whole[run_id] = sampling.Chart(points, points[:1, 0])
    return counts, whole


def _sparse(
    client: Client, database: str, scope: _Scope, run_ids: list[str], max_points: int
) -> dict[str, sampling.Chart]:
    """Runs charted from stored buckets with fewer than max_points points: sparse series over a long range,
    which may hold points the summaries do not name. Those with at most max_points points come back whole,
    as stock MLflow answers them; reading them is cheap because they are small."""
    if not run_ids:
        return {}
    runs = _Scope(run_ids, scope.key, scope.start_step, scope.end_step)
    where, parameters = runs.where("step")
    return _counted(client, f"{database}.{schema.METRICS}", where, parameters, max_points)[1]


def _summaries(
    client: Client, grouped: str, parameters: dict[str, object], origin: int, scale: int
) -> dict[str, sampling.Summaries]:
    """Run `grouped` (run_id, b and the packed summary columns), unpacked into numpy per run."""
    words = ", ".join(
        f"{sql} AS {column}_{i}" for column in _SUMMARY for i, sql in enumerate(schema.unpack_sql(column))
    )
    rows = client.query_np(f"SELECT run_id, b, {words} FROM ({grouped}) ORDER BY run_id, b", parameters=parameters)
    summaries = {}
    for run_id, begin, end in _runs_in(rows["run_id"]) if len(rows) else []:
        part = rows[begin:end]
        summaries[run_id] = sampling.Summaries(
            bucket=np.asarray(part["b"], np.int64),
            words={
                column: np.column_stack([np.asarray(part[f"{column}_{i}"], np.int64) for i in range(3)])
                for column in _SUMMARY
            },
            origin=origin,
            scale=scale,
        )
    return summaries


def _runs_in(run_column: npt.NDArray[Any]) -> list[tuple[str, int, int]]:
    """(run_id, begin, end) of each run's rows in a result ordered by run_id."""
    if not len(run_column):
        return []
    starts = np.flatnonzero(np.append(True, run_column[1:] != run_column[:-1]))
    bounds = np.append(starts, len(run_column)).tolist()
    return [(str(run_column[b]), b, e) for b, e in itertools.pairwise(bounds)]


def unpack_latest(packed: Sequence[int]) -> list[Point]:
    """metric_latest's packed points (schema.latest_point_sql in SQL) as (step, timestamp, value), decoded in numpy:
    little-endian 64-bit words (0, value order, timestamp, step), the middle two with their sign bit flipped."""
    if not packed:
        return []
    raw = b"".join(point.to_bytes(32, "little", signed=True) for point in packed)
    words = np.frombuffer(raw, "<i8").reshape(-1, 4)
    sign = np.int64(-(2**63))
    values = _order_value(words[:, 1] ^ sign)
    return list(zip(words[:, 3].tolist(), (words[:, 2] ^ sign).tolist(), values.tolist(), strict=True))


def _order_value(order: Int64Array) -> Float64Array:
    """The inverse of _value_order (NaN for NaN's order)."""
    bits: Int64Array = np.where(order >= 0, order, order ^ np.int64(2**63 - 1))
    return bits.view(np.float64)


def latest(
    client: Client, database: str, run_ids: Collection[str], keys: Collection[str] | None = None
) -> dict[str, dict[str, Point]]:
    """Each run's latest point per key: the maximum by (step, timestamp, value), as MLflow defines it. With `keys`,
    resumed and forked runs answer those keys only (their reads cost a query or more per key; others answer all)."""
    result = _stored_latest(client, database, run_ids)
    special = attempts.lineages(client, database, run_ids)
    for run_id, lineage in special.items():
        result[run_id] = _lineage_latest(client, database, lineage, keys)
    return result


def _stored_latest(client: Client, database: str, run_ids: Collection[str]) -> dict[str, dict[str, Point]]:
    """Each run's latest stored point per key, whatever its attempt."""
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


# ----- resumed and forked runs (query.attempts): the reads above, over the intervals a lineage shows -----

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_PACKED_POINT = schema.pack_sql("step", "timestamp", _VALUE_ORDER)


def _history_in_view(
    client: Client, table: str, view: tuple[str, dict[str, object]], limit: int, after: Point | None
) -> HistoryPage:
    """A history page of a resumed or forked run's shown points, read sorted by (timestamp, step, value):
    exact, and as stable under keyset pagination as the plain read."""
    where, parameters = view
    parameters = {**parameters, "limit": limit + 1}
    if after is not None:
        parameters.update(_bound("a", after))
        where += f" AND timestamp >= {{a_t:Int64}} AND {_after_in_time('a', '>')}"
    rows = client.query_np(
        f"SELECT DISTINCT step, timestamp, value, {_VALUE_ORDER} AS o FROM {table} WHERE {where}"
        " ORDER BY timestamp, step, o LIMIT {limit:UInt64}",
        parameters=parameters,
    )
    read = _Columns(
        np.ascontiguousarray(rows["step"], np.int64) if len(rows) else np.empty(0, np.int64),
        np.ascontiguousarray(rows["timestamp"], np.int64) if len(rows) else np.empty(0, np.int64),
        np.ascontiguousarray(rows["value"], np.float64) if len(rows) else np.empty(0, np.float64),
    )
    if len(read) <= limit:
        return HistoryPage(read.step, read.timestamp, read.value, None)
    return HistoryPage(read.step[:limit], read.timestamp[:limit], read.value[:limit], read.point(limit - 1))


def _in_range(shown: list[attempts.Interval], start: int | None, end: int | None) -> list[attempts.Interval]:
    """The intervals cut to the chart's step range [start, end], empty ones dropped."""
    result = []
    for piece in shown:
        lo, hi = piece.lo, piece.hi
        if start is not None:
            lo = start if lo is None else max(lo, start)
        if end is not None:
            hi = end + 1 if hi is None else min(hi, end + 1)
        cut = attempts.Interval(piece.run_id, piece.attempt, lo, hi)
        if not cut.empty():
            result.append(cut)
    return result


def _split(
    piece: attempts.Interval, dirty: tuple[int, int] | None, width: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The piece's stored buckets that hold its points and nothing else, as ranges of bucket numbers, and the
    step ranges whose points must be read instead: the buckets straddling its ends and those holding
    superseded points (`dirty`, a step range). The two may overlap: every summary is a minimum or maximum."""
    shift = width.bit_length() - 1
    lo = _INT64_MIN if piece.lo is None else piece.lo
    hi = _INT64_MAX if piece.hi is None else piece.hi
    first_full, last_full = -((-lo) >> shift), (hi >> shift) - 1
    if first_full > last_full:
        return [], [(lo, hi)]
    raw = [(lo, first_full << shift), ((last_full + 1) << shift, hi)]
    clean = [(first_full, last_full)]
    if dirty is not None:
        low, high = dirty[0] >> shift, (dirty[1] - 1) >> shift
        clean = [
            r for r in ((first_full, min(last_full, low - 1)), (max(first_full, high + 1), last_full)) if r[0] <= r[1]
        ]
        raw.append((max(lo, low << shift), min(hi, (high + 1) << shift)))
    return clean, [r for r in raw if r[0] < r[1]]


def _dirty(client: Client, table: str, pieces: list[attempts.Interval], key: str) -> list[tuple[int, int] | None]:
    """For each piece, the step range inside it that also holds points of its run's earlier attempts (which it
    supersedes), or None. A minmax index on `attempt` lets ClickHouse skip the granules of the later attempts."""
    last: dict[tuple[str, int], int] = {}
    for run_id in {p.run_id for p in pieces if p.attempt}:
        mine = [p for p in pieces if p.run_id == run_id and p.attempt]
        rows = client.query(
            f"SELECT attempt, max(step) FROM {table} WHERE run_id = {{run:String}} AND key = {{key:String}}"
            " AND attempt < {top:UInt32} AND step >= {lo:Int64} GROUP BY attempt",
            parameters={
                "run": run_id,
                "key": key,
                "top": max(p.attempt or 0 for p in mine),
                "lo": min(p.lo if p.lo is not None else _INT64_MIN for p in mine),
            },
        ).result_rows
        last.update({(run_id, int(a)): int(s) for a, s in rows})
    result: list[tuple[int, int] | None] = []
    for piece in pieces:
        ends = [s + 1 for (run_id, a), s in last.items() if run_id == piece.run_id and a < (piece.attempt or 0)]
        lo = _INT64_MIN if piece.lo is None else piece.lo
        hi = _INT64_MAX if piece.hi is None else piece.hi
        end = min(max(ends, default=lo), hi)
        result.append((lo, end) if end > lo else None)
    return result


def _piece_sql(piece: attempts.Interval, p: str) -> tuple[str, str, dict[str, object]]:
    """The piece's series, and its attempt (every summary table lacks the column, so it applies to points only)."""
    series = f"run_id = {{{p}_run:String}} AND key = {{key:String}}"
    parameters: dict[str, object] = {f"{p}_run": piece.run_id}
    attempt = ""
    if piece.attempt is not None:
        attempt = f" AND attempt = {{{p}_attempt:UInt32}}"
        parameters[f"{p}_attempt"] = piece.attempt
    return series, attempt, parameters


def _ranges_sql(column: str, ranges: list[tuple[int, int]], p: str, inclusive: bool) -> tuple[str, dict[str, object]]:
    """`column` within any of `ranges` ([lo, hi), or [lo, hi] when inclusive)."""
    terms: list[str] = []
    parameters: dict[str, object] = {}
    for i, (lo, hi) in enumerate(ranges):
        terms.append(
            f"({column} >= {{{p}_{i}_lo:Int64}} AND {column} {'<=' if inclusive else '<'} {{{p}_{i}_hi:Int64}})"
        )
        parameters.update({f"{p}_{i}_lo": lo, f"{p}_{i}_hi": hi})
    return "(" + " OR ".join(terms) + ")", parameters


def _piece_sources(
    database: str, pieces: list[attempts.Interval], dirty: list[tuple[int, int] | None], width: int
) -> tuple[list[str], dict[str, object]]:
    """SELECTs of (bucket, summary columns) whose merge per bucket summarises exactly the pieces' points:
    stored buckets where they hold nothing else, the points elsewhere."""
    shift = width.bit_length() - 1
    aggregates = ", ".join(f"{sql} AS {column}" for column, sql in schema.bucket_aggregates_sql())
    columns = ", ".join(_SUMMARY)
    sources: list[str] = []
    parameters: dict[str, object] = {"width": width}
    for i, piece in enumerate(pieces):
        clean, raw = _split(piece, dirty[i], width)
        series, attempt, series_parameters = _piece_sql(piece, f"p{i}")
        parameters.update(series_parameters)
        if clean:
            ranges, ranges_parameters = _ranges_sql("bucket", clean, f"c{i}", inclusive=True)
            parameters.update(ranges_parameters)
            sources.append(
                f"SELECT bucket, {columns} FROM {database}.{schema.METRIC_BUCKETS}"
                f" WHERE width = {{width:UInt16}} AND {series} AND {ranges}"
            )
        if raw:
            ranges, ranges_parameters = _ranges_sql("step", raw, f"r{i}", inclusive=False)
            parameters.update(ranges_parameters)
            sources.append(
                f"SELECT bitShiftRight(step, {shift}) AS bucket, {aggregates} FROM {database}.{schema.METRICS}"
                f" WHERE {series}{attempt} AND {ranges} GROUP BY bucket"
            )
    return sources, parameters


def _lineage_chart(
    client: Client,
    database: str,
    run_id: str,
    shown: list[attempts.Interval],
    key: str,
    max_points: int,
    start: int | None,
    end: int | None,
) -> sampling.Chart:
    """`charts` for one resumed or forked run: by the same rules, over the points its lineage shows (`shown`). Stored
    buckets serve wherever they hold only shown points; only the buckets at the pieces' ends and those with
    superseded points (a restart's overlap, usually short) are summarised from points."""
    empty = sampling.Chart(np.empty((0, 3), np.int64), np.empty(0, np.int64))
    pieces = _in_range(shown, start, end)
    if not pieces:
        return empty
    table = f"{database}.{schema.METRICS}"
    dirty = _dirty(client, table, pieces, key)
    for width in _WIDTHS:
        first, last = _piece_bounds(client, database, pieces, key, width)
        if first is None or last is None:
            return empty
        stored = last - first + 1
        if stored >= max_points or (width == schema.FINE_WIDTH and stored >= max(2, max_points // 2)):
            per = -(-stored // max_points)  # ceiling division
            sources, parameters = _piece_sources(database, pieces, dirty, width)
            merged = ", ".join(f"{merge}({column}) AS {column}" for column, merge in schema.BUCKET_MERGES.items())
            summaries = _summaries(
                client,
                f"SELECT {{run:String}} AS run_id, intDiv(bucket - {{first:Int64}}, {{per:Int64}}) AS b, {merged}"
                f" FROM ({' UNION ALL '.join(sources)}) GROUP BY run_id, b",
                {**parameters, "key": key, "run": run_id, "first": first, "per": per},
                origin=first * width,
                scale=per * width,
            )
            chart = sampling.choose(summaries[run_id], max_points) if run_id in summaries else empty
            if len(chart.rows) < max_points:  # sparse: whole when small, as for plain runs
                chart = _view_whole(client, table, pieces, key, max_points) or chart
            return chart
    where, parameters = attempts.where_sql(pieces)
    where, parameters = f"key = {{key:String}} AND {where}", {**parameters, "key": key, "run": run_id}
    count, low, high = client.query(
        f"SELECT uniqExact(step, timestamp, value), min(step), max(step) FROM {table} WHERE {where}",
        parameters=parameters,
    ).result_rows[0]
    if count <= max_points:
        return _view_whole(client, table, pieces, key, max_points) or empty
    width = max(1, -(-(int(high) - int(low) + 1) // max_points))  # ceiling division
    aggregates = ", ".join(f"{sql} AS {column}" for column, sql in schema.bucket_aggregates_sql())
    summaries = _summaries(
        client,
        # The run's id is named outside the query that filters on run_id: inside, the alias would shadow the column.
        f"SELECT {{run:String}} AS run_id, * FROM (SELECT intDiv(step - {{first:Int64}}, {{width:Int64}}) AS b,"
        f" {aggregates} FROM {table} WHERE {where} GROUP BY b)",
        {**parameters, "first": int(low), "width": width},
        origin=int(low),
        scale=width,
    )
    return sampling.choose(summaries[run_id], max_points) if run_id in summaries else empty


def _piece_bounds(
    client: Client, database: str, pieces: list[attempts.Interval], key: str, width: int
) -> tuple[int | None, int | None]:
    """The first and last stored bucket `width` steps wide overlapping any piece, or None when there are none."""
    shift = width.bit_length() - 1
    terms: list[str] = []
    parameters: dict[str, object] = {"key": key, "width": width}
    for i, piece in enumerate(pieces):
        lo = _INT64_MIN if piece.lo is None else piece.lo
        hi = _INT64_MAX if piece.hi is None else piece.hi
        terms.append(f"(run_id = {{b{i}_run:String}} AND bucket >= {{b{i}_lo:Int64}} AND bucket <= {{b{i}_hi:Int64}})")
        parameters.update({f"b{i}_run": piece.run_id, f"b{i}_lo": lo >> shift, f"b{i}_hi": (hi - 1) >> shift})
    count, first, last = client.query(
        f"SELECT count(), min(bucket), max(bucket) FROM {database}.{schema.METRIC_BUCKETS}"
        f" WHERE width = {{width:UInt16}} AND key = {{key:String}} AND ({' OR '.join(terms)})",
        parameters=parameters,
    ).result_rows[0]
    return (int(first), int(last)) if count else (None, None)


def _view_whole(
    client: Client, table: str, pieces: list[attempts.Interval], key: str, max_points: int
) -> sampling.Chart | None:
    """Every shown point of the pieces as a chart, or None when they hold more than max_points."""
    where, parameters = attempts.where_sql(pieces)
    rows = client.query_np(
        f"SELECT DISTINCT step, timestamp, {_VALUE_ORDER} AS o FROM {table} WHERE key = {{key:String}} AND {where}"
        " ORDER BY step, timestamp, o LIMIT {limit:UInt64}",
        parameters={**parameters, "key": key, "limit": max_points + 1},
    )
    if len(rows) > max_points:
        return None
    if not len(rows):
        points = np.empty((0, 3), np.int64)
    elif rows.dtype.names is None:  # columns of one type come back as a plain matrix
        points = np.ascontiguousarray(rows, np.int64).reshape(-1, 3)
    else:
        points = np.column_stack([np.asarray(rows[c], np.int64) for c in ("step", "timestamp", "o")])
    return sampling.Chart(points, points[:1, 0])


def _lineage_latest(
    client: Client, database: str, lineage: attempts.Lineage, wanted: Collection[str] | None = None
) -> dict[str, Point]:
    """A resumed or forked run's latest shown point per key (of `wanted`, when given): the latest point of the last
    piece of the series that has one. Stored summaries answer it, except for a piece cut off above (a fork's
    parent up to the fork step), whose latest is read from its stored buckets and the points of the bucket it
    ends in."""
    stored = _stored_latest(client, database, lineage.run_ids)
    keys = sorted({key for points in stored.values() for key in points if wanted is None or key in wanted})
    if not keys:
        return {}
    shown = attempts.intervals_of_keys(client, database, lineage, keys)
    by_attempt = _attempt_latest(client, database, lineage.run_ids, keys)
    result: dict[str, Point] = {}
    todo = {key: list(shown[key]) for key in keys}
    while todo:
        bounded: dict[attempts.Interval, list[str]] = {}
        for key, pieces in list(todo.items()):
            while pieces and pieces[-1].hi is None:  # the piece's points are all shown: a stored latest is exact
                piece = pieces.pop()
                if piece.attempt:
                    point = by_attempt.get((piece.run_id, key, piece.attempt))
                else:
                    point = stored[piece.run_id].get(key)
                if point is not None:
                    result[key] = point
                    pieces.clear()
            if pieces:
                bounded.setdefault(pieces[-1], []).append(key)
            else:
                del todo[key]
        for piece, piece_keys in bounded.items():
            found = _latest_in(client, database, piece, piece_keys)
            for key in piece_keys:
                todo[key].pop()
                if key in found:
                    result[key] = found[key]
                    todo[key].clear()
    return result


def _attempt_latest(
    client: Client, database: str, run_ids: list[str], keys: list[str]
) -> dict[tuple[str, str, int], Point]:
    rows = client.query(
        f"SELECT run_id, key, attempt, {', '.join(schema.latest_point_sql('l'))} FROM (SELECT run_id, key, attempt,"
        f" max(latest) AS l FROM {database}.{schema.METRIC_ATTEMPTS}"
        " WHERE run_id IN {ids:Array(String)} AND key IN {keys:Array(String)} GROUP BY run_id, key, attempt)",
        parameters={"ids": run_ids, "keys": keys},
    ).result_rows
    return {(str(r), str(k), int(a)): (int(s), int(t), float(v)) for r, k, a, s, t, v in rows}


def _latest_in(client: Client, database: str, piece: attempts.Interval, keys: list[str]) -> dict[str, Point]:
    """The latest point of each key among the piece's points."""
    series = "run_id = {run:String} AND key IN {keys:Array(String)}"
    parameters: dict[str, object] = {"run": piece.run_id, "keys": keys, "width": schema.FINE_WIDTH}
    if piece.attempt is None:  # the run's stored buckets hold only these points: read them where whole
        clean, raw = _split(piece, None, schema.FINE_WIDTH)
    else:
        clean, raw = [], [(_INT64_MIN if piece.lo is None else piece.lo, _INT64_MAX if piece.hi is None else piece.hi)]
        series += " AND attempt = {attempt:UInt32}"
        parameters["attempt"] = piece.attempt
    sources = []
    if clean:
        ranges, ranges_parameters = _ranges_sql("bucket", clean, "c", inclusive=True)
        parameters.update(ranges_parameters)
        sources.append(
            f"SELECT key, last AS p FROM {database}.{schema.METRIC_BUCKETS}"
            f" WHERE width = {{width:UInt16}} AND {series} AND {ranges}"
        )
    if raw:
        ranges, ranges_parameters = _ranges_sql("step", raw, "r", inclusive=False)
        parameters.update(ranges_parameters)
        sources.append(f"SELECT key, {_PACKED_POINT} AS p FROM {database}.{schema.METRICS} WHERE {series} AND {ranges}")
    rows = client.query(
        f"SELECT key, {', '.join(schema.latest_point_sql('l'))} FROM (SELECT key, max(p) AS l"
        f" FROM ({' UNION ALL '.join(sources)}) GROUP BY key)",
        parameters=parameters,
    ).result_rows
    return {str(k): (int(s), int(t), float(v)) for k, s, t, v in rows}
