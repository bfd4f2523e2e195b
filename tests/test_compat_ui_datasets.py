"""The UI's dataset chips and drawer, in Debian's Chromium, against trackhouse (see test_compat_ui.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.tracking import MlflowClient
from playwright.sync_api import Page

from benchmarks.uiwalk import CHROMIUM
from tests.conftest import RunningServer
from tests.test_compat_ui import ARTIFACTS, no_error_notification, watched_page

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (make test installs it)")

SCHEMA = {"mlflow_colspec": [{"type": "double", "name": "feature_a", "required": True}]}


@pytest.fixture
def page(server: RunningServer) -> Iterator[tuple[Page, list[str]]]:
    with watched_page(server.http_url) as watched:
        yield watched


def seed(server: RunningServer) -> tuple[str, str]:
    client = MlflowClient(server.http_url)
    experiment_id = client.create_experiment("ui-datasets")
    run_id = client.create_run(experiment_id, run_name="with-data").info.run_id
    dataset = Dataset(
        "wine-quality",
        "d1g357ab",
        "http",
        json.dumps({"url": "https://example.invalid/wine.csv"}),
        schema=json.dumps(SCHEMA),
        profile=json.dumps({"num_rows": 1599, "num_elements": 19188}),
    )
    client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])])
    client.set_terminated(run_id)
    return experiment_id, run_id


def test_dataset_chips_and_drawer_show_the_logged_dataset(server: RunningServer, page: tuple[Page, list[str]]) -> None:
    experiment_id, run_id = seed(server)
    tab, problems = page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    tab.goto(f"{server.http_url}/#/experiments/{experiment_id}/runs", wait_until="commit")
    tab.wait_for_selector(".ag-center-cols-container .ag-row", timeout=30_000)
    chip = tab.get_by_text("wine-quality").first
    chip.wait_for(timeout=30_000)
    tab.screenshot(path=ARTIFACTS / "ui-datasets-1-runs-table.png")
    chip.click()
    # The drawer names the dataset with its digest and shows the schema's columns.
    tab.get_by_text("feature_a").first.wait_for(timeout=30_000)
    tab.get_by_text("d1g357ab").first.wait_for(timeout=30_000)
    tab.screenshot(path=ARTIFACTS / "ui-datasets-2-drawer.png")
    no_error_notification(tab)

    tab.goto(f"{server.http_url}/#/experiments/{experiment_id}/runs/{run_id}", wait_until="commit")
    tab.get_by_text("wine-quality").first.wait_for(timeout=30_000)
    tab.screenshot(path=ARTIFACTS / "ui-datasets-3-run-page.png")
    no_error_notification(tab)
    assert problems == []
