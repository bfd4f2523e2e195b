"""The registry pages of the stock MLflow UI in a real headless Chromium against trackhouse.

Walks the Models list, a model's page, a version's page with its source run, aliases, tags and
a stage transition, and a run's page listing the versions registered from it; fails on an error
toast, a page error or a failed API call (the `page` fixture of test_compat_ui).
"""

from __future__ import annotations

import tempfile

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from playwright.sync_api import Page
from sklearn.linear_model import LinearRegression

from benchmarks.uiwalk import CHROMIUM
from tests.conftest import RunningServer, wait_until
from tests.test_compat_ui import ARTIFACTS, no_error_notification, page, settle

__all__ = ["page"]  # the fixture, shared with test_compat_ui

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*type hint is inferred:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*Model registry stages will be removed:FutureWarning"),
    pytest.mark.skipif(not CHROMIUM, reason="needs Debian's chromium"),
    pytest.mark.timeout(900),  # five pages and a registration in a browser, on a shared machine
]


def seed(server: RunningServer) -> tuple[str, str]:
    """Model `ui-model` with two versions from one run, an alias, tags and a stage. Returns (experiment, run)."""
    mlflow.set_tracking_uri(server.http_url)
    try:
        mlflow.set_experiment("ui-registry")
        features = np.arange(4.0).reshape(-1, 1)
        with mlflow.start_run(run_name="trained-here") as run, tempfile.TemporaryDirectory() as tmp:
            mlflow.sklearn.save_model(LinearRegression().fit(features, features[:, 0]), f"{tmp}/model")
            mlflow.log_artifacts(f"{tmp}/model", "model")
        client = MlflowClient(server.http_url)
        client.create_registered_model("ui-model", tags={"team": "forecasting"}, description="Demand forecaster")
        for _ in range(2):
            client.create_model_version("ui-model", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
        client.set_registered_model_alias("ui-model", "champion", "2")
        client.set_model_version_tag("ui-model", "2", "validated", "yes")
        client.transition_model_version_stage("ui-model", "1", "Staging")
    finally:
        mlflow.set_tracking_uri("")
    return run.info.experiment_id, run.info.run_id


def test_registry_pages_without_errors(server: RunningServer, page: tuple[Page, list[str]]) -> None:
    experiment_id, run_id = seed(server)
    client = MlflowClient(server.http_url)
    tab, problems = page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    tab.goto(f"{server.http_url}/#/models", wait_until="commit")
    tab.get_by_text("ui-model").first.wait_for(timeout=30_000)
    tab.get_by_text("@ champion").first.wait_for(timeout=30_000)
    settle(tab)
    tab.screenshot(path=ARTIFACTS / "ui-registry-1-models.png")
    no_error_notification(tab)

    tab.goto(f"{server.http_url}/#/models/ui-model", wait_until="commit")
    tab.get_by_text("Demand forecaster").first.wait_for(timeout=30_000)
    tab.get_by_text("Version 2").first.wait_for(timeout=30_000)
    tab.get_by_text("forecasting").first.wait_for(timeout=30_000)
    settle(tab)
    tab.screenshot(path=ARTIFACTS / "ui-registry-2-model.png")
    no_error_notification(tab)

    # An edit through the UI's own calls (ajax-api set-tag).
    tab.get_by_placeholder("Name").first.fill("owner")
    tab.get_by_placeholder("Value").first.fill("ml-platform")
    tab.get_by_role("button", name="Add").first.click()
    wait_until(lambda: client.get_registered_model("ui-model").tags.get("owner") == "ml-platform", 30, "UI tag")

    tab.goto(f"{server.http_url}/#/models/ui-model/versions/2", wait_until="commit")
    tab.get_by_text("trained-here").first.wait_for(timeout=30_000)  # the source run, linked
    tab.get_by_text("validated").first.wait_for(timeout=30_000)
    settle(tab)
    tab.screenshot(path=ARTIFACTS / "ui-registry-3-version.png")
    no_error_notification(tab)

    tab.goto(f"{server.http_url}/#/models/ui-model/versions/1", wait_until="commit")
    tab.get_by_text("Staging").first.wait_for(timeout=30_000)
    settle(tab)
    no_error_notification(tab)

    tab.goto(f"{server.http_url}/#/experiments/{experiment_id}/runs/{run_id}", wait_until="commit")
    tab.get_by_text("ui-model").first.wait_for(timeout=30_000)  # versions registered from this run
    settle(tab)
    tab.screenshot(path=ARTIFACTS / "ui-registry-4-run.png")
    no_error_notification(tab)

    # The "Register model" button on the run's artifact page, as a person promotes a model.
    tab.goto(f"{server.http_url}/#/experiments/{experiment_id}/runs/{run_id}/artifacts", wait_until="commit")
    tab.get_by_text("model", exact=True).first.click()
    tab.get_by_role("button", name="Register model").first.click()
    tab.locator("#selectedModel").click()
    tab.locator(".mlflow-create-new-model-option").click()
    tab.get_by_placeholder("Input a model name").fill("registered-in-ui")
    tab.get_by_role("button", name="Register", exact=True).click()
    wait_until(lambda: len(client.search_model_versions("name = 'registered-in-ui'")) == 1, 30, "UI registration")
    registered = client.search_model_versions("name = 'registered-in-ui'")[0]
    assert (registered.run_id, registered.source) == (run_id, f"runs:/{run_id}/model")  # as the stock UI sends
    settle(tab)
    tab.screenshot(path=ARTIFACTS / "ui-registry-5-registered-from-run.png")
    no_error_notification(tab)
    assert problems == []
