"""`trackhouse serve` as a real process: SIGKILL and SIGTERM mid-stream, with the real client."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from ingest.client import Client, ClientConfig
from tests.conftest import ServerProcess

pytestmark = pytest.mark.slow

STEPS = 40_000
KEYS = 5


def log_steadily(client: Client, run_id_out: list[str], started: threading.Event) -> None:
    run = client.start_run(experiment="crash-test")
    run_id_out.append(run.run_id)
    for step in range(STEPS):
        run.log_metrics({f"k{i}": step + i / 10 for i in range(KEYS)}, step=step)
        if step == 2_000:
            started.set()
        if step % 500 == 0:
            time.sleep(0.005)  # spread the run over the crash
    run.finish()


def exactly_once(proc: ServerProcess, run_id: str) -> tuple[int, int]:
    sql = proc.sql()
    try:
        distinct = sql.query(
            "SELECT count() FROM (SELECT DISTINCT * FROM trackhouse.metrics WHERE run_id = {r:String})",
            parameters={"r": run_id},
        ).result_rows[0][0]
        steps = sql.query(
            "SELECT uniqExact(step, key) FROM trackhouse.metrics WHERE run_id = {r:String}", parameters={"r": run_id}
        ).result_rows[0][0]
        return int(distinct), int(steps)
    finally:
        sql.close()


def test_sigkill_mid_stream_then_restart_loses_and_doubles_nothing(server_process: ServerProcess) -> None:
    server_process.start()
    client = Client(server_process.target, ClientConfig(request_points=5_000, max_backoff_s=0.5))
    run_id: list[str] = []
    started = threading.Event()
    logger = threading.Thread(target=log_steadily, args=(client, run_id, started))
    logger.start()
    assert started.wait(30)
    server_process.kill()
    time.sleep(0.5)  # the client keeps logging into its buffer while the server is down
    server_process.start()
    logger.join(120)
    client.close(timeout=120)
    stats = client.stats()
    assert stats.reconnects > 0
    assert stats.acknowledged_points >= STEPS * KEYS
    assert server_process.terminate() == 0
    assert exactly_once(server_process, run_id[0]) == (STEPS * KEYS, STEPS * KEYS)


def test_sigterm_drains_everything_acknowledged(server_process: ServerProcess) -> None:
    server_process.start()
    client = Client(server_process.target, ClientConfig(request_points=20_000, max_backoff_s=0.5))
    run = client.start_run(experiment="sigterm-test")
    for chunk in range(20):
        steps = np.arange(chunk * 10_000, (chunk + 1) * 10_000)
        run.log_series("loss", steps, steps * 0.5)
    client.flush(timeout=60)
    acknowledged_before = client.stats().acknowledged_points
    # More data in flight while the server shuts down.
    run.log_series("late", np.arange(100_000), np.ones(100_000))
    assert server_process.terminate() == 0, "SIGTERM must drain and exit cleanly"
    sql = server_process.sql()
    try:
        stored = sql.query(
            "SELECT count() FROM (SELECT DISTINCT * FROM trackhouse.metrics"
            " WHERE run_id = {r:String} AND key = 'loss')",
            parameters={"r": run.run_id},
        ).result_rows[0][0]
        late_acked = client.stats().acknowledged_points - acknowledged_before
        late_stored = sql.query(
            "SELECT count() FROM (SELECT DISTINCT * FROM trackhouse.metrics"
            " WHERE run_id = {r:String} AND key = 'late')",
            parameters={"r": run.run_id},
        ).result_rows[0][0]
    finally:
        sql.close()
    assert stored == 200_000
    assert late_stored >= late_acked  # every acknowledged point is durable
    # What was not acknowledged stays with the client and arrives after a restart.
    server_process.start()
    client.close(timeout=60)
    assert server_process.terminate() == 0
    assert exactly_once(server_process, run.run_id) == (300_000, 300_000)
