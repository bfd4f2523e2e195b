"""POST /graphql on MLflow's own schema: the same queries to trackhouse and to a stock server, the same answers.

The UI's two operations are read from the installed UI build, so they are exactly what a browser sends.
Answers are compared whole, after replacing each server's ids with placeholders and dropping the
fields that are clocks or paths of that server (start and end times, artifact locations).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests
from graphql import ExecutionContext
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.proto_json_utils import parse_dict
from starlette.applications import Starlette

from tests.conftest import RunningServer
from tests.stock import stock_server
from trackhouse.compat import graphql
from trackhouse.compat.graphql import GraphQlApi
from trackhouse.compat.ui import BUILD_DIR, ui_routes
from trackhouse.ingest.batch import Batch, ExperimentRow, Metrics, RunRow
from trackhouse.ingest.sink import ClickHouseSink

#: Fields holding the ids each server assigns.
_ID_FIELDS = {"runUuid", "runId", "experimentId"}
#: Fields whose values are one server's clock or storage path.
_OWN_FIELDS = {"startTime", "endTime", "creationTime", "lastUpdateTime", "artifactUri", "artifactLocation"}


def ui_query(name: str) -> str:
    """The text of the UI's operation `name`, as its build sends it."""
    for script in sorted((BUILD_DIR / "static" / "js").glob("*.js")):
        found = re.search(rf"(query {name}\(\$[^`]*)`", script.read_text(errors="replace"))
        if found:
            return found.group(1)
    raise AssertionError(f"the UI build has no query {name}")


@pytest.fixture(scope="module")
def stock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from stock_server(tmp_path_factory.mktemp("stock"))


def seed(url: str, experiment: str = "gql") -> dict[str, str]:
    client = MlflowClient(url)
    experiment_id = client.create_experiment(experiment, tags={"team": "a"})
    run_id = client.create_run(experiment_id, run_name="g", tags={"t": "v"}).info.run_id
    metrics = [Metric("odd", math.nan, 5, 3), Metric("fine", 0.5, 5, 3), Metric("big", math.inf, 6, 1)]
    metrics += [Metric("small", -math.inf, 6, 1)] + [Metric("curve", i / 10, 100 + i, i) for i in range(10)]
    client.log_batch(run_id, metrics=metrics, params=[Param("lr", "0.1")])
    dataset = Dataset("train", "abc", "s3", '{"uri": "s3://b/t"}', profile='{"rows": 3}')
    client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])])
    client.set_terminated(run_id)
    return {"run": run_id, "experiment": experiment_id}


def ask(url: str, ids: dict[str, str], query: str, **extra: Any) -> tuple[int, Any]:
    """POST the query; the answer with this server's ids as placeholders and its own fields dropped."""
    response = requests.post(f"{url}/graphql", json={"query": query, **extra}, timeout=30)
    return response.status_code, _normalized(response.json(), {v: f"<{k}>" for k, v in ids.items()})


def _normalized(value: Any, placeholders: dict[str, str]) -> Any:
    """Ids as placeholders, this server's own fields dropped, and a run's keyed entries (metrics, params, tags)
    sorted: they come in storage order, which is not part of MLflow's contract. Chart points keep their order."""
    if isinstance(value, dict):
        return {
            k: placeholders.get(v, v) if k in _ID_FIELDS else _normalized(v, placeholders)
            for k, v in value.items()
            if k not in _OWN_FIELDS
        }
    if isinstance(value, list):
        entries = [_normalized(v, placeholders) for v in value]
        if entries and all(isinstance(e, dict) and "key" in e and "runId" not in e for e in entries):
            entries.sort(key=lambda e: json.dumps(e, sort_keys=True))
        return entries
    return value


ARBITRARY = """
query Arbitrary($id: String) {
  first: mlflowGetRun(input: {runId: $id}) {
    run {
      info { runName status lifecycleStage userId }
      data { metrics { key value step timestamp } params { key value } tags { key value } }
      inputs { datasetInputs { dataset { name digest sourceType source profile schema } tags { key value } } }
      experiment { name tags { key value } __typename }
    }
  }
  again: mlflowGetRun(input: {runUuid: $id}) { run { info { runUuid } } }
  test(inputString: "echo") { output }
}
"""
SEARCHES = """
mutation Searches($ids: [String]) {
  mlflowSearchRuns(input: {experimentIds: $ids, filter: "datasets.context = 'training'"}) {
    runs { info { runName } data { params { key value } } }
    nextPageToken
  }
  mlflowSearchDatasets(input: {experimentIds: $ids}) { datasetSummaries { name digest context } }
}
"""
HISTORY = """
query History($id: String) {
  mlflowGetMetricHistoryBulkInterval(input: {runIds: [$id], metricKey: "curve", maxResults: 20}) {
    metrics { key value step timestamp runId }
  }
}
"""
TOO_WIDE = "query { " + " ".join(f'f{i}: test(inputString: "{i}") {{ output }}' for i in range(11)) + " }"


def requests_to_compare(ids: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    run, experiment = {"id": ids["run"]}, {"ids": [ids["experiment"]]}
    return [
        (ui_query("GetRun"), {"operationName": "GetRun", "variables": {"data": {"runId": ids["run"]}}}),
        (
            ui_query("MlflowGetExperimentQuery"),
            {"operationName": "MlflowGetExperimentQuery", "variables": {"input": {"experimentId": ids["experiment"]}}},
        ),
        ('query testQuery { test(inputString: "abc") { output } }', {"operationName": "testQuery"}),
        (ARBITRARY, {"variables": run}),
        (SEARCHES, {"variables": experiment}),
        (HISTORY, {"variables": run}),
        ('{ mlflowGetRun(input: {runId: "nope"}) { run { info { runUuid } } } }', {}),
        ('{ mlflowGetExperiment(input: {experimentId: "12345"}) { experiment { name } } }', {}),
        (TOO_WIDE, {}),
        ("{ nope }", {}),
        (ARBITRARY, {"variables": run, "operationName": "Other"}),
        ("query One { test { output } } query Two { test { output } }", {}),
    ]


def test_queries_answer_as_on_a_stock_server(server: RunningServer, stock: str) -> None:
    ours, theirs = seed(server.http_url), seed(stock)
    for query, extra in requests_to_compare(ours):
        # The stock request carries the stock server's ids.
        stock_extra = json.loads(
            json.dumps(extra).replace(ours["run"], theirs["run"]).replace(ours["experiment"], theirs["experiment"])
        )
        expected = ask(stock, theirs, query, **stock_extra)
        assert ask(server.http_url, ours, query, **extra) == expected, query


def test_the_ui_run_query_renders_nan_and_infinities_as_stock(server: RunningServer) -> None:
    ids = seed(server.http_url)
    status, answer = ask(
        server.http_url, ids, ui_query("GetRun"), operationName="GetRun", variables={"data": {"runId": ids["run"]}}
    )
    assert status == 200 and answer["errors"] is None
    values = {m["key"]: m["value"] for m in answer["data"]["mlflowGetRun"]["run"]["data"]["metrics"]}
    assert values["odd"] is None  # GraphQL has no NaN
    assert values["big"] == 1.7976931348623157e308 and values["small"] == -1.7976931348623157e308


def test_a_prepared_query_is_refused_or_answered_each_time_as_the_first(server: RunningServer) -> None:
    # Queries are parsed, checked and validated once (compat.graphql._prepared); their answers must not be.
    unknown = {"query": '{ test(inputString: "a") { output nosuchfield } }'}
    deep = {"query": "{ " + "test { output } " * 11 + "}"}  # more root fields than stock's safety check allows
    echo = {"query": "query Echo($s: String) { test(inputString: $s) { output } }"}
    for _ in range(2):
        refused = [requests.post(f"{server.http_url}/graphql", json=b, timeout=30).json() for b in (unknown, deep)]
        assert [a["data"] for a in refused] == [None, None] and all(a["errors"] for a in refused)
        assert "nosuchfield" in refused[0]["errors"][0]
        for text in ("x", "y"):
            answer = requests.post(f"{server.http_url}/graphql", json={**echo, "variables": {"s": text}}, timeout=30)
            assert answer.json() == {"data": {"test": {"output": text}}, "errors": None}


@pytest.mark.parametrize(
    "body",
    [
        {"query": "query {"},
        {"query": "{ " + "test { output } " * 10_000 + "}"},
        {"query": 5},
        {"query": "{ test { output } }", "variables": [1]},
        {},
    ],
)
def test_malformed_requests_get_a_graphql_error_not_a_500(server: RunningServer, body: dict[str, Any]) -> None:
    # Stock answers these with an HTML 500 page (its parser's exception escapes); see the README.
    response = requests.post(f"{server.http_url}/graphql", json=body, timeout=30)
    assert response.status_code == 400
    answer = response.json()
    assert answer["data"] is None and len(answer["errors"]) == 1


def test_model_versions_are_empty_where_no_registry_is_served() -> None:
    """A node with no registry store serves no model-versions route; GraphQL then answers an empty list."""
    app = Starlette(routes=ui_routes(GraphQlApi()))
    query = '{ mlflowSearchModelVersions(input: {filter: ""}) { modelVersions { name } } }'
    body = json.dumps({"query": query}).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/graphql",
        "raw_path": b"/graphql",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    }
    status, answer = asyncio.run(graphql._send(app, scope, body))
    assert status == 200
    assert json.loads(answer) == {"data": {"mlflowSearchModelVersions": {"modelVersions": []}}, "errors": None}


#: Every special value a metric can hold, spread over the keys of the wide run.
_SPECIAL = [0.5, math.nan, math.inf, -math.inf, -0.0, 5e-324, 2.5e16, -1.7976931348623157e308]
WIDE_QUERIES = [
    # Aliases, a fragment, a skipped field and a metric list twice: the fast path collects fields as graphql-core.
    """query Wide($id: String) { mlflowGetRun(input: {runId: $id}) { run { data {
         metrics { k: key ...M step @skip(if: true) __typename }
         again: metrics { value timestamp v2: value } } } } }
       fragment M on MlflowMetricExtension { value timestamp }""",
    """mutation Search($ids: [String]) { mlflowSearchRuns(input: {experimentIds: $ids, maxResults: 5}) {
         runs { info { runId } data { metrics { key value step timestamp } } } } }""",
    # A NaN in a history is an error on stock's schema (its type has no null for NaN); the answer keeps that error.
    """query History($id: String) { mlflowGetMetricHistoryBulkInterval(
         input: {runIds: [$id], metricKey: "k.0", maxResults: 20}) { metrics { key value step timestamp runId } } }""",
]


def _wide_run(server: RunningServer, keys: int) -> str:
    """One run with `keys` metric keys of two steps each, loaded through the real sink."""
    assert server.sql is not None
    run_id = "w" * 32
    sink = ClickHouseSink(server.sql, "trackhouse")
    sink.write(Batch(experiments=(ExperimentRow("77", "wide", 1_700_000_000_000),)))
    sink.write(Batch(runs=(RunRow(run_id, "77", "wide", "FINISHED", 1_700_000_000_000, 1_700_000_001_000, "u", 1),)))
    n = keys * 2
    sink.write(
        Batch(
            metrics=Metrics(
                run_ids=(run_id,),
                keys=tuple(f"k.{i}" for i in range(keys)),
                run_index=np.zeros(n, np.int32),
                key_index=np.repeat(np.arange(keys, dtype=np.int32), 2),
                step=np.tile(np.array([-3, 2**40], np.int64), keys),
                timestamp=1_700_000_000_000 + np.arange(n, dtype=np.int64),
                value=np.resize(np.array(_SPECIAL), n),
            )
        )
    )
    return run_id


def test_a_run_with_many_metrics_answers_as_graphql_cores_own_path(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GetRun on 2,000 metric keys: the metrics are runs/get's, and every answer is byte for byte the one that
    graphql-core's item-by-item completion and json_format's parse_dict give (the code path before the fast one)."""
    run_id = _wide_run(server, 2_000)
    get_run: tuple[str, dict[str, Any]] = (
        ui_query("GetRun"),
        {"operationName": "GetRun", "variables": {"data": {"runId": run_id}}},
    )
    requests_ = [get_run, *((q, {"variables": {"id": run_id, "ids": ["77"]}}) for q in WIDE_QUERIES)]

    def answers() -> list[bytes]:
        url = f"{server.http_url}/graphql"
        return [requests.post(url, json={"query": q, **extra}, timeout=60).content for q, extra in requests_]

    fast = answers()
    rest = requests.get(f"{server.http_url}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, timeout=60).json()
    metrics = json.loads(fast[0])["data"]["mlflowGetRun"]["run"]["data"]["metrics"]
    assert len(metrics) == 2_000
    assert metrics == [
        {
            "key": m["key"],
            "value": None if m["value"] == "NaN" else _clamped(m["value"]),
            "step": str(m["step"]),
            "timestamp": str(m["timestamp"]),
        }
        for m in rest["run"]["data"]["metrics"]
    ]
    assert {m["step"] for m in metrics} == {str(2**40)}
    assert json.loads(fast[3])["errors"]  # the NaN history point is an error, as on graphql-core's own path
    monkeypatch.setattr(graphql, "_MetricListsContext", ExecutionContext)
    monkeypatch.setattr(graphql, "_parse_answer", parse_dict)
    assert answers() == fast


def _clamped(value: float | str) -> float:
    number = float(value)
    return math.copysign(1.7976931348623157e308, number) if math.isinf(number) else number
