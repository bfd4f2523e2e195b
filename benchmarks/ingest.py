"""End-to-end ingest benchmark: ingest.client -> gRPC -> `trackhouse serve` (embedded chDB).

    python -m benchmarks.ingest [--repeats 3] [--bulk-points 5000000] [--steps 200000]

Workloads, each repeated and reported as median (min-max):
- bulk: log_series of whole arrays (10 runs x 10 keys), timed until close() returns,
  i.e. until every point is acknowledged, which the server does only after the insert.
- per-step: log_metrics with 10 keys per call, the training-loop shape; also times each call.
Server memory is the peak RSS (VmHWM) of the server process after each workload.
Correctness: the server's inserted-points counter must grow by exactly the points sent.
Results go to benchmarks/reports/ingest-<UTC time>-<commit>.json, with the commit, date and machine load.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.provenance import provenance, save_report
from tests.serving import wait_until_ready
from trackhouse import Client

ROOT = Path(__file__).resolve().parent.parent
KEYS = [f"layer.{i}.grad_norm" for i in range(10)]


class ServerUnderTest:
    """`trackhouse serve` as a child process on free ports; `args` add e.g. a role and Kafka settings."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.log = data_dir.with_suffix(".log")
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "trackhouse.cli",
                    "serve",
                    "--data-dir",
                    str(data_dir),
                    "--grpc-port",
                    "0",
                    "--http-port",
                    "0",
                    *args,
                ],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            fields = wait_until_ready(self.process, self.log)
        except BaseException:  # including Ctrl-C: nobody else holds this process yet
            self.process.kill()
            self.process.wait(10)
            raise
        self.target, self.http = fields["grpc"], fields["http"]

    def inserted_points(self) -> int:
        with urllib.request.urlopen(f"{self.http}/metrics") as response:
            for line in response.read().decode().splitlines():
                if line.startswith("trackhouse_inserted_points_total "):
                    return int(float(line.split()[1]))
        raise RuntimeError("no trackhouse_inserted_points_total on /metrics")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        """SIGTERM (the server drains), and SIGKILL if it has not exited in 60 s, so no server outlives a run."""
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def send_bulk(target: str, points: int) -> int:
    """The bulk workload: 10 runs x 10 keys of whole arrays. Returns once every point is acknowledged."""
    runs, per_series = 10, points // (10 * len(KEYS))
    values = np.random.default_rng(0).random(per_series)
    steps = np.arange(per_series)
    with Client(target) as client:
        for r in range(runs):
            run = client.start_run(experiment="bench-bulk", name=f"bulk-{r}")
            for key in KEYS:
                run.log_series(key, steps, values)
    return runs * len(KEYS) * per_series


def bulk(server: ServerUnderTest, points: int) -> dict[str, float]:
    before = server.inserted_points()
    started = time.perf_counter()
    sent = send_bulk(server.target, points)
    elapsed = time.perf_counter() - started
    stored = server.inserted_points() - before
    return {"points": sent, "seconds": elapsed, "points_per_s": sent / elapsed, "stored_exactly": float(stored == sent)}


def per_step(server: ServerUnderTest, steps: int) -> dict[str, float]:
    before = server.inserted_points()
    costs = np.empty(steps, np.int64)
    metrics = dict.fromkeys(KEYS, 0.5)
    clock = time.perf_counter_ns
    started = time.perf_counter()
    with Client(server.target) as client:
        run = client.start_run(experiment="bench-steps")
        log_metrics = run.log_metrics
        for step in range(steps):
            t0 = clock()
            log_metrics(metrics, step=step)
            costs[step] = clock() - t0
    elapsed = time.perf_counter() - started
    sent = steps * len(KEYS)
    stored = server.inserted_points() - before
    return {
        "points": sent,
        "seconds": elapsed,
        "points_per_s": sent / elapsed,
        "call_us_p50": float(np.percentile(costs, 50)) / 1000,
        "call_us_p99": float(np.percentile(costs, 99)) / 1000,
        "stored_exactly": float(stored == sent),
    }


def summarize(samples: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {
        key: {
            "median": statistics.median(s[key] for s in samples),
            "min": min(s[key] for s in samples),
            "max": max(s[key] for s in samples),
        }
        for key in samples[0]
    }


def save_results(name: str, results: dict[str, Any], started: dict[str, Any] | None = None) -> Path:
    """Write `results` to benchmarks/reports/<name>-<time>-<commit>.json (committed) and return the path.

    `started` is `provenance()` taken before measuring; without it the record is taken now."""
    return save_report(name, results, started or provenance())


def spread_of(values: list[float]) -> str:
    """median (min-max) of raw samples."""
    return _spread({"median": statistics.median(values), "min": min(values), "max": max(values)})


def _spread(stat: dict[str, float]) -> str:
    return f"{stat['median']:,.0f} ({stat['min']:,.0f}-{stat['max']:,.0f})"


def _exact(summary: dict[str, dict[str, float]]) -> str:
    return "yes" if summary["stored_exactly"]["min"] == 1 else "NO"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bulk-points", type=int, default=5_000_000)
    parser.add_argument("--steps", type=int, default=200_000)
    args = parser.parse_args()

    started = provenance()
    results: dict[str, Any] = {"args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="trackhouse-bench-") as tmp:
        server = ServerUnderTest(Path(tmp) / "data")
        try:
            bulk_runs, step_runs = [], []
            for i in range(args.repeats):
                bulk_runs.append(bulk(server, args.bulk_points))
                step_runs.append(per_step(server, args.steps))
                print(
                    f"repeat {i + 1}/{args.repeats}: bulk {bulk_runs[-1]['points_per_s']:,.0f} pts/s, "
                    f"per-step {step_runs[-1]['points_per_s']:,.0f} pts/s, "
                    f"log_metrics p50 {step_runs[-1]['call_us_p50']:.2f} us",
                    flush=True,
                )
            results["bulk"] = summarize(bulk_runs)
            results["per_step"] = summarize(step_runs)
            results["server_peak_rss_mb"] = server.peak_rss_mb()
        finally:
            server.stop()

    out = save_results("ingest", results, started)
    print()
    print("| workload | points/s, median (min-max) | log_metrics per call, p50 / p99 | stored exactly once |")
    print("|---|---|---|---|")
    print(f"| bulk log_series | {_spread(results['bulk']['points_per_s'])} | - | {_exact(results['bulk'])} |")
    steps = results["per_step"]
    cost = f"{steps['call_us_p50']['median']:.2f} / {steps['call_us_p99']['median']:.2f} us"
    print(f"| log_metrics, 10 keys per call | {_spread(steps['points_per_s'])} | {cost} | {_exact(steps)} |")
    print(f"\nserver peak RSS: {results['server_peak_rss_mb']:.0f} MB; results in {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
