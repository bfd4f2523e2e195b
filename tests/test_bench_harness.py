"""Smoke test of the benchmark harness at tiny sizes: it runs every system and workload end to end.

It asserts that the report files exist and that every point was stored exactly once, never a speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1200)  # six systems started one after another: minutes on a loaded 2-core machine
def test_harness_writes_a_report_and_every_point_is_stored_once(tmp_path: Path) -> None:
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--size", "tiny", "--repeats", "1", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1100,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("results.json", "report.md", "throughput.png", "ack_latency_cdf.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert results["all_stored_exactly_once"] is True
    pairs = {(m["workload"], m["system"]) for m in results["measurements"]}
    assert pairs == {(w, s) for w in ("hpo", "llm") for s in ("trackhouse-grpc", "trackhouse-kafka", "mlflow-sqlite")}
    # Distinct points and raw rows both equal the points sent: a request stored twice would fail the second.
    assert all(m["stored_distinct"] == m["stored_rows"] == m["points"] > 0 for m in results["measurements"])
    report = (out / "report.md").read_text()
    assert "## HPO sweep" in report and "## LLM run" in report
    assert "x stock MLflow" in report
    # The LLM run's injected slow rank and NaN rank are found through the rank API on both trackhouse paths.
    ranked = [m for m in results["measurements"] if m["workload"] == "llm" and m["system"] != "mlflow-sqlite"]
    assert len(ranked) == 2 and all(m["rank_api"]["found_slow_rank"] for m in ranked)
    assert all(m["rank_api"]["found_nan_rank"] and m["rank_api"]["nan_ranks"] == [2] for m in ranked)
    assert "found the slow rank and the NaN rank" in report


def test_harness_help_and_bad_arguments() -> None:
    help_text = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert help_text.returncode == 0 and "--size" in help_text.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--systems", "nope"], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode != 0 and "unknown: nope" in bad.stderr
