"""Real components on free loopback ports: embedded chDB, a grpc.aio server, the real client.

chDB allows one data directory per process at a time, so a test's SQL client
shares the directory of the server it checks, and closes before the next test.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from tests.clickhouse_http import ClickHouseHttp
from tests.serving import wait_until_ready
from tests.tansu import KafkaBroker, free_port
from trackhouse.ingest.config import BatcherConfig, KafkaConfig, ReceiverConfig
from trackhouse.ingest.receiver_grpc import GrpcConfig
from trackhouse.query import schema
from trackhouse.query.connection import Client, StoreConfig, connect
from trackhouse.server import Server, ServerConfig

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class RunningServer:
    """A Server on its own event loop thread, plus a SQL client on the same chDB directory."""

    server: Server
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    sql: Client | None  # None for a gateway, which has no storage
    data_dir: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    def rows(self, query: str, **parameters: Any) -> list[tuple[Any, ...]]:
        assert self.sql is not None, "this server has no storage"
        return list(self.sql.query(query, parameters=parameters).result_rows)

    def scalar(self, query: str, **parameters: Any) -> Any:
        return self.rows(query, **parameters)[0][0]

    def call(self, coro: Any, timeout: float = 60) -> Any:
        """Run a coroutine on the server's loop, from the test thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.call(self.server.stop())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def start_in_process(
    data_dir: Path,
    role: str = "all",
    kafka: KafkaConfig | None = None,
    network: dict[str, Any] | None = None,
    **overrides: Any,
) -> RunningServer:
    """`network`: ServerConfig's auth, TLS, host and CORS fields (auth_file=..., tls_cert=..., ...).

    `artifacts_destination` (default: `data_dir/artifacts`) may be any directory or URI, such as another
    server's `.../api/2.0/mlflow-artifacts/artifacts`; the other overrides are BatcherConfig's.
    """
    config = ServerConfig(
        store=StoreConfig.for_data_dir(data_dir),
        grpc=GrpcConfig(
            port=0, max_message_bytes=overrides.pop("max_message_bytes", ReceiverConfig().max_message_bytes)
        ),
        http_port=0,
        artifacts_destination=overrides.pop("artifacts_destination", str(data_dir / "artifacts")),
        batcher=replace(BatcherConfig(flush_interval_ms=50), **overrides),
        role=role,
        kafka=kafka,
        **(network or {}),
    )
    server = Server(config)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True, name="test-server")
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(60)
    sql = connect(config.store) if config.stores else None
    return RunningServer(server, loop, thread, sql, data_dir)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    """Factory: start_server(role=..., kafka=..., data_dir=..., artifacts_destination=..., max_message_bytes=...,
    **BatcherConfig overrides)."""
    started: list[RunningServer] = []

    def start(data_dir: Path | None = None, **overrides: Any) -> RunningServer:
        running = start_in_process(data_dir or tmp_path / f"data{len(started)}", **overrides)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
        if running.sql is not None:
            running.sql.close()


@pytest.fixture(autouse=True)
def _fresh_mlflow_fluent_state() -> Iterator[None]:
    """MLflow's fluent API keeps process-wide state: the active experiment (also exported as MLFLOW_EXPERIMENT_ID)
    and the active-run stack. One test's experiment, on a server that is gone, must not become the next test's
    default: with two pytest workers each process runs other tests before this one than a single process does."""
    exported = os.environ.get("MLFLOW_EXPERIMENT_ID")
    yield
    if "mlflow.tracking.fluent" not in sys.modules:
        return  # this test never touched MLflow's fluent API: nothing to reset, and nothing worth importing
    from mlflow.tracking import fluent

    fluent._active_experiment_id = None
    fluent._active_run_stack.reset()  # type: ignore[no-untyped-call]  # not end_run(): its server may be gone
    if exported is None:
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    else:
        os.environ["MLFLOW_EXPERIMENT_ID"] = exported


@pytest.fixture
def server(start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server()


@dataclass
class ServerProcess:
    """`trackhouse serve` as a child process on fixed ports, so a restart keeps its address."""

    data_dir: Path
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    extra_args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> None:
        args = [sys.executable, "-m", "trackhouse.cli", "serve", "--data-dir", str(self.data_dir)]
        args += ["--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port), *self.extra_args]
        log_path = self.data_dir.with_suffix(".log")
        offset = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("a") as log:  # a file, not a pipe: the child can never block on its output
            self.process = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
        wait_until_ready(self.process, log_path, offset)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)

    def sql(self) -> Client:
        """A SQL client on the data directory; only while no server process holds it."""
        assert self.process is None or self.process.poll() is not None
        return connect(StoreConfig.for_data_dir(self.data_dir))


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path / "data")
    yield proc
    if proc.process is not None and proc.process.poll() is None:
        proc.kill()


@pytest.fixture(scope="module")
def clickhouse_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseHttp]:
    """A ClickHouse HTTP endpoint (chDB behind tests/clickhouse_http.py) in a child process, for one test module."""
    root = tmp_path_factory.mktemp("clickhouse_http")
    server = ClickHouseHttp(root / "data", root / "log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def kafka_broker(tmp_path: Path) -> Iterator[KafkaBroker]:
    broker = KafkaBroker(tmp_path / "tansu.log")
    broker.start()
    yield broker
    broker.stop()


def wait_until(predicate: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@contextmanager
def insert_running(
    runner: Client, watcher: Client, statement: str, parameters: dict[str, Any] | None = None
) -> Iterator[None]:
    """Within: `statement`, a slow insert (`sleepEachRow`) that `runner` runs in a thread, has begun, as `watcher` sees
    in the server's process list; on exit it has ended. The tests that force a claim race (query.claims) stamp a
    rival's claim this way, before their own and committed after it."""
    thread = threading.Thread(target=lambda: runner.command(statement, parameters=parameters))
    thread.start()
    try:
        running = "SELECT count() FROM system.processes WHERE query_kind = 'Insert' AND query LIKE '%sleepEachRow%'"
        wait_until(lambda: watcher.command(running) == 1, timeout=10, what="the slow insert to be running")
        yield
    finally:
        thread.join(30)


@pytest.fixture
def sql(tmp_path: Path) -> Iterator[Client]:
    """An embedded chDB store with the schema migrated into database `trackhouse`, in this test's own directory."""
    client = connect(StoreConfig.for_data_dir(tmp_path / "data"))
    schema.migrate(client, "trackhouse")
    yield client
    client.close()
