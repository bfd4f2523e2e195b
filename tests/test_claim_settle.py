"""query.claims.settle_inserts: a claim's read-back waits for the inserts into its table that began before it, and
only those, on real chDB (two clients on one engine, as two nodes on one server). tests/test_topology.py forces the
race it closes through nodes of their own."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from tests.conftest import insert_running
from trackhouse.query import claims, schema
from trackhouse.query.connection import Client, StoreConfig, connect
from trackhouse.query.errors import ContendedError, UnsettledError

DB = "trackhouse"


@pytest.fixture
def clients(tmp_path: Path) -> Iterator[tuple[Client, Client]]:
    config = StoreConfig.for_data_dir(tmp_path / "data")
    first, second = connect(config), connect(config)
    schema.migrate(first, DB)
    yield first, second
    first.close()
    second.close()


def slow_insert(rival: Client, watcher: Client, table: str, seconds: float) -> AbstractContextManager[None]:
    """Within: `rival`'s insert into `table` has begun (as `watcher` sees) and ends about `seconds` later."""
    statement = (
        f"INSERT INTO {DB}.{table} (run_id, key, value) SELECT 'r', 'k', 'v' FROM numbers(1)"
        f" WHERE sleepEachRow({seconds}) = 0"
    )
    return insert_running(rival, watcher, statement)


def test_a_read_back_waits_for_an_insert_begun_before_it(clients: tuple[Client, Client]) -> None:
    rival, claimant = clients
    with slow_insert(rival, claimant, schema.PARAMS, 1.5):
        began = time.monotonic()
        claims.settle_inserts(claimant, DB, schema.PARAMS)
        waited = time.monotonic() - began
    assert waited > 0.8
    # Once settled, the rival's claim is stored: a read-back now sees it.
    assert claimant.command(f"SELECT count() FROM {DB}.{schema.PARAMS} WHERE run_id = 'r'") == 1


def test_inserts_into_other_tables_are_not_waited_for(clients: tuple[Client, Client]) -> None:
    rival, claimant = clients
    # `params_by_key` begins with the claims table's name; it must not match.
    with slow_insert(rival, claimant, schema.PARAMS_BY_KEY, 1.5):
        began = time.monotonic()
        claims.settle_inserts(claimant, DB, schema.PARAMS)
        assert time.monotonic() - began < 0.5


def test_an_insert_running_past_the_timeout_is_a_retryable_contention(clients: tuple[Client, Client]) -> None:
    rival, claimant = clients
    with slow_insert(rival, claimant, schema.PARAMS, 2), pytest.raises(UnsettledError) as raised:
        claims.settle_inserts(claimant, DB, schema.PARAMS, timeout_s=0.3)
    # compat answers it 503 (retry later), and the write path's confirm maps it to RetryableError (an OSError).
    assert isinstance(raised.value, ContendedError) and isinstance(raised.value, OSError)
