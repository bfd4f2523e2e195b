"""The client spool: a server outage, a killed training process and a full spool cost no point, and none twice.

One `trackhouse serve` process (on fixed ports, so a restart keeps its address) serves the whole module; each
test starts it when it needs it and stops it to read the store (chDB allows one process per directory).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from tests import stored
from tests.conftest import ROOT, ServerProcess, wait_until
from tests.tansu import free_port
from tests.test_install import SERVER_MODULES
from trackhouse import BufferFullError, Client, ClientConfig, IngestError, InvalidArgumentError
from trackhouse.ingest.client import api
from trackhouse.ingest.client.spool import Spool, SpoolDepth
from trackhouse.query.connection import Client as SqlClient
from trackhouse.v1 import ingest_pb2

#: Reconnect soon after a restart: the default backoff grows to 5 s, which would only slow the tests down.
FAST = ClientConfig(max_backoff_s=0.3)
KEYS = [f"layer{i}/grad_norm" for i in range(10)]

# A training process that logs into a spool while the server is down, says when all of it is on disk, and waits
# to be killed. argv: target, spool directory, steps.
TRAIN = """
import sys, time
from trackhouse import Client

target, spool, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = Client(target, spool_dir=spool)
run = client.start_run(experiment="preempted", params={"seed": 7}, tags={"team": "vision"})
for step in range(steps):
    run.log_metrics({"loss": 1 / (step + 1), "acc": step / steps}, step=step, timestamp_ms=1_000 + step)
while True:
    s = client.stats()
    if s.buffered_points == 0 and s.unacknowledged_points == 0 and s.spooled_points:
        break
    time.sleep(0.05)
print(run.run_id, s.spooled_points, flush=True)
time.sleep(600)
"""

# `trackhouse replay` with every server module made unimportable: it must run on the client-only install.
REPLAY_CLIENT_ONLY = f"""
import sys
for name in {SERVER_MODULES!r}:
    sys.modules[name] = None
sys.argv = ["trackhouse", "replay", *sys.argv[1:]]
from trackhouse.launcher import main
main()
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Not running at first: each test starts and stops it as its scenario needs."""
    proc = ServerProcess(tmp_path_factory.mktemp("spool") / "data")
    yield proc
    if proc.process is not None and proc.process.poll() is None:
        proc.kill()


def running(server: ServerProcess) -> bool:
    return server.process is not None and server.process.poll() is None


def stop(server: ServerProcess) -> None:
    if running(server):
        assert server.terminate() == 0


def stop_and_read(server: ServerProcess) -> SqlClient:
    stop(server)
    return server.sql()


def expected(steps: int, key: int) -> list[float]:
    curve: npt.NDArray[np.float64] = np.sin(np.arange(steps) * 1e-3 + key) * 1e3 + np.arange(steps)
    return [float(v) for v in curve]


def test_a_full_spool_with_policy_raise_refuses_the_call_clearly(tmp_path: Path) -> None:
    config = ClientConfig(
        max_buffer_points=10_000, request_points=2_000, spool_max_bytes=128 * 1024, full_policy="raise"
    )
    client = Client(f"127.0.0.1:{free_port()}", config, spool_dir=tmp_path / "spool")
    run = client.start_run(experiment="refused")
    with pytest.raises(BufferFullError, match=r"spool's 131072 bytes .* these 1000 points were not logged"):
        for start in range(0, 1_000_000, 1_000):
            run.log_series("loss", np.arange(start, start + 1_000), np.ones(1_000))
    spooled = client.stats()
    assert 0 < spooled.spooled_bytes <= 128 * 1024 and spooled.dropped_points == 0
    # The server never came, and the cap holds at close too: what did not fit is reported, not silently gone.
    with pytest.raises(IngestError, match="points not acknowledged"):
        client.close(timeout=0)
    kept, _ = Spool(tmp_path / "spool", 1 << 30).adopt()
    assert sum(r.size for r in kept) >= spooled.spooled_points > 0


def test_a_server_that_never_answers_the_handshake_stalls_neither_the_loop_nor_close(tmp_path: Path) -> None:
    """A host that takes the connection and says nothing: the first handshake hangs for its 10 s deadline.

    The loop must keep logging into the spool meanwhile, and close() must not wait on that handshake: it once
    waited past its own 120 s join on a loaded machine, and left the spool locked with everything in it.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def hold() -> None:
        with contextlib.suppress(OSError):  # the listener closed
            while True:
                held.append(listener.accept()[0])

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    config = ClientConfig(max_buffer_points=10_000, request_points=2_000)
    client = Client(f"127.0.0.1:{listener.getsockname()[1]}", config, spool_dir=tmp_path / "spool")
    try:
        run = client.start_run(experiment="silent")
        for start in range(0, 100_000, 1_000):  # ten times the memory bound
            run.log_series("loss", np.arange(start, start + 1_000), np.ones(1_000))
        stats = client.stats()
        # Logged while the first handshake is still waiting: the spool took what memory could not.
        assert stats.reconnects == 0 and stats.spooled_points > 0
        # Closed while the silent host still holds the connection: the handshake is cut, not waited out.
        began = time.monotonic()
        client.close(timeout=0)
        assert time.monotonic() - began < 8  # well inside the handshake's own 10 s deadline
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        holder.join(10)
        for connection in held:
            connection.close()
    kept, skipped = Spool(tmp_path / "spool", 1 << 30).adopt()
    assert skipped == 0  # the closed client let go of its directory
    assert sum(r.size for r in kept) == 100_000 + 2  # the run and its name tag


def test_a_torn_tail_is_ignored_with_a_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    writer = Spool(tmp_path, 1 << 20)
    payloads = [(bytes([i]) * (100 + i), i + 1) for i in range(3)]
    writer.append(payloads)
    [segment] = writer.directories()[0].glob("*.seg")
    writer._own.release()  # type: ignore[union-attr]  # as a crash would: the files stay, the lock goes
    with segment.open("r+b") as f:  # the last record cut short mid-write
        f.truncate(segment.stat().st_size - 10)
    with caplog.at_level(logging.WARNING):
        records, live = Spool(tmp_path, 1 << 20).adopt()
    assert live == 0
    assert [(r.read(), r.size) for r in records] == payloads[:2]
    assert "torn or corrupt record" in caplog.text and segment.name in caplog.text


def test_a_segment_goes_only_once_every_record_in_it_is_settled(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1 << 20)
    first, second, third = spool.append([(b"x" * 10, 1), (b"y" * 10, 2), (b"z" * 10, 3)])
    spool.release(first)
    spool.release(third)
    assert first.segment.path.exists() and spool.depth().points == 2
    spool.release(second)
    assert not first.segment.path.exists() and spool.depth() == SpoolDepth(0, 0, 0, 0.0)
    spool.close()
    assert not any(tmp_path.iterdir())


def test_a_corrupt_record_ends_the_segment_there(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    writer = Spool(tmp_path, 1 << 20)
    records = writer.append([(b"a" * 50, 1), (b"b" * 50, 1), (b"c" * 50, 1)])
    writer._own.release()  # type: ignore[union-attr]
    with records[1].segment.path.open("r+b") as f:  # one bit flipped in the second record's bytes
        f.seek(records[1].offset + 7)
        f.write(b"B")
    with caplog.at_level(logging.WARNING):
        found, _ = Spool(tmp_path, 1 << 20).adopt()
    assert [r.read() for r in found] == [b"a" * 50]
    assert "torn or corrupt record" in caplog.text


def test_kafka_targets_take_no_spool(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="broker is the durable buffer"):
        Client("kafka://127.0.0.1:9/topic", spool_dir=tmp_path)


def test_a_recovered_request_is_resent_under_a_new_sequence() -> None:
    head = ingest_pb2.WriteRequest(writer_id="dead", sequence=41)
    for sequence in (1, 127, 128, 300, 2**40):
        again = ingest_pb2.WriteRequest.FromString(head.SerializeToString() + api._sequence_field(sequence))
        assert (again.writer_id, again.sequence) == ("dead", sequence)


def test_a_full_spool_blocks_the_logging_call_until_the_server_returns(server: ServerProcess, tmp_path: Path) -> None:
    stop(server)
    config = ClientConfig(max_buffer_points=20_000, request_points=5_000, spool_max_bytes=256 * 1024, max_backoff_s=0.3)
    client = Client(server.target, config, spool_dir=tmp_path / "spool")
    run = client.start_run(experiment="blocked")
    steps = 100_000  # 28 bytes a point on disk: far more than memory and the spool hold together
    logged = threading.Event()

    def train() -> None:
        for start in range(0, steps, 1_000):
            run.log_series("loss", np.arange(start, start + 1_000), np.arange(start, start + 1_000) * 0.5)
        logged.set()

    trainer = threading.Thread(target=train, daemon=True)
    trainer.start()

    def full() -> bool:
        # The sender spools whenever a call waits for room, so memory stays full only once the spool is.
        s = client.stats()
        return s.buffered_points + s.unacknowledged_points + 1_000 > 20_000 and s.spooled_bytes > 0

    wait_until(full, what="memory and spool full")
    assert not logged.is_set()  # memory and spool are full and the server is down: the trainer is waiting
    server.start()
    trainer.join(120)
    assert logged.is_set()
    client.flush()  # an acknowledgement means stored; the server stays up for the next test
    assert client.stats().acknowledged_points == steps + 2  # and the run and its name tag
    client.close()


def test_a_permanently_refused_spooled_request_is_reported_not_retried(server: ServerProcess, tmp_path: Path) -> None:
    # Sequence 41 in its bytes: the client answers for it only if it resends it under its own sequence.
    bad = ingest_pb2.WriteRequest(schema_version=99, writer_id="w", sequence=41)
    writer = Spool(tmp_path / "spool", 1 << 20)
    writer.append([(bad.SerializeToString(), 5)])
    writer._own.release()  # type: ignore[union-attr]
    if not running(server):
        server.start()
    client = Client(server.target, spool_dir=tmp_path / "spool")
    with pytest.raises(InvalidArgumentError, match="schema_version 99"):
        client.flush(timeout=60)
    assert client.stats().failed_points == 5 and client.stats().spooled_requests == 0
    client.close()
    assert not any((tmp_path / "spool").iterdir())


def test_a_server_outage_while_logging_a_million_points_stores_each_once(server: ServerProcess, tmp_path: Path) -> None:
    if not running(server):
        server.start()
    steps = 100_000
    with Client(server.target, FAST, spool_dir=tmp_path / "spool") as client:
        run = client.start_run(experiment="outage", params={"lr": 3e-4})
        run.log_metrics({"warmup": 1.0}, step=-1, timestamp_ms=1)
        client.flush()
        assert server.terminate() == 0
        down_at = time.monotonic()
        values = [expected(steps, i) for i in range(len(KEYS))]
        for step in range(steps):
            run.log_metrics({key: values[i][step] for i, key in enumerate(KEYS)}, step=step, timestamp_ms=10_000 + step)

        # Everything logged during the outage is on disk, none of it in memory. Both at once: the spool counts a
        # request once it is written, and memory lets it go just after (Client._spool_inflight), so a stats() taken
        # in between sees it in both.
        def all_on_disk() -> bool:
            stats = client.stats()
            return stats.spooled_points == steps * len(KEYS) and stats.unacknowledged_points == 0

        wait_until(all_on_disk, what="the outage's points spooled and out of memory")
        assert client.stats().spooled_bytes > 0
        # The outage: at least 30 s, long enough for the client's reconnect backoff to reach its cap.
        time.sleep(max(0.0, 30 - (time.monotonic() - down_at)))
        server.start()
        run.finish()
        client.flush()
        after = client.stats()
        assert (after.spooled_points, after.spooled_requests, after.failed_points) == (0, 0, 0)
    assert not any((tmp_path / "spool").iterdir())  # delivered spools are deleted
    sql = stop_and_read(server)
    try:
        for i, key in enumerate(KEYS):
            points = stored.history(sql, run.run_id, key)
            assert [p[0] for p in points] == list(range(steps))
            assert [p[1] for p in points] == list(range(10_000, 10_000 + steps))
            assert [p[2] for p in points] == values[i]
            # No request went twice: the server was stopped cleanly, so every stored request was acknowledged.
            assert stored.raw_rows(sql, run.run_id, key) == steps
        assert stored.history(sql, run.run_id, "warmup") == [(-1, 1, 1.0)]
    finally:
        sql.close()


def test_a_killed_training_process_is_replayed_by_the_next_client_and_by_the_command(
    server: ServerProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = tmp_path / "spool"
    steps = 100_000
    stop(server)  # down: the trainer can only spool
    with subprocess.Popen(
        [sys.executable, "-c", TRAIN, server.target, str(spool), str(steps)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "RANK": "3"},  # rank and node travel inside the spooled bytes, untouched
    ) as child:
        try:
            assert child.stdout is not None
            run_id, spooled = child.stdout.readline().split()
            # While the trainer lives, its directory is locked: another client on the same root leaves it alone.
            bystander = Client(f"127.0.0.1:{free_port()}", spool_dir=spool)
            assert bystander.stats().spooled_requests == 0
            bystander.close(timeout=0)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(30)
    assert int(spooled) == 2 * steps + 4  # the points, the run, one param and two tags (the run name and team)
    shutil.copytree(spool, tmp_path / "copy")
    server.start()
    with caplog.at_level(logging.WARNING, logger=api.__name__), Client(server.target, FAST, spool_dir=spool) as client:
        assert client.stats().spooled_points == int(spooled)
        client.flush()
        assert client.stats().acknowledged_points == int(spooled)
    assert "an earlier client left" in caplog.text and "spool empty again" in caplog.text
    assert not any(spool.iterdir())
    # Replaying the same spool a second time (a crash between a store and its acknowledgement) changes nothing.
    replay = subprocess.run(
        [sys.executable, "-c", REPLAY_CLIENT_ONLY, str(tmp_path / "copy"), "--target", server.target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert replay.returncode == 0, replay.stderr
    assert f"({spooled} points)" in replay.stdout, replay.stdout
    assert not any((tmp_path / "copy").iterdir())
    sql = stop_and_read(server)
    try:
        loss = stored.history(sql, run_id, "loss")
        assert loss == [(s, 1_000 + s, 1 / (s + 1)) for s in range(steps)]
        assert [p[2] for p in stored.history(sql, run_id, "acc")] == [s / steps for s in range(steps)]
        # Stored twice, unless insert deduplication recognised the second copy; read once either way.
        assert steps <= stored.raw_rows(sql, run_id, "loss") <= 2 * steps
        assert sql.query(
            "SELECT DISTINCT rank, node, attempt FROM trackhouse.metrics WHERE run_id = {r:String}",
            parameters={"r": run_id},
        ).result_rows == [(3, socket.gethostname(), 0)]
        assert sql.query(
            "SELECT DISTINCT key, value FROM trackhouse.params WHERE run_id = {r:String}", parameters={"r": run_id}
        ).result_rows == [("seed", "7")]
        tags = sql.query(
            "SELECT key, value FROM trackhouse.tags FINAL WHERE run_id = {r:String} ORDER BY key",
            parameters={"r": run_id},
        ).result_rows
        assert tags == [("mlflow.runName", f"run-{run_id[:8]}"), ("team", "vision")]
        assert sql.query(
            "SELECT status FROM trackhouse.runs FINAL WHERE run_id = {r:String}", parameters={"r": run_id}
        ).result_rows == [("RUNNING",)]
    finally:
        sql.close()
