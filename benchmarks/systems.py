"""The systems the harness compares, each started fresh on free ports in its own temporary directory.

Every server runs in its own process group, so `stop()` (also on Ctrl-C) leaves nothing behind.
Correctness is read back after the servers stop: trackhouse from its ClickHouse tables with SQL,
stock MLflow from its SQLite store.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from benchmarks.ingest import ROOT, ServerUnderTest
from tests.tansu import KafkaBroker, free_port

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root_pid: int) -> float:
    """User plus system CPU of a process and all its descendants, from /proc."""
    total, stack, seen = 0.0, [root_pid], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
            for task in Path(f"/proc/{pid}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


class System(Protocol):
    #: Short name used in tables and file names.
    name: str
    #: "trackhouse" clients use ingest.client; "mlflow" clients use MlflowClient.
    client_kind: str
    #: What the client processes connect to.
    endpoint: str
    #: The HTTP base URL serving trackhouse's rank API (/api/2.0/trackhouse/), or "" where there is none.
    rank_api: str

    def start(self, workdir: Path) -> None: ...

    def wait_stored(self, points: int) -> None:
        """Return once `points` more points than at start are stored (a no-op where acknowledged means stored)."""

    def server_cpu_seconds(self) -> float: ...

    def stop(self) -> None: ...

    def stored_points(self, run_ids: Sequence[str]) -> tuple[int, int]:
        """(distinct points, raw rows) stored for `run_ids`. Call after stop().

        Both are needed: distinct alone passes when a request was stored three times, and a raw count
        alone passes when one point is missing and another doubled."""
        ...


class TrackhouseGrpc:
    name = "trackhouse-grpc"
    client_kind = "trackhouse"

    def __init__(self) -> None:
        self.endpoint = ""
        self.rank_api = ""
        self._server: ServerUnderTest | None = None
        self._data = Path()

    def start(self, workdir: Path) -> None:
        self._data = workdir / "trackhouse"
        self._server = ServerUnderTest(self._data)
        self.endpoint = self._server.target
        self.rank_api = self._server.http

    def wait_stored(self, points: int) -> None:
        pass  # the client's close() returns after every point is acknowledged, which means inserted

    def server_cpu_seconds(self) -> float:
        return tree_cpu_seconds(self._server.process.pid) if self._server else 0.0

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def stored_points(self, run_ids: Sequence[str]) -> tuple[int, int]:
        return count_in_clickhouse(self._data, run_ids)


class TrackhouseKafka:
    """client -> gateway (gRPC) -> Tansu broker -> worker -> chDB, each its own process."""

    name = "trackhouse-kafka"
    client_kind = "trackhouse"

    def __init__(self) -> None:
        self.endpoint = ""
        self.rank_api = ""
        self._broker: KafkaBroker | None = None
        self._gateway: ServerUnderTest | None = None
        self._worker: ServerUnderTest | None = None
        self._data = Path()
        self._baseline = 0

    def start(self, workdir: Path) -> None:
        self._broker = KafkaBroker(workdir / "tansu.log")
        self._broker.start()
        args = ("--kafka-bootstrap", self._broker.bootstrap, "--kafka-partitions", "4")
        self._data = workdir / "worker"
        self._worker = ServerUnderTest(self._data, "--role", "worker", *args)
        self._gateway = ServerUnderTest(workdir / "gateway", "--role", "gateway", *args)
        self.endpoint = self._gateway.target
        self.rank_api = self._worker.http  # a worker stores, so it serves the read API
        self._baseline = self._worker.inserted_points()

    def wait_stored(self, points: int) -> None:
        assert self._worker is not None
        deadline = time.monotonic() + 600
        while self._worker.inserted_points() < self._baseline + points:
            if time.monotonic() > deadline:
                raise RuntimeError("the Kafka worker did not store every point within 10 minutes")
            time.sleep(0.05)

    def server_cpu_seconds(self) -> float:
        pids = [p.process.pid for p in (self._gateway, self._worker) if p is not None]
        if self._broker is not None and self._broker.process is not None:
            pids.append(self._broker.process.pid)
        return sum(tree_cpu_seconds(pid) for pid in pids)

    def stop(self) -> None:
        for server in (self._gateway, self._worker):
            if server is not None:
                server.stop()
        self._gateway = self._worker = None
        if self._broker is not None:
            self._broker.stop()
            self._broker = None

    def stored_points(self, run_ids: Sequence[str]) -> tuple[int, int]:
        return count_in_clickhouse(self._data, run_ids)


class StockMlflow:
    """`mlflow server` on SQLite, the usual self-hosted set-up."""

    name = "mlflow-sqlite"
    client_kind = "mlflow"

    def __init__(self) -> None:
        self.endpoint = ""
        self.rank_api = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._db = Path()

    def start(self, workdir: Path) -> None:
        self._db = workdir / "mlflow.db"
        # MLflow's default workers: a fair baseline is the stock set-up.
        self._process, self.endpoint = start_stock_mlflow(workdir)

    def wait_stored(self, points: int) -> None:
        pass  # log_batch returns after the SQLite commit

    def server_cpu_seconds(self) -> float:
        return tree_cpu_seconds(self._process.pid) if self._process else 0.0

    def stop(self) -> None:
        if self._process is not None:
            stop_stock_mlflow(self._process)
        self._process = None

    def stored_points(self, run_ids: Sequence[str]) -> tuple[int, int]:
        # MLflow's primary key spans (key, timestamp, step, run_uuid, value, is_nan): rows are distinct points.
        with sqlite3.connect(self._db) as db:
            marks = ",".join("?" * len(run_ids))
            row = db.execute(f"SELECT COUNT(*) FROM metrics WHERE run_uuid IN ({marks})", list(run_ids)).fetchone()
        return int(row[0]), int(row[0])


def start_stock_mlflow(
    workdir: Path,
    workers: int | None = None,
    artifact_root: bool = True,
    timeout_s: float = 600,
    settle: bool = True,
) -> tuple[subprocess.Popen[bytes], str]:
    """A stock `mlflow server` on SQLite and a free port, healthy: (process, base URL). It can take minutes to start
    on a loaded 2-core machine. Without `artifact_root`, stock's default applies: artifacts proxied under
    `mlflow-artifacts:/`. One worker suits callers that send one request at a time: on a busy machine uvicorn's
    health check kills a slowly starting worker of several (seen here).

    With `settle`, it also waits until the server's processes are quiet (settled). MLflow's server (3.17.2 here) answers
    /health while its job runner is still starting seven huey consumers, each importing MLflow: here they kept both
    cores busy for about 10 s after /health first answered (2.0 s of CPU per second, then about 25 ms idle). A
    benchmark that measured in that window would charge stock for its own start-up; a test need not wait."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}"]
    if workers is not None:
        command += ["--workers", str(workers)]
    if artifact_root:
        command += ["--default-artifact-root", str(workdir / "artifacts")]
    log_path = workdir / "mlflow.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                break
        except OSError:
            time.sleep(0.25)
    else:
        stop_stock_mlflow(process)
        raise RuntimeError(f"stock mlflow server did not start:\n{log_path.read_text()[-2000:]}")
    if settle and not settled(process.pid, deadline - time.monotonic()):
        stop_stock_mlflow(process)
        raise RuntimeError(f"stock mlflow server did not settle in {timeout_s:.0f} s")
    return process, url


#: A server is settled once its processes use less than this share of one core over SETTLE_WINDOW_S (idle, stock
#: MLflow's use about 0.025 and trackhouse's about 0.02).
SETTLE_CPU_SHARE = 0.1
SETTLE_WINDOW_S = 1.0


def cpu_share(pid: int, seconds: float) -> float:
    """The cores process `pid` and its descendants kept busy over the next `seconds`, on average."""
    before = tree_cpu_seconds(pid)
    time.sleep(seconds)
    return (tree_cpu_seconds(pid) - before) / seconds


def settled(pid: int, timeout_s: float) -> bool:
    """Wait until process `pid` and its descendants are quiet (see SETTLE_CPU_SHARE); False if not within
    `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cpu_share(pid, SETTLE_WINDOW_S) < SETTLE_CPU_SHARE:
            return True
    return False


def stop_stock_mlflow(process: subprocess.Popen[bytes]) -> None:
    """Stop the server and every process it started (it runs in its own session)."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def count_in_clickhouse(data_dir: Path, run_ids: Sequence[str]) -> tuple[int, int]:
    """(distinct points, raw rows), counted in a child process: chDB opens one directory per process."""
    script = (
        "import json, sys\n"
        "from trackhouse.query.connection import StoreConfig, connect\n"
        "client = connect(StoreConfig.for_data_dir(__import__('pathlib').Path(sys.argv[1])))\n"
        "r = json.loads(sys.stdin.read())\n"
        "where = 'FROM trackhouse.metrics WHERE run_id IN {r:Array(String)}'\n"
        "q = f'SELECT (SELECT count() FROM (SELECT DISTINCT * {where})), (SELECT count() {where})'\n"
        "print(*client.query(q, parameters={'r': r}).result_rows[0])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(data_dir)],
        input=json.dumps(list(run_ids)),
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
        timeout=300,
    )
    distinct, raw = result.stdout.split()
    return int(distinct), int(raw)


SYSTEMS: dict[str, type[TrackhouseGrpc] | type[TrackhouseKafka] | type[StockMlflow]] = {
    "grpc": TrackhouseGrpc,
    "kafka": TrackhouseKafka,
    "mlflow": StockMlflow,
}
