"""`trackhouse repair` (query.schema.repair): after a rolling upgrade, the copies the sink writes beside their source
hold what a node of an older version wrote to the source only. On real chDB; the cluster form is in
test_cluster_ddl."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.older_nodes import sink_before_migration_15
from trackhouse.cli import main
from trackhouse.ingest.batch import Batch, Metrics
from trackhouse.ingest.sink import ClickHouseSink
from trackhouse.query import schema
from trackhouse.query.connection import Client

DB = "trackhouse"
LATEST = "SELECT run_id, key, max(latest) FROM {}.{} GROUP BY run_id, key ORDER BY run_id, key"


def points(run_id: str, values: list[float], first_step: int = 0) -> Batch:
    n = len(values)
    return Batch(
        metrics=Metrics(
            run_ids=(run_id,),
            keys=("loss", "acc"),
            run_index=np.zeros(n, np.int32),
            key_index=np.arange(n, dtype=np.int32) % 2,
            step=np.arange(first_step, first_step + n, dtype=np.int64),
            timestamp=np.full(n, 7, np.int64),
            value=np.array(values, np.float64),
        )
    )


def write_as_an_older_node(sql: Client, batch: Batch) -> None:
    with sink_before_migration_15():
        ClickHouseSink(sql, DB).write(batch)


def copies_agree(sql: Client, database: str = DB) -> bool:
    tables = (schema.LATEST_BY_KEY, schema.LATEST_METRICS)
    by_key, by_run = (sql.query(LATEST.format(database, table)).result_rows for table in tables)
    return bool(by_key == by_run)


def test_repair_copies_what_an_older_node_wrote_and_is_idempotent(sql: Client) -> None:
    ClickHouseSink(sql, DB).write(points("new", [0.9, 0.8]))
    # An older node, during the rolling upgrade: a run of its own, and later points of the upgraded node's run.
    write_as_an_older_node(sql, points("old", [0.5, 0.4]))
    write_as_an_older_node(sql, points("new", [0.1, 0.2], first_step=10))
    assert not copies_agree(sql)
    assert schema.repair(sql, DB) == [schema.LATEST_BY_KEY]
    assert copies_agree(sql)
    # Again, with nothing to copy, and again after the copies merge: still one row per run and key.
    schema.repair(sql, DB)
    sql.command(f"OPTIMIZE TABLE {DB}.{schema.LATEST_BY_KEY} FINAL")
    schema.repair(sql, DB)
    assert copies_agree(sql)
    count = f"SELECT count() FROM {DB}.{schema.LATEST_BY_KEY} FINAL"
    assert sql.query(count).result_rows[0][0] == 4


def test_repair_refuses_a_store_whose_schema_is_behind_this_version(
    sql: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schema, "MIGRATIONS", tuple(m for m in schema.MIGRATIONS if m[0] < 15))
    schema.migrate(sql, "before15")
    monkeypatch.undo()
    with pytest.raises(schema.OutdatedSchemaError, match=r"migrations 15(, \d+)* are not applied to before15"):
        schema.repair(sql, "before15")


def test_trackhouse_repair_fills_the_copies_and_says_so(
    tmp_path: Path, sql: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    write_as_an_older_node(sql, points("old", [0.5, 0.4]))
    with pytest.raises(SystemExit) as exited:
        main(["repair", "--data-dir", str(tmp_path / "data")])
    assert exited.value.code == 0
    assert f"copied again into {schema.LATEST_BY_KEY}" in capsys.readouterr().out
    assert copies_agree(sql)
    with pytest.raises(SystemExit) as exited:
        main(["repair", "--data-dir", str(tmp_path / "nothing")])
    assert exited.value.code == 0 and "no data yet" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["repair", "--cluster", "prod"], "--cluster needs a ClickHouse server"),
        (["repair", "--clickhouse-url", "ftp://admin:s3cret@ch:21"], "must start with chdb://, http:// or https://"),
        (["check", "--clickhouse-url", "ftp://admin:s3cret@ch:21"], "must start with chdb://, http:// or https://"),
    ],
)
def test_bad_store_flags_are_one_line_and_exit_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--data-dir", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and "s3cret" not in err
