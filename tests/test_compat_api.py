"""The MLflow REST API, driven by the real MLflow client against a real server on embedded chDB."""

from __future__ import annotations

import base64
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import mlflow
import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.entities import Metric, Param, RunStatus, RunTag, ViewType
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.service_pb2 import LogMetric
from mlflow.tracking import MlflowClient
from mlflow.tracking.metric_value_conversion_utils import convert_metric_value_to_float_if_possible
from mlflow.utils.proto_json_utils import parse_dict

from tests.conftest import RunningServer, wait_until
from trackhouse import Client
from trackhouse.ingest.codec import BlockColumns, encode_request
from trackhouse.v1 import ingest_pb2


@pytest.fixture
def mlflow_server(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningServer]:
    # Errors are asserted, not retried: the client would otherwise back off for minutes on purpose-made 5xx.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    mlflow.set_tracking_uri(server.http_url)
    yield server
    mlflow.end_run()
    mlflow.set_tracking_uri("")


@pytest.fixture
def client(mlflow_server: RunningServer) -> MlflowClient:
    return MlflowClient(tracking_uri=mlflow_server.http_url)


def error_code(exc: pytest.ExceptionInfo[MlflowException]) -> str:
    return str(exc.value.error_code)


def test_the_readme_example_round_trips(mlflow_server: RunningServer, tmp_path: Path) -> None:
    mlflow.set_experiment("fraud-detection-v3")
    artifact = tmp_path / "confusion_matrix.png"
    artifact.write_bytes(b"\x89PNG fake image bytes")
    with mlflow.start_run(run_name="rf-baseline") as run:
        mlflow.log_params({"n_estimators": 100, "max_depth": 10})
        mlflow.log_metrics({"accuracy": 0.94, "f1": 0.87})
        mlflow.log_artifact(str(artifact))
    found = mlflow.search_runs(
        filter_string="metrics.accuracy > 0.9 and params.max_depth = '10'", order_by=["metrics.f1 DESC"]
    )
    assert list(found["run_id"]) == [run.info.run_id]
    assert found["tags.mlflow.runName"][0] == "rf-baseline"
    stored = MlflowClient().get_run(run.info.run_id)
    assert stored.data.params == {"n_estimators": "100", "max_depth": "10"}
    assert stored.data.metrics == {"accuracy": 0.94, "f1": 0.87}
    assert stored.info.status == "FINISHED" and stored.info.end_time is not None
    assert [a.path for a in MlflowClient().list_artifacts(run.info.run_id)] == ["confusion_matrix.png"]
    downloaded = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "down"))
    assert (Path(downloaded) / "confusion_matrix.png").read_bytes() == artifact.read_bytes()


def test_experiment_lifecycle(client: MlflowClient) -> None:
    experiment_id = client.create_experiment("exp-a", tags={"team": "vision"})
    assert client.get_experiment(experiment_id).name == "exp-a"
    assert client.get_experiment(experiment_id).tags == {"team": "vision"}
    assert getattr(client.get_experiment_by_name("exp-a"), "experiment_id", None) == experiment_id
    with pytest.raises(MlflowException) as exc:
        client.create_experiment("exp-a")
    assert error_code(exc) == "RESOURCE_ALREADY_EXISTS"

    client.rename_experiment(experiment_id, "exp-b")
    assert client.get_experiment(experiment_id).name == "exp-b"
    assert client.get_experiment_by_name("exp-a") is None
    # The old name is free again and must not collide with the renamed experiment's id.
    other = client.create_experiment("exp-a")
    assert other != experiment_id

    client.set_experiment_tag(experiment_id, "stage", "prod")
    client.delete_experiment_tag(experiment_id, "team")
    assert client.get_experiment(experiment_id).tags == {"stage": "prod"}

    client.delete_experiment(experiment_id)
    assert client.get_experiment(experiment_id).lifecycle_stage == "deleted"
    active = {e.name for e in client.search_experiments()}
    assert "exp-b" not in active and {"exp-a", "Default"} <= active
    deleted = {e.name for e in client.search_experiments(view_type=ViewType.DELETED_ONLY)}
    assert deleted == {"exp-b"}
    with pytest.raises(MlflowException) as exc:
        client.create_run(experiment_id)
    assert error_code(exc) == "INVALID_PARAMETER_VALUE"
    client.restore_experiment(experiment_id)
    assert client.get_experiment(experiment_id).lifecycle_stage == "active"

    with pytest.raises(MlflowException) as exc:
        client.get_experiment("123456")
    assert error_code(exc) == "RESOURCE_DOES_NOT_EXIST"


def test_search_experiments_filters_orders_and_pages(client: MlflowClient) -> None:
    for name in ("sweep-1", "sweep-2", "sweep-3", "other"):
        client.create_experiment(name, tags={"kind": "sweep" if name.startswith("sweep") else "x"})
    names = [e.name for e in client.search_experiments(filter_string="name LIKE 'sweep-%'", order_by=["name DESC"])]
    assert names == ["sweep-3", "sweep-2", "sweep-1"]
    tagged = client.search_experiments(filter_string="tags.kind = 'x'")
    assert [e.name for e in tagged] == ["other"]
    first = client.search_experiments(max_results=2, order_by=["name ASC"])
    assert first.token
    second = client.search_experiments(max_results=10, order_by=["name ASC"], page_token=first.token)
    assert [e.name for e in first] + [e.name for e in second] == sorted(
        ["Default", "sweep-1", "sweep-2", "sweep-3", "other"]
    )


def test_run_lifecycle_and_tags(client: MlflowClient) -> None:
    experiment_id = client.create_experiment("lifecycle")
    run = client.create_run(experiment_id, run_name="first", tags={"owner": "ana"})
    run_id = run.info.run_id
    assert run.info.run_name == "first" and run.info.status == "RUNNING"
    assert run.data.tags["owner"] == "ana" and run.data.tags["mlflow.runName"] == "first"

    client.set_tag(run_id, "owner", "bo")
    client.set_tag(run_id, "mlflow.runName", "renamed")
    client.delete_tag(run_id, "owner")
    stored = client.get_run(run_id)
    assert "owner" not in stored.data.tags
    assert stored.info.run_name == "renamed"
    with pytest.raises(MlflowException) as exc:
        client.delete_tag(run_id, "owner")
    assert error_code(exc) == "RESOURCE_DOES_NOT_EXIST"

    client.update_run(run_id, status="FAILED", name="final")
    client.set_terminated(run_id, status="KILLED", end_time=1234)
    stored = client.get_run(run_id)
    assert (stored.info.status, stored.info.end_time, stored.info.run_name) == ("KILLED", 1234, "final")

    client.delete_run(run_id)
    assert client.get_run(run_id).info.lifecycle_stage == "deleted"
    assert client.search_runs([experiment_id]) == []
    assert [r.info.run_id for r in client.search_runs([experiment_id], run_view_type=ViewType.ALL)] == [run_id]
    with pytest.raises(MlflowException) as exc:
        client.log_metric(run_id, "loss", 1.0)
    assert error_code(exc) == "INVALID_PARAMETER_VALUE"
    client.restore_run(run_id)
    client.log_metric(run_id, "loss", 1.0)
    assert client.get_run(run_id).data.metrics == {"loss": 1.0}

    with pytest.raises(MlflowException) as exc:
        client.get_run("0123456789abcdef0123456789abcdef")
    assert error_code(exc) == "RESOURCE_DOES_NOT_EXIST"
    with pytest.raises(MlflowException) as exc:
        client.log_metric("0123456789abcdef0123456789abcdef", "loss", 1.0)
    assert error_code(exc) == "RESOURCE_DOES_NOT_EXIST"


def test_params_are_immutable(client: MlflowClient) -> None:
    run_id = client.create_run("0").info.run_id
    client.log_param(run_id, "lr", "0.1")
    client.log_param(run_id, "lr", "0.1")  # the same value again is fine, as in MLflow
    with pytest.raises(MlflowException) as exc:
        client.log_param(run_id, "lr", "0.2")
    assert error_code(exc) == "INVALID_PARAMETER_VALUE"
    assert "lr" in str(exc.value)
    assert client.get_run(run_id).data.params == {"lr": "0.1"}


def test_nan_and_infinities_round_trip(client: MlflowClient, mlflow_server: RunningServer) -> None:
    run_id = client.create_run("0").info.run_id
    values = [math.nan, math.inf, -math.inf, 1.5]
    client.log_batch(run_id, metrics=[Metric("odd", v, 1000 + i, i) for i, v in enumerate(values)])
    history = client.get_metric_history(run_id, "odd")
    got = [m.value for m in sorted(history, key=lambda m: m.step)]
    # MLflow's wire carries infinities clamped to the largest double, as stock sends them; storage keeps them.
    assert math.isnan(got[0]) and got[1:] == [sys.float_info.max, -sys.float_info.max, 1.5]
    assert mlflow_server.sql is not None
    stored = mlflow_server.sql.query(
        "SELECT value FROM trackhouse.metrics WHERE run_id = {r:String} ORDER BY step", parameters={"r": run_id}
    ).result_rows
    assert [v for (v,) in stored][1:] == [math.inf, -math.inf, 1.5]
    assert client.get_run(run_id).data.metrics["odd"] == 1.5  # the latest by (step, timestamp, value)


def test_history_pages_through_long_series_without_duplicates(client: MlflowClient) -> None:
    run_id = client.create_run("0").info.run_id
    total = 30_000  # more than the client's 25,000-point page
    for start in range(0, total, 1000):
        batch = [Metric("loss", float(s), 1_700_000_000_000 + s, s) for s in range(start, start + 1000)]
        client.log_batch(run_id, metrics=batch)
    # A client retry resends a batch it already sent; every read must still see each point once.
    client.log_batch(run_id, metrics=[Metric("loss", float(s), 1_700_000_000_000 + s, s) for s in range(1000)])
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == list(range(total))


def test_log_batch_limits_and_bad_input(client: MlflowClient, mlflow_server: RunningServer) -> None:
    run_id = client.create_run("0").info.run_id
    with pytest.raises(MlflowException) as exc:
        client.log_metric(run_id, "bad key!", 1.0)
    assert error_code(exc) == "INVALID_PARAMETER_VALUE"
    url = f"{mlflow_server.http_url}/api/2.0/mlflow/runs/log-batch"
    # The MLflow client splits batches itself, so the limits are checked with raw requests.
    bodies: list[dict[str, Any]] = [
        {"run_id": run_id, "params": [{"key": f"p{i}", "value": "v"} for i in range(101)]},
        {"run_id": run_id, "metrics": [{"key": f"m{i}", "value": 1, "timestamp": 1} for i in range(1001)]},
        {"run_id": run_id, "metrics": [{"key": "m", "value": "high", "timestamp": 1}]},
        {"run_id": run_id, "metrics": [{"key": "m", "value": 1.0}]},
        {"run_id": run_id, "metrics": "not a list"},
        {"metrics": []},
    ]
    for body in bodies:
        answer = requests.post(url, json=body, timeout=10)
        assert answer.status_code == 400, body
        assert answer.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    answer = requests.post(url, data=b"{not json", timeout=10)
    assert answer.status_code == 400 and answer.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    # Nothing from the bad requests was stored, and the run still takes good data.
    client.log_batch(run_id, metrics=[Metric("m", 2.0, 1, 0)], tags=[RunTag("t", "v")])
    stored = client.get_run(run_id)
    assert stored.data.metrics == {"m": 2.0} and stored.data.tags["t"] == "v"


def test_search_runs_grammar_and_pagination(client: MlflowClient) -> None:
    experiment_id = client.create_experiment("grid")
    ids = {}
    for i in range(6):
        run = client.create_run(experiment_id, run_name=f"trial-{i}", tags={"family": "cnn" if i % 2 else "mlp"})
        client.log_batch(
            run.info.run_id,
            metrics=[Metric("acc", 0.5 + i / 10, 1, 0)],
            params=[Param("depth", str(i)), Param("opt", "adam" if i < 3 else "SGD")],
        )
        if i == 5:
            client.set_terminated(run.info.run_id)
        ids[i] = run.info.run_id

    def search(filter_string: str, order_by: list[str] | None = None) -> list[str]:
        runs = client.search_runs([experiment_id], filter_string, order_by=order_by)
        return [r.info.run_name for r in runs]

    assert search("metrics.acc >= 0.8", ["metrics.acc DESC"]) == ["trial-5", "trial-4", "trial-3"]
    in_ids = f"attributes.run_id IN ('{ids[1]}', '{ids[2]}')"
    assert search(in_ids, ["params.depth ASC"]) == ["trial-1", "trial-2"]
    assert search("params.missing IS NULL and tags.family IS NOT NULL and params.depth = '4'") == ["trial-4"]
    assert search("params.opt ILIKE 'sgd'", ["attributes.run_name ASC"]) == ["trial-3", "trial-4", "trial-5"]
    assert search("params.opt LIKE 'sgd'") == []
    assert search("tags.family = 'cnn' and metrics.acc < 0.8", ["params.depth DESC"]) == ["trial-1"]
    assert search("attributes.status = 'FINISHED'") == ["trial-5"]
    assert search("attributes.run_name LIKE 'trial-%' and params.depth != '0'", ["metrics.acc ASC"])[:2] == [
        "trial-1",
        "trial-2",
    ]
    # Pages walk every run once, in a stable order.
    seen: list[str] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=4, order_by=["params.depth ASC"], page_token=token)
        seen += [r.info.run_name for r in page]
        token = page.token
        if not token:
            break
    assert seen == [f"trial-{i}" for i in range(6)]
    with pytest.raises(MlflowException) as exc:
        client.search_runs([experiment_id], "metrics.acc >>> 1")
    assert error_code(exc) == "INVALID_PARAMETER_VALUE"


def test_points_from_the_ingest_client_are_visible_to_mlflow(mlflow_server: RunningServer) -> None:
    with Client(mlflow_server.target) as ingest:
        run = ingest.start_run(experiment="from-grpc", name="grpc-run", params={"lr": 0.01})
        run.log_series("loss", np.arange(5000), np.linspace(1, 0, 5000))
        run.finish()
    client = MlflowClient()
    experiment = client.get_experiment_by_name("from-grpc")
    assert experiment is not None
    [found] = client.search_runs([experiment.experiment_id], "params.lr = '0.01'")
    assert found.info.run_name == "grpc-run" and found.info.status == "FINISHED"
    assert found.data.metrics["loss"] == 0.0
    assert len(client.get_metric_history(found.info.run_id, "loss")) == 5000


def test_the_run_name_and_its_tag_stay_in_step_over_grpc_too(mlflow_server: RunningServer) -> None:
    """MLflow keeps runs.name and the mlflow.runName tag equal; a tag set through the gRPC client renames the run."""
    client = MlflowClient()

    def name_and_tag(run_id: str) -> tuple[str, str]:
        stored = client.get_run(run_id)
        return stored.info.run_name, stored.data.tags["mlflow.runName"]

    with Client(mlflow_server.target) as ingest:
        run = ingest.start_run(experiment="renames", name="before")
        ingest.flush()
        assert name_and_tag(run.run_id) == ("before", "before")
        run.set_tags({"mlflow.runName": "by-grpc-tag"})
        ingest.flush()
        assert name_and_tag(run.run_id) == ("by-grpc-tag", "by-grpc-tag")
        run.finish()  # a whole-row upsert: it must carry the new name, not the one the run started with
        ingest.flush()
        assert name_and_tag(run.run_id) == ("by-grpc-tag", "by-grpc-tag")
    with Client(mlflow_server.target) as other:  # a process that did not start the run: the server reads its row
        other.attach_run(run.run_id).set_tags({"mlflow.runName": "by-other"})
    assert name_and_tag(run.run_id) == ("by-other", "by-other")
    assert client.get_run(run.run_id).info.status == "FINISHED"  # the rename kept the rest of the row
    client.update_run(run.run_id, name="by-rest")
    assert name_and_tag(run.run_id) == ("by-rest", "by-rest")
    client.set_tag(run.run_id, "mlflow.runName", "by-rest-tag")
    assert name_and_tag(run.run_id) == ("by-rest-tag", "by-rest-tag")
    experiment_id = client.get_run(run.run_id).info.experiment_id
    found = client.search_runs([experiment_id], "attributes.run_name = 'by-rest-tag'")
    assert [r.info.run_id for r in found] == [run.run_id]


def test_bool_metric_values_are_stored_as_stock_mlflow_stores_them(
    client: MlflowClient, mlflow_server: RunningServer
) -> None:
    """Stock MLflow stores True as 1.0 and False as 0.0, Python's and numpy's alike: its client converts them
    (convert_metric_value_to_float_if_possible) and its handlers take JSON true (float(True)); checked once
    against a stock `mlflow server`, and here through MLflow's own functions."""
    values = {"py_true": True, "py_false": False, "np_true": np.bool_(True), "np_false": np.bool_(False)}
    expected = {key: convert_metric_value_to_float_if_possible(value) for key, value in values.items()}
    assert expected == {"py_true": 1.0, "py_false": 0.0, "np_true": 1.0, "np_false": 0.0}
    stock_json = LogMetric()
    parse_dict({"run_id": "r", "key": "k", "value": True, "timestamp": 1}, stock_json)  # type: ignore[no-untyped-call]
    assert stock_json.value == 1.0

    with Client(mlflow_server.target) as ingest:
        run = ingest.start_run(experiment="bools")
        run.log_metrics(values, step=0)  # type: ignore[arg-type]  # bools on purpose
        run.log_series("series", steps=np.arange(2), values=np.array([True, False]))
    run_id = run.run_id
    client.log_metric(run_id, "mlflow_client_np_true", np.bool_(True))  # type: ignore[arg-type]
    session = requests.Session()
    api = f"{mlflow_server.http_url}/api/2.0/mlflow/runs"
    answer = session.post(
        f"{api}/log-metric", json={"run_id": run_id, "key": "json_true", "value": True, "timestamp": 1}
    )
    assert answer.status_code == 200, answer.text
    batch: dict[str, Any] = {
        "run_id": run_id,
        "metrics": [{"key": "batch_false", "value": False, "timestamp": 1, "step": 0}],
    }
    answer = session.post(f"{api}/log-batch", json=batch)
    assert answer.status_code == 200, answer.text

    stored = client.get_run(run_id).data.metrics
    assert {k: stored[k] for k in values} == expected
    assert (stored["mlflow_client_np_true"], stored["json_true"], stored["batch_false"]) == (1.0, 1.0, 0.0)
    assert [m.value for m in client.get_metric_history(run_id, "series")] == [1.0, 0.0]


def test_chart_call_samples_with_min_and_max(client: MlflowClient, mlflow_server: RunningServer) -> None:
    runs = [client.create_run("0").info.run_id for _ in range(2)]
    for run_id in runs:
        values = np.zeros(10_000)
        values[4321] = 100.0  # a spike sampling must keep
        for start in range(0, 10_000, 1000):
            client.log_batch(
                run_id, metrics=[Metric("loss", float(values[s]), 1, s) for s in range(start, start + 1000)]
            )
    chart_query: dict[str, Any] = {"run_ids": runs, "metric_key": "loss", "max_results": 320}
    answer = requests.get(
        f"{mlflow_server.http_url}/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval",
        params=chart_query,
        timeout=30,
    )
    assert answer.status_code == 200
    points: list[dict[str, Any]] = answer.json()["metrics"]
    for run_id in runs:
        mine = [p for p in points if p["run_id"] == run_id]
        assert 2 < len(mine) <= 320
        assert max(p["value"] for p in mine) == 100.0
        assert [p["step"] for p in mine] == sorted(p["step"] for p in mine)
    ranged = requests.get(
        f"{mlflow_server.http_url}/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval",
        params={"run_ids": runs[0], "metric_key": "loss", "start_step": 10, "end_step": 19},
        timeout=30,
    ).json()["metrics"]
    assert [p["step"] for p in ranged] == list(range(10, 20))
    bad = requests.get(
        f"{mlflow_server.http_url}/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval",
        params={"run_ids": runs[0], "metric_key": "loss", "start_step": 10},
        timeout=30,
    )
    assert bad.status_code == 400 and bad.json()["error_code"] == "INVALID_PARAMETER_VALUE"


def test_unknown_routes_and_errors_are_mlflow_json(mlflow_server: RunningServer) -> None:
    answer = requests.get(f"{mlflow_server.http_url}/api/2.0/mlflow/runs/get", params={"run_id": "nope"}, timeout=10)
    assert answer.status_code == 404
    assert answer.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"
    answer = requests.get(f"{mlflow_server.http_url}/api/2.0/mlflow/experiments/get", timeout=10)
    assert answer.status_code == 400 and "experiment_id" in answer.json()["message"]


def test_run_status_names_match_mlflow(client: MlflowClient) -> None:
    run_id = client.create_run("0").info.run_id
    for status in ("SCHEDULED", "FAILED", "FINISHED"):
        client.update_run(run_id, status=status)
        assert client.get_run(run_id).info.status == status
        assert RunStatus.from_string(status) == RunStatus.from_string(client.get_run(run_id).info.status)


def test_rest_exception_type_is_the_clients(client: MlflowClient) -> None:
    with pytest.raises(RestException) as exc:
        client.get_run("missing")
    # A RestException is what the client raises for any error answer, a 500 too: the code and status must match.
    assert error_code(exc) == "RESOURCE_DOES_NOT_EXIST"
    assert exc.value.get_http_status_code() == 404  # type: ignore[no-untyped-call]


def test_ui_shell_and_features_trackhouse_lacks(mlflow_server: RunningServer) -> None:
    base = mlflow_server.http_url
    index = requests.get(f"{base}/", timeout=10)
    assert index.status_code == 200 and "static-files" in index.text
    assert requests.get(f"{base}/version", timeout=10).text == mlflow.__version__
    assert requests.get(f"{base}/ajax-api/3.0/mlflow/server-info", timeout=10).json()["store_type"] == "SqlStore"
    # Logged models are real now (tests/test_compat_logged_models.py); with none, stock's empty answer.
    models = requests.post(
        f"{base}/ajax-api/2.0/mlflow/logged-models/search", json={"experiment_ids": ["0"]}, timeout=10
    )
    assert (models.status_code, models.json()) == (200, {})
    for method, path in (
        ("GET", "/ajax-api/2.0/mlflow/model-versions/search"),
        ("POST", "/ajax-api/3.0/mlflow/traces/metrics"),
        ("GET", "/ajax-api/3.0/mlflow/scorers/list"),
    ):
        answer = requests.request(method, base + path, json={}, timeout=10)
        assert (answer.status_code, answer.json()) == (200, {}), path
    assert requests.get(f"{base}/ajax-api/2.0/mlflow/gateway-proxy", timeout=10).json() == {"endpoints": []}


def test_a_reader_serves_the_api_and_refuses_writes(start_server: Any, tmp_path: Path) -> None:
    reader = start_server(role="reader")
    client = MlflowClient(tracking_uri=reader.http_url)
    assert [e.name for e in client.search_experiments()] == ["Default"]
    answer = requests.post(f"{reader.http_url}/api/2.0/mlflow/experiments/create", json={"name": "x"}, timeout=10)
    assert answer.status_code == 400
    assert "read-only" in answer.json()["message"]
    assert reader.server.grpc_port == 0  # no ingest on a reader


HOSTILE_PIECES = ["'", '"', "`", "\\", "--", "/*", "*/", ";", "%", "_", "DROP TABLE runs", "\u202e", "é", "\x00", "🙂"]
hostile_text = st.lists(st.sampled_from(HOSTILE_PIECES) | st.text(max_size=5), max_size=8).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=hostile_text, key=hostile_text, raw=hostile_text)
def test_hostile_search_input_is_a_clear_400_or_a_correct_answer(
    searchable: tuple[str, str, str], value: str, key: str, raw: str
) -> None:
    base, experiment_id, run_id = searchable
    quoted = "'" + value.replace("'", "\\'") + "'"
    for filter_string in (
        f"params.p = {quoted}",
        f"tags.`{key}` LIKE {quoted}",
        f"attributes.run_name ILIKE {quoted}",
        raw,
        raw * 400,  # very long input
    ):
        body = {"experiment_ids": [experiment_id], "filter": filter_string}
        answer = requests.post(f"{base}/api/2.0/mlflow/runs/search", json=body, timeout=30)
        assert answer.status_code in (200, 400), (filter_string, answer.text[:300])
        if answer.status_code == 400:
            assert answer.json()["error_code"] == "INVALID_PARAMETER_VALUE"
            assert "Code:" not in answer.json()["message"], "a ClickHouse error leaked"
        else:  # the only run has p = 'v' and no other tags: it may match only a filter it satisfies
            found = [r["info"]["run_id"] for r in answer.json().get("runs", [])]
            assert found in ([], [run_id])
            if found and filter_string.startswith("params.p ="):
                assert value == "v"
    token = requests.post(
        f"{base}/api/2.0/mlflow/runs/search",
        json={"experiment_ids": [experiment_id], "page_token": raw or "x"},
        timeout=30,
    )
    assert token.status_code == 400 and token.json()["error_code"] == "INVALID_PARAMETER_VALUE"


@pytest.fixture
def searchable(client: MlflowClient, mlflow_server: RunningServer) -> tuple[str, str, str]:
    experiment_id = client.create_experiment("hostile")
    run_id = client.create_run(experiment_id, run_name="only").info.run_id
    client.log_param(run_id, "p", "v")
    return mlflow_server.http_url, experiment_id, run_id


def test_a_full_queue_answers_503_with_retry_after_and_keeps_nothing(start_server: Any) -> None:
    """REST backpressure: when the batcher's queue is full, a write answers 503 TEMPORARILY_UNAVAILABLE with
    Retry-After (which the MLflow client retries), stores nothing of the refused call, and the next call goes in."""
    server = start_server(flush_points=1_000, max_queue_points=1_000, flush_interval_ms=3_600_000)
    api = f"{server.http_url}/api/2.0/mlflow"
    run_id = requests.post(f"{api}/runs/create", json={"experiment_id": "0"}, timeout=60).json()["run"]["info"]
    run_id = run_id["run_id"]
    # 900 points held in the queue by gRPC, which asks for no early flush: they wait for the hour-long interval.
    write = grpc.insecure_channel(server.target).unary_unary(
        "/trackhouse.v1.Ingest/Write", request_serializer=None, response_deserializer=ingest_pb2.WriteAck.FromString
    )
    steps = np.arange(900, dtype=np.int64)
    held = write.future(
        encode_request(
            ingest_pb2.WriteRequest(),
            [BlockColumns(run_id, ["held"], np.zeros(900, np.uint32), steps, np.ones(900), np.ones(900, np.int64))],
        )
    )
    wait_until(lambda: server.server.telemetry.queue_points._value.get() >= 900, what="the gRPC points queued")

    metrics: list[Any] = [{"key": "refused", "value": float(i), "timestamp": 1, "step": i} for i in range(200)]
    answer = requests.post(f"{api}/runs/log-batch", json={"run_id": run_id, "metrics": metrics}, timeout=60)
    assert answer.status_code == 503, answer.text
    assert answer.json()["error_code"] == "TEMPORARILY_UNAVAILABLE"
    assert int(answer.headers["Retry-After"]) >= 1

    # A call that fits is taken, and its 5 ms deadline flushes the held points with it.
    answer = requests.post(f"{api}/runs/log-batch", json={"run_id": run_id, "metrics": metrics[:50]}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert held.result(timeout=60).points == 900
    history = MlflowClient(server.http_url).get_metric_history(run_id, "refused")
    assert [m.step for m in history] == list(range(50))  # none of the refused call's 200 points


def _token(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


@pytest.mark.parametrize(
    "token",
    [
        "%%%not-base64",
        "é",
        _token(b"hello"),
        _token(b"null"),
        _token(b'{"a": 1}'),
        _token(b"[1, 2]"),
        _token(b"[1, 2, 3]"),
        pytest.param(_token(json.dumps([2**70, 1, (1.0).hex()]).encode()), id="step-over-int64"),
        pytest.param(_token(json.dumps([1e300, 1, (1.0).hex()]).encode()), id="float-step"),
        pytest.param(_token(b"[" * 3000 + b"]" * 3000), id="deeply-nested"),
    ],
)
def test_an_invalid_history_page_token_is_a_400(client: MlflowClient, mlflow_server: RunningServer, token: str) -> None:
    run_id = client.create_run("0").info.run_id
    client.log_metric(run_id, "m", 1.0, step=0)
    answer = requests.get(
        f"{mlflow_server.http_url}/api/2.0/mlflow/metrics/get-history",
        params={"run_id": run_id, "metric_key": "m", "page_token": token, "max_results": 10},
        timeout=60,
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error_code"] == "INVALID_PARAMETER_VALUE"


def test_get_history_bulk_returns_each_runs_series_with_its_run_id(
    client: MlflowClient, mlflow_server: RunningServer
) -> None:
    """The metric page's older bulk call: whole series of several runs, each point tagged with its run, capped."""
    runs = [client.create_run("0").info.run_id for _ in range(2)]
    for i, run_id in enumerate(runs):
        client.log_batch(run_id, metrics=[Metric("loss", float(i * 100 + s), 1_000 + s, s) for s in range(30)])
    client.log_metric(runs[0], "other", 5.0)
    url = f"{mlflow_server.http_url}/ajax-api/2.0/mlflow/metrics/get-history-bulk"
    answer = requests.get(url, params={"run_id": runs, "metric_key": "loss"}, timeout=60)
    assert answer.status_code == 200, answer.text
    found = answer.json()["metrics"]
    for i, run_id in enumerate(runs):
        mine = [m for m in found if m["run_id"] == run_id]
        assert [(m["step"], m["value"], m["timestamp"], m["key"]) for m in mine] == [
            (s, float(i * 100 + s), 1_000 + s, "loss") for s in range(30)
        ]
    assert len(found) == 60
    capped_params: dict[str, Any] = {"run_id": runs, "metric_key": "loss", "max_results": 40}
    capped = requests.get(url, params=capped_params, timeout=60)
    assert len(capped.json()["metrics"]) == 40
    bad: list[dict[str, Any]] = [
        {"metric_key": "loss"},
        {"run_id": runs},
        {"run_id": [f"r{i}" for i in range(101)], "metric_key": "x"},
    ]
    for params in bad:
        refused = requests.get(url, params=params, timeout=60)
        assert refused.status_code == 400, params
        assert refused.json()["error_code"] == "INVALID_PARAMETER_VALUE"


def test_which_writes_are_idempotent_as_the_readme_says(client: MlflowClient, mlflow_server: RunningServer) -> None:
    """A resent call, as the MLflow client's retries send it: points, params and tags change nothing the second time;
    runs/create, experiments/create and delete-tag are not idempotent, exactly as on a stock server."""
    api = f"{mlflow_server.http_url}/api/2.0/mlflow"

    def twice(path: str, body: dict[str, Any]) -> list[requests.Response]:
        return [requests.post(f"{api}/{path}", json=body, timeout=60) for _ in range(2)]

    run_id = client.create_run("0").info.run_id
    batch = {
        "run_id": run_id,
        "metrics": [{"key": "loss", "value": s / 10, "timestamp": 5, "step": s} for s in range(20)],
        "params": [{"key": "lr", "value": "0.1"}],
        "tags": [{"key": "team", "value": "nlp"}],
    }
    assert [r.status_code for r in twice("runs/log-batch", batch)] == [200, 200]
    assert [r.status_code for r in twice("runs/set-tag", {"run_id": run_id, "key": "t", "value": "v"})] == [200, 200]
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, s / 10) for s in range(20)]  # each point once
    stored = client.get_run(run_id).data
    assert (stored.params, stored.tags["team"], stored.tags["t"]) == ({"lr": "0.1"}, "nlp", "v")

    created = twice("runs/create", {"experiment_id": "0"})
    assert len({r.json()["run"]["info"]["run_id"] for r in created}) == 2  # a retried create leaves two runs
    first, second = twice("experiments/create", {"name": "made-once"})
    assert first.status_code == 200
    assert (second.status_code, second.json()["error_code"]) == (400, "RESOURCE_ALREADY_EXISTS")
    first, second = twice("runs/delete-tag", {"run_id": run_id, "key": "t"})
    assert first.status_code == 200
    assert (second.status_code, second.json()["error_code"]) == (404, "RESOURCE_DOES_NOT_EXIST")
