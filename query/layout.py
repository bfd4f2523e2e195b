"""The physical layout of the tables a run page reads: short granules and small compressed blocks.

A page of a runs search holds 50 runs scattered over a large experiment. Reading them from `runs`, `params`, `tags`
and `metric_latest` (all ordered by run) costs per granule touched, and per compressed block around it, not per row
returned. With ClickHouse's defaults (8,192-row granules, blocks of at least 64 KiB) each of those reads decompressed
most of its table over 10^5 runs. FINE_SETTINGS gives 256-row granules, and closes a compressed block at the first
mark past 4 KiB, so that a granule is decompressed on its own (with short granules alone, a 64 KiB block of a narrow
column still held dozens of them). On the uimix `--full` store (10^5 runs), the six part reads of a sweep page took
48 ms of CPU against 56-58 with 1,024-row granules and default blocks (`python -m benchmarks.page_parts`, in-process,
alternated); a page of the wide experiment (250,000 metric rows in its runs' own ranges) read as fast as before. The
four tables grow by 1-18% on disk.

ClickHouse cannot change a table's granularity in place (`index_granularity` is read-only), and migrations may not
edit a shipped CREATE, so the layout is applied by copying: each table is copied into a new one of the fine layout,
the two are exchanged atomically, and the old one is dropped. An insert in flight during the exchange may still land
in the old table, and is then lost with it, so a rebuild needs every writer stopped:
- an embedded store is rebuilt by `trackhouse serve` itself as it opens the directory, before anything writes (chDB
  lets one process at a time open a directory);
- a store on a ClickHouse server by `trackhouse rebuild --writers-stopped`, with every node stopped. `serve` logs
  which tables still have another layout.

A rebuild interrupted anywhere leaves the store correct: before the exchange the original table is untouched, after
it the new one holds every row; the next rebuild drops the leftover copy and carries on. A cluster's tables
(`T_local` on each shard) are not rebuilt here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

from trackhouse.query import schema
from trackhouse.query.cluster_ddl import LOCAL_SUFFIX
from trackhouse.query.connection import Client
from trackhouse.query.errors import QueryError

#: The table settings of the fine layout. 128-row granules read as fast as 256 with twice the marks; 1,024 with 4 KiB
#: blocks half-way between (in-process, the six part reads of a sweep page over 10^5 runs, one store per layout).
FINE_SETTINGS: Mapping[str, int] = MappingProxyType({"index_granularity": 256, "min_compress_block_size": 4096})
#: FINE_SETTINGS in words, for messages.
FINE_LAYOUT_TEXT = (
    f"{FINE_SETTINGS['index_granularity']:,}-row granules and"
    f" {FINE_SETTINGS['min_compress_block_size'] // 1024} KiB compressed blocks"
)
#: What a table has when SHOW CREATE does not name a setting: ClickHouse's default granules, and 0 (the server's
#: min_compress_block_size, 64 KiB by default).
DEFAULT_SETTINGS: Mapping[str, int] = MappingProxyType({"index_granularity": 8192, "min_compress_block_size": 0})
#: The run-ordered tables a search page reads for its runs (compat.runs.search). The by-key copies are read by key
#: ranges, and the point and summary tables by series, where long granules cost nothing.
FINE_TABLES = (schema.RUNS, schema.PARAMS, schema.TAGS, schema.LATEST_METRICS)
#: The copy's name while a table is rebuilt.
COPY_SUFFIX = "__rebuild"

_SETTING = re.compile(r"\b(" + "|".join(DEFAULT_SETTINGS) + r") = (\d+)")


class RebuildError(QueryError):
    """A rebuild that cannot run, or that found the table changing under it (nothing is lost: the copy is dropped)."""


def coarse_tables(client: Client, database: str) -> list[str]:
    """The tables of FINE_TABLES that still have another layout, in FINE_TABLES' order."""
    layouts = _layouts(client, database, FINE_TABLES)
    return [table for table in FINE_TABLES if table in layouts and _differs(layouts[table], FINE_SETTINGS)]


def rebuild(
    client: Client,
    database: str,
    settings: Mapping[str, int] = FINE_SETTINGS,
    copied: Callable[[str], None] | None = None,
) -> list[str]:
    """Give each table of FINE_TABLES the layout `settings`, with every writer stopped; returns those rebuilt.

    `settings` names some of DEFAULT_SETTINGS; the others keep what each table has. Idempotent. `copied(table)` runs
    after a table's rows are copied, before the copy is checked and exchanged (for tests: a write there stands for a
    writer that was not stopped)."""
    unknown = set(settings) - set(DEFAULT_SETTINGS)
    if unknown:
        raise ValueError(f"not a layout setting: {sorted(unknown)}")
    if not (1 <= settings.get("index_granularity", 1) <= 65536):
        raise ValueError(f"index_granularity must be in [1, 65536], not {settings['index_granularity']}")
    # One lookup for the tables, a cluster's, and leftover copies: `serve` runs this on every start of an embedded
    # store, where it usually finds nothing to do.
    names = [*FINE_TABLES, *(t + suffix for suffix in (LOCAL_SUFFIX, COPY_SUFFIX) for t in FINE_TABLES)]
    existing = _layouts(client, database, names)
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
        if table not in existing or not _differs(existing[table], settings):
            continue
        _rebuild_table(client, database, table, settings, copied)
        rebuilt.append(table)
    return rebuilt


def _rebuild_table(
    client: Client, database: str, table: str, settings: Mapping[str, int], copied: Callable[[str], None] | None
) -> None:
    source, copy = f"{database}.{table}", f"{database}.{table}{COPY_SUFFIX}"
    definition = str(client.query(f"SHOW CREATE TABLE {source}").result_rows[0][0])
    client.command(_with_settings(definition, source, copy, settings))
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


def _differs(found: Mapping[str, int], settings: Mapping[str, int]) -> bool:
    """Whether a table's layout (from _layouts) differs from `settings` in any setting `settings` names."""
    return any(found[name] != value for name, value in settings.items())


def _with_settings(definition: str, source: str, copy: str, settings: Mapping[str, int]) -> str:
    """`source`'s SHOW CREATE as the CREATE of `copy` with `settings`: each replaced where it is named, added where not.

    SHOW CREATE names the table once, at the start, and lists the table's settings on its last line."""
    prefix = f"CREATE TABLE {source}"
    body, _, listed = definition.rpartition("\nSETTINGS ")
    named = [name for name, _ in _SETTING.findall(listed)]
    if not definition.startswith(prefix) or "\n" in listed or len(named) != len(set(named)):
        raise RebuildError(f"{source}: unexpected definition, not rebuilt: {definition[:200]!r}")
    listed = _SETTING.sub(lambda m: f"{m.group(1)} = {settings.get(m.group(1), m.group(2))}", listed)
    listed += "".join(f", {name} = {value}" for name, value in settings.items() if name not in named)
    return f"CREATE TABLE {copy}{body[len(prefix) :]}\nSETTINGS {listed}"


def _layouts(client: Client, database: str, tables: Iterable[str]) -> dict[str, dict[str, int]]:
    """Each existing MergeTree table's DEFAULT_SETTINGS, by name."""
    rows = client.query(
        "SELECT name, engine_full FROM system.tables WHERE database = {db:String} AND name IN {names:Array(String)}"
        " AND engine LIKE '%MergeTree'",  # a cluster's Distributed tables have no granules
        parameters={"db": database, "names": list(tables)},
    ).result_rows
    return {name: {**DEFAULT_SETTINGS, **{k: int(v) for k, v in _SETTING.findall(engine)}} for name, engine in rows}
