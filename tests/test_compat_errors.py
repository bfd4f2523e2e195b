"""Validation errors in stock's words: each bad request goes to trackhouse and to a stock server, and the two
answers (status, error_code, message) must be equal, up to the run ids each server assigned.

The gRPC path words its key errors the same way, without importing MLflow (checked here against MLflow's own
validators).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import (
    _validate_length_limit,
    _validate_metric_name,
    _validate_param_name,
    _validate_tag_name,
)

from tests.conftest import RunningServer
from tests.stock import error_answer, stock_server
from tests.test_validation import KEYS
from trackhouse.ingest import validation
from trackhouse.ingest.errors import InvalidArgumentError

#: (method, path, query-or-body) for a run id; each must fail on both servers.
Case = Callable[[str], tuple[str, str, dict[str, Any]]]


def metric(key: str, value: Any = 1.0) -> dict[str, Any]:
    return {"key": key, "value": value, "timestamp": 1, "step": 0}


def batch(run_id: str, **fields: Any) -> tuple[str, str, dict[str, Any]]:
    return "POST", "runs/log-batch", {"run_id": run_id, **fields}


def token(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


CASES: dict[str, Case] = {
    "experiment id not a number": lambda r: ("GET", "experiments/get", {"experiment_id": "abc"}),
    "metric key": lambda r: ("POST", "runs/log-metric", {"run_id": r, **metric("bad key!")}),
    "metric key in a batch": lambda r: (
        "POST",
        "runs/log-batch",
        {"run_id": r, "metrics": [metric("a"), metric("b!")]},
    ),
    "long metric key": lambda r: batch(r, metrics=[metric("m" * 251)]),
    "param key": lambda r: ("POST", "runs/log-parameter", {"run_id": r, "key": "bad key!", "value": "1"}),
    "param key in a batch": lambda r: (
        "POST",
        "runs/log-batch",
        {"run_id": r, "params": [{"key": "a/../b", "value": "1"}]},
    ),
    "long param key": lambda r: ("POST", "runs/log-parameter", {"run_id": r, "key": "p" * 251, "value": "1"}),
    "tag key": lambda r: ("POST", "runs/set-tag", {"run_id": r, "key": "bad key!", "value": "1"}),
    "tag key in a batch": lambda r: batch(r, tags=[{"key": "../x", "value": "1"}]),
    "long tag key in a batch": lambda r: (
        "POST",
        "runs/log-batch",
        {"run_id": r, "tags": [{"key": "t" * 251, "value": ""}]},
    ),
    "too many metrics": lambda r: (
        "POST",
        "runs/log-batch",
        {"run_id": r, "metrics": [metric(f"m{i}") for i in range(1001)]},
    ),
    "too many params": lambda r: (
        "POST",
        "runs/log-batch",
        {"run_id": r, "params": [{"key": f"p{i}", "value": "v"} for i in range(101)]},
    ),
    "too many entities": lambda r: (
        "POST",
        "runs/log-batch",
        {
            "run_id": r,
            "metrics": [metric(f"m{i}") for i in range(1000)],
            "tags": [{"key": f"t{i}", "value": "v"} for i in range(10)],
        },
    ),
    "repeated param keys": lambda r: (
        "POST",
        "runs/log-batch",
        {"run_id": r, "params": [{"key": "k", "value": "1"}, {"key": "k", "value": "1"}]},
    ),
    "changed param": lambda r: ("POST", "runs/log-parameter", {"run_id": r, "key": "fixed", "value": "2"}),
    "changed params in a batch": lambda r: (
        "POST",
        "runs/log-batch",
        {"run_id": r, "params": [{"key": "fixed", "value": "3"}, {"key": "other", "value": "x"}]},
    ),
    "missing run id": lambda r: ("POST", "runs/log-batch", {"metrics": []}),
    "missing metric key": lambda r: ("POST", "runs/log-metric", {"run_id": r, "value": 1, "timestamp": 1}),
    "missing metric value": lambda r: ("POST", "runs/log-metric", {"run_id": r, "key": "m", "timestamp": 1}),
    "page token not base64": lambda r: ("POST", "runs/search", {"experiment_ids": ["0"], "page_token": "abc"}),
    "page token without offset": lambda r: (
        "POST",
        "runs/search",
        {"experiment_ids": ["0"], "page_token": token({"foo": 1})},
    ),
    "page token not json": lambda r: (
        "POST",
        "runs/search",
        {"experiment_ids": ["0"], "page_token": base64.b64encode(b"nope").decode()},
    ),
    "experiments page token": lambda r: ("POST", "experiments/search", {"max_results": 5, "page_token": "abc"}),
}


@pytest.fixture(scope="module")
def stock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from stock_server(tmp_path_factory.mktemp("stock"))


def prepared_run(url: str) -> str:
    client = MlflowClient(url)
    run_id: str = client.create_run("0").info.run_id
    client.log_param(run_id, "fixed", "1")
    return run_id


def send(url: str, run_id: str, case: Case) -> tuple[int, str, str]:
    method, path, fields = case(run_id)
    options = {"params": fields} if method == "GET" else {"json": fields}
    status, code, message = error_answer(method, f"{url}/api/2.0/mlflow/{path}", **options)
    return status, code, message.replace(run_id, "<run>")


def test_errors_are_worded_as_on_a_stock_server(server: RunningServer, stock: str) -> None:
    ours, theirs = prepared_run(server.http_url), prepared_run(stock)
    differences = {}
    for name, case in CASES.items():
        got, expected = send(server.http_url, ours, case), send(stock, theirs, case)
        if got != expected:
            differences[name] = (got, expected)
    assert differences == {}


def mlflow_message(check: Callable[[], object]) -> str:
    with pytest.raises(MlflowException) as raised:
        check()
    return str(raised.value)


@pytest.mark.parametrize("key", [k for k in KEYS if validation.key_problem(k) is not None])
def test_grpc_key_errors_use_stocks_words(key: str) -> None:
    """The gRPC path's copy of the checks (no MLflow import there) says what MLflow's validators say."""
    # MLflow's validators carry no annotations.
    expected: dict[str, Callable[[], object]] = {
        "metric": lambda: (_validate_metric_name(key), _validate_length_limit("Metric name", 250, key)),  # type: ignore[no-untyped-call]
        "param": lambda: (_validate_param_name(key), _validate_length_limit("Param key", 250, key)),  # type: ignore[no-untyped-call]
        "tag": lambda: (_validate_tag_name(key), _validate_length_limit("key", 250, key)),  # type: ignore[no-untyped-call]
    }
    for what, check in expected.items():
        with pytest.raises(InvalidArgumentError) as raised:
            validation.check_key(key, what)
        assert str(raised.value) == mlflow_message(check), what
