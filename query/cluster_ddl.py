"""Schema statements rewritten for a ClickHouse cluster (`--cluster NAME`), generically, from the single-node ones.

Every table T of the single-node schema becomes two tables:
- `T_local`: the storage, one per shard, created ON CLUSTER with the Replicated* form of T's engine
  (`/clickhouse/tables/{shard}/<db>/T_local`, `{replica}`: the macros each server defines);
- `T`: a Distributed table over `T_local`, sharded by `cityHash64(run_id)` when `run_id` is in T's sort key, else
  by the sort key's first column. So every row of one sort key lives on one shard: FINAL, argMax and the
  AggregatingMergeTree merges stay correct per shard, and all of one run's rows (points, summaries, params,
  tags) sit together. Reads and inserts keep using the names they use on one server.

How each kind of migration statement is rendered (anything else is refused, so a new kind is noticed in the tests):
- CREATE TABLE IF NOT EXISTS: the two tables above (`AS other` copies other's engine with T's own replica path);
- ALTER TABLE: to `T_local` ON CLUSTER; the column actions among it (ADD/DROP/MODIFY/RENAME COLUMN) also to `T`;
- DROP TABLE: `T` and then `T_local`, ON CLUSTER; DROP VIEW, CREATE VIEW: ON CLUSTER;
- CREATE MATERIALIZED VIEW: ON CLUSTER, with every table it names read and written as its `_local` table, since a
  view fires on the inserts each shard receives;
- INSERT (backfills): unchanged target names, so it runs once, from the node that migrates, reading every shard
  through the Distributed tables and writing through them. It waits for the shards
  (`insert_distributed_sync`) and carries a deduplication token fixed by migration and statement, so a second
  node migrating at the same time has its copy dropped by the replicas (within their deduplication window).
  Outside that window a re-run stores duplicate rows: harmless for ReplacingMergeTree and for the min/max
  summaries, which is why every backfill targets only such tables.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

LOCAL_SUFFIX = "_local"
#: The tables of the whole cluster, one replica per server (no {shard} in its path): every node reads its own copy.
SCHEMA_MIGRATIONS_PATH = "/clickhouse/tables/all/{db}/"
#: Names we put into DDL unquoted: a cluster or database name is checked against this before use.
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")

_CREATE_TABLE = re.compile(r"\s*CREATE TABLE IF NOT EXISTS \{db\}\.(\w+)\s+(.*)", re.DOTALL)
_AS_TABLE = re.compile(r"AS \{db\}\.(\w+)\s*(.*)", re.DOTALL)
_ENGINE = re.compile(r"(.*?)ENGINE\s*=\s*(\w*MergeTree)\b(?:\s*\(([^()]*)\))?(.*)", re.DOTALL)
_ORDER_BY = re.compile(r"ORDER BY\s*(?:\(([^()]*)\)|(\w+))")
_MATERIALIZED_VIEW = re.compile(r"\s*CREATE MATERIALIZED VIEW IF NOT EXISTS \{db\}\.(\w+)\s+(TO .*)", re.DOTALL)
_VIEW = re.compile(r"\s*CREATE VIEW IF NOT EXISTS \{db\}\.(\w+)\s+(AS .*)", re.DOTALL)
_DROP = re.compile(r"\s*DROP (TABLE|VIEW) IF EXISTS \{db\}\.(\w+)\s*$")
_ALTER = re.compile(r"\s*ALTER TABLE \{db\}\.(\w+)\s+(.*)", re.DOTALL)
_INSERT = re.compile(r"\s*INSERT INTO \{db\}\.(\w+)\s*(\([^()]*\))?\s*((?:SELECT|VALUES|WITH)\b.*)", re.DOTALL)
_TABLE_REFERENCE = re.compile(r"\{db\}\.(\w+)")
_COLUMN_ACTION = re.compile(r"(ADD|DROP|MODIFY|RENAME) COLUMN\b")


class ClusterDdlError(ValueError):
    """A statement this module cannot render for a cluster."""


@dataclass(frozen=True, slots=True)
class _Table:
    engine: str  # e.g. ReplacingMergeTree
    arguments: str  # inside the engine's parentheses, e.g. "version"; "" when none
    clauses: str  # what follows the engine: ORDER BY ..., SETTINGS ...
    shard_key: str


class ClusterRenderer:
    """Renders migration statement templates (with `{db}`) in migration order; remembers each table's engine."""

    def __init__(self, cluster: str) -> None:
        if not NAME.fullmatch(cluster):
            raise ClusterDdlError(f"cluster name {cluster!r} must be letters, digits and _, not starting with a digit")
        self._cluster = cluster
        self._tables: dict[str, _Table] = {}

    @property
    def on_cluster(self) -> str:
        return f"ON CLUSTER {self._cluster}"

    def preamble(self, migrations_table: str, locks: tuple[str, str, str]) -> list[str]:
        """The database, the replicated table of applied migrations and the replicated table of migration lease
        claims, `locks` = (name, columns, clauses) (templates, like the migrations). Both have a copy on every
        server: every node reads its own."""
        path = SCHEMA_MIGRATIONS_PATH + migrations_table
        locks_table, locks_columns, locks_clauses = locks
        return [
            f"CREATE DATABASE IF NOT EXISTS {{db}} {self.on_cluster}",
            f"CREATE TABLE IF NOT EXISTS {{db}}.{migrations_table} {self.on_cluster}"
            " (version UInt32, applied_at DateTime64(3))"
            f" ENGINE = ReplicatedReplacingMergeTree('{path}', '{{{{replica}}}}') ORDER BY version",
            f"CREATE TABLE IF NOT EXISTS {{db}}.{locks_table} {self.on_cluster} {locks_columns}"
            f" ENGINE = ReplicatedMergeTree('{SCHEMA_MIGRATIONS_PATH + locks_table}', '{{{{replica}}}}')"
            f" {locks_clauses}",
        ]

    def render(self, template: str, version: int, index: int) -> list[str]:
        """The cluster statements (still templates) for statement `index` of migration `version`."""
        for pattern, handler in (
            (_CREATE_TABLE, self._create_table),
            (_MATERIALIZED_VIEW, self._materialized_view),
            (_VIEW, self._view),
            (_DROP, self._drop),
            (_ALTER, self._alter),
        ):
            match = pattern.match(template)
            if match:
                return handler(match)
        insert = _INSERT.match(template)
        if insert:
            return [self._insert(insert, f"trackhouse-migration-{version}-{index}")]
        raise ClusterDdlError(f"migration {version} statement {index} has no cluster form: {template.strip()[:80]!r}")

    def _create_table(self, match: re.Match[str]) -> list[str]:
        name, rest = match.group(1), match.group(2)
        copied = _AS_TABLE.fullmatch(rest.strip())
        if copied:
            source = self._table(copied.group(1))
            if copied.group(2):
                raise ClusterDdlError(f"CREATE TABLE {name} AS ... with its own engine has no cluster form")
            table, body = source, f"AS {{db}}.{copied.group(1)}{LOCAL_SUFFIX} "
        else:
            engine = _ENGINE.fullmatch(rest)
            if not engine:
                raise ClusterDdlError(f"CREATE TABLE {name} has no MergeTree engine clause")
            columns, kind, arguments, clauses = engine.groups()
            table = _Table(kind, (arguments or "").strip(), clauses, _shard_key(clauses))
            body = columns
        self._tables[name] = table
        local = name + LOCAL_SUFFIX
        replicated_arguments = ", ".join(
            a for a in (f"'/clickhouse/tables/{{{{shard}}}}/{{db}}/{local}'", "'{{replica}}'", table.arguments) if a
        )
        return [
            f"CREATE TABLE IF NOT EXISTS {{db}}.{local} {self.on_cluster} {body}"
            f"ENGINE = Replicated{table.engine}({replicated_arguments}){table.clauses}",
            f"CREATE TABLE IF NOT EXISTS {{db}}.{name} {self.on_cluster} AS {{db}}.{local}"
            f" ENGINE = Distributed('{self._cluster}', '{{db}}', '{local}', cityHash64({table.shard_key}))",
        ]

    def _materialized_view(self, match: re.Match[str]) -> list[str]:
        name, target_and_query = match.groups()
        return [
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {{db}}.{name} {self.on_cluster} {self._local(target_and_query)}"
        ]

    def _view(self, match: re.Match[str]) -> list[str]:
        return [f"CREATE VIEW IF NOT EXISTS {{db}}.{match.group(1)} {self.on_cluster} {match.group(2)}"]

    def _drop(self, match: re.Match[str]) -> list[str]:
        kind, name = match.groups()
        if kind == "VIEW" or name not in self._tables:
            return [f"DROP {kind} IF EXISTS {{db}}.{name} {self.on_cluster}"]
        del self._tables[name]
        # SYNC: a replicated table's Keeper path is freed at once, so a later migration may create the name again.
        return [
            f"DROP TABLE IF EXISTS {{db}}.{name} {self.on_cluster}",
            f"DROP TABLE IF EXISTS {{db}}.{name}{LOCAL_SUFFIX} {self.on_cluster} SYNC",
        ]

    def _alter(self, match: re.Match[str]) -> list[str]:
        name, actions = match.groups()
        self._table(name)
        statements = [f"ALTER TABLE {{db}}.{name}{LOCAL_SUFFIX} {self.on_cluster} {actions}"]
        columns = [a for a in split_actions(actions) if _COLUMN_ACTION.match(a)]
        if columns:  # the Distributed table must know every column it is asked to read or write
            statements.append(f"ALTER TABLE {{db}}.{name} {self.on_cluster} {', '.join(columns)}")
        return statements

    def insert(self, template: str, token: str) -> str:
        """The cluster form of an INSERT ... SELECT outside a migration (schema.repair), deduplicated by `token`."""
        insert = _INSERT.match(template)
        if not insert:
            raise ClusterDdlError(f"not an INSERT ... SELECT: {template.strip()[:80]!r}")
        return self._insert(insert, token)

    def _insert(self, match: re.Match[str], token: str) -> str:
        name, columns, query = match.groups()
        target = f"{{db}}.{name}" + (f" {columns}" if columns else "")
        return (
            f"INSERT INTO {target} SETTINGS insert_distributed_sync = 1, insert_deduplication_token = '{token}' {query}"
        )

    def _local(self, sql: str) -> str:
        """`sql` with every known table read or written as its local table."""
        return _TABLE_REFERENCE.sub(
            lambda m: f"{{db}}.{m.group(1)}{LOCAL_SUFFIX}" if m.group(1) in self._tables else m.group(0), sql
        )

    def _table(self, name: str) -> _Table:
        try:
            return self._tables[name]
        except KeyError:
            raise ClusterDdlError(f"table {name} is not created by an earlier migration") from None


def _shard_key(clauses: str) -> str:
    order = _ORDER_BY.search(clauses)
    if not order:
        raise ClusterDdlError(f"no ORDER BY in {clauses.strip()[:80]!r}")
    keys = [k.strip() for k in (order.group(1) or order.group(2)).split(",")]
    return "run_id" if "run_id" in keys else keys[0]


def split_actions(actions: str) -> list[str]:
    """An ALTER's comma-separated actions, split only at commas outside parentheses and quotes."""
    return [a.strip() for a in _split(actions) if a.strip()]


def _split(text: str) -> Iterator[str]:
    depth, quoted, start = 0, False, 0
    for position, char in enumerate(text):
        if char == "'" and (position == 0 or text[position - 1] != "\\"):
            quoted = not quoted
        elif quoted:
            continue
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            yield text[start:position]
            start = position + 1
    yield text[start:]
