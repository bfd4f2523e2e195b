"""`trackhouse serve` as a real process: SIGKILL and SIGTERM mid-stream, with the real client."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests import stored
from tests.conftest import ROOT, ServerProcess, wait_until
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


def stored_once(proc: ServerProcess, run_id: str, expected: dict[str, np.ndarray], extra_rows: int = 0) -> None:
    """Each key's series, read as get-history reads it, holds exactly the expected steps and values once, and the raw
    rows exceed the points by at most `extra_rows` (what a crash may legitimately store twice)."""
    sql = proc.sql()
    try:
        assert stored.keys(sql, run_id) == sorted(expected)
        for key, values in expected.items():
            points = stored.history(sql, run_id, key)
            assert [p[0] for p in points] == list(range(len(values))), key
            assert np.array_equal([p[2] for p in points], values), key
        total = sum(len(v) for v in expected.values())
        assert total <= stored.raw_rows(sql, run_id) <= total + extra_rows
    finally:
        sql.close()


def queued_points(proc: ServerProcess) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{proc.http_port}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("trackhouse_queue_points "):
                return float(line.split()[1])
    raise AssertionError("no trackhouse_queue_points on /metrics")


def test_sigkill_mid_stream_then_restart_loses_and_doubles_nothing(server_process: ServerProcess) -> None:
    server_process.start()
    # A small bound on unacknowledged points bounds what the crash may store twice.
    config = ClientConfig(request_points=5_000, max_buffer_points=50_000, max_backoff_s=0.5)
    client = Client(server_process.target, config)
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
    steps = np.arange(STEPS)
    expected = {f"k{i}": steps + i / 10 for i in range(KEYS)}
    stored_once(server_process, run_id[0], expected, extra_rows=config.max_buffer_points)


def test_sigterm_drains_everything_acknowledged(server_process: ServerProcess) -> None:
    """Points still queued in the server when SIGTERM arrives are inserted, then acknowledged, before it exits."""
    # Flush by size only: 200,000 points trigger an insert, while the 100,000 late ones wait in the queue.
    server_process.extra_args = ("--flush-points", "200000", "--flush-interval-ms", "3600000")
    server_process.start()
    client = Client(server_process.target, ClientConfig(request_points=20_000, max_backoff_s=0.5))
    run = client.start_run(experiment="sigterm-test")
    for chunk in range(20):
        steps = np.arange(chunk * 10_000, (chunk + 1) * 10_000)
        run.log_series("loss", steps, steps * 0.5)
    client.flush(timeout=120)
    acknowledged_before = client.stats().acknowledged_points
    run.log_series("late", np.arange(100_000), np.ones(100_000))
    wait_until(lambda: queued_points(server_process) >= 100_000, timeout=120, what="the late points queued")
    assert client.stats().acknowledged_points == acknowledged_before  # queued, so not acknowledged yet
    assert server_process.terminate() == 0, "SIGTERM must drain and exit cleanly"
    wait_until(
        lambda: client.stats().acknowledged_points - acknowledged_before == 100_000,
        timeout=60,
        what="the drained points acknowledged",
    )
    sql = server_process.sql()
    try:
        assert stored.raw_rows(sql, run.run_id, "late") == 100_000  # stored by the drain, once
    finally:
        sql.close()
    # Nothing was left to resend: a restart and close add no row.
    server_process.start()
    client.close(timeout=60)
    assert client.stats().acknowledged_points - acknowledged_before == 100_000
    assert server_process.terminate() == 0
    stored_once(server_process, run.run_id, {"late": np.ones(100_000), "loss": np.arange(200_000) * 0.5})


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
            # Wait for its word that the signal handlers are installed, not a fixed time: under load a fixed sleep
            # sent SIGTERM before the handler existed, and the process died of the signal (-15).
            wait_until(
                lambda: "now stops the start-up" in (tmp_path / "log").read_text() or process.poll() is not None,
                timeout=120,
                what="the start-up log line",
            )
            assert process.poll() is None, "it should still be waiting for the broker"
            process.send_signal(signal.SIGTERM)
            assert process.wait(15) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert "stopping during start-up" in (tmp_path / "log").read_text()


def test_the_server_is_ready_only_once_mlflow_server_is_imported(tmp_path: Path) -> None:
    """mlflow.server's import holds the GIL for about a second; requests answered during it took 5-10x their time
    (README, "The MLflow API"), so start-up finishes it before the ready line. In a fresh interpreter, where nothing
    else imported it."""
    script = (
        "import asyncio, sys\n"
        "from tests.conftest import start_in_process\n"
        "from pathlib import Path\n"
        f"running = start_in_process(Path({str(tmp_path / 'data')!r}))\n"
        "print('imported' if 'mlflow.server.handlers' in sys.modules else 'not imported', flush=True)\n"
        "running.stop()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "imported"
