"""The physical layout of the tables a run page reads: 1,024-row granules instead of ClickHouse's 8,192.

A page of a runs search holds 50 runs scattered over a large experiment. Reading them from `runs`, `params`, `tags`
and `metric_latest` (all ordered by run) costs per granule touched, not per row returned: over 10^5 runs each of
those reads decompressed most of its table. With granules an eighth as long, over HTTP, the UI's metric filter + sort
over 10^5 runs went 97-109 -> 91-94 ms p50, and a wide experiment's first table page 228-240 -> 193-201 ms (README,
"The UI's call mix at scale").

ClickHouse cannot change a table's granularity in place (`index_granularity` is read-only), and migrations may not
edit a shipped CREATE, so the layout is applied by copying: each table is copied into a new one of the fine layout,
the two are exchanged atomically, and the old one is dropped. An insert in flight during the exchange may still land
in the old table, and is then lost with it, so a rebuild needs every writer stopped:
- an embedded store is rebuilt by `trackhouse serve` itself as it opens the directory, before anything writes (chDB
  lets one process at a time open a directory);
- a store on a ClickHouse server by `trackhouse rebuild --writers-stopped`, with every node stopped. `serve` logs
  which tables still have the coarse layout.

A rebuild interrupted anywhere leaves the store correct: before the exchange the original table is untouched, after
it the new one holds every row; the next rebuild drops the leftover copy and carries on. A cluster's tables
(`T_local` on each shard) are not rebuilt here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from trackhouse.query import schema
from trackhouse.query.cluster_ddl import LOCAL_SUFFIX
from trackhouse.query.connection import Client
from trackhouse.query.errors import QueryError

FINE_GRANULES = 1024
#: The run-ordered tables a search page reads for its runs (compat.runs.search). The by-key copies are read by key
#: ranges, and the point and summary tables by series, where long granules cost nothing.
FINE_TABLES = (schema.RUNS, schema.PARAMS, schema.TAGS, schema.LATEST_METRICS)
#: The copy's name while a table is rebuilt.
COPY_SUFFIX = "__rebuild"

_GRANULARITY = re.compile(r"\bindex_granularity = (\d+)")


class RebuildError(QueryError):
    """A rebuild that cannot run, or that found the table changing under it (nothing is lost: the copy is dropped)."""


def coarse_tables(client: Client, database: str) -> list[str]:
    """The tables of FINE_TABLES that still have another granularity, in FINE_TABLES' order."""
    granules = _granularity(client, database, FINE_TABLES)
    return [table for table in FINE_TABLES if table in granules and granules[table] != FINE_GRANULES]


def rebuild(
    client: Client,
    database: str,
    granules: int = FINE_GRANULES,
    copied: Callable[[str], None] | None = None,
) -> list[str]:
    """Give each table of FINE_TABLES `granules`-row granules, with every writer stopped; returns those rebuilt.

    Idempotent. `copied(table)` runs after a table's rows are copied, before the copy is checked and exchanged (for
    tests: a write there stands for a writer that was not stopped)."""
    if not (1 <= granules <= 65536):
        raise ValueError(f"granules must be in [1, 65536], not {granules}")
    # One lookup for the tables, a cluster's, and leftover copies: `serve` runs this on every start of an embedded
    # store, where it usually finds nothing to do.
    names = [*FINE_TABLES, *(t + suffix for suffix in (LOCAL_SUFFIX, COPY_SUFFIX) for t in FINE_TABLES)]
    existing = _granularity(client, database, names)
    clustered = sorted(t for t in existing if t.endswith(LOCAL_SUFFIX))
    if clustered:
        raise RebuildError(
            f"{database} is a cluster's schema ({', '.join(clustered)}): rebuild each shard's tables by hand"
        )
    rebuilt = []
    for table in FINE_TABLES:
        # A copy left by an interrupted rebuild: either unfinished (the table is the original) or exchanged already
        # (it is the original, and the table the new one). Either way the table holds every row.
        if table + COPY_SUFFIX in existing:
            client.command(f"DROP TABLE {database}.{table}{COPY_SUFFIX} SYNC")
        if table not in existing or existing[table] == granules:
            continue
        _rebuild_table(client, database, table, granules, copied)
        rebuilt.append(table)
    return rebuilt


def _rebuild_table(
    client: Client, database: str, table: str, granules: int, copied: Callable[[str], None] | None
) -> None:
    source, copy = f"{database}.{table}", f"{database}.{table}{COPY_SUFFIX}"
    definition = str(client.query(f"SHOW CREATE TABLE {source}").result_rows[0][0])
    # SHOW CREATE names the table once, at the start, and lists its settings with their values.
    prefix = f"CREATE TABLE {source}"
    if not definition.startswith(prefix) or len(_GRANULARITY.findall(definition)) != 1:
        raise RebuildError(f"{source}: unexpected definition, not rebuilt: {definition[:200]!r}")
    client.command(
        f"CREATE TABLE {copy}" + _GRANULARITY.sub(f"index_granularity = {granules}", definition[len(prefix) :])
    )
    columns = ", ".join(_stored_columns(client, database, table))
    # Row for row: without deduplication (two parts of identical rows are two blocks of one hash, and the copy's
    # window would keep one) and without optimize_on_insert (which merges a block's versions of one key as a merge
    # would: harmless, but then the counts below could not tell a copy from a write).
    client.command(
        f"INSERT INTO {copy} ({columns}) SELECT {columns} FROM {source}",
        settings={"insert_deduplicate": 0, "optimize_on_insert": 0},
    )
    if copied is not None:
        copied(table)
    # Rows, not distinct rows: the copy is of the stored rows as they are, duplicates and unmerged versions included.
    before, after = (_count(client, name) for name in (source, copy))
    if before != after:
        client.command(f"DROP TABLE {copy} SYNC")
        raise RebuildError(
            f"{source} changed while it was copied ({after} rows copied, {before} now): stop every writer, then"
            " rebuild again; this table was left as it was"
        )
    client.command(f"EXCHANGE TABLES {source} AND {copy}")
    client.command(f"DROP TABLE {copy} SYNC")


def _count(client: Client, table: str) -> int:
    return int(client.query(f"SELECT count() FROM {table}").result_rows[0][0])


def _stored_columns(client: Client, database: str, table: str) -> list[str]:
    """The columns an INSERT may write: a MATERIALIZED or ALIAS column is computed, and the copy computes it again."""
    rows = client.query(
        "SELECT name, default_kind FROM system.columns WHERE database = {db:String} AND table = {t:String}"
        " ORDER BY position",
        parameters={"db": database, "t": table},
    ).result_rows
    return [f"`{name}`" for name, kind in rows if kind not in ("MATERIALIZED", "ALIAS")]


def _granularity(client: Client, database: str, tables: Iterable[str]) -> dict[str, int]:
    """Each existing MergeTree table's index_granularity, by name."""
    rows = client.query(
        "SELECT name, engine_full FROM system.tables WHERE database = {db:String} AND name IN {names:Array(String)}"
        " AND engine LIKE '%MergeTree'",  # a cluster's Distributed tables have no granules
        parameters={"db": database, "names": list(tables)},
    ).result_rows
    found = {}
    for name, engine in rows:
        match = _GRANULARITY.search(engine)
        found[name] = int(match.group(1)) if match else 8192  # ClickHouse's default, when SHOW omits it
    return found
