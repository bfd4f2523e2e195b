"""The trackhouse:// MLflow plugin through the real fluent API and MlflowClient, in a child process.

A child process, because MLflow reads its store entry points once, when it is
first imported; the child sees this checkout's entry points (benchmarks.plugin).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from benchmarks.plugin import plugin_env
from tests.conftest import RunningServer
from tests.test_auth import Users, secured, users  # noqa: F401  (fixtures)
from trackhouse.mlflow_plugin import parse_uri

# Unchanged MLflow calls; the tracking URI comes from MLFLOW_TRACKING_URI. Prints what it read back.
SCRIPT = """
import json, sys
import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

out = {}
mlflow.set_experiment("plugin")
with mlflow.start_run(run_name="fluent") as run:
    mlflow.log_param("lr", 0.1)
    mlflow.set_tag("team", "nlp")
    for step in range(200):
        mlflow.log_metrics({"loss": 1 / (step + 1), "acc": step / 200}, step=step)
    mlflow.log_metric("single", 3.5)
    mlflow.log_text("hello", "notes.txt")
    try:
        mlflow.log_param("lr", 0.2)
    except MlflowException as exc:
        out["changed_param"] = exc.error_code
    try:
        mlflow.log_metric("bad key!", 1.0)
    except MlflowException as exc:
        out["bad_key"] = exc.error_code
fluent = run.info.run_id
client = MlflowClient()
info = client.get_run(fluent)
out["status"] = info.info.status
out["params"] = info.data.params
out["tags_team"] = info.data.tags.get("team")
out["latest"] = info.data.metrics
out["loss"] = [[m.step, m.value] for m in client.get_metric_history(fluent, "loss")]
out["notes"] = mlflow.artifacts.load_text(f"runs:/{fluent}/notes.txt")

# MlflowClient's own log_* calls, and a run that ends through set_terminated.
experiment = client.get_experiment_by_name("plugin").experiment_id
other = client.create_run(experiment).info.run_id
client.log_metric(other, "m", 1.5, step=1)
client.log_batch(other, metrics=[Metric("m", 2.5, 0, 2), Metric("n", 7.0, 0, 2)], params=[], tags=[])
client.set_terminated(other)
out["other"] = sorted([m.key, m.step, m.value] for k in ("m", "n") for m in client.get_metric_history(other, k))

# An unknown run is MLflow's own error at once.
try:
    client.log_metric("0" * 32, "m", 1.0)
except MlflowException as exc:
    out["unknown_run"] = exc.error_code

# A refusal the server makes after the call returned surfaces at the end of a run.
doomed = client.create_run(experiment).info.run_id
client.log_metric(doomed, "m", 1.0)
client.get_metric_history(doomed, "m")  # a read flushes
client.delete_run(doomed)
client.log_metric(doomed, "m", 2.0)  # buffered; the server will refuse it: the run is deleted
last = client.create_run(experiment).info.run_id
try:
    client.set_terminated(last)
except MlflowException as exc:
    out["end_error"] = [exc.error_code, exc.message]
out["last_status"] = client.get_run(last).info.status
print(json.dumps(out))
"""


def run_script(
    server: RunningServer, tmp_path: Path, script: str = SCRIPT, extra_env: dict[str, str] | None = None
) -> dict[str, Any]:
    env = {**plugin_env(tmp_path / "entry-points"), **(extra_env or {})}
    env["MLFLOW_TRACKING_URI"] = f"trackhouse://127.0.0.1:{server.server.grpc_port}?http_port={server.server.http_port}"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_unchanged_mlflow_calls_go_through_the_plugin(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    server = start_server(flush_interval_ms=1_000)  # slow flushes: reads must still see what was logged
    out = run_script(server, tmp_path)
    assert out["status"] == "FINISHED"
    assert out["params"] == {"lr": "0.1"}
    assert out["tags_team"] == "nlp"
    assert out["changed_param"] == "INVALID_PARAMETER_VALUE"
    assert out["bad_key"] == "INVALID_PARAMETER_VALUE"
    assert out["loss"] == [[step, 1 / (step + 1)] for step in range(200)]
    assert out["latest"] == {"loss": 1 / 200, "acc": 199 / 200, "single": 3.5}
    assert out["notes"] == "hello"
    assert out["other"] == [["m", 1, 1.5], ["m", 2, 2.5], ["n", 2, 7.0]]
    assert out["unknown_run"] == "RESOURCE_DOES_NOT_EXIST"
    code, message = out["end_error"]
    assert code == "INVALID_PARAMETER_VALUE"
    assert "1 points in 1 write request(s) rejected" in message and "deleted" in message
    assert out["last_status"] == "FINISHED"
    # The metrics came through gRPC: the server counted them as received requests there.
    assert server.server.telemetry.received_requests._value.get() > 0


def test_the_points_took_the_grpc_path(start_server: Callable[..., RunningServer], tmp_path: Path) -> None:
    """With the REST metric endpoints unable to see them, the points can only have come over gRPC."""
    server = start_server()
    before = server.server.telemetry.received_requests._value.get()
    out = run_script(
        server,
        tmp_path,
        "import json, mlflow\n"
        "with mlflow.start_run() as run:\n"
        "    for s in range(1000):\n"
        "        mlflow.log_metrics({'a': s, 'b': 2 * s}, step=s)\n"
        "print(json.dumps({'run': run.info.run_id}))\n",
    )
    assert server.server.telemetry.received_requests._value.get() > before
    assert server.scalar("SELECT count() FROM trackhouse.metrics WHERE run_id = {r:String}", r=out["run"]) == 2000


def test_mlflows_credential_variables_serve_both_paths(
    secured: RunningServer,  # noqa: F811
    users: Users,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Behind authentication, MLFLOW_TRACKING_TOKEN alone lets an unchanged script log over REST and gRPC."""
    before = secured.server.telemetry.received_requests._value.get()
    out = run_script(
        secured,
        tmp_path,
        "import json, mlflow\n"
        "with mlflow.start_run() as run:\n"
        "    mlflow.log_param('lr', 0.1)\n"
        "    for s in range(500):\n"
        "        mlflow.log_metrics({'a': s}, step=s)\n"
        "h = mlflow.MlflowClient().get_metric_history(run.info.run_id, 'a')\n"
        "print(json.dumps({'run': run.info.run_id, 'points': len(h)}))\n",
        {"MLFLOW_TRACKING_TOKEN": users.writer_token},
    )
    assert out["points"] == 500
    assert secured.server.telemetry.received_requests._value.get() > before


def test_uris_are_parsed_strictly(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_uri("trackhouse://h:50051") == ("grpc://h:50051", "http://h:5000")
    assert parse_uri("trackhouse://h:1?http_port=8&tls=true") == ("grpcs://h:1", "https://h:8")
    monkeypatch.setenv("TRACKHOUSE_HTTP_PORT", "5001")
    assert parse_uri("trackhouse://h:1") == ("grpc://h:1", "http://h:5001")
    from mlflow.exceptions import MlflowException

    for bad in ("trackhouse://h", "trackhouse://h:1/x", "trackhouse://h:1?port=2", "trackhouse://h:1?http_port=x"):
        with pytest.raises(MlflowException):
            parse_uri(bad)
