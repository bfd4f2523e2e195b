"""Read-side benchmark of query/metrics.py on embedded chDB: the chart calls on long series.

    python -m benchmarks.reads [--long-points 10000000] [--runs 100] [--points-per-run 100000] [--repeats 20]

Writes through the real sink, then times (median, min, max of --repeats):
- the sampled chart series (320 points, as the MLflow UI asks) of one --long-points run;
- the same for --runs runs at once;
- the first 1,000-point page of the long run's full history;
- latest values of --runs runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.ingest import save_results
from trackhouse.ingest.batch import Batch, Metrics
from trackhouse.ingest.sink import ClickHouseSink
from trackhouse.query import metrics, schema
from trackhouse.query.connection import StoreConfig, connect

DB = "trackhouse"
CHUNK = 1_000_000


def load(sink: ClickHouseSink, run_id: str, points: int) -> None:
    rng = np.random.default_rng(len(run_id))
    for start in range(0, points, CHUNK):
        n = min(CHUNK, points - start)
        steps = np.arange(start, start + n, dtype=np.int64)
        sink.write(
            Batch(
                metrics=Metrics(
                    run_ids=(run_id,),
                    keys=("loss",),
                    run_index=np.zeros(n, np.int32),
                    key_index=np.zeros(n, np.int32),
                    step=steps,
                    timestamp=1_700_000_000_000 + steps * 10,
                    value=np.cumsum(rng.standard_normal(n)),
                )
            )
        )


def timed(repeats: int, call: Callable[[], object]) -> dict[str, float]:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long-points", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--points-per-run", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    results: dict[str, Any] = {"args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="trackhouse-reads-") as tmp:
        client = connect(StoreConfig.for_data_dir(Path(tmp)))
        schema.migrate(client, DB)
        sink = ClickHouseSink(client, DB)
        started = time.perf_counter()
        load(sink, "long", args.long_points)
        runs = [f"run-{i:04d}" for i in range(args.runs)]
        for run_id in runs:
            load(sink, run_id, args.points_per_run)
        results["load_seconds"] = time.perf_counter() - started
        client.command(f"OPTIMIZE TABLE {DB}.{schema.METRICS} FINAL")  # steady state: merged parts
        results["sampled_long_run"] = timed(args.repeats, lambda: metrics.sampled(client, DB, ["long"], "loss", 320))
        results["sampled_many_runs"] = timed(args.repeats, lambda: metrics.sampled(client, DB, runs, "loss", 320))
        results["history_first_page"] = timed(args.repeats, lambda: metrics.history(client, DB, "long", "loss", 1_000))
        results["latest_many_runs"] = timed(args.repeats, lambda: metrics.latest(client, DB, runs))
        client.close()
    out = save_results("reads", results)
    print(
        f"loaded {args.long_points:,} + {args.runs} x {args.points_per_run:,} points in {results['load_seconds']:.0f} s"
    )
    print("| read | median ms (min-max) |")
    print("|---|---|")
    for name in ("sampled_long_run", "sampled_many_runs", "history_first_page", "latest_many_runs"):
        r = results[name]
        print(f"| {name} | {r['median_ms']:.1f} ({r['min_ms']:.1f}-{r['max_ms']:.1f}) |")
    print(f"results in {out}")


if __name__ == "__main__":
    main()
