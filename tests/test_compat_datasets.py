"""Datasets as run inputs: one script, through the real MLflow client, against trackhouse and a stock server.

The same calls go to both; their answers (run inputs, dataset searches, `datasets.*` filters and
errors) must be the same, up to the ids each server assigns.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mlflow
import pandas as pd  # type: ignore[import-untyped]
import pytest
from mlflow.data.pandas_dataset import from_pandas
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tests.conftest import RunningServer
from tests.stock import answer, error_answer, stock_server

# MLflow's dataset code calls pandas in a way pandas 3 warns about; the warning is MLflow's, not ours.
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")

FILTERS = [
    "datasets.name = 'train'",
    "datasets.name != 'train'",
    "datasets.digest LIKE '%'",
    "datasets.context = 'training'",
    "datasets.context IN ('eval', 'nothing')",
    "dataset.name ILIKE 'EV%' AND params.kind = 'b'",
]


@pytest.fixture(scope="module")
def stock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from stock_server(tmp_path_factory.mktemp("stock"))


@pytest.fixture
def no_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    train = pd.DataFrame({"x": [1.0, 2.0, 3.0], "y": [0.5, 0.25, 0.125]})
    return train, train.head(2)


def log_script(url: str, experiment: str) -> dict[str, str]:
    """The user's script: datasets logged with and without context, repeated, and across runs."""
    mlflow.set_tracking_uri(url)
    try:
        mlflow.set_experiment(experiment)
        train, evaluation = frames()
        ids = {}
        with mlflow.start_run(run_name="a") as run:
            mlflow.log_param("kind", "a")
            mlflow.log_input(
                from_pandas(train, name="train", source="s3://bucket/train.csv"),
                context="training",
                tags={"split": "full"},
            )
            mlflow.log_input(from_pandas(evaluation, name="eval", source="s3://bucket/eval.csv"))
            # Logged again with another context: stock keeps the first input and changes nothing.
            mlflow.log_input(from_pandas(train, name="train", source="s3://bucket/train.csv"), context="again")
            ids["a"] = run.info.run_id
        with mlflow.start_run(run_name="b") as run:
            mlflow.log_param("kind", "b")
            # The same dataset in the same experiment: one dataset, a second input.
            mlflow.log_input(from_pandas(train, name="train", source="s3://bucket/train.csv"), context="eval")
            mlflow.log_input(from_pandas(evaluation, name="eval", source="s3://bucket/eval.csv"), "eval")
            ids["b"] = run.info.run_id
        with mlflow.start_run(run_name="c") as run:
            ids["c"] = run.info.run_id
        ids["experiment"] = mlflow.get_experiment_by_name(experiment).experiment_id  # type: ignore[union-attr]
        return ids
    finally:
        mlflow.set_tracking_uri("")


def run_inputs(url: str, run_id: str) -> Any:
    status, body = answer("GET", f"{url}/api/2.0/mlflow/runs/get", params={"run_id": run_id})
    assert status == 200, body
    return body["run"]["inputs"]


def searched_names(url: str, experiment_id: str, filter_string: str) -> list[str]:
    runs = MlflowClient(url).search_runs([experiment_id], filter_string, order_by=["attributes.run_name"])
    return [r.info.run_name for r in runs]


def dataset_summaries(url: str, experiment_id: str) -> list[dict[str, str]]:
    status, body = answer(
        "POST", f"{url}/ajax-api/2.0/mlflow/experiments/search-datasets", json={"experiment_ids": [experiment_id]}
    )
    assert status == 200, body
    summaries = body.get("dataset_summaries", [])
    for summary in summaries:
        assert summary.pop("experiment_id") == experiment_id
    return sorted(summaries, key=lambda s: sorted(s.items()))


def test_logged_datasets_read_back_as_on_a_stock_server(server: RunningServer, stock: str) -> None:
    ours, theirs = log_script(server.http_url, "datasets"), log_script(stock, "datasets")
    for name in ("a", "b", "c"):
        assert run_inputs(server.http_url, ours[name]) == run_inputs(stock, theirs[name]), name
    found = MlflowClient(server.http_url).get_run(ours["a"]).inputs.dataset_inputs  # type: ignore[union-attr]
    assert [(i.dataset.name, {t.key: t.value for t in i.tags}) for i in found] == [
        ("train", {"split": "full", "mlflow.data.context": "training"}),
        ("eval", {}),
    ]
    assert dataset_summaries(server.http_url, ours["experiment"]) == dataset_summaries(stock, theirs["experiment"])
    assert len(dataset_summaries(server.http_url, ours["experiment"])) == 4
    for filter_string in FILTERS:
        expected = searched_names(stock, theirs["experiment"], filter_string)
        assert searched_names(server.http_url, ours["experiment"], filter_string) == expected, filter_string
    # The runs of a search page carry their inputs too.
    status, page = answer(
        "POST", f"{server.http_url}/api/2.0/mlflow/runs/search", json={"experiment_ids": [ours["experiment"]]}
    )
    assert status == 200
    assert {r["info"]["run_name"]: r["inputs"] for r in page["runs"]} == {
        name: run_inputs(server.http_url, ours[name]) for name in ("a", "b", "c")
    }


def bad_log_inputs(run_id: str) -> list[dict[str, Any]]:
    source = '{"uri": "s3://b/x"}'
    return [
        {"run_id": run_id, "datasets": [{"dataset": {"name": "n" * 600, "digest": "d", "source_type": "s3"}}]},
        {"run_id": run_id, "datasets": [{"dataset": {"name": "n", "digest": "d" * 100, "source_type": "s3"}}]},
        {
            "run_id": run_id,
            "datasets": [
                {
                    "dataset": {"name": "n", "digest": "d", "source_type": "s3", "source": source},
                    "tags": [{"key": "k" * 300, "value": "v"}],
                }
            ],
        },
        {"run_id": "0" * 32, "datasets": []},
        {"datasets": []},
    ]


def test_bad_log_inputs_fail_as_on_a_stock_server(server: RunningServer, stock: str, no_retries: None) -> None:
    ours = MlflowClient(server.http_url).create_run("0").info.run_id
    theirs = MlflowClient(stock).create_run("0").info.run_id
    for ours_body, theirs_body in zip(bad_log_inputs(ours), bad_log_inputs(theirs), strict=True):
        got = error_answer("POST", f"{server.http_url}/api/2.0/mlflow/runs/log-inputs", json=ours_body)
        expected = error_answer("POST", f"{stock}/api/2.0/mlflow/runs/log-inputs", json=theirs_body)
        assert got == expected


def test_search_datasets_limits_as_on_a_stock_server(server: RunningServer, stock: str) -> None:
    bodies: list[dict[str, Any]] = [
        {"experiment_ids": []},
        {"experiment_ids": [str(i) for i in range(21)]},
        {"experiment_ids": ["x"]},
    ]
    for body in bodies:
        path = "/ajax-api/2.0/mlflow/experiments/search-datasets"
        assert error_answer("POST", server.http_url + path, json=body) == error_answer("POST", stock + path, json=body)


def test_a_deleted_run_takes_no_inputs(server: RunningServer, no_retries: None) -> None:
    client = MlflowClient(server.http_url)
    run_id = client.create_run("0").info.run_id
    client.delete_run(run_id)
    dataset = DatasetInput(Dataset("n", "d", "s3", '{"uri": "s3://b/x"}'), [InputTag("k", "v")])
    with pytest.raises(MlflowException, match="must be in the 'active' state"):
        client.log_inputs(run_id, [dataset])
    assert server.scalar("SELECT count() FROM trackhouse.dataset_inputs") == 0
