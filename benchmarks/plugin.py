"""`mlflow.log_metrics` per call: http:// against trackhouse://, side by side, on one `trackhouse serve`.

    python -m benchmarks.plugin [--steps 500] [--rounds 3] [--out benchmarks/reports/plugin.json]

The same unchanged MLflow training loop (10 metrics per step) runs in a child
process per URI; only the tracking URI differs. Each round runs both, in
alternating order. Reported: the median per-call time of each round, the
median over rounds, the ratio, the same for `MlflowClient.log_batch` of 10
metrics on one reused client (without the fluent API's own work), and the time `mlflow.end_run` took (on the
trackhouse:// path it waits until every point is acknowledged). Every run's
points are read back through MLflow before its figure counts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from benchmarks.ingest import ServerUnderTest

ROOT = Path(__file__).resolve().parent.parent

# An unchanged MLflow training loop; argv: tracking URI, steps. Prints its timings as JSON.
TRAINING_SCRIPT = """
import json, statistics, sys, time
import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric

uri, steps = sys.argv[1], int(sys.argv[2])
mlflow.set_tracking_uri(uri)
mlflow.set_experiment("plugin-bench")
calls = []
with mlflow.start_run() as run:
    mlflow.log_params({"lr": 3e-4, "layers": 12})
    for step in range(steps):
        metrics = {f"m{i}": 1.0 / (step + i + 1) for i in range(10)}
        start = time.perf_counter_ns()
        mlflow.log_metrics(metrics, step=step)
        calls.append(time.perf_counter_ns() - start)
    end_start = time.perf_counter_ns()
mlflow_end_ns = time.perf_counter_ns() - end_start
stored = len(MlflowClient().get_metric_history(run.info.run_id, "m9"))
assert stored == steps, (stored, steps)

# The same through one MlflowClient, without the fluent API's per-call work.
client = MlflowClient()
run_id = client.create_run(run.info.experiment_id).info.run_id
direct = []
for step in range(steps):
    metrics = [Metric(f"m{i}", 1.0 / (step + i + 1), 0, step) for i in range(10)]
    start = time.perf_counter_ns()
    client.log_batch(run_id, metrics=metrics)
    direct.append(time.perf_counter_ns() - start)
client.set_terminated(run_id)
assert len(client.get_metric_history(run_id, "m9")) == steps
print(json.dumps({
    "median_us": statistics.median(calls) / 1e3,
    "client_log_batch_us": statistics.median(direct) / 1e3,
    "end_run_ms": mlflow_end_ns / 1e6,
}))
"""


def entry_points_dir(out: Path) -> Path:
    """A directory holding the project's MLflow entry points as an installed distribution would declare them.

    An editable install made before the entry points were added does not carry
    them; putting this on PYTHONPATH makes the plugin visible without reinstalling.
    Generated from pyproject.toml, so it declares exactly what a wheel would.
    """
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    info = out / "trackhouse_mlflow_entry_points-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: trackhouse-mlflow-entry-points\nVersion: 0\n")
    lines = []
    for group, points in project["entry-points"].items():
        if group.startswith("mlflow."):
            lines += [f"[{group}]", *(f"{name} = {target}" for name, target in points.items()), ""]
    (info / "entry_points.txt").write_text("\n".join(lines))
    return out


def plugin_env(shim: Path) -> dict[str, str]:
    """The child's environment: this checkout and the entry points on the path, and no MLflow setting inherited
    (an MLFLOW_EXPERIMENT_ID or MLFLOW_TRACKING_URI left by the caller would point the child elsewhere)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(entry_points_dir(shim))])
    return env


def train(uri: str, steps: int, env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", TRAINING_SCRIPT, uri, str(steps)], check=True, capture_output=True, text=True, env=env
    )
    result: dict[str, float] = json.loads(out.stdout.splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "reports" / "plugin.json")
    args = parser.parse_args()
    rounds: dict[str, list[dict[str, float]]] = {"http": [], "trackhouse": []}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        env = plugin_env(work / "entry-points")
        server = ServerUnderTest(work / "data")
        try:
            http_port = server.http.rsplit(":", 1)[1]
            uris = {"http": server.http, "trackhouse": f"trackhouse://{server.target}?http_port={http_port}"}
            for index in range(args.rounds):
                order = ["http", "trackhouse"] if index % 2 == 0 else ["trackhouse", "http"]
                for kind in order:
                    rounds[kind].append(train(uris[kind], args.steps, env))
        finally:
            server.process.terminate()
            server.process.wait(60)
    medians = {kind: statistics.median(r["median_us"] for r in runs) for kind, runs in rounds.items()}
    direct = {kind: statistics.median(r["client_log_batch_us"] for r in runs) for kind, runs in rounds.items()}
    report = {
        "what": "mlflow.log_metrics with 10 metrics per call, per-call median (microseconds), one trackhouse serve",
        "steps_per_run": args.steps,
        "rounds": args.rounds,
        "http_us_median": round(medians["http"], 1),
        "trackhouse_us_median": round(medians["trackhouse"], 1),
        "speedup": round(medians["http"] / medians["trackhouse"], 1),
        "mlflowclient_log_batch_us_median": {kind: round(v, 1) for kind, v in direct.items()},
        "end_run_ms": {kind: [round(r["end_run_ms"], 1) for r in runs] for kind, runs in rounds.items()},
        "per_round_us": {kind: [round(r["median_us"], 1) for r in runs] for kind, runs in rounds.items()},
        "note": "2-core machine shared with other helpers' tests; every run's points were read back before counting",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
