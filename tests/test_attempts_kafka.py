"""Resume through Kafka (issue 17): the broker carries each point's attempt; the worker refuses one never started.

Its own module: test_attempts.py's module-wide server holds this process's chDB, and a worker needs its own."""

from __future__ import annotations

from collections.abc import Callable

import requests
from mlflow.tracking import MlflowClient

from tests.conftest import RunningServer, wait_until
from tests.tansu import KafkaBroker
from tests.test_kafka import scrape
from trackhouse import Client


def test_a_resumed_run_logged_through_kafka_shows_the_restart_and_forged_attempts_are_dead_lettered(
    kafka_broker: KafkaBroker, start_server: Callable[..., RunningServer]
) -> None:
    worker = start_server(role="worker", kafka=kafka_broker.config())
    with Client(f"kafka://{kafka_broker.bootstrap}/trackhouse.writes") as client:
        run = client.start_run(experiment="kafka-resume")
        client.flush(timeout=60)
        for step in range(100):
            run.log_metric("loss", float(step), step=step)
        client.flush(timeout=60)
        wait_until(lambda: len(MlflowClient(worker.http_url).get_metric_history(run.run_id, "loss")) == 100)
        # A Kafka client cannot ask the server for an attempt: it resumes over HTTP, then attaches with it.
        answer = requests.post(
            f"{worker.http_url}/api/2.0/trackhouse/runs/resume", json={"run_id": run.run_id}, timeout=60
        )
        assert answer.status_code == 200, answer.text
        attempt = answer.json()["attempt"]
        assert attempt == 1
        resumed = client.attach_run(run.run_id, attempt=attempt)
        for step in range(50, 150):
            resumed.log_metric("loss", -float(step), step=step)
        client.flush(timeout=60)  # a request is refused whole: the forged point goes in one of its own
        client.attach_run(run.run_id, attempt=9).log_metric("loss", 1e9, step=500)  # never started
        client.flush(timeout=60)
    expected = [(s, float(s)) for s in range(50)] + [(s, -float(s)) for s in range(50, 150)]

    def history() -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in MlflowClient(worker.http_url).get_metric_history(run.run_id, "loss"))

    wait_until(lambda: history() == expected, what="the restart's points, shown over the first attempt's")
    wait_until(lambda: "trackhouse_dead_lettered_total{" in scrape(worker.http_url), what="the forged attempt")
    assert worker.scalar("SELECT count() FROM trackhouse.metrics WHERE step = 500") == 0
