"""query.runs.latest_metrics_json: the metrics rendered for runs/get and runs/search, on real chDB.

The rendered array must be the JSON of exactly what compat.wire.metric builds from query.metrics.latest,
for every special value, signed zero, large and tiny numbers, keys that need escaping, and runs without metrics.
Every test runs on both renderings: in Python from a plain read (a page of few keys) and by ClickHouse.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trackhouse.compat import wire
from trackhouse.ingest.batch import Batch, Metrics
from trackhouse.ingest.sink import ClickHouseSink
from trackhouse.query import metrics, runs
from trackhouse.query.connection import Client

DB = "trackhouse"
SPECIAL = [1.0, math.nan, math.inf, -math.inf, 0.1 + 0.2, 0.0, -0.0, 1e-300, 5e-324, 2.5e16, -1.7976931348623157e308]


@pytest.fixture(autouse=True, params=["here", "clickhouse"])
def rendering(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Rendered in Python (the tests' pages are few keys) or, with no page counted as few, by ClickHouse."""
    runs.forget_keys()  # earlier tests' runs share ids and the database name
    if request.param == "clickhouse":
        monkeypatch.setattr(runs, "FEW_METRICS_ROWS", 0)
    return str(request.param)


def _write(sql: Client, run_id: str, keys: list[str], values: list[float], steps: list[int]) -> None:
    n = len(values)
    ClickHouseSink(sql, DB).write(
        Batch(
            metrics=Metrics(
                run_ids=(run_id,),
                keys=tuple(keys),
                run_index=np.zeros(n, np.int32),
                key_index=np.arange(n, dtype=np.int32) % len(keys),
                step=np.array(steps, np.int64),
                timestamp=np.array(steps, np.int64) * 7 + 1_700_000_000_000,
                value=np.array(values, np.float64),
            )
        )
    )


def _expected(sql: Client, run_ids: list[str]) -> dict[str, list[dict[str, object]]]:
    latest = metrics.latest(sql, DB, run_ids)
    return {r: [wire.metric(k, p) for k, p in sorted(latest[r].items())] for r in run_ids}


def _same(got: list[dict[str, object]], expected: list[dict[str, object]]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.keys() == e.keys()
        assert (g["key"], g["timestamp"], g["step"]) == (e["key"], e["timestamp"], e["step"])
        if isinstance(e["value"], float):
            # The same double, sign of zero included; JSON may write an integral double without ".0".
            assert isinstance(g["value"], float | int) and math.copysign(1, g["value"]) == math.copysign(1, e["value"])
            assert float(g["value"]) == e["value"]
        else:
            assert g["value"] == e["value"] == "NaN"


def test_special_values_keys_and_empty_runs_render_as_the_wire_shape(sql: Client) -> None:
    keys = [f"k{i}" for i in range(len(SPECIAL))] + ['quote"and\\back', "unicode.é", "layer 1/x:y-z"]
    values = [*SPECIAL, 1.5, 2.5, 3.5]
    _write(sql, "r1", keys, values, list(range(len(values))))
    # A later step wins over a larger value: the latest is MLflow's (step, timestamp, value) maximum.
    _write(sql, "r2", ["loss"], [9.0, 1.0], [0, 1])
    rendered = runs.latest_metrics_json(sql, DB, ["r1", "r2", "absent"])
    assert rendered["absent"] == "[]"
    expected = _expected(sql, ["r1", "r2"])
    for run_id in ("r1", "r2"):
        _same(json.loads(rendered[run_id]), expected[run_id])
    assert json.loads(rendered["r2"])[0]["value"] == 1.0
    assert runs.latest_metrics_json(sql, DB, []) == {}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True)),
        min_size=1,
        max_size=30,
    )
)
def test_random_points_render_their_latest_value(sql: Client, points: list[tuple[int, int, float]]) -> None:
    run_id = f"h{abs(hash(tuple(map(repr, points))))}"
    keys = ["a", "b", "c", "d"]
    n = len(points)
    ClickHouseSink(sql, DB).write(
        Batch(
            metrics=Metrics(
                run_ids=(run_id,),
                keys=tuple(keys),
                run_index=np.zeros(n, np.int32),
                key_index=np.array([p[0] for p in points], np.int32),
                step=np.array([p[1] for p in points], np.int64),
                timestamp=np.zeros(n, np.int64),
                value=np.array([p[2] for p in points], np.float64),
            )
        )
    )
    _same(json.loads(runs.latest_metrics_json(sql, DB, [run_id])[run_id]), _expected(sql, [run_id])[run_id])


def test_a_key_spread_over_unmerged_parts_renders_its_latest_once(sql: Client) -> None:
    # Each write is a part of its own; with merges stopped, the read itself must combine a key's rows.
    sql.command(f"SYSTEM STOP MERGES {DB}.metric_latest")
    _write(sql, "p", ["loss", "acc"], [5.0, 0.5], [3, 3])
    _write(sql, "p", ["loss", "acc"], [9.0, 0.9], [2, 7])  # loss: an older step; acc: a newer one
    _write(sql, "p", ["loss"], [math.nan], [3])  # the same step and timestamp: NaN is the largest value
    parts = f"SELECT count() FROM system.parts WHERE database = '{DB}' AND table = 'metric_latest' AND active"
    assert sql.query(parts).result_rows[0][0] == 3
    got = json.loads(runs.latest_metrics_json(sql, DB, ["p"])["p"])
    assert [(m["key"], m["value"], m["step"]) for m in got] == [("acc", 0.9, 7), ("loss", "NaN", 3)]
    _same(got, _expected(sql, ["p"])["p"])


def test_a_page_of_runs_with_different_keys_renders_each_run_by_itself(sql: Client) -> None:
    # Keys with a comma or a quote inside, a wide one that escapes to 6 bytes a character, and runs of one page
    # with different key sets, asked for in an order that is not the store's.
    _write(sql, "w1", ["a,b", 'q"uote', "\x01" * 250, "x", "é,ü"], [0.5, -1.0, 2.0, 3.0, math.nan], [1, 2, 3, 4, 5])
    _write(sql, "w2", ["x", "loss"], [7.0, 0.25], [9, 9])
    _write(sql, "w3", [f"layer.{i}.norm" for i in range(300)], [i / 7 for i in range(300)], list(range(300)))
    rendered = runs.latest_metrics_json(sql, DB, ["w3", "w1", "missing", "w2"])
    expected = _expected(sql, ["w1", "w2", "w3"])
    for run_id in ("w1", "w2", "w3"):
        _same(json.loads(rendered[run_id]), expected[run_id])
    assert rendered["missing"] == "[]"


class Recording:
    """A real client that also keeps the statements it ran."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.statements: list[str] = []

    def query(self, statement: str, **kwargs: object) -> object:
        self.statements.append(statement)
        return self.client.query(statement, **kwargs)


def test_a_page_over_the_bound_is_rendered_by_clickhouse_and_known_as_heavy_next_time(
    sql: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runs, "FEW_METRICS_ROWS", 5)  # whichever rendering the fixture chose
    _write(sql, "heavy", [f"k{i}" for i in range(8)], [float(i) for i in range(8)], list(range(8)))
    _write(sql, "light", ["loss"], [0.5], [1])
    expected = _expected(sql, ["heavy", "light"])
    rendered_sql = runs.rendered_metrics_sql(DB).statement
    few_sql = runs.few_metrics_sql(DB)

    def read(run_ids: list[str]) -> list[str]:
        recording = Recording(sql)
        rendered = runs.latest_metrics_json(recording, DB, run_ids)
        for run_id in run_ids:
            _same(json.loads(rendered[run_id]), expected[run_id])
        reads = {rendered_sql: "rendered", few_sql: "plain"}
        return [reads[statement] for statement in recording.statements if statement in reads]

    # Over the bound: the plain read stops one row past it, and ClickHouse renders the page.
    assert read(["heavy"]) == ["plain", "rendered"]
    # Known as heavy from then on (its keys only grow): no plain read first.
    assert read(["heavy"]) == ["rendered"]
    assert read(["light", "heavy"]) == ["rendered"]
    # A light page is rendered from the plain read alone.
    assert read(["light"]) == ["plain"]
