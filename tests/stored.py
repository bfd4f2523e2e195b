"""How tests check "stored exactly once": through the product's own read path, with the raw row count as a bound.

Counting distinct rows alone cannot fail for a request stored three times, nor for a Kafka worker that replays its
partition; the raw rows can. The read path (query.metrics.history, what get-history serves) must show each point once.
"""

from __future__ import annotations

from trackhouse.query import metrics, schema
from trackhouse.query.connection import Client

DB = "trackhouse"


def history(sql: Client, run_id: str, key: str, page: int = 50_000) -> list[metrics.Point]:
    """Every point of one series as get-history pages through it: (step, timestamp, value), each distinct point once."""
    points: list[metrics.Point] = []
    after = None
    while True:
        found = metrics.history(sql, DB, run_id, key, page, after)
        points += found.points
        if found.next_after is None:
            return points
        after = found.next_after


def raw_rows(sql: Client, run_id: str, key: str | None = None) -> int:
    """Rows as stored, duplicates included (before merges remove them)."""
    where = "run_id = {r:String}" + (" AND key = {k:String}" if key is not None else "")
    query = f"SELECT count() FROM {DB}.{schema.METRICS} WHERE {where}"
    return int(sql.query(query, parameters={"r": run_id, "k": key or ""}).result_rows[0][0])


def keys(sql: Client, run_id: str) -> list[str]:
    rows = sql.query(
        f"SELECT DISTINCT key FROM {DB}.{schema.METRICS} WHERE run_id = {{r:String}} ORDER BY key",
        parameters={"r": run_id},
    ).result_rows
    return [str(row[0]) for row in rows]
