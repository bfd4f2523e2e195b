"""The MLflow API's targets, measured over HTTP against `trackhouse serve` on embedded chDB.

    python -m benchmarks.compat [--chart-runs 100] [--chart-points 1000000] [--long-points 10000000]
                                [--search-runs 100000] [--repeats 20] [--log-batch-repeats 3]

Loads through the real sink into a fresh data directory, merges it (the steady state
background merges reach), then starts the server and times, median of --repeats:
- the UI's chart call (metrics/get-history-bulk-interval, 320 points) for --chart-runs runs;
- the same for one --long-points run;
- runs/search with a metric filter over --search-runs runs in one experiment (1,000 per page, as
  MlflowClient.search_runs asks);
and then MLflow's log-batch (1,000 metrics per call; --log-batch-writers concurrent writers, as in a sweep of
that many trials, in 4 client processes sending pre-encoded bodies) against trackhouse and a stock
`mlflow server` on SQLite, side by side in each repeat. One unmeasured round warms both servers up first,
and every measurement starts once the machine is quiet (see wait_until_quiet).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import requests

from benchmarks.ingest import ServerUnderTest, save_results
from benchmarks.provenance import provenance
from benchmarks.reads import load, timed
from benchmarks.systems import StockMlflow
from trackhouse.ingest.batch import Batch, ExperimentRow, Metrics, ParamRow, RunRow
from trackhouse.ingest.sink import ClickHouseSink
from trackhouse.query import schema
from trackhouse.query.connection import StoreConfig, connect

DB = "trackhouse"
CHART_EXPERIMENT = "100"
SEARCH_EXPERIMENT = "200"
LOG_BATCH_PROCESSES = 4
METRICS_PER_BATCH = 1000


def _runs(experiment_id: str, run_ids: list[str]) -> Batch:
    rows = tuple(RunRow(r, experiment_id, r, "FINISHED", 1_700_000_000_000, 0, "bench", 1) for r in run_ids)
    return Batch(runs=rows)


def load_all(data_dir: Path, args: argparse.Namespace) -> float:
    started = time.perf_counter()
    client = connect(StoreConfig.for_data_dir(data_dir))
    schema.migrate(client, DB)
    sink = ClickHouseSink(client, DB)
    sink.write(
        Batch(
            experiments=(
                ExperimentRow(CHART_EXPERIMENT, "charts", 1_700_000_000_000),
                ExperimentRow(SEARCH_EXPERIMENT, "sweep", 1_700_000_000_000),
            )
        )
    )
    chart_runs = [f"chart{i:04d}" for i in range(args.chart_runs)]
    sink.write(_runs(CHART_EXPERIMENT, [*chart_runs, "long"]))
    for run_id in chart_runs:
        load(sink, run_id, args.chart_points)
    load(sink, "long", args.long_points)
    _load_sweep(sink, args.search_runs)
    for table in (schema.METRICS, schema.METRIC_BUCKETS, schema.LATEST_METRICS, schema.RUNS, schema.PARAMS):
        client.command(f"OPTIMIZE TABLE {DB}.{table} FINAL")
    client.close()
    return time.perf_counter() - started


def _load_sweep(sink: ClickHouseSink, runs: int) -> None:
    """`runs` trials, each with 10 metrics and 2 params: a large hyperparameter sweep."""
    rng = np.random.default_rng(1)
    keys = ("acc", *(f"m{i}" for i in range(9)))
    for start in range(0, runs, 10_000):
        ids = [f"trial{i:06d}" for i in range(start, min(start + 10_000, runs))]
        n = len(ids) * len(keys)
        sink.write(_runs(SEARCH_EXPERIMENT, ids))
        sink.write(
            Batch(
                metrics=Metrics(
                    run_ids=tuple(ids),
                    keys=keys,
                    run_index=np.repeat(np.arange(len(ids), dtype=np.int32), len(keys)),
                    key_index=np.tile(np.arange(len(keys), dtype=np.int32), len(ids)),
                    step=np.zeros(n, np.int64),
                    timestamp=np.full(n, 1_700_000_000_000, np.int64),
                    value=rng.random(n),
                ),
                params=tuple(ParamRow(r, "lr", str(rng.random())) for r in ids),
            )
        )


def read_targets(http: str, args: argparse.Namespace) -> dict[str, Any]:
    """Each call is timed until its whole answer has arrived, as a browser or curl receives it; the answer is
    then checked, outside the timing, so the figure is the server's and the wire's, not this script's JSON parsing.
    """
    session = requests.Session()
    chart_url = f"{http}/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval"
    chart_runs = [f"chart{i:04d}" for i in range(args.chart_runs)]
    answers: dict[str, bytes] = {}

    def chart(name: str, run_ids: list[str]) -> None:
        query: dict[str, Any] = {"run_ids": run_ids, "metric_key": "loss", "max_results": 320}
        answer = session.get(chart_url, params=query)
        answer.raise_for_status()
        answers[name] = answer.content

    search_body: dict[str, Any] = {
        "experiment_ids": [SEARCH_EXPERIMENT],
        "filter": "metrics.acc > 0.9",
        "max_results": 1000,
    }

    def search() -> None:
        answer = session.post(f"{http}/api/2.0/mlflow/runs/search", json=search_body)
        answer.raise_for_status()
        answers["search"] = answer.content

    chart("warm-up", chart_runs)  # first touch: the server's caches and chDB's page cache
    results: dict[str, Any] = {
        "chart_many_runs": timed(args.repeats, lambda: chart("many", chart_runs)),
        "chart_long_run": timed(args.repeats, lambda: chart("long", ["long"])),
        "search_metric_filter": timed(args.repeats, search),
    }
    for name, expected_runs in (("many", len(chart_runs)), ("long", 1)):
        points = json.loads(answers[name])["metrics"]
        assert len({p["run_id"] for p in points}) == expected_runs and len(points) <= 320 * expected_runs
        results[f"chart_{name}_bytes"] = len(answers[name])
    found = json.loads(answers["search"])["runs"]
    assert len(found) == 1000, "the filter matches about a tenth of the runs: a full page"
    assert all({m["key"]: m["value"] for m in r["data"]["metrics"]}["acc"] > 0.9 for r in found)
    return results


def _log_batches(endpoint: str, bodies_per_writer: list[list[bytes]]) -> None:
    """One client process: a thread per writer, each making synchronous log-batch calls as a training loop does."""

    def write(bodies: list[bytes]) -> None:
        session = requests.Session()
        for body in bodies:
            answer = session.post(
                f"{endpoint}/api/2.0/mlflow/runs/log-batch", data=body, headers={"Content-Type": "application/json"}
            )
            answer.raise_for_status()

    threads = [threading.Thread(target=write, args=(bodies,)) for bodies in bodies_per_writer]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def log_batch_rate(endpoint: str, writers: int, batches: int) -> tuple[float, list[str]]:
    """Points/s of `writers` concurrent MLflow log-batch writers, one run each, METRICS_PER_BATCH metrics per call.

    The bodies are the JSON MlflowClient.log_batch sends, encoded before the clock starts: the
    MLflow client spends about 40 ms of its own CPU per 1,000-metric call (measured), which on
    2 shared cores would measure the client rather than the server. Both systems get the same bodies.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=endpoint)
    run_ids = [client.create_run("0").info.run_id for _ in range(writers)]
    now = int(time.time() * 1000)
    bodies = [
        [
            json.dumps(
                {
                    "run_id": run_id,
                    "metrics": [
                        {"key": f"k{i}", "value": float(i), "timestamp": now, "step": step}
                        for i in range(METRICS_PER_BATCH)
                    ],
                }
            ).encode()
            for step in range(batches)
        ]
        for run_id in run_ids
    ]
    processes = min(LOG_BATCH_PROCESSES, writers)
    shares = [bodies[i::processes] for i in range(processes)]
    started = time.perf_counter()
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_log_batches, [endpoint] * processes, shares))
    elapsed = time.perf_counter() - started
    return writers * batches * METRICS_PER_BATCH / elapsed, run_ids


def wait_until_quiet(busy_below: float = 0.1, window_s: float = 0.5, timeout_s: float = 120) -> None:
    """Wait until the whole machine's CPU use stays under `busy_below` for `window_s`.

    Each system's background work (trackhouse's merges, the stock server's worker start-up) would
    otherwise land on the other system's measurement: on 2 cores, the first repeat after the stock
    server started ran at 55-70% of the later ones.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy_before, total_before = _cpu_ticks()
        time.sleep(window_s)
        busy_after, total_after = _cpu_ticks()
        if busy_after - busy_before < busy_below * max(total_after - total_before, 1):
            return
    print(f"the machine stayed busy for {timeout_s:.0f} s; measuring anyway", flush=True)


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot, from /proc/stat."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle and iowait
    return sum(fields) - idle, sum(fields)


def stored_points(endpoint: str, run_ids: list[str], batches: int) -> bool:
    """Spot check: every step of two keys of every run is stored exactly once."""
    session = requests.Session()
    for run_id in run_ids:
        for key in ("k0", f"k{METRICS_PER_BATCH - 1}"):
            answer = session.get(
                f"{endpoint}/api/2.0/mlflow/metrics/get-history", params={"run_id": run_id, "metric_key": key}
            )
            steps = sorted(m["step"] for m in answer.json().get("metrics", []))
            if steps != list(range(batches)):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chart-runs", type=int, default=100)
    parser.add_argument("--chart-points", type=int, default=1_000_000)
    parser.add_argument("--long-points", type=int, default=10_000_000)
    parser.add_argument("--search-runs", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--log-batch-repeats", type=int, default=3)
    parser.add_argument("--log-batch-writers", type=int, default=32, help="concurrent log-batch writers (runs)")
    parser.add_argument("--trackhouse-batches", type=int, default=20, help="log-batch calls per writer, trackhouse")
    parser.add_argument("--stock-batches", type=int, default=2, help="log-batch calls per writer, stock MLflow")
    args = parser.parse_args()
    started = provenance()
    results: dict[str, Any] = {"args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="trackhouse-compat-") as tmp:
        data_dir = Path(tmp) / "data"
        results["load_seconds"] = load_all(data_dir, args)
        print(f"loaded in {results['load_seconds']:.0f} s", flush=True)
        server = ServerUnderTest(data_dir)
        stock = StockMlflow()
        try:
            results.update(read_targets(server.http, args))
            if args.log_batch_repeats:
                stock.start(Path(tmp) / "stock")
                for endpoint in (server.http, stock.endpoint):  # warm-up, not measured
                    wait_until_quiet()
                    log_batch_rate(endpoint, args.log_batch_writers, 1)
            rates: dict[str, list[float]] = {"trackhouse": [], "stock": [], "ratio": []}
            for _ in range(args.log_batch_repeats):
                wait_until_quiet()
                ours, run_ids = log_batch_rate(server.http, args.log_batch_writers, args.trackhouse_batches)
                assert stored_points(server.http, run_ids, args.trackhouse_batches), "trackhouse lost or doubled points"
                wait_until_quiet()
                theirs, _ = log_batch_rate(stock.endpoint, args.log_batch_writers, args.stock_batches)
                rates["trackhouse"].append(ours)
                rates["stock"].append(theirs)
                rates["ratio"].append(ours / theirs)
            results["log_batch"] = rates
        finally:
            stock.stop()
            server.stop()
    out = save_results("compat", results, started)
    print("| MLflow API call | median (min-max) | target |")
    print("|---|---|---|")
    for name, target in (
        ("chart_many_runs", "< 100 ms"),
        ("chart_long_run", "< 100 ms"),
        ("search_metric_filter", "< 200 ms"),
    ):
        r = results[name]
        print(f"| {name} | {r['median_ms']:.1f} ms ({r['min_ms']:.1f}-{r['max_ms']:.1f}) | {target} |")
    rates = results["log_batch"]
    if not rates["ratio"]:
        print(f"results in {out}")
        return
    for name in ("trackhouse", "stock"):
        print(f"| log-batch {name} | {_spread(rates[name], ',.0f')} points/s | |")
    print(f"| log-batch ratio | {_spread(rates['ratio'], '.0f')}x | >= 30x |")
    print(f"results in {out}")


def _spread(values: list[float], spec: str) -> str:
    return f"{statistics.median(values):{spec}} ({min(values):{spec}}-{max(values):{spec}})"


if __name__ == "__main__":
    main()
