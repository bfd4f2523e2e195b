"""Nodes starting together on one store migrate it one at a time (query.migration_lock), against a ClickHouse HTTP
endpoint that every "node" (a thread with its own clients) reaches as separate servers' nodes would."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.clickhouse_http import ClickHouseHttp
from tests.conftest import insert_running, wait_until
from trackhouse.query import schema
from trackhouse.query.connection import Client, StoreConfig, connect
from trackhouse.query.errors import ContendedError
from trackhouse.query.migration_lock import LOCKS_TABLE, LeaseConfig, MigrationLease

LATEST = schema.MIGRATIONS[-1][0]
#: Tables and views early migrations created and later ones dropped: a node that replayed an early migration after
#: another node's later one would bring one back (or fail on it, as CI once saw).
DROPPED = {"metric_rollups", "metric_rollups_mv", "metric_rollups_coarse", "latest_metrics", "latest_metrics_mv"}
#: What a store's migrations table holds when one node applied every migration.
EACH_ONCE = {version: 1 for version, _ in schema.MIGRATIONS}
QUICK = LeaseConfig(lease_seconds=1.5, renew_seconds=0.2, poll_seconds=0.05, wait_seconds=60)


@pytest.fixture
def clients(clickhouse_endpoint: ClickHouseHttp) -> Iterator[Callable[[], Client]]:
    opened: list[Client] = []

    def client() -> Client:
        opened.append(connect(StoreConfig(clickhouse_endpoint.url)))
        return opened[-1]

    yield client
    for c in opened:
        c.close()


@pytest.fixture
def database(request: pytest.FixtureRequest) -> str:
    return f"lock_{request.node.name.split('[')[0][-40:]}"


def applied_rows(client: Client, database: str) -> dict[int, int]:
    """How many times each migration was recorded (without FINAL: each node that applied one recorded it)."""
    rows = client.query(f"SELECT version, count() FROM {database}.{schema.MIGRATIONS_TABLE} GROUP BY version")
    return dict(rows.result_rows)


def tables(client: Client, database: str) -> set[str]:
    rows = client.query("SELECT name FROM system.tables WHERE database = {db:String}", parameters={"db": database})
    return {r[0] for r in rows.result_rows}


def in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run `target` in a thread; the list receives its result or its exception."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(target())
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def preamble(client: Client, database: str) -> None:
    for statement in schema.schema_statements(database)[0][1]:
        client.command(statement)


def holding(clients: Callable[[], Client], database: str, renewing: bool = True) -> tuple[Client, MigrationLease]:
    """A store with its preamble only, and a lease held on it (renewed from its own client unless not `renewing`,
    as a process that died holding it). Returns the holder's client and lease."""
    client = clients()
    preamble(client, database)
    lease = MigrationLease(client, database, QUICK, renewer=clients() if renewing else None)
    assert lease.acquire(lambda: True)
    return client, lease


class SlowClient:
    """A real client whose statements each take `delay` longer: a node migrating a large store, or a slow one."""

    def __init__(self, client: Client, delay: float) -> None:
        self._client, self._delay = client, delay

    def command(self, statement: str) -> Any:
        time.sleep(self._delay)
        return self._client.command(statement)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def test_a_node_starting_while_another_is_midway_waits_and_applies_nothing_twice(
    clients: Callable[[], Client], database: str
) -> None:
    """What CI once saw: a node that reads the applied migrations while another is between migration 3 and 5 would
    apply 4 after the other's 5 dropped what 4 reads (UNKNOWN_TABLE), or bring back what 5 dropped."""
    slow = SlowClient(clients(), delay=0.05)
    first, first_outcome = in_thread(lambda: schema.migrate(slow, database, renewer=clients, lease=QUICK))
    check = clients()
    preamble(check, database)  # (idempotent) so the migrations table can be watched from the start
    wait_until(lambda: 3 in applied_rows(check, database), what="the first node to apply migration 3")
    assert schema.migrate(clients(), database, renewer=clients, lease=QUICK) == LATEST
    first.join(120)
    assert first_outcome == [LATEST]
    # The first node applied and recorded every migration; the second waited and found them applied.
    assert applied_rows(check, database) == EACH_ONCE
    assert not tables(check, database) & DROPPED
    assert schema.migrate(check, database) == LATEST  # and a later start touches nothing
    assert applied_rows(check, database) == EACH_ONCE


def test_a_node_waits_while_another_holds_the_lease_then_takes_it_when_released(
    clients: Callable[[], Client], database: str
) -> None:
    holder_client, holder = holding(clients, database)
    waiter, outcome = in_thread(lambda: schema.migrate(clients(), database, renewer=clients, lease=QUICK))
    time.sleep(3 * QUICK.lease_seconds)  # the holder renews from its own thread, so its lease never lapses
    assert waiter.is_alive() and outcome == []
    assert applied_rows(holder_client, database) == {}  # the waiter applied nothing while it waited
    holder.release()
    waiter.join(60)
    assert outcome == [LATEST]
    assert applied_rows(holder_client, database) == EACH_ONCE


def test_a_waiter_finds_the_holders_work_done_and_applies_nothing(clients: Callable[[], Client], database: str) -> None:
    holder_client, holder = holding(clients, database)
    with holder:
        waiter, outcome = in_thread(lambda: schema.migrate(clients(), database, renewer=clients, lease=QUICK))
        time.sleep(0.5)
        assert waiter.is_alive()
        for version, statements in schema.schema_statements(database)[1:]:
            for statement in statements:
                holder_client.command(statement)
            holder_client.command(schema.record_sql(database, version))
        waiter.join(60)  # returns while the holder still holds the lease: nothing is left to apply
        assert outcome == [LATEST]
        assert holder.holder() == holder.token
    assert applied_rows(holder_client, database) == EACH_ONCE


def test_a_holder_that_died_is_taken_over_one_lease_later(clients: Callable[[], Client], database: str) -> None:
    client, dead = holding(clients, database, renewing=False)  # and never released: a process that died holding it
    began = time.monotonic()
    assert schema.migrate(clients(), database, renewer=clients, lease=QUICK) == LATEST
    assert time.monotonic() - began >= QUICK.lease_seconds - 0.5  # it waited for the lapse (server clock: slack)
    assert applied_rows(client, database) == EACH_ONCE
    assert dead.holder() == ""  # the new holder released it


def test_a_waiter_gives_up_with_a_clear_error_after_its_wait(clients: Callable[[], Client], database: str) -> None:
    client, holder = holding(clients, database)
    with holder:
        impatient = LeaseConfig(lease_seconds=1.5, renew_seconds=0.2, poll_seconds=0.05, wait_seconds=0.5)
        with pytest.raises(ContendedError, match=f"held the schema migration lease of {database}"):
            schema.migrate(clients(), database, lease=impatient)
    assert applied_rows(client, database) == {}


def test_the_earliest_live_claim_holds_and_a_later_claim_never_displaces_it(
    clients: Callable[[], Client], database: str
) -> None:
    _, first = holding(clients, database)
    second = MigrationLease(clients(), database, QUICK)
    waiting, outcome = in_thread(lambda: second.acquire(lambda: True))
    deadline = time.monotonic() + 3 * QUICK.lease_seconds
    while time.monotonic() < deadline:  # the second renews its claim all along, later than the first's each time
        assert first.holder() == first.token
        time.sleep(0.1)
    assert waiting.is_alive()
    first.release()
    waiting.join(30)
    assert outcome == [True] and first.holder() == second.token
    second.release()
    assert first.holder() == ""


def test_an_embedded_store_migrates_under_the_lease_without_a_renewer(sql: Client) -> None:
    """The `sql` fixture migrated a fresh embedded store, renewing between statements, and released the lease."""
    assert applied_rows(sql, "trackhouse") == EACH_ONCE
    claims = sql.query(f"SELECT countIf(released = 1), uniqExact(claimed_by) FROM trackhouse.{LOCKS_TABLE}")
    assert claims.result_rows == [(1, 1)]  # claimed, then released
    assert schema.migrate(sql, "trackhouse") == LATEST
    # Nothing to apply, so the lease was not claimed again.
    assert sql.query(f"SELECT count() FROM trackhouse.{LOCKS_TABLE}").result_rows == [(2,)]


def test_a_claim_stamped_earlier_but_committed_later_keeps_the_lease(
    clients: Callable[[], Client], database: str
) -> None:
    """The race two nodes starting at once can hit, forced: a rival's claim is stamped (by ClickHouse, as its insert
    begins) before ours but commits two seconds later. Reading the holder at once, a claimant saw only its own claim
    and migrated while the rival, once its claim landed, held the lease too. It waits for the inserts begun before
    its read, so the rival holds and the claimant takes over only once the rival's claim lapses."""
    check = clients()
    preamble(check, database)
    # Long enough that the rival's claim is still live once it lands, under load too.
    lease = LeaseConfig(lease_seconds=8, renew_seconds=0.2, poll_seconds=0.05, wait_seconds=60)
    rival = clients()  # its own session: the stand-in runs one query per session
    claimant = MigrationLease(clients(), database, lease, renewer=clients())
    observer = MigrationLease(check, database, lease)  # reads the holder on a session of its own
    rival_claim = (
        f"INSERT INTO {database}.{LOCKS_TABLE} (claimed_by, released, claimed_at)"
        " SELECT 'rival', 0, now64(9) FROM numbers(1) WHERE sleepEachRow(2) = 0"
    )
    with insert_running(rival, check, rival_claim):
        acquiring, outcome = in_thread(lambda: claimant.acquire(lambda: True))
    time.sleep(0.5)
    # The rival's claim has landed, stamped first: it holds, and the claimant waits for it to lapse.
    assert observer.holder() == "rival"
    assert acquiring.is_alive() and outcome == []
    acquiring.join(30)
    assert outcome == [True] and observer.holder() == claimant.token
    claimant.release()
