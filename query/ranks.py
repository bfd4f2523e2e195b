"""Reading distributed runs rank by rank: each rank's progress, the cross-rank band, the stragglers.

Answers come from the per-rank summaries the sink keeps (schema.RANK_SERIES, schema.RANK_BUCKETS; see
ingest.rank_summaries), so their cost follows ranks x keys, or ranks x steps / RANK_WIDTH, never the points;
only a series of at most `max_buckets` steps is read from its points, and counts read ranks x steps / RANK_SPAN
rows (schema.RANK_SPANS). User input travels as bound parameters.

Definitions (the README's "Distributed training" states them for users):
- A rank's *step rate* is steps per second, by the points' own timestamps, from a point RATE_WINDOW/2 to
  RATE_WINDOW steps before its latest one (the first point of the older of two staggered RATE_WINDOW-step
  windows) to that latest point; a rank with less history is measured from its first point. None when the
  window holds one timestamp.
- *points* counts the distinct steps at which the rank logged the key: retried writes never inflate it.
- The band (`aggregate`): per bucket of steps, each rank contributes one value, its point at the highest step
  it logged in the bucket; NaN and ±Inf values are counted apart (`nan`, `inf`) and left out of count, mean,
  min, max and the exact quantiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from trackhouse.query import schema
from trackhouse.query.connection import Client

#: Keys of MLflow's system-metrics logger; with a node id they read `system/<node_id>/<metric>`.
SYSTEM_PREFIX = "system/"
#: Most (key, rank, node) rows one answer holds.
MAX_SERIES = 65_536
_RUN = "run_id = {run:String}"


@dataclass(frozen=True, slots=True)
class RankSeries:
    """One rank's series of one key."""

    key: str
    rank: int
    node: str
    first_step: int
    first_timestamp: int
    last_step: int
    last_timestamp: int
    last_value: float
    #: Distinct steps holding a point of this rank.
    points: int
    nan_count: int
    inf_count: int
    step_rate: float | None


def run_exists(client: Client, database: str, run_id: str) -> bool:
    rows = client.query(
        f"SELECT 1 FROM {database}.{schema.RUNS} WHERE {_RUN} LIMIT 1", parameters={"run": run_id}
    ).result_rows
    return bool(rows)


def series_keys(client: Client, database: str, run_id: str, key: str) -> dict[str, str]:
    """The stored keys that hold `key` for some node: `key` itself, and for a system metric each MLflow
    `system/<node_id>/<metric>` key; mapped to the node their name gives ('' for `key` itself)."""
    keys = {key: ""}
    if not key.startswith(SYSTEM_PREFIX):
        return keys
    metric = key.removeprefix(SYSTEM_PREFIX)
    rows = client.query(
        f"SELECT DISTINCT key FROM {database}.{schema.RANK_SERIES} WHERE {_RUN}"
        " AND startsWith(key, {prefix:String}) AND endsWith(key, {suffix:String})",
        parameters={"run": run_id, "prefix": SYSTEM_PREFIX, "suffix": "/" + metric},
    ).result_rows
    for (stored,) in rows:
        node = stored[len(SYSTEM_PREFIX) : -len(metric) - 1]
        if node and "/" not in node:
            keys[stored] = node
    return keys


def rank_series(client: Client, database: str, run_id: str, keys: dict[str, str]) -> list[RankSeries]:
    """Each (key, rank, node)'s summary for `keys` (stored key -> node its name gives, see series_keys),
    ordered by rank, node and key; at most MAX_SERIES."""
    table = f"{database}.{schema.RANK_SERIES}"
    parameters = {"run": run_id, "keys": list(keys), "limit": MAX_SERIES}
    head = _head(client, table, f"{_RUN} AND key IN {{keys:Array(String)}}", parameters)
    if not len(head["key"]):
        return []
    counts = client.query_np(
        "SELECT key, rank, node, sum(bitCount(steps)) AS points, sum(bitCount(nan_steps)) AS nans,"
        f" sum(bitCount(inf_steps)) AS infs FROM {database}.{schema.RANK_SPANS} FINAL"
        f" WHERE {_RUN} AND key IN {{keys:Array(String)}} GROUP BY key, rank, node",
        parameters=parameters,
    )
    counted = {
        (str(k), int(r), str(n)): (int(p), int(a), int(i))
        for k, r, n, p, a, i in zip(
            counts["key"], counts["rank"], counts["node"], counts["points"], counts["nans"], counts["infs"], strict=True
        )
    }
    found = []
    for i in range(len(head["key"])):
        key, rank, node = str(head["key"][i]), int(head["rank"][i]), str(head["node"][i])
        points, nans, infs = counted.get((key, rank, node), (0, 0, 0))
        found.append(
            RankSeries(
                key=key,
                rank=rank,
                node=node or keys.get(key, ""),
                first_step=int(head["first_step"][i]),
                first_timestamp=int(head["first_ts"][i]),
                last_step=int(head["last_step"][i]),
                last_timestamp=int(head["last_ts"][i]),
                last_value=float(_order_value(head["last_order"][i : i + 1])[0]),
                points=points,
                nan_count=nans,
                inf_count=infs,
                step_rate=_rate(head["step_rate"][i]),
            )
        )
    found.sort(key=lambda s: (s.rank, s.node, s.key))
    return found


def _series_sql(table: str, where: str) -> str:
    """metric_ranks rows merged per (key, rank, node), unpacked into int64 columns, with the step rate
    (see the module docstring; NaN when unknown)."""
    unpack = []
    for column, names in (
        ("first", ("first_step", "first_ts", "first_order")),
        ("last", ("last_step", "last_ts", "last_order")),
        ("window_a", ("a_window", "a_neg_step", "a_neg_ts")),
        ("window_b", ("b_window", "b_neg_step", "b_neg_ts")),
    ):
        unpack += [f"{sql} AS {name}" for sql, name in zip(schema.unpack_sql(column), names, strict=True)]
    # The older of the two window anchors, unless it is the latest point itself: then the first point.
    rate = (
        "if(-a_neg_step <= -b_neg_step, -a_neg_step, -b_neg_step) AS w_step,"
        " if(-a_neg_step <= -b_neg_step, -a_neg_ts, -b_neg_ts) AS w_ts,"
        " if(w_step >= last_step, first_step, w_step) AS s0, if(w_step >= last_step, first_ts, w_ts) AS t0,"
        " if(last_step > s0 AND last_ts > t0, (last_step - s0) * 1000.0 / (last_ts - t0), nan) AS step_rate"
    )
    return (
        f"SELECT key, rank, node, {', '.join(unpack)}, {rate} FROM (SELECT key, rank, node, min(first) AS first,"
        " max(last) AS last, max(window_a) AS window_a, max(window_b) AS window_b"
        f" FROM {table} WHERE {where} GROUP BY key, rank, node)"
    )


def _head(client: Client, table: str, where: str, parameters: dict[str, object]) -> dict[str, npt.NDArray[Any]]:
    result = client.query_np(f"{_series_sql(table, where)} LIMIT {{limit:UInt64}}", parameters=parameters)
    if not len(result):
        return {"key": np.empty(0, np.int64)}
    return {name: result[name] for name in result.dtype.names}


def _rate(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _order_value(order: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    bits = order.astype(np.int64)
    flipped: npt.NDArray[np.int64] = np.where(bits >= 0, bits, bits ^ np.int64(2**63 - 1))
    return flipped.view(np.float64)


# ----- the band across ranks -----


@dataclass(frozen=True, slots=True)
class Band:
    """One bucket of steps across ranks: statistics of each rank's value (see the module docstring)."""

    start_step: int
    end_step: int
    count: int
    nan: int
    inf: int
    mean: float | None
    min: float | None
    max: float | None
    p50: float | None
    p95: float | None


_V = "v"
_STATS = (
    f"countIf(isFinite({_V})) AS count, countIf(isNaN({_V})) AS nan, countIf(isInfinite({_V})) AS inf,"
    f" avgIf({_V}, isFinite({_V})) AS mean, minIf({_V}, isFinite({_V})) AS low, maxIf({_V}, isFinite({_V})) AS high,"
    f" quantilesExactIf(0.5, 0.95)({_V}, isFinite({_V})) AS q"
)


@dataclass(frozen=True, slots=True)
class _Buckets:
    """How a key's steps fall into buckets: one per step from the points (`per` 0), or `per` summary rows each."""

    first: int
    last: int
    first_bucket: int
    per: int


def _bucketing(client: Client, database: str, run_id: str, key: str, max_buckets: int) -> _Buckets | None:
    span = _span(client, database, run_id, key)
    if span is None:
        return None
    first, last = span
    if last - first + 1 <= max_buckets:
        return _Buckets(first, last, first, 0)
    first_bucket, last_bucket = first >> _SHIFT, last >> _SHIFT
    return _Buckets(first, last, first_bucket, -(-(last_bucket - first_bucket + 1) // max_buckets))


_SHIFT = schema.RANK_WIDTH.bit_length() - 1
_WHERE_KEY = f"{_RUN} AND key = {{key:String}}"


def aggregate(client: Client, database: str, run_id: str, key: str, max_buckets: int) -> list[Band]:
    """At most `max_buckets` buckets of equal step width over the key's steps, in step order, each with its
    statistics across ranks. A series spanning at most max_buckets steps gets one bucket per step, from its
    points; a longer one gets buckets of whole RANK_WIDTH-step summary rows."""
    buckets = _bucketing(client, database, run_id, key, max_buckets)
    if buckets is None:
        return []
    parameters: dict[str, object] = {"run": run_id, "key": key, "fb": buckets.first_bucket, "per": buckets.per}
    if not buckets.per:
        order = schema.value_order_sql("value", schema.NAN_LOW)
        rows = client.query(
            f"SELECT step AS b, {_STATS} FROM (SELECT step, rank, node, {schema.order_value_sql(f'max({order})')} AS v"
            f" FROM {database}.{schema.METRICS} WHERE {_WHERE_KEY} GROUP BY step, rank, node) GROUP BY b ORDER BY b",
            parameters=parameters,
        ).result_rows
        return [_band(row, row[0], row[0]) for row in rows]
    table = f"{database}.{schema.RANK_BUCKETS}"
    if buckets.per == 1:  # one row per rank and bucket once merged: FINAL merges them, cheaper than grouping
        value = schema.order_value_sql(schema.unpack128_sql("last")[1])
        inner = f"SELECT bucket - {{fb:Int64}} AS b, {value} AS v FROM {table} FINAL WHERE {_WHERE_KEY}"
    else:
        top = schema.order_value_sql(schema.unpack128_sql("max(last)")[1])
        inner = (
            f"SELECT intDiv(bucket - {{fb:Int64}}, {{per:Int64}}) AS b, {top} AS v FROM {table}"
            f" WHERE {_WHERE_KEY} GROUP BY b, rank, node"
        )
    rows = client.query(f"SELECT b, {_STATS} FROM ({inner}) GROUP BY b ORDER BY b", parameters=parameters).result_rows
    width = buckets.per * schema.RANK_WIDTH
    bands = []
    for row in rows:
        start = (buckets.first_bucket + int(row[0]) * buckets.per) * schema.RANK_WIDTH
        bands.append(_band(row, max(start, buckets.first), min(start + width - 1, buckets.last)))
    return bands


#: A rank's curve: (rank, node) -> steps and values, in step order.
Curves = dict[tuple[int, str], tuple[list[int], list[float]]]


def rank_curves(client: Client, database: str, run_id: str, key: str, ranks: Sequence[int], max_buckets: int) -> Curves:
    """The curves of some ranks at the band's resolution (see `aggregate`): per bucket, each rank's point at its
    highest step there."""
    buckets = _bucketing(client, database, run_id, key, max_buckets)
    if buckets is None or not ranks:
        return {}
    parameters: dict[str, object] = {"run": run_id, "key": key, "ranks": list(ranks)}
    where = f"{_WHERE_KEY} AND rank IN {{ranks:Array(UInt32)}}"
    if not buckets.per:
        order = schema.value_order_sql("value", schema.NAN_LOW)
        sql = (
            f"SELECT rank, node, step, {schema.order_value_sql(f'max({order})')} FROM {database}.{schema.METRICS}"
            f" WHERE {where} GROUP BY rank, node, step ORDER BY rank, node, step"
        )
    else:
        step, order = schema.unpack128_sql("max(last)")
        sql = (
            f"SELECT rank, node, {step} AS s, {schema.order_value_sql(order)} FROM {database}.{schema.RANK_BUCKETS}"
            f" WHERE {where} GROUP BY rank, node, intDiv(bucket - {{fb:Int64}}, {{per:Int64}}) ORDER BY rank, node, s"
        )
        parameters.update(fb=buckets.first_bucket, per=buckets.per)
    curves: Curves = {}
    for rank, node, at, value in client.query(sql, parameters=parameters).result_rows:
        steps, values = curves.setdefault((int(rank), str(node)), ([], []))
        steps.append(int(at))
        values.append(float(value))
    return curves


def _span(client: Client, database: str, run_id: str, key: str) -> tuple[int, int] | None:
    first_step = schema.unpack_sql("min(first)")[0]
    last_step = schema.unpack_sql("max(last)")[0]
    count, first, last = client.query(
        f"SELECT count(), {first_step}, {last_step} FROM {database}.{schema.RANK_SERIES}"
        f" WHERE {_RUN} AND key = {{key:String}}",
        parameters={"run": run_id, "key": key},
    ).result_rows[0]
    return (int(first), int(last)) if count else None


def _band(row: Sequence[object], start: object, end: object) -> Band:
    _, count, nan, inf, mean, low, high, q = row
    finite = int(count)  # type: ignore[call-overload]
    p50, p95 = (float(q[0]), float(q[1])) if finite else (None, None)  # type: ignore[index]

    def stat(value: object) -> float | None:
        return float(value) if finite else None  # type: ignore[arg-type]

    return Band(
        start_step=int(start),  # type: ignore[call-overload]
        end_step=int(end),  # type: ignore[call-overload]
        count=finite,
        nan=int(nan),  # type: ignore[call-overload]
        inf=int(inf),  # type: ignore[call-overload]
        mean=stat(mean),
        min=stat(low),
        max=stat(high),
        p50=p50,
        p95=p95,
    )


# ----- stragglers -----


@dataclass(frozen=True, slots=True)
class StragglerRules:
    """When a rank counts as a straggler. Thresholds follow the run's own cadence, the median rank's step rate."""

    #: Stalled: no point for this many median step intervals while another rank got further.
    stall_intervals: float = 20.0
    #: ...and for at least this long, so that sub-millisecond steps do not flag jitter.
    min_stall_ms: int = 1_000
    #: Behind: lagging the median step by more than the median rank's steps in this many seconds...
    behind_seconds: float = 1.0
    #: ...and by at least this many steps.
    min_behind_steps: int = 2
    #: Slow: a step rate below this fraction of the median rank's.
    slow_ratio: float = 0.8


@dataclass(frozen=True, slots=True)
class Straggler:
    rank: int
    node: str
    last_step: int
    last_timestamp: int
    step_rate: float | None
    #: Median step minus this rank's last step.
    lag_steps: float
    #: This rank's step rate over the median rank's, when both are known.
    rate_ratio: float | None
    #: Milliseconds between this rank's latest point and the run's newest.
    silent_ms: int
    stalled: bool
    reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Stragglers:
    ranks: int
    median_step: float | None
    median_step_rate: float | None
    newest_timestamp: int | None
    stall_after_ms: float | None
    behind_steps: float | None
    #: Stragglers, most behind first, then slowest first.
    stragglers: list[Straggler]


def stragglers(
    client: Client, database: str, run_id: str, key: str | None = None, rules: StragglerRules | None = None
) -> Stragglers:
    """Ranks that lag the median rank. A rank's progress is its latest point over the run's keys (`key` alone
    when given; system metrics, which follow the clock rather than training steps, are left out otherwise),
    and its step rate is its fastest key's."""
    rules = rules or StragglerRules()
    where = f"{_RUN} AND " + ("key = {key:String}" if key else "NOT startsWith(key, {system:String})")
    parameters: dict[str, object] = {"run": run_id, "key": key or "", "system": SYSTEM_PREFIX, "limit": MAX_SERIES}
    # Per rank in SQL: a run may hold ranks x thousands of keys.
    rows = client.query_np(
        "SELECT rank, node, max(last_step) AS step, max(last_ts) AS ts,"
        " ifNull(maxIfOrNull(step_rate, isFinite(step_rate)), nan) AS rate"
        f" FROM ({_series_sql(f'{database}.{schema.RANK_SERIES}', where)}) GROUP BY rank, node LIMIT {{limit:UInt64}}",
        parameters=parameters,
    )
    if not len(rows):
        return Stragglers(0, None, None, None, None, None, [])
    columns = (rows["rank"], rows["node"], rows["step"], rows["ts"], rows["rate"])
    progress = {
        (int(rank), str(node)): (int(step), int(ts), _rate(rate))
        for rank, node, step, ts, rate in zip(*columns, strict=True)
    }
    return _classify(progress, rules)


def _classify(progress: dict[tuple[int, str], tuple[int, int, float | None]], rules: StragglerRules) -> Stragglers:
    steps = np.array([p[0] for p in progress.values()], np.float64)
    known = [p[2] for p in progress.values() if p[2] is not None]
    median_step = float(np.median(steps))
    median_rate = float(np.median(known)) if known else None
    newest = max(p[1] for p in progress.values())
    furthest = max(p[0] for p in progress.values())
    stall_after = max(rules.stall_intervals * 1000.0 / median_rate, rules.min_stall_ms) if median_rate else None
    behind = max(rules.min_behind_steps, rules.behind_seconds * median_rate) if median_rate else None
    found = []
    for (rank, node), (step, ts, rate) in progress.items():
        lag = median_step - step
        ratio = rate / median_rate if rate is not None and median_rate else None
        silent = newest - ts
        reasons = []
        stalled = False
        if stall_after is not None and silent > stall_after and step < furthest:
            stalled = True
            reasons.append(f"stalled: no point for {silent / 1000:.1f} s (over {stall_after / 1000:.1f} s)")
        if behind is not None and lag > behind:
            reasons.append(f"behind: {lag:g} steps behind the median step {median_step:g}")
        if ratio is not None and ratio < rules.slow_ratio:
            reasons.append(f"slow: {ratio:.2f}x the median step rate ({rate:.3g} vs {median_rate:.3g} steps/s)")
        if reasons:
            found.append(Straggler(rank, node, step, ts, rate, lag, ratio, silent, stalled, reasons))
    found.sort(key=lambda s: (-s.lag_steps, math.inf if s.rate_ratio is None else s.rate_ratio, s.rank, s.node))
    return Stragglers(len(progress), median_step, median_rate, newest, stall_after, behind, found)
