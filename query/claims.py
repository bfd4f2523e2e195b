"""Claims decided by the earliest stamp: waiting out the rival claims that may still land.

Params, attempt numbers and the migration lease are each claimed by inserting a row that ClickHouse stamps, then
reading back which claim is earliest (schema.PARAM_VALUE, schema.ATTEMPT_WINNER, query.migration_lock). It imports
no other stage, so that query.migration_lock (which query.schema imports) can use it.
"""

from __future__ import annotations

import re
import time

from trackhouse.query.connection import Client
from trackhouse.query.errors import UnsettledError

#: How long a claim waits for rival inserts to end before its read-back (a claim's insert takes milliseconds).
SETTLE_TIMEOUT_S = 30.0


def settle_inserts(client: Client, database: str, table: str, timeout_s: float = SETTLE_TIMEOUT_S) -> None:
    """Return once every insert into `database.table` that began before this call has ended, on the server.

    Claims are stamped by ClickHouse as their insert begins, but visible only once it commits. An insert stamped
    earlier can commit after a rival's insert and read-back have both finished, and both writers would then be told
    they won (seen in CI: two nodes logging one param at once). A claim's insert has committed before this is
    called; read back after it, a rival stamped earlier has either committed (it is read back, and wins) or failed
    (it never will be). The server's process list shows the inserts still running; a cluster's servers each list
    only their own, so there it narrows the window without closing it.
    """
    began = time.monotonic()
    # clickhouse-connect writes `INSERT INTO db.table (columns) FORMAT ...`, with or without backquotes.
    quoted = r"[`\"]?"
    pattern = rf"(?i)^\s*INSERT\s+INTO\s+{quoted}{re.escape(database)}{quoted}\.{quoted}{re.escape(table)}{quoted}[\s(]"
    pause = 0.002
    while True:
        waited = time.monotonic() - began
        # An insert that began before this call has run at least `waited` by now (10 ms of slack for the two clocks
        # counting it: waiting for an insert that began just after costs only that insert's time).
        running = client.query(
            "SELECT count() FROM system.processes WHERE query_kind = 'Insert' AND elapsed >= {waited:Float64}"
            " AND match(query, {pattern:String})",
            parameters={"waited": max(0.0, waited - 0.01), "pattern": pattern},
        ).result_rows[0][0]
        if not running:
            return
        if waited > timeout_s:
            raise UnsettledError(f"{database}.{table}: inserts begun before this claim still run after {timeout_s} s")
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
