"""One node at a time migrates a store: a lease kept in the store itself.

Each migration statement is idempotent, but a sequence of them is not safe in every interleaving. A node still
running migration 4 (a view reading `metric_rollups`) after a faster node's migration 5 dropped that table fails
with UNKNOWN_TABLE, and a node still running migration 3 would silently recreate the table and its view. CI saw the
first when four nodes started on one fresh store at once. So a node with migrations to apply first holds this lease.
Nodes that find nothing to apply (every start after the first) never touch it.

ClickHouse has no lock, so the lease is claimed the way params are (schema.PARAM_VALUE). Each claim is a row stamped
by the server's clock. Every node computes the same holder from the same rows: among the claimants that renewed
within the lease and have not released, the one whose first claim is earliest (ties: the smaller token). A later
claimant therefore never displaces a live holder. A claim is stamped as its insert begins but visible once it
commits, so a claimant reads the holder only after the inserts begun before its read have ended
(query.claims.settle_inserts): otherwise a rival stamped earlier but committed later would hold the lease alongside
it. The holder renews from its own thread and client while statements run, so a long backfill keeps the lease. A
holder that dies stops renewing, and the earliest waiter takes over one lease later. A waiter renews too, so its
place in line does not lapse while it waits.

On a cluster the table is replicated to every server (cluster_ddl.ClusterRenderer.preamble), claims are written
with `insert_quorum` and read with `select_sequential_consistency`, so a claim is visible to every node once it is
acknowledged. Servers' clocks still order claims made within their skew of each other, and each server lists only
its own running inserts, so settling narrows the window there without closing it; two nodes that both won would run
the same idempotent migrations side by side, as every node did before this lease.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from trackhouse.query.claims import settle_inserts
from trackhouse.query.connection import Client
from trackhouse.query.errors import ContendedError

log = logging.getLogger(__name__)

#: The claims. Rows older than a day can no longer hold anything, so a TTL keeps the table a few rows long.
LOCKS_TABLE = "schema_migration_locks"
LOCKS_COLUMNS = "(claimed_by String, released UInt8, claimed_at DateTime64(9) DEFAULT now64(9))"
LOCKS_CLAUSES = "ORDER BY (claimed_at, claimed_by) TTL toDateTime(claimed_at) + INTERVAL 1 DAY"


@dataclass(frozen=True, slots=True)
class LeaseConfig:
    #: A claimant that has not renewed for this long is gone (its process died or lost the store).
    lease_seconds: float = 30.0
    #: How often the holder and every waiter renew their claim. Well under the lease, so a slow insert or a
    #: stalled thread does not let a live holder lapse.
    renew_seconds: float = 3.0
    #: How often a waiter looks whether the holder finished or lapsed.
    poll_seconds: float = 0.5
    #: A waiter gives up after this long. A holder migrating this long is stuck or migrating a huge store;
    #: the start fails with a clear error rather than hanging unnoticed.
    wait_seconds: float = 1800.0


DEFAULT_LEASE = LeaseConfig()


class MigrationLease:
    """Claim, hold and release the store's migration lease; a context manager that releases on exit.

    `renewer` is a second client for the renewing thread (a clickhouse-connect client runs one query at a time).
    Without one (an embedded store, which one process owns anyway), the caller renews between statements with
    `renew_if_due`."""

    def __init__(
        self,
        client: Client,
        database: str,
        config: LeaseConfig = DEFAULT_LEASE,
        renewer: Client | None = None,
        cluster: bool = False,
    ) -> None:
        self._client = client
        self._database = database
        self._config = config
        self._renewer = renewer
        self.token = uuid.uuid4().hex
        self._claimed = False
        self._renewed_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # A renewal repeats the claim's row: it must never be dropped as a repeated insert (replicated tables
        # deduplicate by default, and whether a block's hash covers the server-stamped claimed_at is not a thing to
        # rely on).
        self._insert_settings: dict[str, object] = {"insert_deduplicate": 0}
        if cluster:
            self._insert_settings["insert_quorum"] = "auto"
        self._read_settings = {"select_sequential_consistency": 1} if cluster else {}

    def acquire(self, still_needed: Callable[[], bool]) -> bool:
        """Wait until this node holds the lease (True), or until `still_needed()` is False (another node did the
        work; False). Raises ContendedError after LeaseConfig.wait_seconds."""
        config = self._config
        deadline = time.monotonic() + config.wait_seconds
        reported = 0.0
        while still_needed():
            if self._due():
                self._claim(self._client, released=False)
                # A rival's claim stamped before ours may not have landed yet: read back before it does, each of
                # us would see only its own claim, and both would migrate (query.claims).
                settle_inserts(self._client, self._database, LOCKS_TABLE)
            holder = self.holder()
            if holder == self.token:
                if self._renewer is not None:
                    self._thread = threading.Thread(target=self._renew_until_released, name="migration-lease")
                    self._thread.start()
                return True
            now = time.monotonic()
            if now >= deadline:
                raise ContendedError(
                    f"another node ({holder or 'whose claim just lapsed'}) held the schema migration lease of"
                    f" {self._database} for over {config.wait_seconds:.0f} s; if no node is migrating, it is safe"
                    " to start again"
                )
            if now - reported >= 30.0:
                log.info("waiting for another node to migrate %s (lease holder %s)", self._database, holder)
                reported = now
            time.sleep(config.poll_seconds)
        return False

    def holder(self) -> str:
        """The claimant holding the lease now, or "" when none does."""
        rows = self._client.query(
            f"SELECT claimed_by FROM {self._database}.{LOCKS_TABLE} GROUP BY claimed_by"
            " HAVING max(released) = 0 AND max(claimed_at) > now64(9) - toIntervalMillisecond({lease:UInt64})"
            " ORDER BY min(claimed_at), claimed_by LIMIT 1",
            parameters={"lease": int(self._config.lease_seconds * 1000)},
            settings=self._read_settings,
        ).result_rows
        return str(rows[0][0]) if rows else ""

    def renew_if_due(self) -> None:
        """Renew from the caller's thread, when there is no renewing thread and a renewal is due."""
        if self._renewer is None and self._due():
            self._claim(self._client, released=False)

    def release(self) -> None:
        """Stop renewing and mark the claim released, so waiters take over at once rather than one lease later.
        Idempotent; a release that cannot be written leaves the claim to lapse."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._claimed:
            self._claimed = False  # before the insert: a release that fails is not tried again
            try:
                self._claim(self._client, released=True)
            except Exception:  # the claim lapses by itself; the migration's own error is the one to report
                log.warning("could not release the schema migration lease of %s; it lapses by itself", self._database)

    def __enter__(self) -> MigrationLease:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()

    def _claim(self, client: Client, released: bool) -> None:
        client.insert(
            LOCKS_TABLE,
            [[self.token, int(released)]],
            ["claimed_by", "released"],
            database=self._database,
            settings=self._insert_settings,
        )
        if not released:
            self._claimed = True
            self._renewed_at = time.monotonic()

    def _due(self) -> bool:
        return time.monotonic() - self._renewed_at >= self._config.renew_seconds

    def _renew_until_released(self) -> None:
        assert self._renewer is not None
        while not self._stop.wait(self._config.renew_seconds):
            try:
                self._claim(self._renewer, released=False)
            except Exception:  # one failed renewal is not fatal: the lease is ten renewals long
                log.warning("could not renew the schema migration lease of %s", self._database, exc_info=True)
