"""query.layout: the run tables' fine layout. `trackhouse serve` applies them to an embedded store as it opens it,
`trackhouse rebuild --writers-stopped` to a server's; every row and every answer survives, interrupted or not. On
real chDB, behind tests/clickhouse_http.py for the server's path, with the real MLflow client for the answers."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from tests.clickhouse_http import ClickHouseHttp
from tests.conftest import RunningServer, ServerProcess, start_in_process
from trackhouse.cli import main
from trackhouse.query import layout, schema
from trackhouse.query.connection import Client, StoreConfig, connect
from trackhouse.server import _apply_layout

DB = "trackhouse"


def engines(sql: Client, expression: str, database: str = DB) -> dict[str, Any]:
    """`expression` of each of the four tables' engine_full, by table."""
    rows = sql.query(
        f"SELECT name, {expression} FROM system.tables WHERE database = {{db:String}} AND name IN {{t:Array(String)}}",
        parameters={"db": database, "t": list(layout.FINE_TABLES)},
    ).result_rows
    return dict(rows)


#: A store as versions before query.layout left it: ClickHouse's defaults.
OLD = {"index_granularity": 8192, "min_compress_block_size": 0}
FINE = dict(layout.FINE_SETTINGS)


def layouts(sql: Client, database: str = DB) -> dict[str, dict[str, int]]:
    """Each table's layout settings, as its definition names them (ClickHouse's defaults where it does not)."""
    found = engines(sql, "engine_full", database)
    return {
        name: {key: int(m.group(1)) if (m := re.search(rf"\b{key} = (\d+)", engine)) else OLD[key] for key in OLD}
        for name, engine in found.items()
    }


def definitions(sql: Client, database: str = DB) -> dict[str, str]:
    """Each table's definition with its layout settings left out."""
    pattern = "(, )?(index_granularity|min_compress_block_size) = \\\\d+"
    return engines(sql, f"replaceRegexpAll(engine_full, '{pattern}', '')", database)


def stored_rows(sql: Client, database: str = DB) -> dict[str, list[tuple[Any, ...]]]:
    """Every stored row of the four tables, unmerged versions and duplicates included."""
    return {
        table: sorted(map(tuple, sql.query(f"SELECT * FROM {database}.{table}").result_rows), key=repr)
        for table in layout.FINE_TABLES
    }


def fill(client: MlflowClient) -> list[str]:
    """Runs with params, tags (one deleted, one rewritten) and metrics (two flushes: unmerged latest rows)."""
    experiment = client.create_experiment("layout")
    ids = []
    for i in range(12):
        run = client.create_run(experiment, run_name=f"run-{i}")
        ids.append(run.info.run_id)
        client.log_batch(
            run.info.run_id,
            metrics=[Metric("loss", 1.0 / (i + 1), 1000, 0), Metric("acc", i / 12, 1000, 0)],
            params=[Param("lr", str(0.1 * i)), Param("layers", str(i % 3))],
            tags=[RunTag("team", "a" if i % 2 else "b"), RunTag("gone", "x")],
        )
        client.log_batch(run.info.run_id, metrics=[Metric("loss", 0.5 / (i + 1), 2000, 1)])
        client.set_tag(run.info.run_id, "team", f"c{i}")
        client.delete_tag(run.info.run_id, "gone")
        if i % 4 == 3:
            client.set_terminated(run.info.run_id, "FAILED")
    return [experiment]


def answers(client: MlflowClient, experiments: list[str]) -> list[Any]:
    """What the UI's runs table and run page read: whole runs, in the searches' orders."""
    found = []
    for filter_string, order_by in (
        ("", ["attributes.start_time DESC"]),
        ("metrics.loss < 0.2", ["metrics.loss DESC"]),
        ("attributes.run_name LIKE '%1%'", ["params.lr ASC"]),
        ("tags.team LIKE 'c%'", ["tags.team DESC"]),
    ):
        runs = client.search_runs(experiments, filter_string, order_by=order_by, max_results=50)
        found.append([run.to_dictionary() for run in runs])
    return found


@pytest.fixture
def sql(tmp_path: Path) -> Iterator[Client]:
    client = connect(StoreConfig.for_data_dir(tmp_path / "data"))
    schema.migrate(client, DB)
    yield client
    client.close()


def test_serve_gives_a_store_written_before_the_fine_layout_it_and_answers_as_before(tmp_path: Path) -> None:
    data = tmp_path / "data"
    running = start_in_process(data)
    try:
        assert running.sql is not None
        assert all(found == FINE for found in layouts(running.sql).values())  # a fresh store: fine from the start
        client = MlflowClient(running.http_url)
        experiments = fill(client)
        # The store as an older version left it: ClickHouse's defaults.
        assert layout.rebuild(running.sql, DB, OLD) == list(layout.FINE_TABLES)
        assert all(found == OLD for found in layouts(running.sql).values())
        before, rows, shapes = answers(client, experiments), stored_rows(running.sql), definitions(running.sql)
    finally:
        _stop(running)
    running = start_in_process(data)
    try:
        assert running.sql is not None
        assert all(found == FINE for found in layouts(running.sql).values())
        assert stored_rows(running.sql) == rows
        assert definitions(running.sql) == shapes  # the dedup window and every other setting kept
        client = MlflowClient(running.http_url)
        assert answers(client, experiments) == before
        # The by-key copies are filled by views on the tables' names: they follow the exchange.
        run_id = before[0][0]["info"]["run_id"]
        client.log_param(run_id, "late", "1")
        client.set_tag(run_id, "late", "2")
        for table in (schema.PARAMS_BY_KEY, schema.TAGS_BY_KEY):
            assert (
                running.scalar(
                    f"SELECT count() FROM {DB}.{table} WHERE key = 'late' AND run_id = {{r:String}}", r=run_id
                )
                == 1
            )
        assert layout.coarse_tables(running.sql, DB) == []
        assert (
            running.scalar(f"SELECT count() FROM system.tables WHERE database = '{DB}' AND name LIKE '%__rebuild'") == 0
        )
    finally:
        _stop(running)


def _stop(running: RunningServer) -> None:
    running.stop()
    if running.sql is not None:
        running.sql.close()


def other_tables(sql: Client) -> list[tuple[Any, ...]]:
    return list(
        sql.query(
            "SELECT name, engine_full FROM system.tables WHERE database = {db:String} AND name NOT IN {t:Array(String)}"
            " ORDER BY name",
            parameters={"db": DB, "t": list(layout.FINE_TABLES)},
        ).result_rows
    )


def test_a_rebuild_is_idempotent_and_leaves_other_tables_alone(sql: Client) -> None:
    others = other_tables(sql)
    assert layout.coarse_tables(sql, DB) == list(layout.FINE_TABLES)
    assert layout.rebuild(sql, DB) == list(layout.FINE_TABLES)
    assert layout.rebuild(sql, DB) == []
    assert layout.coarse_tables(sql, DB) == []
    # A store the previous version laid out (1,024-row granules, default blocks) differs in both, and in one.
    for earlier in ({"index_granularity": 1024, "min_compress_block_size": 0}, {"min_compress_block_size": 65536}):
        assert layout.rebuild(sql, DB, earlier) == list(layout.FINE_TABLES)
        assert layout.coarse_tables(sql, DB) == list(layout.FINE_TABLES)
        assert layout.rebuild(sql, DB) == list(layout.FINE_TABLES)
        assert all(found == FINE for found in layouts(sql).values())
    assert other_tables(sql) == others


def test_a_rebuild_takes_only_layout_settings(sql: Client) -> None:
    for wrong in ({"index_granularity": 0}, {"non_replicated_deduplication_window": 1}):
        with pytest.raises(ValueError):
            layout.rebuild(sql, DB, wrong)
    assert layout.coarse_tables(sql, DB) == list(layout.FINE_TABLES)


class Interrupted(Exception):
    pass


def test_a_rebuild_interrupted_after_copying_loses_nothing_and_completes_next_time(sql: Client) -> None:
    sql.command(f"INSERT INTO {DB}.params (run_id, key, value) VALUES ('r1', 'lr', '0.1'), ('r2', 'lr', '0.2')")
    rows = stored_rows(sql)

    def crash(table: str) -> None:
        if table == schema.PARAMS:
            raise Interrupted

    with pytest.raises(Interrupted):
        layout.rebuild(sql, DB, copied=crash)
    # runs was rebuilt; params' copy is left beside the untouched original.
    assert layouts(sql)[schema.RUNS] == FINE
    assert layouts(sql)[schema.PARAMS] == OLD
    assert sql.command(f"EXISTS TABLE {DB}.params{layout.COPY_SUFFIX}") == 1
    assert stored_rows(sql) == rows
    assert layout.rebuild(sql, DB) == [schema.PARAMS, schema.TAGS, schema.LATEST_METRICS]
    assert stored_rows(sql) == rows
    assert sql.command(f"EXISTS TABLE {DB}.params{layout.COPY_SUFFIX}") == 0


def test_a_rebuild_interrupted_after_its_exchange_keeps_the_new_table(sql: Client) -> None:
    sql.command(f"INSERT INTO {DB}.tags VALUES ('r1', 'team', 'a', 0, 1)")
    layout.rebuild(sql, DB)
    rows = stored_rows(sql)
    # What the exchange leaves until the drop: the original, under the copy's name.
    sql.command(
        f"CREATE TABLE {DB}.tags{layout.COPY_SUFFIX} (run_id String, key String, value String, deleted UInt8,"
        " version UInt64) ENGINE = ReplacingMergeTree(version) ORDER BY (run_id, key)"
    )
    sql.command(f"INSERT INTO {DB}.tags{layout.COPY_SUFFIX} VALUES ('r1', 'team', 'stale', 0, 0)")
    assert layout.rebuild(sql, DB) == []
    assert sql.command(f"EXISTS TABLE {DB}.tags{layout.COPY_SUFFIX}") == 0
    assert stored_rows(sql) == rows


def test_a_write_during_the_copy_stops_the_rebuild_and_is_kept(sql: Client) -> None:
    def writer(table: str) -> None:
        if table == schema.TAGS:
            sql.command(f"INSERT INTO {DB}.tags VALUES ('r9', 'late', 'v', 0, 1)")

    with pytest.raises(layout.RebuildError, match="changed while it was copied"):
        layout.rebuild(sql, DB, copied=writer)
    assert layouts(sql)[schema.TAGS] == OLD
    assert sql.command(f"EXISTS TABLE {DB}.tags{layout.COPY_SUFFIX}") == 0
    assert sql.command(f"SELECT value FROM {DB}.tags WHERE run_id = 'r9'") == "v"


def test_a_clusters_tables_are_not_rebuilt(sql: Client) -> None:
    sql.command(f"CREATE TABLE {DB}.runs_local (run_id String) ENGINE = MergeTree ORDER BY run_id")
    with pytest.raises(layout.RebuildError, match="cluster"):
        layout.rebuild(sql, DB)
    assert all(found == OLD for found in layouts(sql).values())


def test_rebuild_command_on_a_data_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    client = connect(StoreConfig.for_data_dir(data))
    schema.migrate(client, DB)
    client.close()
    with pytest.raises(SystemExit) as exited:
        main(["rebuild", "--data-dir", str(data)])
    assert exited.value.code == 0
    assert f"rebuilt runs, params, tags, metric_latest with {layout.FINE_LAYOUT_TEXT}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        main(["rebuild", "--data-dir", str(data)])
    assert exited.value.code == 0
    assert "nothing to rebuild" in capsys.readouterr().out


def test_rebuild_command_refuses_a_directory_a_server_holds(server_process: ServerProcess) -> None:
    server_process.start()
    done = subprocess.run(
        [sys.executable, "-m", "trackhouse.cli", "rebuild", "--data-dir", str(server_process.data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "another process has it open" in done.stderr
    assert "Traceback" not in done.stderr
    assert server_process.terminate() == 0


def test_a_servers_store_is_rebuilt_only_when_the_writers_are_said_to_be_stopped(
    clickhouse_endpoint: ClickHouseHttp, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    url = f"{clickhouse_endpoint.url}/layout_server"
    store = StoreConfig(url)
    client = connect(store)
    try:
        schema.migrate(client, store.resolved_database)
        client.command("INSERT INTO layout_server.runs (run_id, experiment_id, version) VALUES ('r1', '0', 1)")
        # serve only reports a server's coarse tables: other nodes may be writing to them.
        with caplog.at_level(logging.WARNING, logger="trackhouse"):
            _apply_layout(client, store)
        assert "runs, params, tags, metric_latest have an older layout" in caplog.text
        assert "trackhouse rebuild --clickhouse-url URL --writers-stopped" in caplog.text
        assert layout.coarse_tables(client, store.resolved_database) == list(layout.FINE_TABLES)
        secret = url.replace("http://", "http://admin:hunter2@")
        with pytest.raises(SystemExit) as exited:
            main(["rebuild", "--clickhouse-url", secret])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert "--writers-stopped" in err and "hunter2" not in err
        assert layout.coarse_tables(client, store.resolved_database) == list(layout.FINE_TABLES)
        with pytest.raises(SystemExit) as exited:
            main(["rebuild", "--clickhouse-url", url, "--writers-stopped"])
        assert exited.value.code == 0
        assert layout.coarse_tables(client, store.resolved_database) == []
        assert client.command("SELECT run_id FROM layout_server.runs") == "r1"
    finally:
        client.close()
