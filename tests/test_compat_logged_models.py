"""MLflow 3 logged models through the real mlflow client, against trackhouse and a stock `mlflow server`.

The same script (sklearn autolog, log_model, load_model through models:/ and runs:/, predict,
search_logged_models with a metric filter) runs in a child process against each server; what it
observes, with ids and clocks taken out, must be the same. The child keeps autolog's warnings
out of this process, where pytest turns warnings into errors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow.entities import LoggedModelStatus, Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from playwright.sync_api import Page

from benchmarks.uiwalk import CHROMIUM
from tests.conftest import RunningServer
from tests.tansu import free_port
from tests.test_compat_ui import ARTIFACTS, no_error_notification, settle
from tests.test_compat_ui import page as page  # the Chromium fixture, shared
from trackhouse.ingest.batch import Batch, Metrics, RunRow
from trackhouse.ingest.sink import ClickHouseSink
from trackhouse.query import logged_models, schema
from trackhouse.query.connection import Client

SCRIPT = r"""
import json, sys
import mlflow
from mlflow import MlflowClient
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression

mlflow.set_tracking_uri(sys.argv[1])
experiment_id = mlflow.set_experiment("autolog").experiment_id
client = MlflowClient()
X, y = load_breast_cancer(return_X_y=True)
X = X[:, :4]

mlflow.sklearn.autolog()
with mlflow.start_run() as run:
    LogisticRegression(max_iter=2000).fit(X, y)
mlflow.sklearn.autolog(disable=True)
run_id = run.info.run_id
got = client.get_run(run_id)
model_id = got.outputs.model_outputs[0].model_id
model = client.get_logged_model(model_id)


def files(list_fn, path=None):
    out = []
    for f in list_fn(path):
        out += files(list_fn, f.path) if f.is_dir else [f.path]
    return sorted(out)


def metric(m):
    return [m.key, m.value, m.step, m.dataset_name, m.dataset_digest, m.model_id == model_id, m.run_id == run_id]


history = client.get_metric_history(run_id, "training_score")
with mlflow.start_run() as second:
    info = mlflow.sklearn.log_model(LogisticRegression(max_iter=2000).fit(X, y), name="explicit")
    mlflow.log_metric("holdout_auc", 0.75, model_id=info.model_id, dataset=mlflow.data.from_numpy(X, name="holdout"))
by_id = mlflow.pyfunc.load_model(f"models:/{info.model_id}").predict(X[:5])
by_run = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(X[:5])


def names(filter_string, order_by=None):
    found = mlflow.search_logged_models(
        experiment_ids=[experiment_id], filter_string=filter_string, order_by=order_by, output_format="list"
    )
    return [m.name for m in found]


print(json.dumps({
    "run": {
        "metrics": got.data.metrics,
        "params": got.data.params,
        "tags": {k: v for k, v in got.data.tags.items() if k != "mlflow.runName"},
        "artifacts": files(lambda p: client.list_artifacts(run_id, p)),
        "outputs": [[o.model_id == model_id, o.step] for o in got.outputs.model_outputs],
    },
    "history": [[m.key, m.value, m.step, m.model_id, m.dataset_name, m.dataset_digest] for m in history],
    "model": {
        "name": model.name,
        "status": str(model.status),
        "source_run_id": model.source_run_id == run_id,
        "params": model.params,
        "tags": model.tags,
        "metrics": sorted(metric(m) for m in model.metrics),
        "artifacts": files(lambda p: client.list_logged_model_artifacts(model_id, p)),
        "location": model.artifact_location.endswith(f"/models/{model_id}/artifacts"),
    },
    "explicit": {
        "metrics": [[m.key, m.value, m.dataset_name] for m in client.get_logged_model(info.model_id).metrics],
        "by_id": by_id.tolist(),
        "by_run": by_run.tolist(),
    },
    "search": {
        "all": names(None),
        "score": names("metrics.training_score > 0.5"),
        "none": names("metrics.training_score > 2"),
        "holdout": names("metrics.holdout_auc >= 0.75 AND name = 'explicit'"),
        "by_metric": names(None, [{"field_name": "metrics.holdout_auc", "ascending": False}]),
        "param": names("params.max_iter = '2000'"),
    },
}, sort_keys=True))
"""


@pytest.fixture(scope="module")
def stock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A stock `mlflow server`: SQLite, proxied artifacts in a temp directory, on a free port."""
    workdir = tmp_path_factory.mktemp("stock-mlflow")
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--workers", "1"]
    command += ["--serve-artifacts", "--artifacts-destination", str(workdir / "artifacts")]
    with (workdir / "mlflow.log").open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log_text = (workdir / "mlflow.log").read_text()
                    raise RuntimeError(f"mlflow server did not start:\n{log_text}") from None
                time.sleep(0.25)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # its own session: the server and its uvicorn worker
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(15)


def run_script(url: str, tmp_path: Path, text: str = SCRIPT) -> dict[str, Any]:
    script = tmp_path / "script.py"
    script.write_text(text)
    done = subprocess.run(
        [sys.executable, str(script), url], capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.timeout(1200)  # a stock server's start and two sklearn scripts: minutes on a shared 2-core machine
def test_autolog_log_model_load_model_and_search_match_stock(server: RunningServer, stock: str, tmp_path: Path) -> None:
    ours = run_script(server.http_url, tmp_path)
    theirs = run_script(stock, tmp_path)

    assert len(ours["run"]["metrics"]) == 7
    assert {"estimator.html", "training_confusion_matrix.png"} <= set(ours["run"]["artifacts"])
    assert len(ours["run"]["artifacts"]) == 4
    assert ours["model"]["status"] == "READY"
    assert "MLmodel" in ours["model"]["artifacts"]
    assert ours["model"]["metrics"] and all(m[3] == "dataset" for m in ours["model"]["metrics"])
    assert ours["search"]["score"] == ["model"] and ours["search"]["none"] == []
    assert len(ours["explicit"]["by_id"]) == len(ours["explicit"]["by_run"]) == 5
    assert ours["explicit"]["metrics"] == [["holdout_auc", 0.75, "holdout"]]
    assert ours == theirs


def test_history_carries_no_model_link_and_model_metrics_do(server: RunningServer, stock: str) -> None:
    """Stock's run history has no model_id or dataset; a model's metrics have them, and search filters on them."""
    seen = []
    for url in (server.http_url, stock):
        client = MlflowClient(url)
        experiment_id = client.create_experiment(f"links-{time.time_ns()}")
        run = client.create_run(experiment_id)
        model = client.create_logged_model(experiment_id, name="m", source_run_id=run.info.run_id)
        other = client.create_logged_model(experiment_id, name="n")
        run_id, now = run.info.run_id, 1_700_000_000_000
        client.log_batch(
            run_id,
            metrics=[
                Metric("acc", 0.5, now, 0, model_id=model.model_id, dataset_name="val", dataset_digest="d1"),
                Metric("acc", 0.9, now + 1, 1, model_id=model.model_id, dataset_name="test", dataset_digest="d2"),
                Metric("acc", 0.1, now, 0, model_id=other.model_id),
                Metric("loss", 1.0, now, 0),
            ],
        )
        history = [(m.value, m.step, m.model_id, m.dataset_name) for m in client.get_metric_history(run_id, "acc")]
        got = client.get_logged_model(model.model_id)
        search = client.search_logged_models([experiment_id], filter_string="metrics.acc > 0.4")
        val = [{"dataset_name": "val", "dataset_digest": "d1"}]
        on_val = client.search_logged_models([experiment_id], filter_string="metrics.acc > 0.7", datasets=val)
        ordered = client.search_logged_models([experiment_id], order_by=[{"field_name": "metrics.acc"}])
        # Stock matches a name-only dataset filter to points logged without a digest only; trackhouse to any digest.
        any_digest = client.search_logged_models([experiment_id], datasets=[{"dataset_name": "val"}])
        seen.append(
            {
                "history": sorted(history),
                "metrics": sorted((m.key, m.value, m.dataset_name, m.dataset_digest) for m in got.metrics or []),
                "search": [m.name for m in search],
                "on_val": [m.name for m in on_val],
                "ordered": [m.name for m in ordered],
                "latest": client.get_run(run_id).data.metrics,
                "any_digest": [m.name for m in any_digest],
            }
        )
    ours, theirs = seen
    assert (ours.pop("any_digest"), theirs.pop("any_digest")) == (["m"], [])
    assert ours["history"] == [(0.1, 0, None, None), (0.5, 0, None, None), (0.9, 1, None, None)]
    assert ours["metrics"] == [("acc", 0.5, "val", "d1"), ("acc", 0.9, "test", "d2")]
    assert ours["search"] == ["m"] and ours["on_val"] == [] and ours["ordered"] == ["n", "m"]
    assert ours == theirs


def _error(call: Any) -> tuple[str, str]:
    with pytest.raises(MlflowException) as raised:
        call()
    return raised.value.error_code, raised.value.message


def test_lifecycle_tags_params_and_errors_match_stock(server: RunningServer, stock: str) -> None:
    seen = []
    for url in (server.http_url, stock):
        client = MlflowClient(url)
        experiment_id = client.create_experiment(f"life-{time.time_ns()}")
        model = client.create_logged_model(experiment_id, name="life", tags={"a": "1"}, params={"p": "x"})
        model_id = model.model_id
        client.set_logged_model_tags(model_id, {"b": "2", "a": "3"})
        client.log_model_params(model_id, {"q": "y"})
        client.delete_logged_model_tag(model_id, "b")
        missing_tag = _error(lambda: client.delete_logged_model_tag(model_id, "b"))  # noqa: B023
        finalized = client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
        registered = client.create_registered_model(f"reg-{time.time_ns()}").name
        client.create_model_version(registered, f"models:/{model_id}", model_id=model_id)
        versions = json.loads(client.get_logged_model(model_id).tags["mlflow.modelVersions"])
        page = client.search_logged_models([experiment_id], max_results=1)
        for i in range(2):
            client.create_logged_model(experiment_id, name=f"more{i}")
        first = client.search_logged_models([experiment_id], max_results=2)
        second = client.search_logged_models([experiment_id], max_results=2, page_token=first.token)
        client.delete_logged_model(model_id)
        seen.append(
            {
                "created": (model.status == LoggedModelStatus.PENDING, model.tags, model.params),
                "finalized": (str(finalized.status), finalized.tags, finalized.params),
                "missing_tag": missing_tag[0],
                "versions": [(v["name"] == registered, v["version"]) for v in versions],
                "page": ([m.name for m in page], page.token),
                "pages": ([m.name for m in first], [m.name for m in second], second.token),
                "after_delete": _error(lambda: client.get_logged_model(model_id))[0],  # noqa: B023
                "deleted_search": [m.name for m in client.search_logged_models([experiment_id])],
                "unknown": _error(lambda: client.get_logged_model("m-0123"))[1],  # noqa: B023
                "bad_name": _error(lambda: client.create_logged_model(experiment_id, name="a/b"))[1],  # noqa: B023
                "bad_order": _error(
                    lambda: client.search_logged_models([experiment_id], order_by=[{"field_name": "params.p"}])  # noqa: B023
                )[1],
            }
        )
    ours, theirs = seen
    assert ours["finalized"] == ("FAILED", {"a": "3"}, {"p": "x", "q": "y"})
    assert ours["unknown"] == "RESOURCE_DOES_NOT_EXIST: Logged model with ID 'm-0123' not found."
    assert ours["missing_tag"] == "RESOURCE_DOES_NOT_EXIST"
    assert ours["versions"] == [(True, 1)]  # the registry lists the version on the model, as stock
    ours["page"] = (ours["page"][0], ours["page"][1] is None)  # tokens are opaque: only whether there is one
    theirs["page"] = (theirs["page"][0], theirs["page"][1] is None)
    assert ours == theirs


def test_search_filter_values_are_bound_parameters(server: RunningServer) -> None:
    client = MlflowClient(server.http_url)
    experiment_id = client.create_experiment("hostile")
    client.create_logged_model(experiment_id, name="safe", tags={"t": "x' OR 1=1 --"})
    for hostile in ("name = 'x'' OR 1=1 --'", "tags.`t'; DROP TABLE x` = 'y'", "name LIKE '%\\'"):
        try:
            assert client.search_logged_models([experiment_id], filter_string=hostile) == []
        except MlflowException as error:
            assert error.error_code == "INVALID_PARAMETER_VALUE"
    found = client.search_logged_models([experiment_id], filter_string="tags.t = 'x'' OR 1=1 --'")
    assert [m.name for m in found] in ([], ["safe"])
    assert _error(lambda: client.search_logged_models([experiment_id], filter_string="bogus.x = 1"))[0] == (
        "INVALID_PARAMETER_VALUE"
    )
    assert _error(lambda: client.search_logged_models([experiment_id], page_token="not-a-token"))[0] == (
        "INVALID_PARAMETER_VALUE"
    )


def test_migration_6_keeps_existing_points_and_links_new_ones(sql: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    database = "before6"
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:5])
    schema.migrate(sql, database)
    sql.command(f"INSERT INTO {database}.metrics VALUES ('r', 'loss', 1, 10, 0.5)")
    monkeypatch.undo()
    latest = schema.MIGRATIONS[-1][0]  # 6 and every migration after it
    assert schema.migrate(sql, database) == latest
    assert schema.migrate(sql, database) == latest  # idempotent
    assert sql.query(f"SELECT * FROM {database}.metrics").result_rows == [
        ("r", "loss", 1, 10, 0.5, "", "", "", 0, "", 0)  # migration 9: rank 0, no node, attempt 0
    ]

    sink = ClickHouseSink(sql, database)
    run = RunRow("r", "0", "run", "RUNNING", 1, 0, "u", 1)
    linked = Metrics(
        run_ids=("r",),
        keys=("loss",),
        run_index=np.zeros(2, np.int32),
        key_index=np.zeros(2, np.int32),
        step=np.array([2, 3]),
        timestamp=np.array([20, 30]),
        value=np.array([0.4, 0.3]),
        links=(("m-1", "val", "d"),),
        link_index=np.zeros(2, np.int32),
    )
    plain = Metrics(
        run_ids=("r",),
        keys=("acc",),
        run_index=np.zeros(1, np.int32),
        key_index=np.zeros(1, np.int32),
        step=np.array([2]),
        timestamp=np.array([20]),
        value=np.array([0.9]),
    )
    sink.write(Batch(runs=(run,), metrics=Metrics.concat([plain, linked])))
    points = logged_models.metrics_of(sql, database, ["m-1"])["m-1"]
    assert [(p.key, p.step, p.value, p.dataset_name, p.dataset_digest) for p in points] == [
        ("loss", 2, 0.4, "val", "d"),
        ("loss", 3, 0.3, "val", "d"),
    ]
    unlinked = sql.query(f"SELECT key, model_id FROM {database}.metrics WHERE key = 'acc'").result_rows
    assert unlinked == [("acc", "")]


AUTOLOG_ONLY = r"""
import json, sys
import mlflow
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression

mlflow.set_tracking_uri(sys.argv[1])
experiment_id = mlflow.set_experiment("ui-autolog").experiment_id
mlflow.sklearn.autolog()
X, y = load_breast_cancer(return_X_y=True)
with mlflow.start_run() as run:
    LogisticRegression(max_iter=2000).fit(X[:, :4], y)
model_id = mlflow.MlflowClient().get_run(run.info.run_id).outputs.model_outputs[0].model_id
print(json.dumps({"experiment_id": experiment_id, "run_id": run.info.run_id, "model_id": model_id}))
"""


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (make test installs it)")
@pytest.mark.timeout(900)
def test_ui_shows_an_autologged_run_its_model_and_artifacts(
    server: RunningServer, page: tuple[Page, list[str]], tmp_path: Path
) -> None:
    ids = run_script(server.http_url, tmp_path, AUTOLOG_ONLY)
    experiment = f"{server.http_url}/#/experiments/{ids['experiment_id']}"
    tab, problems = page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    tab.goto(f"{experiment}/runs/{ids['run_id']}", wait_until="commit")
    tab.get_by_text("Metrics (7)").wait_for(timeout=30_000)
    tab.get_by_text("Logged models (1)").wait_for(timeout=30_000)
    tab.get_by_text("training_roc_auc").first.wait_for(timeout=30_000)
    settle(tab)
    tab.screenshot(path=ARTIFACTS / "ui-models-1-run.png", full_page=True)
    no_error_notification(tab)

    tab.goto(f"{experiment}/runs/{ids['run_id']}/artifacts", wait_until="commit")
    for name in ("estimator.html", "training_confusion_matrix.png", "training_roc_curve.png"):
        tab.get_by_text(name).first.wait_for(timeout=30_000)
    no_error_notification(tab)

    tab.goto(f"{experiment}/models", wait_until="commit")
    tab.get_by_text("Ready").first.wait_for(timeout=30_000)
    tab.get_by_role("link", name="model", exact=True).first.wait_for(timeout=30_000)
    settle(tab)
    tab.screenshot(path=ARTIFACTS / "ui-models-2-models-tab.png")
    no_error_notification(tab)

    tab.goto(f"{experiment}/models/{ids['model_id']}", wait_until="commit")
    tab.get_by_text("Metrics (7)").wait_for(timeout=30_000)
    tab.get_by_text("dataset (#").first.wait_for(timeout=30_000)
    tab.get_by_text("Parameters (").first.wait_for(timeout=30_000)
    tab.screenshot(path=ARTIFACTS / "ui-models-3-model-page.png", full_page=True)
    no_error_notification(tab)

    tab.goto(f"{experiment}/models/{ids['model_id']}/artifacts", wait_until="commit")
    tab.get_by_text("requirements.txt").first.wait_for(timeout=30_000)
    tab.get_by_text("MLmodel").first.click()
    tab.get_by_text("flavors").first.wait_for(timeout=30_000)  # the preview, through the model's files endpoint
    settle(tab)
    tab.screenshot(path=ARTIFACTS / "ui-models-4-model-artifacts.png")
    no_error_notification(tab)
    assert problems == []
