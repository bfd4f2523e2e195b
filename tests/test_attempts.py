"""Resume after preemption and fork (issue 17), against one real server, with the real MLflow client, the real
trackhouse client and a training process killed with SIGKILL."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import requests
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, RunningServer, start_in_process
from tests.test_mlflow_plugin import run_script
from trackhouse import Client
from trackhouse.compat.security import is_write
from trackhouse.ingest.errors import InvalidArgumentError
from trackhouse.ingest.grpc_auth import READ_METHODS
from trackhouse.query import attempts


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_in_process(tmp_path_factory.mktemp("attempts") / "data")
    yield running
    running.stop()
    if running.sql is not None:
        running.sql.close()


@pytest.fixture
def mlflow_at(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    mlflow.set_tracking_uri(server.http_url)
    return MlflowClient(tracking_uri=server.http_url)


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def chart(server: RunningServer, run_id: str, key: str, max_results: int = 2500) -> list[tuple[int, float]]:
    answer = requests.get(
        f"{server.http_url}/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval",
        params={"run_ids": run_id, "metric_key": key, "max_results": str(max_results)},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    return sorted((m["step"], m["value"]) for m in answer.json().get("metrics", []))


def trackhouse_history(server: RunningServer, run_id: str, key: str, **params: Any) -> list[dict[str, Any]]:
    answer = requests.get(
        f"{server.http_url}/api/2.0/trackhouse/metrics/history",
        params={"run_id": run_id, "metric_key": key, **params},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    return list(answer.json()["metrics"])


def latest(client: MlflowClient, run_id: str) -> dict[str, tuple[int, float]]:
    return {m.key: (m.step, m.value) for m in client.get_run(run_id).data._metric_objs}


def log_steps(client: MlflowClient, run_id: str, steps: range, value: Any, key: str = "loss") -> None:
    metrics = [Metric(key, float(value(s)), 1_700_000_000_000 + s, s) for s in steps]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def test_intervals_cut_each_attempt_at_the_first_step_of_the_later_ones() -> None:
    own = attempts._own_intervals("r", {1: 500, 2: 300})
    assert own == [
        attempts.Interval("r", 0, None, 300),
        attempts.Interval("r", 1, 500, 300),  # restarted from 300 again: attempt 1 is wholly superseded
        attempts.Interval("r", 2, 300, None),
    ]
    assert own[1].empty()
    assert attempts._own_intervals("r", {}) == [attempts.Interval("r", None, None, None)]


def test_mlflow_resume_opens_an_attempt_and_reads_show_one_value_per_step(
    server: RunningServer, mlflow_at: MlflowClient
) -> None:
    with mlflow.start_run() as active:
        run_id = active.info.run_id
        log_steps(mlflow_at, run_id, range(10), lambda s: s)
    assert server.scalar("SELECT count() FROM trackhouse.run_attempts WHERE run_id = {r:String}", r=run_id) == 0
    with mlflow.start_run(run_id=run_id):  # MLflow's own resume: runs/update to RUNNING
        log_steps(mlflow_at, run_id, range(5, 8), lambda s: 100 + s)
        # The restart has not yet passed where the first attempt got to: its latest is still the latest shown.
        assert latest(mlflow_at, run_id)["loss"] == (7, 107.0)
        log_steps(mlflow_at, run_id, range(8, 15), lambda s: 100 + s)
    expected = [(s, float(s)) for s in range(5)] + [(s, 100.0 + s) for s in range(5, 15)]
    assert history(mlflow_at, run_id, "loss") == expected
    assert chart(server, run_id, "loss") == expected
    assert latest(mlflow_at, run_id)["loss"] == (14, 114.0)
    assert mlflow_at.get_run(run_id).info.status == "FINISHED"
    # Superseded points stay stored, and trackhouse's own history returns them with their attempts.
    every = trackhouse_history(server, run_id, "loss", all_attempts="true")
    assert sorted((m["step"], m["attempt"]) for m in every) == sorted(
        [(s, 0) for s in range(10)] + [(s, 1) for s in range(5, 15)]
    )
    shown = trackhouse_history(server, run_id, "loss")
    assert [(m["step"], m["value"], m["attempt"]) for m in shown] == [(s, v, int(s >= 5)) for s, v in expected]
    # A rename of a running run is not a resume.
    with mlflow.start_run(run_id=run_id):
        mlflow_at.update_run(run_id, name="renamed")
    assert server.scalar("SELECT max(attempt) FROM trackhouse.run_attempts WHERE run_id = {r:String}", r=run_id) == 2


def test_chart_of_a_long_resumed_series_reads_buckets_yet_never_shows_a_superseded_point(
    server: RunningServer, mlflow_at: MlflowClient
) -> None:
    run_id = mlflow_at.create_run("0").info.run_id
    # Attempt 0 logs 0..2999, with a spike at 2000 that the restart (from step 1000) supersedes.
    log_steps(mlflow_at, run_id, range(3000), lambda s: 1e6 if s == 2000 else 1.0)
    mlflow_at.set_terminated(run_id, "KILLED")
    with mlflow.start_run(run_id=run_id):
        log_steps(mlflow_at, run_id, range(1000, 2500), lambda s: 5.0 if s != 1700 else -3.0)
    shown = {s: 1.0 for s in range(1000)} | {s: (5.0 if s != 1700 else -3.0) for s in range(1000, 2500)}
    for max_results in (10, 40, 2500):
        points = chart(server, run_id, "loss", max_results)
        assert 0 < len(points) <= max_results
        assert all(shown.get(s) == v for s, v in points), [p for p in points if shown.get(p[0]) != p[1]]
        assert points[0][0] == 0 and points[-1][0] == 2499  # both ends
        assert (1700, -3.0) in points  # the lowest point survives sampling
    window = requests.get(
        f"{server.http_url}/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval",
        params={"run_ids": run_id, "metric_key": "loss", "max_results": 20, "start_step": 900, "end_step": 2100},
        timeout=60,
    ).json()["metrics"]
    assert all(shown.get(m["step"]) == m["value"] and 900 <= m["step"] <= 2100 for m in window)
    bulk = requests.get(
        f"{server.http_url}/ajax-api/2.0/mlflow/metrics/get-history-bulk",
        params={"run_id": run_id, "metric_key": "loss"},
        timeout=60,
    ).json()["metrics"]
    assert sorted((m["step"], m["value"]) for m in bulk) == sorted(shown.items())
    assert latest(mlflow_at, run_id)["loss"] == (2499, 5.0)


TRAINER = textwrap.dedent(
    """
    import sys, time
    from trackhouse import Client
    client = Client(sys.argv[1])
    run = client.start_run(experiment="preempted")
    for step in range(100):
        run.log_metrics({"loss": 1000.0 - step, "lr": 0.1}, step=step)
    client.flush()
    print(run.run_id, flush=True)
    step = 100
    while True:  # training goes on until the machine is taken away
        run.log_metrics({"loss": 1000.0 - step, "lr": 0.1}, step=step)
        step += 1
        time.sleep(0.001)
    """
)


def test_preempted_process_resumes_from_a_checkpoint_and_reads_show_the_restart(
    server: RunningServer, mlflow_at: MlflowClient, tmp_path: Path
) -> None:
    trainer = subprocess.Popen(
        [sys.executable, "-c", TRAINER, server.target], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert trainer.stdout is not None
        run_id = trainer.stdout.readline().strip()
        assert len(run_id) == 32, run_id
    finally:
        trainer.send_signal(signal.SIGKILL)  # preempted: no finish, no flush
        trainer.wait(30)
        if trainer.stdout is not None:
            trainer.stdout.close()
    assert mlflow_at.get_run(run_id).info.status == "RUNNING"
    before = {s for s, _ in history(mlflow_at, run_id, "loss")}
    assert set(range(100)) <= before
    # The restarted job loads its checkpoint of step 60 and carries on from there, with other values.
    with Client(server.target) as client:
        run = client.start_run(resume=run_id)
        assert run.attempt == 1
        for step in range(60, 150):
            run.log_metrics({"loss": -float(step)}, step=step)
        run.finish()
    expected = [(s, 1000.0 - s) for s in range(60)] + [(s, -float(s)) for s in range(60, 150)]
    assert history(mlflow_at, run_id, "loss") == expected
    assert chart(server, run_id, "loss") == expected
    assert latest(mlflow_at, run_id)["loss"] == (149, -149.0)
    # "lr" was not logged again: the first attempt's points are all still shown.
    assert [s for s, _ in history(mlflow_at, run_id, "lr")] == sorted(before)
    assert mlflow_at.get_run(run_id).info.status == "FINISHED"
    every = trackhouse_history(server, run_id, "loss", all_attempts="true", max_results=50)
    assert len(every) == 50 and every[0]["attempt"] == 0  # pages of the stored points, superseded included


def test_an_attempt_the_server_never_started_is_refused(server: RunningServer) -> None:
    with Client(server.target) as client:
        run = client.start_run()
        client.flush()
        forged = client.attach_run(run.run_id, attempt=7)
        forged.log_metric("loss", 1.0, step=1)
        with pytest.raises(InvalidArgumentError, match="attempt 7 was never started"):
            client.flush()
        with pytest.raises(InvalidArgumentError, match="not found"):
            client.start_run(resume="f" * 32)


def test_fork_shows_the_parents_prefix_then_its_own_points_and_forks_of_forks_chain(
    server: RunningServer, mlflow_at: MlflowClient
) -> None:
    with Client(server.target) as client:
        parent = client.start_run(experiment="forks", name="base")
        for step in range(100):
            parent.log_metrics({"loss": float(step), "only_parent": 7.0 + step}, step=step)
        child = client.fork_run(parent.run_id, at_step=49, name="child")
        for step in range(50, 80):
            child.log_metric("loss", 1000.0 + step, step=step)
        client.flush()
        # A fork of the fork, over REST, at a step inside the child's own points.
        answer = requests.post(
            f"{server.http_url}/api/2.0/trackhouse/runs/fork",
            json={"parent_run_id": child.run_id, "fork_step": 64, "run_name": "grandchild"},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        grandchild = answer.json()["run"]["info"]["run_id"]
        for step in range(60, 70):  # it restarts before its fork step: its own points win from step 60
            client.attach_run(grandchild).log_metric("loss", 5000.0 + step, step=step)
    parent_loss = [(s, float(s)) for s in range(100)]
    child_loss = [(s, float(s)) for s in range(50)] + [(s, 1000.0 + s) for s in range(50, 80)]
    grandchild_loss = child_loss[:60] + [(s, 5000.0 + s) for s in range(60, 70)]
    assert history(mlflow_at, parent.run_id, "loss") == parent_loss
    assert history(mlflow_at, child.run_id, "loss") == child_loss
    assert chart(server, child.run_id, "loss") == child_loss
    assert history(mlflow_at, grandchild, "loss") == grandchild_loss
    assert chart(server, grandchild, "loss") == grandchild_loss
    assert chart(server, grandchild, "loss", max_results=7)[-1] == (69, 5069.0)
    assert [s for s, _ in history(mlflow_at, grandchild, "only_parent")] == list(range(50))
    info = mlflow_at.get_run(child.run_id)
    assert info.info.experiment_id == mlflow_at.get_run(parent.run_id).info.experiment_id
    assert info.data.tags[attempts.PARENT_TAG] == parent.run_id and info.data.tags[attempts.FORK_STEP_TAG] == "49"
    assert info.data.tags["mlflow.runName"] == "child"
    assert latest(mlflow_at, child.run_id) == {"loss": (79, 1079.0), "only_parent": (49, 56.0)}
    assert latest(mlflow_at, grandchild) == {"loss": (69, 5069.0), "only_parent": (49, 56.0)}
    shown = trackhouse_history(server, grandchild, "loss")
    assert {m["run_id"] for m in shown} == {parent.run_id, child.run_id, grandchild}
    # The parent's points were not copied.
    assert server.scalar("SELECT count() FROM trackhouse.metrics WHERE run_id = {r:String}", r=grandchild) == 10
    assert not math.isnan(chart(server, child.run_id, "loss", max_results=3)[0][1])


def test_search_filters_and_sorts_resumed_and_forked_runs_by_the_latest_points_reads_show(
    server: RunningServer, mlflow_at: MlflowClient
) -> None:
    """metric_latest keeps a resumed run's superseded later step, and no row for a fork's parent's points; runs/search
    must compare the latest point runs/get shows, as it does for every other run."""
    experiment = mlflow_at.create_experiment("search-lineages")
    plain = mlflow_at.create_run(experiment, run_name="plain").info.run_id
    log_steps(mlflow_at, plain, range(10), lambda s: 5 * s)  # latest (9, 45)
    resumed = mlflow_at.create_run(experiment, run_name="resumed").info.run_id
    log_steps(mlflow_at, resumed, range(10), lambda s: 1)  # stored latest (9, 1), superseded below
    mlflow_at.set_terminated(resumed)
    mlflow_at.update_run(resumed, status="RUNNING")  # MLflow's resume: a new attempt
    log_steps(mlflow_at, resumed, range(5, 8), lambda s: 200)  # shown latest (7, 200)
    with Client(server.target) as client:
        forked = client.fork_run(plain, at_step=4, name="forked").run_id  # no points of its own: (4, 20)
    assert latest(mlflow_at, resumed)["loss"] == (7, 200.0)
    assert latest(mlflow_at, forked)["loss"] == (4, 20.0)

    def names(filter_string: str = "", order_by: list[str] | None = None, max_results: int = 100) -> list[str]:
        found = mlflow_at.search_runs([experiment], filter_string, order_by=order_by, max_results=max_results)
        return [run.info.run_name for run in found]

    assert names("metrics.loss > 100") == ["resumed"]
    assert names("metrics.loss < 30") == ["forked"]
    assert names(order_by=["metrics.loss DESC"]) == ["resumed", "plain", "forked"]
    assert names("metrics.loss > 0", order_by=["metrics.loss ASC"]) == ["forked", "plain", "resumed"]
    assert names("attributes.run_name != 'x'", order_by=["metrics.loss ASC"]) == ["forked", "plain", "resumed"]
    # A param sort answers from candidate runs first (query.search._leading_page), the metric filter included.
    for run_id, lr in ((plain, "1"), (resumed, "2"), (forked, "3")):
        mlflow_at.log_param(run_id, "lr", lr)
    assert names("metrics.loss > 100", order_by=["params.lr ASC"], max_results=1) == ["resumed"]
    assert names("metrics.loss < 30", order_by=["params.lr DESC"], max_results=1) == ["forked"]
    assert names("metrics.loss > 30", order_by=["params.lr DESC"], max_results=1) == ["resumed"]


PLUGIN_RESUME = """
import json, mlflow
from mlflow import MlflowClient
with mlflow.start_run() as run:
    for step in range(10):
        mlflow.log_metric("loss", step, step=step)
with mlflow.start_run(run_id=run.info.run_id):
    for step in range(5, 12):
        mlflow.log_metric("loss", 100 + step, step=step)
history = MlflowClient().get_metric_history(run.info.run_id, "loss")
print(json.dumps({"loss": sorted([m.step, m.value] for m in history)}))
"""


def test_resume_through_the_trackhouse_plugin_logs_under_the_new_attempt(server: RunningServer, tmp_path: Path) -> None:
    """The plugin's points go over gRPC, where the attempt is the client's to send: it reads it from the run."""
    out = run_script(server, tmp_path, PLUGIN_RESUME)
    assert out["loss"] == [[s, float(s)] for s in range(5)] + [[s, 100.0 + s] for s in range(5, 12)]


def test_fork_and_resume_refuse_bad_input(server: RunningServer, mlflow_at: MlflowClient) -> None:
    base = f"{server.http_url}/api/2.0/trackhouse"
    cases: list[tuple[str, dict[str, Any], int]] = [
        ("runs/fork", {"parent_run_id": "f" * 32, "fork_step": 3}, 404),
        ("runs/fork", {"parent_run_id": "f" * 32, "fork_step": "x"}, 400),
        ("runs/fork", {"parent_run_id": "f" * 32, "fork_step": "--5"}, 400),
        ("runs/fork", {"parent_run_id": "f" * 32, "fork_step": "9" * 5000}, 400),
        ("runs/fork", {"parent_run_id": "f" * 32, "fork_step": 2**63}, 400),
        ("runs/fork", {"fork_step": 3}, 400),
        ("runs/resume", {"run_id": "f" * 32}, 404),
        ("runs/resume", {}, 400),
    ]
    for path, body, status in cases:
        answer = requests.post(f"{base}/{path}", json=body, timeout=60)
        assert answer.status_code == status, (path, body, answer.text)
        assert "error_code" in answer.json()
    run_id = mlflow_at.create_run("0").info.run_id
    mlflow_at.delete_run(run_id)
    answer = requests.post(f"{base}/runs/resume", json={"run_id": run_id}, timeout=60)
    assert answer.status_code == 400 and "deleted" in answer.json()["message"]
    bad_token = requests.get(
        f"{base}/metrics/history", params={"run_id": run_id, "metric_key": "x", "page_token": "nope"}, timeout=60
    )
    assert bad_token.status_code == 400


def test_resume_and_fork_need_the_write_role() -> None:
    """The edges' policy tables (test_auth drives both edges with real credentials) fail closed on these."""
    for path in ("runs/resume", "runs/fork"):
        assert is_write("POST", f"/api/2.0/trackhouse/{path}") and is_write("POST", f"/ajax-api/2.0/trackhouse/{path}")
    assert not is_write("GET", "/api/2.0/trackhouse/metrics/history")
    assert not {"/trackhouse.v1.Runs/ResumeRun", "/trackhouse.v1.Runs/ForkRun"} & READ_METHODS
