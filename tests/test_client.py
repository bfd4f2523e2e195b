"""Client behaviour with no server, or one that cannot keep up: bounds, policies, timeouts."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT, RunningServer
from tests.tansu import free_port
from trackhouse import BufferFullError, Client, ClientConfig
from trackhouse.ingest.errors import IngestError, InvalidArgumentError


def unreachable() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there


def test_drop_policy_counts_what_it_drops_and_stays_bounded() -> None:
    client = Client(unreachable(), ClientConfig(max_buffer_points=1_000, request_points=100, full_policy="drop"))
    run = client.start_run()
    for step in range(500):
        run.log_metrics({"a": 1.0, "b": 2.0, "c": 3.0}, step=step)
    stats = client.stats()
    assert stats.buffered_points + stats.unacknowledged_points <= 1_000
    assert stats.dropped_points == 1_500 + 2 - (stats.buffered_points + stats.unacknowledged_points)
    with pytest.raises(IngestError, match="not acknowledged"):
        client.close(timeout=0.2)


def test_block_policy_waits_then_raises_after_its_timeout() -> None:
    client = Client(unreachable(), ClientConfig(max_buffer_points=1_000, request_points=100, block_timeout_s=0.3))
    run = client.start_run()
    run.log_series("x", np.arange(990), np.zeros(990))
    started = time.monotonic()
    with pytest.raises(BufferFullError):
        run.log_series("x", np.arange(100), np.zeros(100))
    assert time.monotonic() - started >= 0.3
    with pytest.raises(IngestError):
        client.close(timeout=0.1)


def test_flush_times_out_while_the_server_is_away() -> None:
    client = Client(unreachable())
    client.start_run().log_metric("loss", 1.0)
    with pytest.raises(TimeoutError, match="still unacknowledged"):
        client.flush(timeout=0.3)
    with pytest.raises(IngestError):
        client.close(timeout=0.1)


def test_series_larger_than_the_buffer_goes_through_piece_by_piece(server: RunningServer) -> None:
    with Client(server.target, ClientConfig(max_buffer_points=20_000, request_points=5_000)) as client:
        run = client.start_run()
        run.log_series("big", np.arange(100_000), np.random.rand(100_000))
    assert server.scalar("SELECT count() FROM trackhouse.metrics WHERE run_id = {r:String}", r=run.run_id) == 100_000


def test_a_logging_call_after_close_fails_loudly(server: RunningServer) -> None:
    client = Client(server.target)
    run = client.start_run()
    client.close()
    with pytest.raises(IngestError, match="closed"):
        run.log_metric("loss", 1.0)


def test_mismatched_series_lengths_and_float_steps() -> None:
    client = Client(unreachable())
    run = client.start_run()
    with pytest.raises(InvalidArgumentError, match="differ in length"):
        run.log_series("x", np.arange(3), np.zeros(4))
    with pytest.raises(InvalidArgumentError, match="steps must be integers"):
        run.log_series("x", np.linspace(0, 1, 3), np.zeros(3))
    with pytest.raises(IngestError):
        client.close(timeout=0.1)


def test_atexit_flushes_a_client_that_was_never_closed(server: RunningServer) -> None:
    script = f"""
from trackhouse import Client
client = Client("{server.target}")
run = client.start_run(experiment="atexit")
for step in range(1000):
    run.log_metrics({{"loss": step / 1000}}, step=step)
print(run.run_id)
"""  # no close(): the interpreter's exit must flush
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.strip()
    assert server.scalar("SELECT count() FROM trackhouse.metrics WHERE run_id = {r:String}", r=run_id) == 1000


def test_acknowledgement_latencies_are_recorded(server: RunningServer) -> None:
    with Client(server.target, ClientConfig(request_points=100)) as client:
        run = client.start_run()
        for step in range(1_000):
            run.log_metric("loss", 1.0, step=step)
    latencies = client.ack_latencies()
    assert len(latencies) >= 10  # 1000 points in requests of at most 100
    assert all(0 < seconds < 30 for seconds in latencies)
