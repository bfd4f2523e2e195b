"""Issue 11 finding 8: every number a client sends is range-checked (400 INVALID_PARAMETER_VALUE, never a 500),
run name and user are bounded on gRPC as on REST, and row versions are the server's to bound."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import grpc
import pytest
import requests
from mlflow.tracking import MlflowClient

from tests.conftest import RunningServer
from tests.test_ingest_grpc import raw_write
from trackhouse.ingest import validation
from trackhouse.ingest.codec import MAX_VERSION_LEAD_NS, encode_request
from trackhouse.v1 import ingest_pb2

TOP = 2**64 - 1


def _token(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode()


def _get(server: RunningServer, path: str, **params: Any) -> requests.Response:
    return requests.get(f"{server.http_url}/api/2.0/mlflow/{path}", params=params, timeout=60)


def _post(server: RunningServer, path: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(f"{server.http_url}/api/2.0/mlflow/{path}", json=body, timeout=60)


def _assert_invalid(response: requests.Response, what: str) -> None:
    assert response.status_code == 400, (what, response.status_code, response.text)
    assert response.json()["error_code"] == "INVALID_PARAMETER_VALUE", what


@pytest.fixture
def run_id(server: RunningServer) -> str:
    client = MlflowClient(tracking_uri=server.http_url)
    run = client.create_run("0")
    for step in range(5):
        client.log_metric(run.info.run_id, "loss", step / 10, step=step)
    return str(run.info.run_id)


HISTORY_TOKENS = [
    _token([2**64, 0, (1.0).hex()]),  # was a 500: OverflowError binding Int64
    _token([2**63, 0, (1.0).hex()]),  # was silently wrapped to -2**63
    _token([-(2**63) - 1, 0, (1.0).hex()]),
    _token([0, 2**63, (1.0).hex()]),
    _token([True, 0, (1.0).hex()]),
    _token([1e300, 0, (1.0).hex()]),
    _token(["1", 0, (1.0).hex()]),
    _token([1, 0, 5]),
    _token([1, 0, "zz"]),
    _token({"offset": 1}),
    _token([1, 0]),
    "not-base64!!",
    _token([1, 0, (1.0).hex()]) + "A" * 1000,
]


@pytest.mark.parametrize("token", HISTORY_TOKENS)
def test_crafted_history_page_tokens_are_invalid(server: RunningServer, run_id: str, token: str) -> None:
    response = _get(server, "metrics/get-history", run_id=run_id, metric_key="loss", max_results=2, page_token=token)
    _assert_invalid(response, token)


def test_a_real_history_token_still_pages(server: RunningServer, run_id: str) -> None:
    first = _get(server, "metrics/get-history", run_id=run_id, metric_key="loss", max_results=2).json()
    rest = _get(
        server, "metrics/get-history", run_id=run_id, metric_key="loss", page_token=first["next_page_token"]
    ).json()
    assert [m["step"] for m in first["metrics"] + rest["metrics"]] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("metrics/get-history", {"max_results": 0}),
        ("metrics/get-history", {"max_results": -1}),
        ("metrics/get-history", {"max_results": 2**31}),
        ("metrics/get-history", {"max_results": "x"}),
        ("metrics/get-history-bulk-interval", {"max_results": -5}),
        ("metrics/get-history-bulk-interval", {"max_results": 0}),
        ("metrics/get-history-bulk-interval", {"max_results": 2501}),
        ("metrics/get-history-bulk-interval", {"start_step": 2**63, "end_step": 2**63}),
        ("metrics/get-history-bulk-interval", {"start_step": 5, "end_step": 1}),
        ("metrics/get-history-bulk-interval", {"start_step": 5}),
        ("metrics/get-history-bulk", {"max_results": -5}),
        ("metrics/get-history-bulk", {"max_results": 0}),
        ("metrics/get-history-bulk", {"max_results": "many"}),
    ],
)
def test_out_of_range_history_parameters_are_invalid(
    server: RunningServer, run_id: str, path: str, params: dict[str, Any]
) -> None:
    ids = {"run_id": run_id} if path != "metrics/get-history-bulk-interval" else {"run_ids": run_id}
    response = _get(server, path, metric_key="loss", **ids, **params)
    _assert_invalid(response, f"{path} {params}")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("runs/search", {"experiment_ids": ["0"], "max_results": -1}),
        ("runs/search", {"experiment_ids": ["0"], "max_results": 50_001}),
        ("runs/search", {"experiment_ids": ["0"], "max_results": 2**40}),
        ("runs/search", {"experiment_ids": ["0"], "page_token": _token({"offset": 2**63})}),
        ("runs/search", {"experiment_ids": ["0"], "page_token": _token({"offset": -1})}),
        ("runs/search", {"experiment_ids": ["0"], "page_token": "%%%"}),
        ("experiments/search", {"max_results": 0}),
        ("experiments/search", {"page_token": _token({"offset": 2**64})}),
    ],
)
def test_out_of_range_search_parameters_are_invalid(server: RunningServer, path: str, body: dict[str, Any]) -> None:
    _assert_invalid(_post(server, path, body), f"{path} {body}")


def test_out_of_range_steps_and_timestamps_are_invalid(server: RunningServer, run_id: str) -> None:
    for metric in (
        {"key": "m", "value": 1.0, "timestamp": 1, "step": 2**63},
        {"key": "m", "value": 1.0, "timestamp": -(2**63) - 1, "step": 0},
        {"key": "m", "value": 1.0, "timestamp": "soon", "step": 0},
        {"key": "m", "value": 1.0, "timestamp": 1, "step": 1.5},
    ):
        _assert_invalid(_post(server, "runs/log-metric", {"run_id": run_id, **metric}), str(metric))
        _assert_invalid(_post(server, "runs/log-batch", {"run_id": run_id, "metrics": [metric]}), str(metric))
    _assert_invalid(_post(server, "runs/update", {"run_id": run_id, "end_time": 2**63}), "end_time")
    _assert_invalid(_post(server, "runs/create", {"experiment_id": "0", "start_time": 2**64}), "start_time")


# --- gRPC: run name and user, as on REST ---------------------------------------------------------------------------


def _upsert(run_id: str, **fields: Any) -> bytes:
    upsert = ingest_pb2.RunUpsert(run_id=run_id, experiment_id="0", status=ingest_pb2.RUNNING, **fields)
    return encode_request(ingest_pb2.WriteRequest(runs=[upsert]), [])


def test_run_name_and_user_are_bounded_on_grpc_as_on_rest(server: RunningServer) -> None:
    write = raw_write(server.target)
    long_name = "n" * (validation.MAX_RUN_NAME_LENGTH + 500)
    write(_upsert("a" * 32, name=long_name, version=1))
    grpc_run = MlflowClient(tracking_uri=server.http_url).get_run("a" * 32)
    rest = _post(server, "runs/create", {"experiment_id": "0", "run_name": long_name}).json()["run"]
    # Both paths keep the run name and its tag equal, at MLflow's tag-value limit.
    assert grpc_run.info.run_name == grpc_run.data.tags["mlflow.runName"] == long_name[: validation.MAX_RUN_NAME_LENGTH]
    assert rest["info"]["run_name"] == grpc_run.info.run_name

    long_user = "u" * (validation.MAX_USER_LENGTH + 1)
    with pytest.raises(grpc.RpcError) as info:
        write(_upsert("b" * 32, user=long_user, version=1))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "over the limit of 256" in str(info.value.details())
    _assert_invalid(_post(server, "runs/create", {"experiment_id": "0", "user_id": long_user}), "user_id")


# --- row versions --------------------------------------------------------------------------------------------------


def test_a_client_cannot_pin_a_run_or_tag_with_a_far_future_version(server: RunningServer) -> None:
    write = raw_write(server.target)
    run_id = "c" * 32
    tag = ingest_pb2.Tag(run_id=run_id, key="owner", value="pinned", version=TOP)
    write(encode_request(ingest_pb2.WriteRequest(runs=[_upsert_message(run_id, "pinned", TOP)], tags=[tag]), []))
    stored = server.scalar("SELECT max(version) FROM trackhouse.runs WHERE run_id = {r:String}", r=run_id)
    assert stored <= time.time_ns() + MAX_VERSION_LEAD_NS
    # REST writes take this server's clock (a run update also outranks the previous version). Once the clock
    # has passed the capped version, which the cap makes at most MAX_VERSION_LEAD_NS away, REST wins.
    while time.time_ns() <= stored:
        time.sleep(0.05)

    client = MlflowClient(tracking_uri=server.http_url)
    client.update_run(run_id, name="renamed")
    client.set_tag(run_id, "owner", "me")
    run = client.get_run(run_id)
    assert (run.info.run_name, run.data.tags["owner"]) == ("renamed", "me")


def test_a_redelivered_older_upsert_never_overwrites_a_newer_one(server: RunningServer) -> None:
    """Kafka redelivers the original bytes after a crash; the client's own versions keep them in order."""
    write = raw_write(server.target)
    run_id = "d" * 32
    older, newer = time.time_ns(), time.time_ns() + 1_000
    write(encode_request(ingest_pb2.WriteRequest(runs=[_upsert_message(run_id, "newer", newer)]), []))
    write(encode_request(ingest_pb2.WriteRequest(runs=[_upsert_message(run_id, "older", older)]), []))
    assert MlflowClient(tracking_uri=server.http_url).get_run(run_id).info.run_name == "newer"


def _upsert_message(run_id: str, name: str, version: int) -> ingest_pb2.RunUpsert:
    return ingest_pb2.RunUpsert(run_id=run_id, experiment_id="0", name=name, status=ingest_pb2.RUNNING, version=version)
