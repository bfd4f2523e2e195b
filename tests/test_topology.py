"""Several trackhouse processes over one shared ClickHouse, as a scale-out deployment runs them. No mocks.

The store is chDB behind tests/clickhouse_http.py, a test-only endpoint speaking ClickHouse's HTTP interface, so
every node uses the `http://` storage path. The broker is Tansu. Every node is a separate `trackhouse serve`
process, started once for the module:

- gateway: gRPC in, Kafka out;
- worker: Kafka in, ClickHouse out (and the MLflow API, writing directly);
- writer: `--role all` without Kafka, a second node that stores (the other side of the param race);
- reader: the MLflow API and UI, read-only.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tests.clickhouse_http import ClickHouseHttp
from tests.conftest import ROOT, insert_running, wait_until
from tests.serving import wait_until_ready
from tests.tansu import KafkaBroker, free_port
from trackhouse import Client, ClientConfig
from trackhouse.ingest.batch import Batch, ParamRow
from trackhouse.ingest.catalog import Catalog
from trackhouse.ingest.errors import PermanentError, RetryableError
from trackhouse.ingest.sink import ClickHouseSink
from trackhouse.query.connection import Client as SqlClient
from trackhouse.query.connection import StoreConfig, connect

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@dataclass
class Node:
    """One `trackhouse serve` process on fixed ports, so that a restart keeps its address."""

    name: str
    directory: Path
    args: tuple[str, ...]
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    _offset: int = 0

    @property
    def log_path(self) -> Path:
        return self.directory.with_suffix(".log")

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def launch(self) -> None:
        command = [sys.executable, "-m", "trackhouse.cli", "serve", "--data-dir", str(self.directory)]
        command += ["--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port), *self.args]
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})

    def wait_ready(self) -> None:
        assert self.process is not None
        wait_until_ready(self.process, self.log_path, self._offset, timeout=120)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"{self.http_url}/metrics", timeout=30) as response:
            text = response.read().decode()
        match = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0


@dataclass
class Topology:
    clickhouse: ClickHouseHttp
    broker: KafkaBroker
    gateway: Node
    worker: Node
    writer: Node
    reader: Node
    sql: SqlClient

    def mlflow(self, node: Node) -> MlflowClient:
        return MlflowClient(tracking_uri=node.http_url)


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    root = tmp_path_factory.mktemp("topology")
    clickhouse = ClickHouseHttp(root / "clickhouse", root / "clickhouse.log")
    broker = KafkaBroker(root / "tansu.log")
    clickhouse.start()
    broker.start()
    store = ("--clickhouse-url", clickhouse.url)
    kafka = ("--kafka-bootstrap", broker.bootstrap, "--kafka-partitions", "4")
    batching = ("--flush-points", "5000", "--flush-interval-ms", "50")
    worker = Node("worker", root / "worker", ("--role", "worker", *store, *kafka, *batching))
    nodes = [
        worker,
        Node("gateway", root / "gateway", ("--role", "gateway", *kafka)),
        Node("writer", root / "writer", ("--role", "all", *store, *batching)),
        Node("reader", root / "reader", ("--role", "reader", *store)),
    ]
    sql = None
    try:
        for node in nodes:  # all at once: every storing node migrates, and migrating concurrently is safe
            node.launch()
        for node in nodes:
            node.wait_ready()
        sql = connect(StoreConfig(clickhouse.url))
        yield Topology(clickhouse, broker, nodes[1], worker, nodes[2], nodes[3], sql)
    finally:
        if sql is not None:
            sql.close()
        for node in nodes:  # nothing is checked at shutdown (tests/test_process.py covers draining)
            node.kill()
        broker.stop()
        clickhouse.stop()


def test_a_point_logged_through_the_gateway_is_read_through_the_reader(topology: Topology) -> None:
    with Client(topology.gateway.target) as client:
        run = client.start_run(experiment="topology-read", name="through-kafka", params={"lr": 0.01})
        for step in range(5):
            run.log_metrics({"loss": 1.0 / (step + 1), "acc": step / 10}, step=step)
        run.finish()
    reader = topology.mlflow(topology.reader)

    def stored() -> bool:
        try:
            return len(reader.get_metric_history(run.run_id, "loss")) == 5 and (
                reader.get_run(run.run_id).info.status == "FINISHED"
            )
        except MlflowException:  # the run is not stored yet
            return False

    wait_until(stored, what="the reader to see what the gateway acknowledged")
    found = reader.get_run(run.run_id)
    assert found.data.params == {"lr": "0.01"}
    assert found.data.metrics == {"loss": 0.2, "acc": 0.4}
    assert [(m.step, m.value) for m in reader.get_metric_history(run.run_id, "loss")] == [
        (step, 1.0 / (step + 1)) for step in range(5)
    ]
    experiment = reader.get_experiment_by_name("topology-read")
    assert experiment is not None and experiment.experiment_id == found.info.experiment_id
    # The reader is read-only: a write gets MLflow's JSON error, not a silent drop.
    refused = requests.post(
        f"{topology.reader.http_url}/api/2.0/mlflow/runs/log-parameter",
        json={"run_id": run.run_id, "key": "other", "value": "1"},
        timeout=30,
    )
    assert refused.status_code == 400 and "read-only" in refused.json()["message"]


def test_a_write_acknowledged_by_one_node_is_read_at_once_on_another(topology: Topology) -> None:
    """Readers keep no cache: an acknowledged REST write on one node is in the reader's very next answer."""
    writer = topology.mlflow(topology.writer)
    reader = topology.mlflow(topology.reader)
    experiment_id = writer.create_experiment("topology-fresh")
    run = writer.create_run(experiment_id)
    for i in range(3):
        writer.set_tag(run.info.run_id, "phase", f"p{i}")
        assert reader.get_run(run.info.run_id).data.tags["phase"] == f"p{i}"
    writer.set_terminated(run.info.run_id)
    assert reader.get_run(run.info.run_id).info.status == "FINISHED"
    writer.delete_run(run.info.run_id)
    assert reader.get_run(run.info.run_id).info.lifecycle_stage == "deleted"


def test_a_param_changed_from_two_nodes_at_once_is_refused(topology: Topology) -> None:
    worker, writer = topology.mlflow(topology.worker), topology.mlflow(topology.writer)
    reader = topology.mlflow(topology.reader)
    run_id = worker.create_run(worker.create_experiment("topology-params")).info.run_id
    for i in range(6):
        key = f"lr{i}"
        outcomes = _at_once(
            {
                "worker": partial(worker.log_param, run_id, key, "0.1"),
                "writer": partial(writer.log_param, run_id, key, "0.2"),
            }
        )
        assert sorted(outcomes.values()) == ["INVALID_PARAMETER_VALUE", "ok"], (key, outcomes)
        winner = "0.1" if outcomes["worker"] == "ok" else "0.2"
        assert reader.get_run(run_id).data.params[key] == winner
        assert worker.get_run(run_id).data.params[key] == winner
        assert writer.get_run(run_id).data.params[key] == winner
        # The loser's node has learnt the winner: logging it again is fine there, the other value is not.
        loser = writer if outcomes["writer"] != "ok" else worker
        loser.log_param(run_id, key, winner)
        with pytest.raises(MlflowException, match="Changing param values is not allowed"):
            loser.log_param(run_id, key, "0.3")


@contextmanager
def _slow_rival_claim(topology: Topology, insert: str, run_id: str) -> Iterator[None]:
    """Within: `insert` (a claim stamped with now64 as it begins) is running, and commits about two seconds later."""
    rival = connect(StoreConfig(topology.clickhouse.url))  # its own session: the stand-in runs one query per session
    try:
        with insert_running(rival, topology.sql, insert, {"run": run_id}):
            yield
    finally:
        rival.close()


def test_a_param_claim_stamped_earlier_but_committed_later_still_wins(topology: Topology) -> None:
    """The race two nodes logging one param at once can hit, forced: a rival insert is stamped (claimed_at, by
    ClickHouse as it begins) before the writer's claim but commits after the writer's own insert. Reading back at
    once, the writer saw only its own claim and was told it won while every read returned the rival's value (CI saw
    both racing writers told "ok" once). It waits for the inserts begun before its read-back."""
    writer, reader = topology.mlflow(topology.writer), topology.mlflow(topology.reader)
    run_id = writer.create_run(writer.create_experiment("topology-late-claim")).info.run_id
    rival = (
        "INSERT INTO trackhouse.params (run_id, key, value, claimed_at)"
        " SELECT {run:String}, 'lr', '0.1', now64(9) FROM numbers(1) WHERE sleepEachRow(2) = 0"
    )
    refused = pytest.raises(MlflowException, match="Changing param values is not allowed")
    with _slow_rival_claim(topology, rival, run_id), refused:
        writer.log_param(run_id, "lr", "0.2")
    assert reader.get_run(run_id).data.params["lr"] == "0.1"
    assert writer.get_run(run_id).data.params["lr"] == "0.1"
    writer.log_param(run_id, "lr", "0.1")  # the writer's node learnt the winner


def test_an_attempt_claim_stamped_earlier_but_committed_later_keeps_its_number(topology: Topology) -> None:
    """The same race for attempt numbers: the rival's claim of attempt 1 is stamped first and commits last, so the
    writer's resume, which claims 1 meanwhile, must lose it and take 2."""
    writer = topology.mlflow(topology.writer)
    run_id = writer.create_run(writer.create_experiment("topology-late-attempt")).info.run_id
    rival = (
        "INSERT INTO trackhouse.run_attempts (run_id, attempt, started_at, claimed_by, claimed_at)"
        " SELECT {run:String}, 1, 0, 'rival', now64(9) FROM numbers(1) WHERE sleepEachRow(2) = 0"
    )
    with _slow_rival_claim(topology, rival, run_id):
        answer = requests.post(
            f"{topology.writer.http_url}/api/2.0/trackhouse/runs/resume", json={"run_id": run_id}, timeout=60
        )
    assert answer.status_code == 200, answer.text
    assert answer.json()["attempt"] == 2


def test_a_run_deleted_on_one_node_is_refused_by_another_nodes_writes_within_the_cache_bound(
    topology: Topology,
) -> None:
    """The writer has the run cached as live; the worker deletes it. The writer's cache entry expires after
    --catalog-cache-seconds, so its writes are refused from then on (without expiry they would be taken forever)."""
    writer, worker = topology.mlflow(topology.writer), topology.mlflow(topology.worker)
    run_id = writer.create_run(writer.create_experiment("topology-delete")).info.run_id
    writer.log_metric(run_id, "loss", 1.0, step=0)  # the writer now knows the run is live
    worker.delete_run(run_id)

    def refused() -> bool:
        try:
            writer.log_metric(run_id, "loss", 2.0, step=1)
        except MlflowException as exc:
            assert exc.error_code == "INVALID_PARAMETER_VALUE" and "must be in the 'active' state" in exc.message
            return True
        return False

    wait_until(refused, timeout=30, what="the writer to notice the other node's delete")


def test_one_experiment_name_created_on_two_nodes_at_once_is_one_experiment(topology: Topology) -> None:
    """Ids derive from the name, so both nodes write the same experiment: one live experiment, one id for all."""
    worker, writer = topology.mlflow(topology.worker), topology.mlflow(topology.writer)
    ids: dict[str, str] = {}

    def create(node: str, client: MlflowClient) -> None:
        ids[node] = client.create_experiment("topology-same-name")

    outcomes = _at_once({"worker": partial(create, "worker", worker), "writer": partial(create, "writer", writer)})
    assert "ok" in outcomes.values() and set(outcomes.values()) <= {"ok", "RESOURCE_ALREADY_EXISTS"}, outcomes
    live = topology.mlflow(topology.reader).search_experiments(filter_string="name = 'topology-same-name'")
    assert [e.experiment_id for e in live] == sorted(set(ids.values()))


def test_one_run_resumed_on_two_nodes_at_once_gets_two_attempt_numbers(topology: Topology) -> None:
    """Both nodes read the same highest attempt and claim the next; the earlier claim keeps it (migration 14), the
    other node takes the one after, so two jobs resuming one run never write under one attempt."""
    worker = topology.mlflow(topology.worker)
    run_id = worker.create_run(worker.create_experiment("topology-resume")).info.run_id
    attempts: dict[str, int] = {}

    def resume(node: str, url: str) -> None:
        answer = requests.post(f"{url}/api/2.0/trackhouse/runs/resume", json={"run_id": run_id}, timeout=60)
        assert answer.status_code == 200, answer.text
        attempts[node] = int(answer.json()["attempt"])

    numbers: list[int] = []
    for _ in range(4):
        outcomes = _at_once(
            {
                "worker": partial(resume, "worker", topology.worker.http_url),
                "writer": partial(resume, "writer", topology.writer.http_url),
            }
        )
        assert outcomes == {"worker": "ok", "writer": "ok"}, outcomes
        numbers += attempts.values()
    assert sorted(numbers) == list(range(1, 9))


def _at_once(calls: dict[str, Callable[[], object]]) -> dict[str, str]:
    """Run the calls at the same moment, one thread each: name -> "ok" or the MLflow error code."""
    outcomes: dict[str, str] = {}
    barrier = threading.Barrier(len(calls))

    def run(name: str, call: Callable[[], object]) -> None:
        barrier.wait()
        try:
            call()
            outcomes[name] = "ok"
        except MlflowException as exc:
            outcomes[name] = exc.error_code

    threads = [threading.Thread(target=run, args=item) for item in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return outcomes


def test_the_worker_killed_mid_batch_loses_nothing_and_duplicates_nothing(topology: Topology) -> None:
    runs, steps, keys = 4, 1_500, 3
    client = Client(topology.gateway.target, ClientConfig(request_points=1_500))
    run_ids: list[str] = []

    def log() -> None:
        started = [client.start_run(experiment="topology-kill", name=f"k{i}") for i in range(runs)]
        run_ids.extend(r.run_id for r in started)
        for step in range(steps):
            for run in started:
                run.log_metrics({f"m{k}": step + k / 10 for k in range(keys)}, step=step)
        client.flush(timeout=120)

    worker = topology.worker
    committed = worker.metric("trackhouse_kafka_committed_messages_total")
    inserted = worker.metric("trackhouse_inserted_points_total")
    writer = threading.Thread(target=log)
    writer.start()
    wait_until(
        lambda: (
            worker.metric("trackhouse_inserted_points_total") > inserted + 3_000
            and worker.metric("trackhouse_kafka_committed_messages_total") > committed
        ),
        what="the worker to insert and commit part of the stream",
    )
    worker.kill()
    writer.join(180)
    client.close()
    worker.launch()
    worker.wait_ready()
    expected = runs * steps * keys
    distinct = "SELECT count() FROM trackhouse.metrics FINAL WHERE run_id IN {runs:Array(String)}"
    wait_until(
        lambda: topology.sql.query(distinct, parameters={"runs": run_ids}).result_rows[0][0] == expected,
        timeout=120,
        what="every point stored after the restart",
    )
    reader = topology.mlflow(topology.reader)
    for run_id in run_ids:
        for k in range(keys):
            history = reader.get_metric_history(run_id, f"m{k}")
            assert [(m.step, m.value) for m in history] == [(s, s + k / 10) for s in range(steps)], (run_id, k)
    assert topology.sql.query(distinct, parameters={"runs": run_ids}).result_rows[0][0] == expected


def test_storage_errors_over_http_map_to_permanent_and_retryable(topology: Topology, tmp_path: Path) -> None:
    """ClickHouse's error responses (status, X-ClickHouse-Exception-Code, text) reach the sink's one mapping."""
    run_param = Batch(params=(ParamRow("r", "k", "v"),))
    sink = ClickHouseSink(connect(StoreConfig(topology.clickhouse.url)), "no_such_database")
    with pytest.raises(PermanentError, match="UNKNOWN_DATABASE"):
        sink.write(run_param)
    sink.close()
    # A server that goes away mid-life: the driver's connection error is retryable.
    spare = ClickHouseHttp(tmp_path / "spare", tmp_path / "spare.log")
    spare.start()
    sink = ClickHouseSink(connect(StoreConfig(spare.url)), "trackhouse")
    node = Catalog(connect(StoreConfig(spare.url)), "trackhouse", 100)
    spare.stop()
    with pytest.raises(RetryableError, match="storage unavailable"):
        sink.write(run_param)
    sink.close()
    # The catalog's lookups before a write (does the run exist?) fail the same way: retry, never refuse the data.
    with pytest.raises(RetryableError, match="storage unavailable during the catalog's lookup"):
        asyncio.run(node.resolve(run_param))
