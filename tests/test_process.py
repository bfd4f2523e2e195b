"""`trackhouse serve` as a real process: SIGKILL and SIGTERM mid-stream, with the real client."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, ServerProcess
from trackhouse import Client, ClientConfig

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


def test_sigterm_during_start_up_exits_promptly(tmp_path: Path) -> None:
    """A worker waiting at start-up for a broker that accepts connections but never answers still obeys SIGTERM."""
    with socket.socket() as black_hole:
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen()
        port = black_hole.getsockname()[1]
        args = [sys.executable, "-m", "trackhouse.cli", "serve", "--data-dir", str(tmp_path / "d"), "--role", "worker"]
        args += ["--kafka-bootstrap", f"127.0.0.1:{port}", "--grpc-port", "0", "--http-port", "0"]
        with (tmp_path / "log").open("w") as log:
            process = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            time.sleep(3)
            assert process.poll() is None, "it should still be waiting for the broker"
            process.send_signal(signal.SIGTERM)
            assert process.wait(15) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert "stopping during start-up" in (tmp_path / "log").read_text()
