"""Issue 11 finding 5: concurrent creates and renames never leave two live experiments with one name (one node)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import requests

from tests.conftest import RunningServer
from tests.test_ingest_grpc import raw_write
from trackhouse.ingest.codec import encode_request
from trackhouse.v1 import ingest_pb2

LIVE = "FROM trackhouse.experiments FINAL WHERE name = {n:String} AND lifecycle_stage = 'active'"
LIVE_WITH_NAME = f"SELECT count() {LIVE}"


def _post(server: RunningServer, path: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(f"{server.http_url}/api/2.0/mlflow/{path}", json=body, timeout=60)


def _all_at_once(calls: list[Callable[[], Any]]) -> list[Any]:
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], Any]) -> Any:
        barrier.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def _rename(server: RunningServer, experiment_id: str, name: str) -> requests.Response:
    return _post(server, "experiments/update", {"experiment_id": experiment_id, "new_name": name})


def _create(server: RunningServer, name: str) -> str:
    response = _post(server, "experiments/create", {"name": name})
    assert response.status_code == 200, response.text
    return str(response.json()["experiment_id"])


def test_concurrent_renames_to_one_name_leave_one_experiment(server: RunningServer) -> None:
    for round_ in range(3):
        ids = [_create(server, f"r{round_}-{i}") for i in range(8)]
        target = f"taken-{round_}"
        answers = _all_at_once([partial(_rename, server, i, target) for i in ids])
        statuses = sorted(a.status_code for a in answers)
        assert statuses.count(200) == 1, [a.text for a in answers]
        refused = [a.json()["error_code"] for a in answers if a.status_code != 200]
        assert set(refused) == {"RESOURCE_ALREADY_EXISTS"}
        assert server.scalar(LIVE_WITH_NAME, n=target) == 1


def test_concurrent_creates_and_renames_to_one_name_leave_one_experiment(server: RunningServer) -> None:
    for round_ in range(3):
        ids = [_create(server, f"c{round_}-{i}") for i in range(4)]
        target = f"contested-{round_}"
        calls: list[Callable[[], Any]] = [partial(_rename, server, i, target) for i in ids]
        calls += [partial(_post, server, "experiments/create", {"name": target}) for _ in range(4)]
        answers = _all_at_once(calls)
        assert [a.status_code for a in answers].count(200) == 1, [a.text for a in answers]
        assert server.scalar(LIVE_WITH_NAME, n=target) == 1


def test_grpc_creation_by_name_and_rest_renames_agree(start_server: Callable[..., RunningServer]) -> None:
    # A long flush interval keeps the gRPC-created experiment in flight while the REST calls check the name.
    server = start_server(flush_interval_ms=1_500)
    write = raw_write(server.target)
    for round_ in range(3):
        target = f"by-name-{round_}"
        ids = [_create(server, f"g{round_}-{i}") for i in range(4)]
        run = ingest_pb2.RunUpsert(
            run_id=f"{round_:02d}" * 16, experiment_name=target, status=ingest_pb2.RUNNING, version=1
        )
        calls: list[Callable[[], Any]] = [
            partial(write, encode_request(ingest_pb2.WriteRequest(runs=[run]), []), timeout=60)
        ]
        calls += [partial(_rename, server, i, target) for i in ids]
        answers = _all_at_once(calls)
        assert [a.status_code for a in answers[1:]].count(200) <= 1
        assert server.scalar(LIVE_WITH_NAME, n=target) == 1
        # The run landed in the one experiment of that name.
        experiment = server.scalar(
            "SELECT experiment_id FROM trackhouse.runs FINAL WHERE run_id = {r:String}", r=run.run_id
        )
        named = server.scalar(f"SELECT experiment_id {LIVE}", n=target)
        assert experiment == named
