"""The model registry through the real MLflow client against a real `trackhouse serve` process.

Registers from a run's artifacts, sets aliases, moves stages, loads by version and by alias and
predicts, downloads with the `mlflow` CLI, refuses sources outside a run, and checks that
registrations from several processes at once get versions 1..N with no gap and no duplicate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sklearn.linear_model import LinearRegression

from tests.conftest import ROOT, RunningServer, ServerProcess
from tests.stock import stock_server
from trackhouse.ingest import auth

pytestmark = [
    # MLflow's own notices while it saves and loads an sklearn model, and its deprecation of stages.
    pytest.mark.filterwarnings("ignore:.*type hint is inferred:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*Model registry stages will be removed:FutureWarning"),
]
FEATURES = np.array([[0.0], [1.0], [2.0], [3.0]])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One `trackhouse serve` for the module: its registry database is migrated once, on first use."""
    process = ServerProcess(tmp_path_factory.mktemp("registry") / "data")
    process.start()
    yield f"http://127.0.0.1:{process.http_port}"
    process.terminate()


@pytest.fixture
def client(served: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[MlflowClient]:
    # Errors are asserted, not retried.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    mlflow.set_tracking_uri(served)
    yield MlflowClient(served)
    mlflow.end_run()
    mlflow.set_tracking_uri("")


def error_code(exc: pytest.ExceptionInfo[MlflowException]) -> str:
    return str(exc.value.error_code)


def run_with_model(slope: float, experiment: str = "registry") -> str:
    """A run whose artifacts hold an sklearn model at `model/` (y = slope * x), as log_model lays it out."""
    mlflow.set_experiment(experiment)
    model = LinearRegression().fit(FEATURES, FEATURES[:, 0] * slope)
    with mlflow.start_run() as run, tempfile.TemporaryDirectory() as tmp:
        mlflow.sklearn.save_model(model, f"{tmp}/model")
        mlflow.log_artifacts(f"{tmp}/model", "model")
        mlflow.log_metric("slope", slope)
    return str(run.info.run_id)


def test_register_alias_load_and_predict(client: MlflowClient) -> None:
    first, second = run_with_model(2.0), run_with_model(3.0)
    v1 = mlflow.register_model(f"runs:/{first}/model", "forecaster")
    v2 = mlflow.register_model(f"runs:/{second}/model", "forecaster")
    assert (v1.version, v2.version) == ("1", "2")
    assert v1.run_id == first and v1.status == "READY"
    assert v1.source == f"{client.get_run(first).info.artifact_uri}/model"
    assert str(v1.source).startswith("mlflow-artifacts:/")

    client.set_registered_model_alias("forecaster", "champion", "2")
    assert client.get_model_version_by_alias("forecaster", "champion").version == "2"
    assert client.get_registered_model("forecaster").aliases == {"champion": "2"}
    by_version = mlflow.pyfunc.load_model("models:/forecaster/1").predict(FEATURES)
    by_alias = mlflow.pyfunc.load_model("models:/forecaster@champion").predict(FEATURES)
    np.testing.assert_allclose(by_version, FEATURES[:, 0] * 2.0)
    np.testing.assert_allclose(by_alias, FEATURES[:, 0] * 3.0)

    client.delete_registered_model_alias("forecaster", "champion")
    with pytest.raises(MlflowException) as missing:
        client.get_model_version_by_alias("forecaster", "champion")
    assert error_code(missing) == "INVALID_PARAMETER_VALUE"  # as stock's store answers


def test_log_model_registers_through_a_logged_model(client: MlflowClient) -> None:
    """MLflow 3's log_model(registered_model_name=...) creates a logged model, then a version whose source is it."""
    mlflow.set_experiment("registry-log-model")
    model = LinearRegression().fit(FEATURES, FEATURES[:, 0] * 4.0)
    with mlflow.start_run() as run:
        info = mlflow.sklearn.log_model(model, name="model", registered_model_name="logged-forecaster")
    version = client.get_model_version("logged-forecaster", "1")
    assert version.run_id == run.info.run_id
    # No version.model_id: MLflow's SQLAlchemy registry store does not keep it, so stock answers none either.
    assert version.source == f"models:/{info.model_id}"
    linked = client.get_logged_model(info.model_id).tags["mlflow.modelVersions"]
    assert {"name": "logged-forecaster", "version": 1} in json.loads(linked)
    predicted = mlflow.pyfunc.load_model("models:/logged-forecaster/1").predict(FEATURES)
    np.testing.assert_allclose(predicted, FEATURES[:, 0] * 4.0)


def test_registered_model_lifecycle_search_and_tags(client: MlflowClient) -> None:
    for i in range(5):
        client.create_registered_model(f"life-{i}", tags={"team": "a" if i % 2 else "b"}, description=f"d{i}")
    with pytest.raises(MlflowException) as duplicate:
        client.create_registered_model("life-0")
    assert error_code(duplicate) == "RESOURCE_ALREADY_EXISTS"

    found = client.search_registered_models("name LIKE 'life-%' AND tags.team = 'a'", order_by=["name DESC"])
    assert [m.name for m in found] == ["life-3", "life-1"]
    first = client.search_registered_models("name LIKE 'life-%'", max_results=2, order_by=["name"])
    rest = client.search_registered_models("name LIKE 'life-%'", max_results=10, page_token=first.token)
    assert [m.name for m in first] + [m.name for m in rest] == [f"life-{i}" for i in range(5)]
    assert first.token and not rest.token

    client.update_registered_model("life-0", description="new words")
    client.set_registered_model_tag("life-0", "stage", "beta")
    client.delete_registered_model_tag("life-0", "team")
    client.rename_registered_model("life-0", "life-renamed")
    got = client.get_registered_model("life-renamed")
    assert (got.description, got.tags) == ("new words", {"stage": "beta"})

    client.delete_registered_model("life-renamed")
    with pytest.raises(MlflowException) as gone:
        client.get_registered_model("life-renamed")
    assert error_code(gone) == "RESOURCE_DOES_NOT_EXIST"
    with pytest.raises(MlflowException) as bad_filter:
        client.search_registered_models("nonsense ~ 1")
    assert error_code(bad_filter) == "INVALID_PARAMETER_VALUE"


def test_versions_stages_tags_search_and_delete(client: MlflowClient) -> None:
    run_id = run_with_model(1.0)
    client.create_registered_model("staged")
    for _ in range(3):
        client.create_model_version("staged", f"runs:/{run_id}/model", run_id=run_id, tags={"k": "v"})
    client.transition_model_version_stage("staged", "1", "Production")
    moved = client.transition_model_version_stage("staged", "2", "production", archive_existing_versions=True)
    assert moved.current_stage == "Production"
    stages = {v.version: v.current_stage for v in client.search_model_versions("name = 'staged'")}
    assert stages == {"1": "Archived", "2": "Production", "3": "None"}
    latest = {v.current_stage: v.version for v in client.get_latest_versions("staged")}
    assert latest == {"Archived": "1", "Production": "2", "None": "3"}
    with pytest.raises(MlflowException) as bad_stage:
        client.transition_model_version_stage("staged", "3", "Nowhere")
    assert error_code(bad_stage) == "INVALID_PARAMETER_VALUE"

    client.update_model_version("staged", "3", description="third")
    client.set_model_version_tag("staged", "3", "checked", "yes")
    client.delete_model_version_tag("staged", "3", "k")
    third = client.get_model_version("staged", "3")
    assert (third.description, third.tags) == ("third", {"checked": "yes"})
    assert [v.version for v in client.search_model_versions(f"run_id = '{run_id}' AND tags.checked = 'yes'")] == ["3"]
    assert client.get_model_version_download_uri("staged", "3") == third.source

    client.delete_model_version("staged", "3")
    client.create_model_version("staged", f"runs:/{run_id}/model", run_id=run_id)
    # A deleted number is never handed out again.
    assert sorted(v.version for v in client.search_model_versions("name = 'staged'")) == ["1", "2", "4"]


def test_sources_outside_the_run_are_refused(client: MlflowClient, served: str) -> None:
    run_id = run_with_model(1.0)
    other = run_with_model(1.0)
    client.create_registered_model("guarded")
    root = client.get_run(run_id).info.artifact_uri
    refused = [
        ("/etc", run_id),  # local path outside the run's artifacts
        (f"runs:/{other}/model", run_id),  # a different run's artifacts
        (f"{root}/../../{other}/artifacts/model", run_id),  # climbing out
        (f"{root.replace(run_id, other)}/model", run_id),  # proxied artifacts of another run
        (f"{root}/model", ""),  # proxied artifacts, no run named
        ("http://169.254.169.254/latest/meta-data", run_id),  # a host the operator did not configure
    ]
    for source, source_run in refused:
        with pytest.raises(MlflowException) as exc:
            client.create_model_version("guarded", source, run_id=source_run)
        assert error_code(exc) == "INVALID_PARAMETER_VALUE", source
    assert client.search_model_versions("name = 'guarded'") == []
    answer = requests.post(f"{served}/api/2.0/mlflow/model-versions/create", json={"name": "guarded"}, timeout=10)
    assert answer.status_code == 400 and answer.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "source" in answer.json()["message"]


def test_registry_through_the_ajax_prefix_and_from_another_version(client: MlflowClient, served: str) -> None:
    run_id = run_with_model(1.0)
    ajax = f"{served}/ajax-api/2.0/mlflow"
    created = requests.post(f"{ajax}/registered-models/create", json={"name": "via-ajax"}, timeout=10)
    assert created.status_code == 200 and created.json()["registered_model"]["name"] == "via-ajax"
    body = {"name": "via-ajax", "source": f"runs:/{run_id}/model", "run_id": run_id}
    assert (
        requests.post(f"{ajax}/model-versions/create", json=body, timeout=10).json()["model_version"]["version"] == "1"
    )
    copy = client.create_model_version("via-ajax", "models:/via-ajax/1")
    assert (copy.version, copy.source, copy.run_id) == ("2", "models:/via-ajax/1", run_id)
    assert client.get_model_version_download_uri("via-ajax", "2") == f"runs:/{run_id}/model"
    missing = requests.get(f"{ajax}/registered-models/get", params={"name": "nope"}, timeout=10)
    assert missing.status_code == 404 and missing.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"


def test_the_mlflow_cli_downloads_a_version(client: MlflowClient, served: str, tmp_path: Path) -> None:
    run_id = run_with_model(5.0)
    mlflow.register_model(f"runs:/{run_id}/model", "downloadable")
    command = [sys.executable, "-m", "mlflow", "artifacts", "download", "-u", "models:/downloadable/1"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": served}
    subprocess.run([*command, "-d", str(tmp_path)], check=True, env=env, capture_output=True, timeout=300)
    assert "sklearn" in (tmp_path / "MLmodel").read_text()
    # The UI's read of a version's MLmodel, as stock's /model-versions/get-artifact.
    ui_read = f"{served}/model-versions/get-artifact"
    mlmodel = requests.get(ui_read, params={"name": "downloadable", "version": "1", "path": "MLmodel"}, timeout=30)
    assert mlmodel.status_code == 200 and mlmodel.text == (tmp_path / "MLmodel").read_text()
    climbing = requests.get(ui_read, params={"name": "downloadable", "version": "1", "path": "../../x"}, timeout=30)
    assert climbing.status_code == 400


CONCURRENT_WRITER = """
import os, sys, time
from mlflow.tracking import MlflowClient
url, name, run_id, go, count = sys.argv[1:6]
client = MlflowClient(url)
while not os.path.exists(go):
    time.sleep(0.01)
for _ in range(int(count)):
    print(client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id).version, flush=True)
"""


def test_concurrent_registrations_from_processes_get_consecutive_versions(
    client: MlflowClient, served: str, tmp_path: Path
) -> None:
    run_id = run_with_model(1.0)
    client.create_registered_model("contended")
    go, writers, each = tmp_path / "go", 4, 10
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_WRITER, served, "contended", run_id, str(go), str(each)],
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        for _ in range(writers)
    ]
    go.touch()  # every writer starts at once, after its slow import
    handed_out: list[int] = []
    for process in processes:
        out, _ = process.communicate(timeout=300)
        assert process.returncode == 0
        handed_out += [int(line) for line in out.split()]
    assert sorted(handed_out) == list(range(1, writers * each + 1))
    stored = [int(v.version) for v in client.search_model_versions("name = 'contended'", max_results=1000)]
    assert sorted(stored) == list(range(1, writers * each + 1))


def test_a_reader_serves_the_registry_and_refuses_writes(start_server: Any) -> None:
    reader: RunningServer = start_server(role="reader")
    api = f"{reader.http_url}/api/2.0/mlflow"
    answer = requests.post(f"{api}/registered-models/create", json={"name": "x"}, timeout=60)
    assert answer.status_code == 400 and "read-only" in answer.json()["message"]
    assert requests.get(f"{api}/registered-models/search", timeout=60).json() == {}


def exchange(url: str) -> list[tuple[int, Any]]:
    """The same registry calls against a server; answers with times and the run id made comparable."""
    api = f"{url}/api/2.0/mlflow"
    run_id = requests.post(f"{api}/runs/create", json={"experiment_id": "0"}, timeout=30).json()["run"]["info"][
        "run_id"
    ]
    name, source = "shapes", f"runs:/{run_id}/model"
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "registered-models/create", {"name": name, "tags": [{"key": "t", "value": "1"}], "description": "d"}),
        ("POST", "registered-models/create", {"name": name}),
        ("GET", "registered-models/get", {"name": "missing"}),
        ("POST", "model-versions/create", {"name": name, "source": source, "run_id": run_id}),
        ("POST", "model-versions/create", {"name": name, "source": source, "run_id": run_id, "description": "two"}),
        ("POST", "model-versions/create", {"name": name, "source": "/etc", "run_id": run_id}),
        ("POST", "registered-models/alias", {"name": name, "alias": "champion", "version": "1"}),
        ("GET", "registered-models/alias", {"name": name, "alias": "champion"}),
        ("POST", "model-versions/transition-stage", {"name": name, "version": "2", "stage": "Staging"}),
        ("PATCH", "model-versions/update", {"name": name, "version": "1", "description": "one"}),
        ("POST", "model-versions/set-tag", {"name": name, "version": "1", "key": "k", "value": "v"}),
        ("GET", "registered-models/search", {"filter": f"name = '{name}'"}),
        ("GET", "model-versions/search", {"filter": f"name = '{name}'", "order_by": "version_number DESC"}),
        ("GET", "registered-models/get", {"name": name}),
        ("GET", "model-versions/get", {"name": name, "version": "9"}),
        ("GET", "model-versions/get-download-uri", {"name": name, "version": "2"}),
        ("GET", "registered-models/search", {"max_results": "5000"}),
        ("DELETE", "registered-models/alias", {"name": name, "alias": "champion"}),
        ("DELETE", "model-versions/delete", {"name": name, "version": "2"}),
        ("DELETE", "registered-models/delete", {"name": name}),
    ]
    answers = []
    for method, path, payload in calls:
        if method == "GET":
            answer = requests.get(f"{api}/{path}", params=payload, timeout=30)
        else:
            answer = requests.request(method, f"{api}/{path}", json=payload, timeout=30)
        answers.append((answer.status_code, comparable(answer.json(), run_id)))
    return answers


def comparable(value: Any, run_id: str) -> Any:
    if isinstance(value, dict):
        return {k: 0 if k.endswith("_timestamp") else comparable(v, run_id) for k, v in value.items()}
    if isinstance(value, list):
        return [comparable(v, run_id) for v in value]
    return value.replace(run_id, "RUN") if isinstance(value, str) else value


@pytest.fixture
def stock_mlflow(tmp_path: Path) -> Iterator[str]:
    """A stock `mlflow server` on SQLite and a free port (patient: its first start migrates a fresh database)."""
    yield from stock_server(tmp_path, artifact_root=False)


def test_answers_match_a_stock_mlflow_server(served: str, stock_mlflow: str) -> None:
    assert exchange(served) == exchange(stock_mlflow)


def test_the_readme_promotion_example_runs_verbatim(client: MlflowClient, served: str) -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- promotion-example -->")[1].split("<!-- /promotion-example -->")[0].strip()
    code = block.removeprefix("```python").removesuffix("```").replace('"http://127.0.0.1:5000"', repr(served))
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)

    experiment = client.get_experiment_by_name("ridge-sweep")
    assert experiment is not None
    sweep = client.search_runs([experiment.experiment_id])
    assert len(sweep) == 3
    best = min(sweep, key=lambda run: run.data.metrics["val_rmse"])
    champion = client.get_model_version_by_alias("ridge-forecaster", "champion")
    assert champion.run_id == best.info.run_id
    assert namespace["champion"].predict(namespace["X"][:3]).shape == (3,)


def test_roles_scope_the_registry(start_server: Any, tmp_path: Path) -> None:
    """With authentication, the read role reads the registry (including POST get-latest-versions), never writes."""
    path = tmp_path / "auth.json"
    auth.add_user(path, "writer", "writer-password", role="write")
    auth.add_user(path, "reader", "reader-password", role="read")
    secured: RunningServer = start_server(network={"auth_file": path})
    api = f"{secured.http_url}/api/2.0/mlflow"
    writer, reader = ("writer", "writer-password"), ("reader", "reader-password")
    created = requests.post(f"{api}/registered-models/create", json={"name": "scoped"}, auth=writer, timeout=60)
    assert created.status_code == 200
    for method, path_, body in (
        ("POST", "registered-models/create", {"name": "other"}),
        ("POST", "registered-models/alias", {"name": "scoped", "alias": "a", "version": "1"}),
        ("PATCH", "registered-models/update", {"name": "scoped", "description": "x"}),
        ("DELETE", "registered-models/delete", {"name": "scoped"}),
        ("POST", "model-versions/transition-stage", {"name": "scoped", "version": "1", "stage": "Production"}),
    ):
        refused = requests.request(method, f"{api}/{path_}", json=body, auth=reader, timeout=60)
        assert refused.status_code == 403, path_
    latest = requests.post(
        f"{api}/registered-models/get-latest-versions", json={"name": "scoped"}, auth=reader, timeout=60
    )
    assert (latest.status_code, latest.json()) == (200, {})
    got = requests.get(f"{api}/registered-models/get", params={"name": "scoped"}, auth=reader, timeout=60)
    assert got.json()["registered_model"]["name"] == "scoped"
    assert requests.get(f"{api}/registered-models/search", timeout=60).status_code == 401
