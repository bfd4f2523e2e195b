"""The stock MLflow UI in a real headless Chromium (Debian's package, driven by Playwright) against trackhouse.

Browses the experiments list, a runs table, the chart view and a run's model-metrics
tab for a run of 10^6 points, and fails on a missing table or chart, an error
notification, a page error, or a failed API call. Screenshots are kept in
$TRACKHOUSE_TEST_ARTIFACTS (default test-artifacts/).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from mlflow.tracking import MlflowClient
from playwright.sync_api import HttpCredentials, Page, Response, sync_playwright

from benchmarks.uiwalk import CHROMIUM, CHROMIUM_ARGS
from tests.conftest import ROOT, RunningServer
from trackhouse import Client
from trackhouse.ingest import auth

ARTIFACTS = Path(os.environ.get("TRACKHOUSE_TEST_ARTIFACTS", ROOT / "test-artifacts"))
LONG_RUN_POINTS = 1_000_000
# A stock server answers this 404 too (no auth configured); the UI expects it.
EXPECTED_404 = ("/ajax-api/2.0/mlflow/users/current",)
# The UI's error toasts vanish after about 3 s, so a MutationObserver records every one as it appears.
RECORD_TOASTS = """
window.__toasts = [];
new MutationObserver(mutations => {
  for (const m of mutations) for (const node of m.addedNodes) {
    if (node.nodeType !== 1) continue;
    const selector = '.du-bois-light-notification-notice-error, .du-bois-light-alert-error';
    const found = node.matches(selector) ? [node] : [...node.querySelectorAll(selector)];
    for (const e of found) window.__toasts.push(e.innerText.slice(0, 300));
  }
}).observe(document, {childList: true, subtree: true});
"""

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (make test installs it)")


@contextlib.contextmanager
def watched_page(base_url: str, credentials: HttpCredentials | None = None) -> Iterator[tuple[Page, list[str]]]:
    """A Chromium tab on `base_url` that records failed API calls (other than EXPECTED_404) and page errors."""
    problems: list[str] = []

    def on_response(response: Response) -> None:
        path = response.url.removeprefix(base_url).split("?")[0]
        if response.status >= 400 and path not in EXPECTED_404:
            problems.append(f"{response.status} {response.request.method} {path}")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1600, "height": 1000}, http_credentials=credentials)
        tab = context.new_page()
        tab.add_init_script(RECORD_TOASTS)
        tab.on("response", on_response)
        tab.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        try:
            yield tab, problems
        finally:
            browser.close()


@pytest.fixture
def page(server: RunningServer) -> Iterator[tuple[Page, list[str]]]:
    with watched_page(server.http_url) as watched:
        yield watched


def seed(server: RunningServer) -> tuple[str, str]:
    """An experiment with three runs, one of them 10^6 points long. Returns (experiment id, long run id)."""
    with Client(server.target) as ingest:
        long_run = ingest.start_run(experiment="ui-e2e", name="long-run", params={"lr": 0.001, "layers": 48})
        steps = np.arange(LONG_RUN_POINTS)
        long_run.log_series("loss", steps, 1 / np.sqrt(steps + 1) + np.random.default_rng(0).random(steps.size) / 50)
        long_run.log_series("accuracy", steps[::100], np.linspace(0.1, 0.95, steps[::100].size))
        long_run.finish()
        for i in range(2):
            short = ingest.start_run(experiment="ui-e2e", name=f"short-{i}", params={"lr": 0.01 * (i + 1)})
            short.log_series("loss", np.arange(1000), np.linspace(1, 0.2 + i / 10, 1000))
            short.finish()
    experiment = MlflowClient(server.http_url).get_experiment_by_name("ui-e2e")
    assert experiment is not None
    return experiment.experiment_id, long_run.run_id


def settle(tab: Page) -> None:
    """Give late requests time to fail. The runs page polls, so the network never goes idle for long."""
    tab.wait_for_timeout(2_000)


def no_error_notification(tab: Page) -> None:
    assert tab.evaluate("window.__toasts") == []  # every error toast or alert since the page loaded
    assert tab.locator(".du-bois-light-alert-error").count() == 0
    for text in ("Request error", "Can't load run details", "Page Not Found"):
        assert tab.get_by_text(text).count() == 0, text


def test_ui_pages_show_runs_and_charts_without_errors(server: RunningServer, page: tuple[Page, list[str]]) -> None:
    experiment_id, long_run = seed(server)
    tab, problems = page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    tab.goto(f"{server.http_url}/", wait_until="commit")  # never "networkidle": a telemetry worker keeps polling
    tab.get_by_text("ui-e2e").first.wait_for(timeout=30_000)
    tab.screenshot(path=ARTIFACTS / "ui-1-experiments.png")

    tab.goto(f"{server.http_url}/#/experiments/{experiment_id}/runs", wait_until="commit")
    tab.wait_for_selector(".ag-center-cols-container .ag-row", timeout=30_000)
    tab.get_by_text("long-run").first.wait_for(timeout=30_000)
    assert tab.locator(".ag-center-cols-container .ag-row").count() == 3
    tab.screenshot(path=ARTIFACTS / "ui-2-runs-table.png")
    no_error_notification(tab)

    tab.locator('label:has(input[name="runs-view-mode"][value="CHART"])').click()
    tab.wait_for_selector(".js-plotly-plot .scatterlayer path.js-line", timeout=30_000)
    settle(tab)
    tab.screenshot(path=ARTIFACTS / "ui-3-chart-view.png")
    no_error_notification(tab)

    tab.goto(f"{server.http_url}/#/experiments/{experiment_id}/runs/{long_run}/model-metrics", wait_until="commit")
    tab.wait_for_selector(".js-plotly-plot .scatterlayer path.js-line", timeout=30_000)
    tab.get_by_text("loss").first.wait_for(timeout=30_000)
    settle(tab)
    tab.screenshot(path=ARTIFACTS / "ui-4-model-metrics-1e6-points.png")

    no_error_notification(tab)
    assert problems == []


def test_ui_works_behind_basic_auth_for_a_reader(start_server: Callable[..., RunningServer], tmp_path: Path) -> None:
    """A browser asked for credentials (401 + Basic challenge) loads the UI with them: a reader sees runs."""
    auth_file = tmp_path / "auth.json"
    auth.add_user(auth_file, "writer", "writer-pw", role="write")
    auth.add_user(auth_file, "viewer", "viewer-pw", role="read")
    running = start_server(network={"auth_file": auth_file})
    api = running.http_url + "/api/2.0/mlflow"
    writer = ("writer", "writer-pw")
    experiment_id = requests.post(f"{api}/experiments/create", json={"name": "behind-auth"}, auth=writer).json()[
        "experiment_id"
    ]
    run_id = requests.post(f"{api}/runs/create", json={"experiment_id": experiment_id}, auth=writer).json()["run"][
        "info"
    ]["run_id"]
    metrics: list[dict[str, Any]] = [
        {"key": "loss", "value": 1 / (s + 1), "timestamp": 1, "step": s} for s in range(100)
    ]
    assert requests.post(f"{api}/runs/log-batch", json={"run_id": run_id, "metrics": metrics}, auth=writer).ok
    assert requests.get(running.http_url + "/", timeout=30).status_code == 401

    credentials: HttpCredentials = {"username": "viewer", "password": "viewer-pw"}
    with watched_page(running.http_url, credentials) as (tab, problems):
        tab.goto(f"{running.http_url}/", wait_until="commit")
        tab.get_by_text("behind-auth").first.wait_for(timeout=30_000)
        tab.goto(f"{running.http_url}/#/experiments/{experiment_id}/runs", wait_until="commit")
        tab.wait_for_selector(".ag-center-cols-container .ag-row", timeout=30_000)
        settle(tab)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        tab.screenshot(path=ARTIFACTS / "ui-5-behind-basic-auth.png")
        no_error_notification(tab)
    # The browser's first request gets the challenge; every other answer is a success.
    assert [p for p in problems if p != "401 GET /"] == []


SERIES_POINTS = 200_000
NAN_STEP = 123_457
# Each chart's traces, as plotly holds them: the steps on x, the values on y (NaN for a NaN point).
PLOTTED = """() => [...document.querySelectorAll('.js-plotly-plot')].flatMap(gd => (gd.data || []).map(t => {
  const x = Array.from(t.x || []), y = Array.from(t.y || []);
  return {x0: x[0], x1: x[x.length - 1], n: x.length,
          nan: x.filter((_, i) => y[i] === null || Number.isNaN(y[i]))};
}))"""


def shows_whole_series_with_nan(tab: Page) -> None:
    """Every plotted trace spans the first to the last step and carries the NaN point at its step.

    The UI plots a NaN as a point whose y is NaN; its line runs past it (it draws no separate marker)."""
    tab.wait_for_selector(".js-plotly-plot .scatterlayer path.js-line", timeout=60_000)
    tab.wait_for_function(f"({PLOTTED})().some(t => t.x1 === {SERIES_POINTS - 1})", timeout=60_000)
    traces = tab.evaluate(PLOTTED)
    assert traces, "no chart traces"
    for trace in traces:
        assert (trace["x0"], trace["x1"]) == (0, SERIES_POINTS - 1), trace
        assert trace["nan"] == [NAN_STEP], trace
        assert trace["n"] <= 320 + 2, trace  # the UI's sampled call, not the whole history


def test_ui_long_series_shows_first_and_last_step_and_nan(server: RunningServer, page: tuple[Page, list[str]]) -> None:
    """A 200,000-point series with a NaN, on the single-metric page and in the run's chart."""
    with Client(server.target) as ingest:
        run = ingest.start_run(experiment="ui-long-series", name="long-series")
        steps = np.arange(SERIES_POINTS)
        values = 1 / np.sqrt(steps + 1.0)
        values[NAN_STEP] = np.nan
        run.log_series("loss", steps, values)
        run.finish()
    experiment = MlflowClient(server.http_url).get_experiment_by_name("ui-long-series")
    assert experiment is not None
    tab, problems = page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # The URL the runs table's metric links open (Routes.getMetricPageRoute in the UI's bundle).
    query = (
        f'?runs=["{run.run_id}"]&metric="loss"&experiments=["{experiment.experiment_id}"]&plot_metric_keys=["loss"]'
        "&plot_layout={}&x_axis=step&y_axis_scale=linear&line_smoothness=1&show_point=false"
        "&deselected_curves=[]&last_linear_y_axis_range=[]"
    )
    tab.goto(f"{server.http_url}/#/metric{query}", wait_until="commit")
    shows_whole_series_with_nan(tab)
    tab.screenshot(path=ARTIFACTS / "ui-6-long-series-metric-page.png")
    no_error_notification(tab)

    tab.goto(
        f"{server.http_url}/#/experiments/{experiment.experiment_id}/runs/{run.run_id}/model-metrics",
        wait_until="commit",
    )
    shows_whole_series_with_nan(tab)
    tab.screenshot(path=ARTIFACTS / "ui-7-long-series-run-chart.png")
    no_error_notification(tab)
    assert problems == []
