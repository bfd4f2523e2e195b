"""Metric reads on MLflow's wire, side by side with a stock `mlflow server` (SQLite) started here:
the same calls through the real MLflow client and raw HTTP, compared answer for answer."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from tests.conftest import RunningServer
from tests.stock import stock_server
from trackhouse.compat import metrics as compat_metrics


@pytest.fixture(scope="module")
def stock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A stock `mlflow server` on SQLite, one worker (a busy machine's slow start-up then cannot trip
    uvicorn's worker health check)."""
    yield from stock_server(tmp_path_factory.mktemp("stock"))


@pytest.fixture
def both(stock: str, server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return {"stock": stock, "trackhouse": server.http_url}


def each(both: dict[str, str], metrics: list[Metric]) -> dict[str, tuple[str, str]]:
    """A run holding `metrics` on each server: name -> (url, run_id)."""
    runs = {}
    for name, url in both.items():
        client = MlflowClient(tracking_uri=url)
        run_id = client.create_run("0").info.run_id
        for metric in metrics:  # one call per point: arrival order is part of what is compared
            client.log_batch(run_id, metrics=[metric])
        runs[name] = (url, run_id)
    return runs


def get(url: str, path: str, **params: Any) -> Any:
    answer = requests.get(f"{url}/api/2.0/mlflow/{path}", params=params, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def points(answer: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [(m["step"], m["timestamp"], m["value"]) for m in answer.get("metrics", [])]


def test_infinities_and_nan_travel_as_stock_sends_them(both: dict[str, str]) -> None:
    values = [math.inf, -math.inf, math.nan, 1.5]
    runs = each(both, [Metric("odd", v, 1_000 + i, i) for i, v in enumerate(values)])
    answers = {
        name: get(url, "metrics/get-history", run_id=run_id, metric_key="odd") for name, (url, run_id) in runs.items()
    }
    assert points(answers["trackhouse"]) == points(answers["stock"])
    assert [v for _, _, v in points(answers["stock"])] == [sys.float_info.max, -sys.float_info.max, "NaN", 1.5]
    latest = {
        name: get(url, "runs/get", run_id=run_id)["run"]["data"]["metrics"] for name, (url, run_id) in runs.items()
    }
    assert latest["trackhouse"] == latest["stock"]
    for name, (url, run_id) in runs.items():
        history = MlflowClient(tracking_uri=url).get_metric_history(run_id, "odd")
        assert [m.value for m in history][:2] == [sys.float_info.max, -sys.float_info.max], name


def test_history_order_is_stocks_when_points_arrive_out_of_order(both: dict[str, str]) -> None:
    """Stock orders a history by (timestamp, step, value); trackhouse's table is sorted by step."""
    arrivals = [(5, 10, 0.5), (3, 20, 0.3), (9, 30, 0.9), (1, 40, 0.1), (1, 40, -0.1), (7, 5, 0.7), (2, 30, 0.2)]
    runs = each(both, [Metric("loss", v, t, s) for s, t, v in arrivals])
    whole = {name: get(url, "metrics/get-history", run_id=r, metric_key="loss") for name, (url, r) in runs.items()}
    assert points(whole["trackhouse"]) == points(whole["stock"])
    assert [s for s, _, _ in points(whole["stock"])] == [7, 5, 3, 2, 9, 1, 1]
    for name, (url, run_id) in runs.items():  # pages of 2, through each server's own tokens
        paged: list[tuple[Any, ...]] = []
        token = None
        while True:
            params = {"run_id": run_id, "metric_key": "loss", "max_results": 2}
            page = get(url, "metrics/get-history", **params, **({"page_token": token} if token else {}))
            paged += points(page)
            token = page.get("next_page_token")
            if not token:
                break
        assert paged == points(whole["stock"]), name
        client = MlflowClient(tracking_uri=url)
        assert [(m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, "loss")] == paged


def test_history_of_an_unknown_run_is_empty_as_in_stock(both: dict[str, str]) -> None:
    unknown = "0123456789abcdef0123456789abcdef"
    for paged in ({}, {"max_results": 10}):  # streamed, and a page written whole
        answers = {
            name: get(url, "metrics/get-history", run_id=unknown, metric_key="loss", **paged)
            for name, url in both.items()
        }
        assert answers["trackhouse"] == answers["stock"] == {}, paged
    for url in both.values():
        assert MlflowClient(tracking_uri=url).get_metric_history(unknown, "loss") == []


def test_bulk_history_streams_runs_in_order_capped_in_total(both: dict[str, str]) -> None:
    first = each(both, [Metric("loss", float(s), 100 + s, s) for s in range(3)])
    second = each(both, [Metric("loss", float(-s), 200 + s, s) for s in range(3)])
    for name, url in both.items():
        run_ids = [first[name][1], second[name][1]]
        answer = requests.get(
            f"{url}/ajax-api/2.0/mlflow/metrics/get-history-bulk",
            params={"run_id": run_ids, "metric_key": "loss", "max_results": "4"},
            timeout=60,
        ).json()["metrics"]
        expected = [(r, s) for r in sorted(run_ids) for s in range(3)][:4]
        assert [(m["run_id"], m["step"]) for m in answer] == expected, name


def test_long_histories_in_many_reads_and_chunks_answer_as_stock(
    both: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads and written chunks far smaller than the series, as a 10^7-point series meets the real sizes:
    get-history unpaged and through page tokens, and get-history-bulk across runs, answer as stock does,
    special values and a stretch of falling timestamps (time order unlike step order) included."""
    monkeypatch.setattr(compat_metrics, "HISTORY_READ", 700)
    monkeypatch.setattr(compat_metrics, "HISTORY_WRITE", 300)
    special = {500: math.inf, 1500: -math.inf, **{s: math.nan for s in range(0, 2000, 97)}}
    long = [
        Metric("loss", special.get(s, s % 7 - 3.0), 50_000 - s if 900 <= s < 1000 else 1_000 + s * 10, s)
        for s in range(2000)
    ]
    runs = {name: [_logged(url, long), _logged(url, long[:500])] for name, url in both.items()}
    unpaged = {
        name: get(url, "metrics/get-history", run_id=runs[name][0], metric_key="loss") for name, url in both.items()
    }
    assert points(unpaged["trackhouse"]) == points(unpaged["stock"])
    # A page that one read answers is written whole, with its length; a longer one is streamed: the same bytes.
    short: dict[str, Any] = {"run_id": runs["trackhouse"][1], "metric_key": "loss"}
    history = f"{both['trackhouse']}/api/2.0/mlflow/metrics/get-history"
    one_read = requests.get(history, params={**short, "max_results": 700}, timeout=60)
    streamed = requests.get(history, params={**short, "max_results": 701}, timeout=60)
    assert one_read.headers["content-length"] == str(len(one_read.content))
    assert streamed.headers["transfer-encoding"] == "chunked"
    assert one_read.content == streamed.content and len(points(one_read.json())) == 500
    for name, url in both.items():
        paged: list[tuple[Any, ...]] = []
        token = None
        while True:
            params = {"run_id": runs[name][0], "metric_key": "loss", "max_results": 450}
            page = get(url, "metrics/get-history", **params, **({"page_token": token} if token else {}))
            paged += points(page)
            token = page.get("next_page_token")
            if not token:
                break
        assert paged == points(unpaged["stock"]), name
    for name, url in both.items():  # each server's runs sort in their own id order
        answer = requests.get(
            f"{url}/ajax-api/2.0/mlflow/metrics/get-history-bulk",
            params={"run_id": runs[name], "metric_key": "loss", "max_results": "2300"},
            timeout=60,
        ).json()["metrics"]
        whole = {r: points(get(url, "metrics/get-history", run_id=r, metric_key="loss")) for r in runs[name]}
        expected = [(r, *point) for r in sorted(runs[name]) for point in whole[r]][:2300]
        assert [(m["run_id"], m["step"], m["timestamp"], _nan_as_text(m["value"])) for m in answer] == expected, name


def _nan_as_text(value: Any) -> Any:
    """Stock's bulk call writes NaN bare (Flask's JSON); trackhouse writes "NaN", as get-history does."""
    return "NaN" if isinstance(value, float) and math.isnan(value) else value


def _logged(url: str, metrics: list[Metric]) -> str:
    """A new run holding `metrics`, logged 1,000 a call; its id."""
    client = MlflowClient(tracking_uri=url)
    run_id: str = client.create_run("0").info.run_id
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    return run_id


def test_chart_call_answers_as_many_points_as_stock(both: dict[str, str]) -> None:
    """get-history-bulk-interval over flat points: stock samples by row, trackhouse by step buckets plus fill."""
    flat = each(both, [Metric("flat", 1.0, 1_000 + s, s) for s in range(10)])
    for max_results in (1, 2, 5, 9, 10, 320):
        counts = {}
        for name, (url, run_id) in flat.items():
            answer = get(
                url, "metrics/get-history-bulk-interval", run_ids=run_id, metric_key="flat", max_results=max_results
            )
            steps = [m["step"] for m in answer["metrics"]]
            assert steps == sorted(steps) and steps[-1] == 9, (name, max_results)
            counts[name] = len(steps)
        assert counts["trackhouse"] == counts["stock"], max_results
