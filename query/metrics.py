"""Reading metric series: full history, sampled chart series, latest values.

Every read is insensitive to duplicate points (client retries, Kafka redelivery):
history reads DISTINCT points; the sampled series keeps each bucket's minimum
and maximum, which duplicates cannot change; latest is a maximum.
User input travels only as bound parameters.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from query import schema
from query.connection import Client

#: (step, timestamp, value): MLflow's ordering of a run's points for one key.
Point = tuple[int, int, float]


@dataclass(frozen=True, slots=True)
class HistoryPage:
    points: list[Point]
    #: Pass back as `after` for the next page; None on the last page.
    next_after: Point | None


def history(
    client: Client, database: str, run_id: str, key: str, limit: int, after: Point | None = None
) -> HistoryPage:
    """One page of a run's series in (step, timestamp, value) order, each distinct point once.

    Keyset pagination: a page starts strictly after the last point of the previous one,
    so pages stay stable while points are being added.
    """
    where = "run_id = {run:String} AND key = {key:String}"
    parameters: dict[str, object] = {"run": run_id, "key": key, "limit": limit + 1}
    if after is not None:
        where += " AND (step, timestamp, value) > ({s:Int64}, {t:Int64}, {v:Float64})"
        parameters.update(s=after[0], t=after[1], v=after[2])
    rows = client.query(
        f"SELECT DISTINCT step, timestamp, value FROM {database}.{schema.METRICS} WHERE {where}"
        " ORDER BY step, timestamp, value LIMIT {limit:UInt64}",
        parameters=parameters,
    ).result_rows
    points = [(int(s), int(t), float(v)) for s, t, v in rows[:limit]]
    return HistoryPage(points, points[-1] if len(rows) > limit else None)


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
    """
    if not run_ids or max_points <= 0:
        return {}
    base = "run_id IN {runs:Array(String)} AND key = {key:String}"
    parameters: dict[str, object] = {"runs": list(run_ids), "key": key}
    if start_step is not None:
        base += " AND step >= {lo:Int64}"
        parameters["lo"] = start_step
    if end_step is not None:
        base += " AND step <= {hi:Int64}"
        parameters["hi"] = end_step
    table = f"{database}.{schema.METRICS}"
    count, first, last = client.query(
        f"SELECT count(), min(step), max(step) FROM {table} WHERE {base}", parameters=parameters
    ).result_rows[0]
    if not count:
        return {run_id: [] for run_id in run_ids}
    buckets = max(1, max_points // 2)
    width = max(1, -(-(int(last) - int(first) + 1) // buckets))  # ceiling division
    rows = client.query(
        "SELECT run_id, intDiv(step - {first:Int64}, {width:Int64}) AS bucket,"
        " argMin((step, timestamp, value), value) AS low, argMax((step, timestamp, value), value) AS high"
        f" FROM {table} WHERE {base} GROUP BY run_id, bucket ORDER BY run_id, bucket",
        parameters={**parameters, "first": int(first), "width": width},
    ).result_rows
    series: dict[str, list[Point]] = {run_id: [] for run_id in run_ids}
    for run_id, _, low, high in rows:
        pair = sorted({_point(low), _point(high)})
        series[run_id].extend(pair)
    return series


def latest(client: Client, database: str, run_ids: Collection[str]) -> dict[str, dict[str, Point]]:
    """Each run's latest point per key: the maximum by (step, timestamp, value), as MLflow defines it."""
    if not run_ids:
        return {}
    rows = client.query(
        f"SELECT run_id, key, max(latest) FROM {database}.{schema.LATEST_METRICS}"
        " WHERE run_id IN {runs:Array(String)} GROUP BY run_id, key",
        parameters={"runs": list(run_ids)},
    ).result_rows
    result: dict[str, dict[str, Point]] = {run_id: {} for run_id in run_ids}
    for run_id, key, point in rows:
        result[run_id][key] = _point(point)
    return result


def _point(value: Any) -> Point:
    """A (step, timestamp, value) tuple from ClickHouse: named tuples arrive as dicts, plain ones as tuples."""
    step, timestamp, number = value.values() if isinstance(value, dict) else value
    return int(step), int(timestamp), float(number)
