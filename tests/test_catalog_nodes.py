"""The write path's catalog when several nodes share one store: two Catalogs on one embedded chDB store stand for
two nodes (each keeps its own caches), with the real sink writing for them. Deterministic orderings of the races
that tests/test_topology.py runs as separate processes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import pytest

from trackhouse.ingest.batch import Batch, ParamRow, RunRow
from trackhouse.ingest.catalog import Catalog, ParamChangedError
from trackhouse.ingest.errors import UnknownRunError
from trackhouse.ingest.sink import ClickHouseSink
from trackhouse.query import attempts, catalog, schema
from trackhouse.query.connection import Client

DB = "trackhouse"


def _run(run_id: str, version: int = 1, stage: str = "active") -> RunRow:
    return RunRow(run_id, "0", run_id, "RUNNING", 1, 0, "u", version, lifecycle_stage=stage)


def _params(run_id: str, **values: str) -> Batch:
    return Batch(params=tuple(ParamRow(run_id, key, value) for key, value in values.items()))


async def _stored(sink: ClickHouseSink, batch: Batch) -> None:
    sink.write(batch)


def _accept(catalog: Catalog, batch: Batch) -> list[ParamRow]:
    """What the pipeline does up to the queue: resolve, then remember; returns the batch's claims."""
    resolved = asyncio.run(catalog.resolve(batch))
    claims = catalog.claims(resolved)
    catalog.remember(resolved)
    return claims


def _confirm(catalog: Catalog, durable: Awaitable[None], claims: list[ParamRow]) -> str:
    try:
        asyncio.run(catalog.confirm(durable, claims))
    except ParamChangedError as exc:
        return f"refused: {exc.changes}"
    return "ok"


def test_two_nodes_claim_one_param_the_earlier_insert_wins_and_both_agree(sql: Client) -> None:
    sink = ClickHouseSink(sql, DB)
    sink.write(Batch(runs=(_run("r"),)))
    a, b = Catalog(sql, DB, 100), Catalog(sql, DB, 100)
    # Both nodes check before either has stored: neither sees the other.
    claims_a = _accept(a, _params("r", lr="0.1", seed="1"))
    claims_b = _accept(b, _params("r", lr="0.2", seed="1"))
    assert {p.key for p in claims_a} == {p.key for p in claims_b} == {"lr", "seed"}
    # b's insert reaches ClickHouse first; a's is read back after both are stored.
    first = _confirm(b, _stored(sink, _params("r", lr="0.2", seed="1")), claims_b)
    second = _confirm(a, _stored(sink, _params("r", lr="0.1", seed="1")), claims_a)
    assert first == "ok"
    assert second == "refused: [('lr', '0.2', '0.1')]"  # seed: same value on both, no conflict
    # Both nodes now hold the winner: the same value is fine on either, the other is refused at once.
    for node in (a, b):
        asyncio.run(node.resolve(_params("r", lr="0.2")))
        with pytest.raises(ParamChangedError):
            asyncio.run(node.resolve(_params("r", lr="0.1")))


def test_a_node_refuses_its_own_concurrent_change_before_storing_it(sql: Client) -> None:
    ClickHouseSink(sql, DB).write(Batch(runs=(_run("r"),)))
    node = Catalog(sql, DB, 100)
    _accept(node, _params("r", lr=""))  # queued, not stored; an empty value is a value
    with pytest.raises(ParamChangedError):
        asyncio.run(node.resolve(_params("r", lr="0.1")))


def test_a_run_this_node_accepted_stays_known_until_stored_then_expires(sql: Client) -> None:
    """With no time to live at all: a run whose upsert waits in the queue must not be refused as unknown (the
    store cannot confirm it yet); once stored, the store answers, and another node's delete is seen."""
    sink = ClickHouseSink(sql, DB)
    node = Catalog(sql, DB, 100, cache_seconds=0)
    upsert = Batch(runs=(_run("queued"),))
    _accept(node, upsert)
    asyncio.run(node.resolve(_params("queued", lr="1")))  # known though not stored
    sink.write(upsert)
    node.stored(upsert)
    asyncio.run(node.resolve(_params("queued", lr="1")))  # the store knows it now
    sink.write(Batch(runs=(_run("queued", version=2, stage="deleted"),)))  # another node deletes it
    with pytest.raises(UnknownRunError):
        asyncio.run(node.resolve(_params("queued", lr="1")))


def test_a_cached_run_is_trusted_until_its_entry_expires(sql: Client) -> None:
    sink = ClickHouseSink(sql, DB)
    sink.write(Batch(runs=(_run("r"),)))
    node = Catalog(sql, DB, 100, cache_seconds=3600)
    asyncio.run(node.resolve(_params("r", lr="1")))  # looked up and cached
    sink.write(Batch(runs=(_run("r", version=2, stage="deleted"),)))
    asyncio.run(node.resolve(_params("r", lr="1")))  # within the bound, the cached answer stands
    with pytest.raises(UnknownRunError):  # a node without the entry sees the delete
        asyncio.run(Catalog(sql, DB, 100).resolve(_params("r", lr="1")))


def test_params_stored_before_migration_13_keep_their_value_and_stay_immutable(
    sql: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upgraded store: a params table as migration 1 made it, with a row, then migration 13 (twice: re-runs are
    harmless). The old value is read, and a different value is refused before it is stored."""
    monkeypatch.setattr(schema, "MIGRATIONS", tuple(m for m in schema.MIGRATIONS if m[0] < 13))
    schema.migrate(sql, "legacy")  # a store of that time: migration 1's params, and no later view reading them
    monkeypatch.undo()
    ClickHouseSink(sql, "legacy").write(Batch(runs=(_run("r"),)))
    sql.command("INSERT INTO legacy.params VALUES ('r', 'lr', 'old')")
    statements = dict(schema.MIGRATIONS)[13]
    for statement in [*statements, *statements]:
        sql.command(statement.format(db="legacy"))
    assert catalog.param_values(sql, "legacy", ["r"], ["lr"]) == {("r", "lr"): "old"}
    sql.command("INSERT INTO legacy.params (run_id, key, value) VALUES ('r', 'seed', '1')")
    assert catalog.param_values(sql, "legacy", ["r"], ["lr", "seed"]) == {("r", "lr"): "old", ("r", "seed"): "1"}
    with pytest.raises(ParamChangedError):
        asyncio.run(Catalog(sql, "legacy", 100).resolve(_params("r", lr="new")))


def test_an_attempt_number_two_nodes_claimed_goes_to_the_earlier_claim_and_the_next_resume_skips_it(
    sql: Client,
) -> None:
    """Rows as two nodes' simultaneous resumes leave them (both read attempt 0, both claimed 1), on a store
    upgraded through migration 14 (applied twice: re-runs are harmless). tests/test_topology.py races real nodes."""
    db = "trackhouse"
    sql.command(f"DROP TABLE {db}.run_attempts")  # back to migration 11's table, with a row from before 14
    sql.command(
        f"CREATE TABLE {db}.run_attempts (run_id String, attempt UInt32, started_at Int64)"
        " ENGINE = ReplacingMergeTree ORDER BY (run_id, attempt)"
    )
    sql.command(f"INSERT INTO {db}.run_attempts VALUES ('old', 1, 1)")
    statements = dict(schema.MIGRATIONS)[14]
    for statement in [*statements, *statements]:
        sql.command(statement.format(db=db))
    sql.command(
        f"INSERT INTO {db}.run_attempts (run_id, attempt, started_at, claimed_at, claimed_by) VALUES"
        " ('r', 1, 1, '2026-01-01 00:00:00.000000002', 'later'), ('r', 1, 1, '2026-01-01 00:00:00.000000001', 'first')"
    )
    sql.command(f"OPTIMIZE TABLE {db}.run_attempts FINAL")  # merges keep every claim, not the last inserted
    assert attempts.attempt_holder(sql, db, "r", 1) == "first"
    assert attempts.start_attempt(sql, db, "r", 2) == 2
    assert attempts.start_attempt(sql, db, "old", 2) == 2  # a row from before claims still holds its number
    assert attempts.known_attempts(sql, db, ["r", "old"]) == {"r": 2, "old": 2}
    assert attempts.attempts_of(sql, db, "r") == [(1, 1), (2, 2)]
