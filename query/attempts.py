"""Resumed and forked runs: which stored points a read of a series shows.

A run is resumed as a new *attempt* (numbered by the server: 0 is every run's start, then 1, 2, ...), and
every point carries the attempt it was logged under. A restarted job logs again from the step of its
checkpoint, so an attempt supersedes the earlier attempts of its run from the first step it logged of a key:
a point of attempt a at step s is shown unless a later attempt's first step of that key is at most s.

A fork reads its parent's shown points up to its fork step (inclusive), and before its own first step of the
key, then its own. Forks of forks chain, up to MAX_LINEAGE runs.

So the steps of a series split into intervals, each served by one (run, attempt); the reads in query.metrics
apply them. A run never resumed nor forked (no row in run_attempts or run_forks) has no view: its reads stay
exactly what they were.
"""

from __future__ import annotations

import threading
import time
import uuid
import weakref
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from trackhouse.query import claims, schema
from trackhouse.query.connection import Client
from trackhouse.query.errors import ContendedError

#: The longest chain of forks a read follows (a fork of a fork of ...); deeper ancestors are not shown.
MAX_LINEAGE = 16
#: The child's tags that show its lineage (the run_forks row is what reads use).
PARENT_TAG = "trackhouse.parent_run_id"
FORK_STEP_TAG = "trackhouse.fork_step"


@dataclass(frozen=True, slots=True)
class Link:
    """One run of a lineage: its highest attempt, and the step it forked from the next link (None: the root)."""

    run_id: str
    attempts: int
    fork_step: int | None


@dataclass(frozen=True, slots=True)
class Lineage:
    """A resumed or forked run and its ancestors, the run itself first."""

    chain: tuple[Link, ...]

    @property
    def run_ids(self) -> list[str]:
        return [link.run_id for link in self.chain]


@dataclass(frozen=True, slots=True)
class Interval:
    """The points of `run_id` with `attempt` (None: any) and lo <= step < hi (None: unbounded)."""

    run_id: str
    attempt: int | None
    lo: int | None
    hi: int | None

    def empty(self) -> bool:
        return self.lo is not None and self.hi is not None and self.lo >= self.hi


#: How long a process trusts what it read of a run's lineage (plain included). A resume or fork made in this
#: process is seen at once (`forget`); one made by another node, within this time.
LINEAGE_TTL_S = 1.0
_CACHED_RUNS = 100_000
_cache: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], tuple[float, Lineage | None]]] = (
    weakref.WeakKeyDictionary()
)
_cache_lock = threading.Lock()


def lineages(client: Client, database: str, run_ids: Collection[str]) -> dict[str, Lineage]:
    """The lineage of each run among `run_ids` that was resumed or forked; plain runs are left out.

    Cached per client for LINEAGE_TTL_S, so that the UI's many chart calls for one run, or the pages of one long
    history, ask once: a plain run's reads then cost no query at all."""
    if not run_ids:
        return {}
    now = time.monotonic()
    with _cache_lock:
        entries = _cache.setdefault(client, {})
        known = {r: entries[database, r] for r in run_ids if (database, r) in entries}
    result = {r: lineage for r, (expiry, lineage) in known.items() if expiry > now and lineage is not None}
    missing = [r for r in run_ids if r not in known or known[r][0] <= now]
    if not missing:
        return result
    found = _lineages(client, database, missing)
    with _cache_lock:
        if len(entries) + len(missing) > _CACHED_RUNS:
            entries.clear()
        for run_id in missing:
            entries[database, run_id] = (now + LINEAGE_TTL_S, found.get(run_id))
    return {**result, **found}


def resumed_or_forked(client: Client, database: str, experiment_ids: Collection[str]) -> list[str]:
    """The runs of `experiment_ids` that were ever resumed or forked: the runs whose latest values a lineage decides
    (metric_latest holds their latest *stored* points, superseded ones included, and a fork's none of its parent's).
    Both tables hold a row per resume or fork, so this reads little however many runs the experiments hold."""
    if not experiment_ids:
        return []
    rows = client.query(
        f"SELECT run_id FROM {database}.{schema.RUNS} FINAL WHERE run_id IN"
        f" (SELECT run_id FROM {database}.{schema.RUN_ATTEMPTS}"
        f" UNION DISTINCT SELECT run_id FROM {database}.{schema.RUN_FORKS})"
        " AND experiment_id IN {experiments:Array(String)}",
        parameters={"experiments": sorted(experiment_ids)},
    ).result_rows
    return sorted(str(r) for (r,) in rows)


def forget(run_id: str) -> None:
    """Drop what this process cached of the run's lineage (it was just resumed or forked)."""
    with _cache_lock:
        for entries in _cache.values():
            for key in [k for k in entries if k[1] == run_id]:
                del entries[key]


def _lineages(client: Client, database: str, run_ids: Collection[str]) -> dict[str, Lineage]:
    attempts, forks = _links(client, database, set(run_ids))
    special = [r for r in run_ids if attempts.get(r, 0) > 0 or r in forks]
    if not special:
        return {}
    chains = {r: [r] for r in special}
    looked = set(run_ids)
    for _ in range(MAX_LINEAGE - 1):  # ancestors, a generation per query
        wanted = {forks[c[-1]][0] for c in chains.values() if c[-1] in forks} - looked
        if wanted:
            more_attempts, more_forks = _links(client, database, wanted)
            attempts.update(more_attempts)
            forks.update(more_forks)
            looked |= wanted
        grew = False
        for chain in chains.values():
            parent = forks.get(chain[-1])
            if parent is not None and parent[0] not in chain and len(chain) < MAX_LINEAGE:
                chain.append(parent[0])
                grew = True
        if not grew:
            break
    result = {}
    for run_id, chain in chains.items():
        links = []
        for i, member in enumerate(chain):
            fork = forks.get(member)
            step = fork[1] if fork is not None and i + 1 < len(chain) else None
            links.append(Link(member, attempts.get(member, 0), step))
        result[run_id] = Lineage(tuple(links))
    return result


def _links(client: Client, database: str, run_ids: set[str]) -> tuple[dict[str, int], dict[str, tuple[str, int]]]:
    rows = client.query(
        f"SELECT run_id, max(attempt), '', 0 FROM {database}.{schema.RUN_ATTEMPTS}"
        " WHERE run_id IN {ids:Array(String)} GROUP BY run_id"
        f" UNION ALL SELECT run_id, 0, any(parent_run_id), any(fork_step) FROM {database}.{schema.RUN_FORKS}"
        " WHERE run_id IN {ids:Array(String)} GROUP BY run_id",
        parameters={"ids": sorted(run_ids)},
    ).result_rows
    attempts = {str(r): int(a) for r, a, parent, _ in rows if not parent}
    forks = {str(r): (str(parent), int(step)) for r, _, parent, step in rows if parent}
    return attempts, forks


def intervals(client: Client, database: str, lineage: Lineage, key: str) -> list[Interval]:
    """The intervals that make up the series `key` of the lineage's run, in ascending steps."""
    return intervals_of_keys(client, database, lineage, [key])[key]


def intervals_of_keys(
    client: Client, database: str, lineage: Lineage, keys: Sequence[str]
) -> dict[str, list[Interval]]:
    firsts = _attempt_firsts(client, database, lineage.run_ids, keys)
    children = [link.run_id for link in lineage.chain if link.fork_step is not None]
    own_first = _first_steps(client, database, children, keys)
    result = {}
    for key in keys:
        shown: list[Interval] = []
        clip: int | None = None  # descendants' points take over from this step
        for link in lineage.chain:
            own = _own_intervals(link.run_id, firsts.get((link.run_id, key), {}))
            kept = [_clipped(interval, clip) for interval in own]
            shown = [interval for interval in kept if not interval.empty()] + shown
            if link.fork_step is None:
                break
            bound = link.fork_step + 1
            first = own_first.get((link.run_id, key))
            if first is not None:
                bound = min(bound, first)
            clip = bound if clip is None else min(clip, bound)
        result[key] = shown
    return result


def _own_intervals(run_id: str, firsts: dict[int, int]) -> list[Interval]:
    """A run's own intervals for one key, from the first step of each of its attempts after the first."""
    if not firsts:
        return [Interval(run_id, None, None, None)]
    result = []
    cut: int | None = None
    for attempt in sorted({0, *firsts}, reverse=True):
        lo = firsts.get(attempt)
        result.append(Interval(run_id, attempt, lo, cut))
        if lo is not None:
            cut = lo if cut is None else min(cut, lo)
    return result[::-1]


def _clipped(interval: Interval, hi: int | None) -> Interval:
    if hi is None or (interval.hi is not None and interval.hi <= hi):
        return interval
    return Interval(interval.run_id, interval.attempt, interval.lo, hi)


def _attempt_firsts(
    client: Client, database: str, run_ids: list[str], keys: Sequence[str]
) -> dict[tuple[str, str], dict[int, int]]:
    rows = client.query(
        f"SELECT run_id, key, attempt, min(first_step) FROM {database}.{schema.METRIC_ATTEMPTS}"
        " WHERE run_id IN {ids:Array(String)} AND key IN {keys:Array(String)} GROUP BY run_id, key, attempt",
        parameters={"ids": run_ids, "keys": list(keys)},
    ).result_rows
    firsts: dict[tuple[str, str], dict[int, int]] = {}
    for run_id, key, attempt, first in rows:
        firsts.setdefault((str(run_id), str(key)), {})[int(attempt)] = int(first)
    return firsts


def _first_steps(client: Client, database: str, run_ids: list[str], keys: Sequence[str]) -> dict[tuple[str, str], int]:
    """Each run's first step of each key, any attempt, from the coarse chart buckets (a few rows per series)."""
    if not run_ids:
        return {}
    step = schema.unpack_sql("min(first)")[0]
    rows = client.query(
        f"SELECT run_id, key, {step} FROM {database}.{schema.METRIC_BUCKETS}"
        " WHERE width = {width:UInt16} AND run_id IN {ids:Array(String)} AND key IN {keys:Array(String)}"
        " GROUP BY run_id, key",
        parameters={"width": schema.COARSE_WIDTH, "ids": run_ids, "keys": list(keys)},
    ).result_rows
    return {(str(r), str(k)): int(s) for r, k, s in rows}


def where_sql(shown: Sequence[Interval], prefix: str = "v") -> tuple[str, dict[str, object]]:
    """A WHERE condition (without the key) matching exactly the points of these intervals, with its parameters."""
    if not shown:
        return "0", {}
    terms: list[str] = []
    parameters: dict[str, object] = {}
    for i, interval in enumerate(shown):
        p = f"{prefix}{i}"
        term = [f"run_id = {{{p}_run:String}}"]
        parameters[f"{p}_run"] = interval.run_id
        if interval.attempt is not None:
            term.append(f"attempt = {{{p}_attempt:UInt32}}")
            parameters[f"{p}_attempt"] = interval.attempt
        if interval.lo is not None:
            term.append(f"step >= {{{p}_lo:Int64}}")
            parameters[f"{p}_lo"] = interval.lo
        if interval.hi is not None:
            term.append(f"step < {{{p}_hi:Int64}}")
            parameters[f"{p}_hi"] = interval.hi
        terms.append("(" + " AND ".join(term) + ")")
    return "(" + " OR ".join(terms) + ")", parameters


def series_view(client: Client, database: str, run_id: str, key: str) -> tuple[str, dict[str, object]] | None:
    """The WHERE condition for the shown points of one series (key included), or None for a plain run, whose
    condition stays `run_id = ... AND key = ...` (one small lookup decides)."""
    lineage = lineages(client, database, [run_id]).get(run_id)
    if lineage is None:
        return None
    shown = intervals(client, database, lineage, key)
    if shown == [Interval(run_id, None, None, None)]:  # a key the run's later attempts never logged: all shown
        return None
    sql, parameters = where_sql(shown)
    return f"key = {{v_key:String}} AND {sql}", {**parameters, "v_key": key}


# ----- writes: attempts and forks are numbered and recorded here, by the server only -----


def current_attempt(client: Client, database: str, run_id: str) -> int:
    """The run's latest attempt (0 until it is resumed)."""
    rows = client.query(
        f"SELECT max(attempt) FROM {database}.{schema.RUN_ATTEMPTS} WHERE run_id = {{run:String}}",
        parameters={"run": run_id},
    ).result_rows
    return int(rows[0][0]) if rows else 0


def known_attempts(client: Client, database: str, run_ids: Collection[str]) -> dict[str, int]:
    """Each run's latest attempt, for the runs among `run_ids` that were ever resumed."""
    if not run_ids:
        return {}
    rows = client.query(
        f"SELECT run_id, max(attempt) FROM {database}.{schema.RUN_ATTEMPTS}"
        " WHERE run_id IN {ids:Array(String)} GROUP BY run_id",
        parameters={"ids": sorted(run_ids)},
    ).result_rows
    return {str(r): int(a) for r, a in rows}


#: Claims one resume makes before it gives up: each lost claim means another resume of the run took that number.
MAX_ATTEMPT_CLAIMS = 16


def start_attempt(client: Client, database: str, run_id: str, now_ms: int) -> int:
    """Record the run's next attempt and return its number, unique across nodes.

    One node serialises its own resumes of a run; another node resuming it at the same moment picks the same
    number, so each claim is read back and the earliest wins (schema.ATTEMPT_WINNER). The loser claims the next
    number. Both claims stay stored, which is harmless: an attempt's rows are read by number.
    """
    claimant = uuid.uuid4().hex
    attempt = current_attempt(client, database, run_id)
    for _ in range(MAX_ATTEMPT_CLAIMS):
        attempt += 1
        client.insert(
            schema.RUN_ATTEMPTS,
            [[run_id, attempt, now_ms, claimant]],
            ["run_id", "attempt", "started_at", "claimed_by"],
            database=database,
        )
        claims.settle_inserts(client, database, schema.RUN_ATTEMPTS)  # a rival stamped earlier may still land
        if attempt_holder(client, database, run_id, attempt) == claimant:
            forget(run_id)
            return attempt
        attempt = max(attempt, current_attempt(client, database, run_id))
    raise ContendedError(f"run {run_id!r}: {MAX_ATTEMPT_CLAIMS} attempt numbers in a row were taken by other resumes")


def attempt_holder(client: Client, database: str, run_id: str, attempt: int) -> str:
    rows = client.query(
        f"SELECT {schema.ATTEMPT_WINNER} FROM {database}.{schema.RUN_ATTEMPTS}"
        " WHERE run_id = {run:String} AND attempt = {attempt:UInt32}",
        parameters={"run": run_id, "attempt": attempt},
    ).result_rows
    return str(rows[0][0]) if rows else ""


def record_fork(client: Client, database: str, run_id: str, parent_run_id: str, fork_step: int, now_ms: int) -> None:
    client.insert(
        schema.RUN_FORKS,
        [[run_id, parent_run_id, fork_step, now_ms]],
        ["run_id", "parent_run_id", "fork_step", "created_at"],
        database=database,
    )
    forget(run_id)


def attempts_of(client: Client, database: str, run_id: str) -> list[tuple[int, int]]:
    """(attempt, started_at ms) of the run's attempts after the first."""
    rows = client.query(
        f"SELECT attempt, min(started_at) FROM {database}.{schema.RUN_ATTEMPTS} WHERE run_id = {{run:String}}"
        " GROUP BY attempt ORDER BY attempt",
        parameters={"run": run_id},
    ).result_rows
    return [(int(a), int(t)) for a, t in rows]


#: A point in trackhouse's own history: (step, timestamp, value, attempt, run_id).
AttemptPoint = tuple[int, int, float, int, str]
#: Where a page of it ended: (step, timestamp, value order, run_id, attempt).
PageEnd = tuple[int, int, int, str, int]


def points(
    client: Client, database: str, run_id: str, key: str, all_attempts: bool, limit: int, after: PageEnd | None
) -> tuple[list[AttemptPoint], PageEnd | None]:
    """A page of a series with each point's attempt and run, in (step, timestamp, value) order: the points reads
    show (a fork's parent's included), or with `all_attempts` every point the run itself stored, superseded ones
    included. Returns the points and where the page ended (None on the last page)."""
    where = "run_id = {run:String} AND key = {key:String}"
    parameters: dict[str, object] = {"run": run_id, "key": key}
    if not all_attempts:
        view = series_view(client, database, run_id, key)
        if view is not None:
            where, parameters = view
    order = schema.value_order_sql("value", schema.NAN_LOW)
    if after is not None:
        where += (
            " AND (step, timestamp, o, run_id, attempt)"
            " > ({a_s:Int64}, {a_t:Int64}, {a_o:Int64}, {a_r:String}, {a_a:UInt32})"
        )
        parameters = {**parameters, "a_s": after[0], "a_t": after[1], "a_o": after[2], "a_r": after[3], "a_a": after[4]}
    rows = client.query(
        f"SELECT DISTINCT step, timestamp, value, {order} AS o, run_id, attempt FROM {database}.{schema.METRICS}"
        f" WHERE {where} ORDER BY step, timestamp, o, run_id, attempt LIMIT {{limit:UInt64}}",
        parameters={**parameters, "limit": limit + 1},
    ).result_rows
    page = [(int(s), int(t), float(v), int(a), str(r)) for s, t, v, _, r, a in rows[:limit]]
    end = None
    if len(rows) > limit:
        s, t, _, o, r, a = rows[limit - 1]
        end = (int(s), int(t), int(o), str(r), int(a))
    return page, end
