"""Cluster DDL (`--cluster`): every statement of the schema, in both forms, parsed by ClickHouse's own parser
(chDB's formatQuery), the single-node form unchanged, and the cluster form run on one server standing in for a
cluster. No cluster runs here (see README "ClickHouse cluster")."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from tests.older_nodes import falling_loss, sink_before_migration_15
from trackhouse.cli import _parser, build_config, main
from trackhouse.ingest.sink import ClickHouseSink
from trackhouse.query import metrics, schema
from trackhouse.query.cluster_ddl import ClusterDdlError, ClusterRenderer
from trackhouse.query.connection import Client, StoreConfig, connect
from trackhouse.query.migration_lock import LOCKS_TABLE

DB = "trackhouse"
CLUSTER = "prod"
#: sha256 of every statement `migrate` ran for versions 0 to 8 before cluster mode existed (now=0), each migration
#: followed by its record: the single-node DDL must stay exactly this.
SINGLE_NODE_DDL_1_TO_8 = "974fa682ef4cb217f07811797c572a5a631f21c3e68f26952c9a712a0e0be388"


@pytest.fixture(scope="module")
def parser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    client = connect(StoreConfig.for_data_dir(Path(tmp_path_factory.mktemp("ddl")) / "data"))
    yield client
    client.close()


def parse(client: Client, statement: str) -> str:
    """ClickHouse's canonical form of `statement`; raises on a syntax error."""
    return str(client.query("SELECT formatQuery({q:String})", parameters={"q": statement}).result_rows[0][0])


def now(sql: str) -> str:
    return re.sub(r"\b\d{13}\b", "NOW", sql)  # the default experiment's creation time


def statements(cluster: str) -> list[tuple[int, str]]:
    return [(version, s) for version, group in schema.schema_statements(DB, cluster, now=0) for s in group]


@pytest.mark.parametrize("cluster", ["", CLUSTER])
def test_every_statement_parses(parser: Client, cluster: str) -> None:
    for version, statement in statements(cluster):
        formatted = parse(parser, statement)
        assert formatted, f"migration {version}: {statement}"
        if cluster and not formatted.startswith("INSERT"):
            assert f"ON CLUSTER {CLUSTER}" in formatted, formatted
        if not cluster:
            assert "ON CLUSTER" not in formatted and "Replicated" not in formatted


def test_single_node_ddl_is_unchanged() -> None:
    migrations = [(v, s) for v, s in schema.schema_statements(DB, now=0) if v <= 8]
    ran = [s for v, group in migrations for s in [*group, *([schema.record_sql(DB, v)] if v else [])]]
    # The preamble's table of migration lease claims came later (it changes nothing a migration made).
    ran = [s for s in ran if LOCKS_TABLE not in s]
    assert hashlib.sha256("\n;\n".join(ran).encode()).hexdigest() == SINGLE_NODE_DDL_1_TO_8
    # and every later migration is its template, as written
    later = {v: group for v, group in schema.schema_statements(DB, now=0) if v > 8}
    for version, templates in schema.MIGRATIONS:
        if version > 8:
            assert later[version] == [t.format(**schema._format_arguments(DB, 0)) for t in templates]


def test_each_table_is_replicated_storage_under_a_distributed_table(parser: Client) -> None:
    formatted = [parse(parser, s) for _, s in statements(CLUSTER)]
    locals_ = {m.group(1) for f in formatted if (m := re.match(rf"CREATE TABLE IF NOT EXISTS {DB}\.(\w+)_local ", f))}
    distributed = {
        m.group(1): m.group(2)
        for f in formatted
        if (m := re.search(rf"CREATE TABLE IF NOT EXISTS {DB}\.(\w+) ON CLUSTER .*Distributed\((.*)\)", f, re.S))
    }
    assert set(distributed) == locals_ and {schema.METRICS, schema.RUNS, schema.METRIC_BUCKETS} <= locals_
    assert distributed[schema.METRICS] == f"'{CLUSTER}', '{DB}', 'metrics_local', cityHash64(run_id)"
    # A run's summaries sit with its points (their sort key starts with width), and every version of an
    # experiment on one shard, so FINAL and the aggregate merges are right shard by shard.
    assert distributed[schema.METRIC_BUCKETS].endswith("cityHash64(run_id)")
    assert distributed[schema.EXPERIMENTS].endswith("cityHash64(experiment_id)")
    metrics = next(f for f in formatted if f.startswith(f"CREATE TABLE IF NOT EXISTS {DB}.metrics_local"))
    assert f"ReplicatedReplacingMergeTree('/clickhouse/tables/{{shard}}/{DB}/metrics_local', '{{replica}}')" in metrics
    runs = next(f for f in formatted if f.startswith(f"CREATE TABLE IF NOT EXISTS {DB}.runs_local"))
    assert f"'/clickhouse/tables/{{shard}}/{DB}/runs_local', '{{replica}}', version)" in runs
    migrations_table = parse(parser, schema.schema_statements(DB, CLUSTER)[0][1][1])
    assert "{shard}" not in migrations_table and "ReplicatedReplacingMergeTree" in migrations_table  # on every node


def test_a_new_column_reaches_storage_and_the_distributed_table() -> None:
    """A migration as the other helpers write them: ALTER TABLE with column and other actions, a new table, a
    backfill. No per-migration code renders them."""
    renderer = ClusterRenderer(CLUSTER)
    for version, group in schema.MIGRATIONS:
        for index, statement in enumerate(group):
            renderer.render(statement, version, index)
    alter = renderer.render(
        """ALTER TABLE {db}.metrics ADD COLUMN IF NOT EXISTS rank UInt32 DEFAULT 0,
        ADD COLUMN IF NOT EXISTS node LowCardinality(String) DEFAULT '', MODIFY ORDER BY (run_id, key, step, rank)""",
        99,
        0,
    )
    assert [s.split(" ADD")[0] for s in alter] == [
        f"ALTER TABLE {{db}}.metrics_local ON CLUSTER {CLUSTER}",
        f"ALTER TABLE {{db}}.metrics ON CLUSTER {CLUSTER}",
    ]
    assert "MODIFY ORDER BY" in alter[0] and "MODIFY ORDER BY" not in alter[1] and "node LowCardinality" in alter[1]
    index_only = renderer.render("ALTER TABLE {db}.metrics ADD INDEX IF NOT EXISTS i rank TYPE minmax", 99, 1)
    assert len(index_only) == 1  # not a column: storage only
    backfill = renderer.render("INSERT INTO {db}.metric_buckets SELECT * FROM {db}.metrics", 99, 2)
    assert backfill == [
        "INSERT INTO {db}.metric_buckets SETTINGS insert_distributed_sync = 1,"
        " insert_deduplication_token = 'trackhouse-migration-99-2' SELECT * FROM {db}.metrics"
    ]
    with pytest.raises(ClusterDdlError, match="no cluster form"):
        renderer.render("OPTIMIZE TABLE {db}.metrics FINAL", 99, 3)
    with pytest.raises(ClusterDdlError, match="not created by an earlier migration"):
        renderer.render("ALTER TABLE {db}.nowhere ADD COLUMN x UInt8", 99, 4)


def test_dropped_tables_drop_both_and_views_read_local_tables() -> None:
    rendered = dict(schema.schema_statements(DB, CLUSTER, now=0))
    view = next(s for s in rendered[1] if "MATERIALIZED VIEW" in s)
    assert f"TO {DB}.latest_metrics_local" in view and f"FROM {DB}.metrics_local" in view
    assert f"DROP TABLE IF EXISTS {DB}.latest_metrics ON CLUSTER {CLUSTER}" in rendered[5]
    assert f"DROP TABLE IF EXISTS {DB}.latest_metrics_local ON CLUSTER {CLUSTER} SYNC" in rendered[5]


@pytest.mark.parametrize("name", ["a b", "1st", "x;DROP", ""])
def test_a_bad_cluster_name_is_refused(name: str) -> None:
    with pytest.raises(ClusterDdlError):
        ClusterRenderer(name)
    with pytest.raises(ValueError, match="cluster"):
        StoreConfig("http://ch:8123", cluster=name or "-")


def test_cluster_mode_needs_a_server() -> None:
    with pytest.raises(ValueError, match="needs a ClickHouse server"):
        StoreConfig("chdb:///tmp/x", cluster=CLUSTER)


@pytest.mark.parametrize("cluster", ["", CLUSTER])
def test_trackhouse_schema_prints_what_migrate_runs(
    parser: Client, cluster: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["schema", "--database", "th", *(["--cluster", cluster] if cluster else [])])
    assert exited.value.code == 0
    printed = [s.strip() for s in capsys.readouterr().out.split(";\n") if s.strip()]
    expected = [
        s
        for v, group in schema.schema_statements("th", cluster)
        for s in [*group, *([schema.record_sql("th", v)] if v else [])]
    ]
    assert len(printed) == len(expected)
    for text, statement in zip(printed, expected, strict=True):
        body = "\n".join(line for line in text.splitlines() if not line.startswith("-- "))
        assert now(parse(parser, body)) == now(parse(parser, statement))  # the same statement, tidied for reading


def test_trackhouse_schema_refuses_a_bad_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["schema", "--database", "th; DROP"])
    assert exited.value.code == 2 and "database name" in capsys.readouterr().err


def single_server_stand_in(statement: str) -> str:
    """A cluster statement as one server can run it: no ON CLUSTER, plain engines for the Replicated ones, and a
    Buffer table (which, like a Distributed one, stores nothing itself and takes ALTERs of its columns) for each
    Distributed table."""
    statement = statement.replace(f" ON CLUSTER {CLUSTER}", "")
    statement = re.sub(r"Replicated(\w+)\('[^']*', '[^']*'(?:, )?", r"\1(", statement)
    return re.sub(
        r"Distributed\('\w+', '(\w+)', '(\w+)', [^\n]*\)$", r"Buffer('\1', '\2', 1, 0, 0, 0, 0, 0, 0)", statement
    )


def columns(client: Client, database: str) -> dict[str, list[tuple[str, str]]]:
    rows = client.query(
        "SELECT table, name, type FROM system.columns WHERE database = {db:String} ORDER BY table, position",
        parameters={"db": database},
    ).result_rows
    found: dict[str, list[tuple[str, str]]] = {}
    for table, name, column_type in rows:
        found.setdefault(table, []).append((name, column_type))
    return found


def test_the_cluster_schema_run_on_one_server_is_the_single_node_schema(parser: Client) -> None:
    """Every migration's cluster form, run in order (with one server standing in for the cluster): each storage
    table ends with the single-node table's columns, each Distributed stand-in with the same columns as its
    storage (so ALTERs reached both), and the sink's writes and the reads go through the usual names."""
    schema.migrate(parser, "single")
    for _, group in schema.schema_statements("clustered", CLUSTER):
        for statement in group:
            parser.command(single_server_stand_in(statement))
    single, clustered = columns(parser, "single"), columns(parser, "clustered")
    views = "SELECT name FROM system.tables WHERE database = {db:String} AND engine = 'MaterializedView'"
    single_views = {row[0] for row in parser.query(views, parameters={"db": "single"}).result_rows}
    # A materialized view keeps its name on a cluster: each server's reads and writes its shard's tables.
    assert {row[0] for row in parser.query(views, parameters={"db": "clustered"}).result_rows} == single_views
    tables = set(single) - {schema.MIGRATIONS_TABLE, LOCKS_TABLE} - single_views
    assert {t for t in clustered if t.endswith("_local")} == {f"{t}_local" for t in tables}
    for table in tables:
        assert clustered[f"{table}_local"] == single[table], table
        assert clustered[table] == single[table], table
    keys = "SELECT name, sorting_key FROM system.tables WHERE database = {db:String} AND sorting_key != ''"
    single_keys = dict(parser.query(keys, parameters={"db": "single"}).result_rows)
    clustered_keys = dict(parser.query(keys, parameters={"db": "clustered"}).result_rows)
    assert {f"{t}_local": k for t, k in single_keys.items() if t in tables} == {
        t: k for t, k in clustered_keys.items() if t not in (schema.MIGRATIONS_TABLE, LOCKS_TABLE)
    }
    # The sink and the reads use the usual names, which on a cluster are the Distributed tables.
    ClickHouseSink(parser, "clustered").write(falling_loss("r", 300))
    assert metrics.latest(parser, "clustered", ["r"]) == {"r": {"loss": (299, 5, 0.0)}}
    assert len(metrics.sampled(parser, "clustered", ["r"], "loss", max_points=320)["r"]) == 300
    # Through the view on the shard's params: a param inserted through the Distributed table reaches the copy.
    parser.insert(schema.PARAMS, [["r", "lr", "0.1"]], ["run_id", "key", "value"], database="clustered")
    copied = parser.query(f"SELECT run_id, key, value FROM clustered.{schema.PARAMS_BY_KEY}").result_rows
    assert copied == [("r", "lr", "0.1")]


class Recording:
    """A client that keeps the statements it is given to run, then runs them."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.commands: list[str] = []

    def command(self, statement: str) -> object:
        self.commands.append(statement)
        return self.client.command(statement)

    def query(self, *args: Any, **kwargs: Any) -> Any:
        return self.client.query(*args, **kwargs)


def test_repair_on_a_cluster_copies_through_the_distributed_tables(parser: Client) -> None:
    """`trackhouse repair --cluster`: the copy reads and writes the Distributed tables (stand-ins here), with a
    deduplication token of each repair's own, so that a second repair after more writes is not skipped as a
    repeat of the first (or of migration 15's backfill)."""
    for version, group in schema.schema_statements("repaired", CLUSTER):
        for statement in group:
            parser.command(single_server_stand_in(statement))
        if version:
            parser.command(schema.record_sql("repaired", version))
    latest = "SELECT run_id, key, max(latest) FROM repaired.{} GROUP BY run_id, key ORDER BY run_id, key"
    for run_id, stamp in (("a", 1), ("b", 2)):
        with sink_before_migration_15():
            ClickHouseSink(parser, "repaired").write(falling_loss(run_id, 3))
        recorded = Recording(parser)
        assert schema.repair(cast(Client, recorded), "repaired", CLUSTER, now=stamp) == [schema.LATEST_BY_KEY]
        # Buffer stand-ins forget tokens, so the token is checked as sent: not the migration's, nor the last repair's.
        (sent,) = recorded.commands
        assert f"insert_deduplication_token = 'trackhouse-repair-{schema.LATEST_BY_KEY}-{stamp}'" in sent
        assert sent.startswith(f"INSERT INTO repaired.{schema.LATEST_BY_KEY} (key, run_id, latest) SETTINGS")
        by_key, by_run = (
            parser.query(latest.format(table)).result_rows for table in (schema.LATEST_BY_KEY, schema.LATEST_METRICS)
        )
        assert by_key == by_run and len(by_run) == stamp


def test_migrations_are_in_version_order() -> None:
    """migrate and the cluster renderer apply them in tuple order: a migration merged out of place would run
    before the ones it follows (migration 12 must come after the tables of 10 and 11)."""
    versions = [version for version, _ in schema.MIGRATIONS]
    assert versions == sorted(set(versions))


def test_serve_takes_the_cluster_into_its_store(tmp_path: Path) -> None:
    url = "http://ch:8123/th"
    config = build_config(_parser().parse_args(["serve", "--clickhouse-url", url, "--cluster", CLUSTER]))
    assert config.store.cluster == CLUSTER and config.store.url == url
    embedded = _parser().parse_args(["serve", "--cluster", CLUSTER, "--data-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="needs a ClickHouse server"):
        build_config(embedded)
