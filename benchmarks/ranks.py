"""The rank API at scale: runs/ranks, metrics/aggregate and runs/stragglers over one distributed run.

    python -m benchmarks.ranks                    # 128 ranks x 2,000 steps x 10 keys (2.6M points)
    python -m benchmarks.ranks --full             # 1,024 ranks x 10,000 steps x 10 keys (about 10^8 points)

Loads the run through the real sink into a fresh data directory, in flushes of all ranks' next --flush-steps
steps (as ranks' clients interleave in a live run), with one slow rank (half the step rate, so half the steps)
and one rank whose values turn to NaN at 70% of the run. Then starts `trackhouse serve` on it and times each
endpoint over HTTP (median and p90 of --repeats, after a settling pause and three warm-up calls), with the
summary tables as the load left them (not merged by hand), and checks that the answers name the slow and the
NaN rank.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests

from benchmarks.ingest import ServerUnderTest
from benchmarks.provenance import provenance, save_report
from trackhouse.ingest.batch import Batch, ExperimentRow, Metrics, RunRow
from trackhouse.ingest.sink import ClickHouseSink
from trackhouse.query import schema
from trackhouse.query.connection import StoreConfig, connect

DB = "trackhouse"
RUN_ID = "ranks0000000000000000000000000001"
T0 = 1_700_000_000_000
STEP_MS = 500
WARM_UP = 3
#: The server imports MLflow's handlers on a thread at start-up (compat.handlers.preload), which holds the GIL
#: for seconds: measuring starts after it.
SETTLE_S = 10


def shape(ranks: int) -> tuple[int, int]:
    """(slow rank, NaN rank)."""
    return ranks // 3, ranks // 2


def load(data_dir: Path, ranks: int, steps: int, keys: int, flush_steps: int) -> dict[str, Any]:
    client = connect(StoreConfig.for_data_dir(data_dir))
    schema.migrate(client, DB)
    sink = ClickHouseSink(client, DB)
    sink.write(Batch(experiments=(ExperimentRow("400", "ranks", T0),)))
    sink.write(Batch(runs=(RunRow(RUN_ID, "400", "llm", "RUNNING", T0, 0, "bench", 1),)))
    slow, nan = shape(ranks)
    names = tuple(["loss", *(f"layer.{k}.grad_norm" for k in range(keys - 1))])
    sources = tuple((r, f"node{r // 8}", 0) for r in range(ranks))
    rng = np.random.default_rng(16)
    started, points = time.perf_counter(), 0
    for first in range(0, steps, flush_steps):
        step_range = np.arange(first, min(first + flush_steps, steps), dtype=np.int64)
        rank = np.repeat(np.arange(ranks, dtype=np.int32), len(step_range) * keys)
        step = np.tile(np.repeat(step_range, keys), ranks)
        key = np.tile(np.arange(keys, dtype=np.int32), ranks * len(step_range))
        # The slow rank steps at half the rate: by the others' last timestamp it has done half their steps.
        logged = (rank != slow) | (step < steps // 2)
        rank, step, key = rank[logged], step[logged], key[logged]
        timestamp = T0 + step * np.where(rank == slow, 2 * STEP_MS, STEP_MS)
        value = 2.0 * np.exp(-step / steps) * (1 + key) + rng.normal(0, 0.05, len(step))
        value[(rank == nan) & (step >= steps * 7 // 10)] = np.nan
        metrics = Metrics(
            run_ids=(RUN_ID,),
            keys=names,
            run_index=np.zeros(len(step), np.int32),
            key_index=key,
            step=step,
            timestamp=timestamp,
            value=value,
            sources=sources,
            source_index=rank,
        )
        sink.write(Batch(metrics=metrics))
        points += len(step)
    seconds = time.perf_counter() - started
    parts = active_parts(client)
    client.close()
    return {"points": points, "load_seconds": seconds, "active_parts": parts}


def active_parts(client: Any) -> dict[str, int]:
    rows = client.query(
        "SELECT table, count() FROM system.parts WHERE database = {db:String} AND active GROUP BY table",
        parameters={"db": DB},
    ).result_rows
    return dict(rows)


def timed(session: requests.Session, url: str, params: dict[str, Any], repeats: int) -> tuple[dict[str, float], Any]:
    for _ in range(WARM_UP):  # caches, the first connection
        session.get(url, params=params).raise_for_status()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        answer = session.get(url, params=params)
        answer.raise_for_status()
        body = answer.json()
        seconds.append(time.perf_counter() - started)
    ms = sorted(s * 1000 for s in seconds)
    return {"median_ms": statistics.median(ms), "p90_ms": ms[int(0.9 * (len(ms) - 1))], "max_ms": ms[-1]}, body


def measure(http: str, ranks: int, repeats: int) -> dict[str, Any]:
    slow, nan = shape(ranks)
    base = f"{http}/api/2.0/trackhouse/"
    calls: dict[str, tuple[str, dict[str, Any]]] = {
        "runs/ranks loss": ("runs/ranks", {"metric_key": "loss"}),
        "metrics/aggregate loss (320 buckets)": ("metrics/aggregate", {"metric_key": "loss"}),
        "metrics/aggregate loss (100 buckets)": ("metrics/aggregate", {"metric_key": "loss", "max_results": 100}),
        "runs/stragglers (all keys)": ("runs/stragglers", {}),
    }
    latency, answers = {}, {}
    with requests.Session() as session:
        for name, (path, params) in calls.items():
            latency[name], answers[name] = timed(session, base + path, {"run_id": RUN_ID, **params}, repeats)
        # The floor on this machine at this moment: an MLflow GET answered by one small query on the same store.
        floor = f"{http}/api/2.0/mlflow/runs/get"
        latency["floor: MLflow runs/get"], _ = timed(session, floor, {"run_id": RUN_ID}, repeats)
    by_rank = answers["runs/ranks loss"]["ranks"]
    stragglers = answers["runs/stragglers (all keys)"]["stragglers"]
    checks = {
        "ranks_seen": len(by_rank) == ranks,
        "nan_rank_found": [r["rank"] for r in by_rank if r["nan_count"]] == [nan],
        "slow_rank_first_straggler": bool(stragglers) and stragglers[0]["rank"] == slow,
        "only_the_slow_rank_straggles": [s["rank"] for s in stragglers] == [slow],
        "aggregate_counts_the_nan": sum(b["nan"] for b in answers["metrics/aggregate loss (320 buckets)"]["buckets"])
        > 0,
    }
    reasons = stragglers[0]["reasons"] if stragglers else []
    return {"latency": latency, "checks": checks, "slowest_rank_reasons": reasons}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ranks", description=__doc__)
    parser.add_argument("--ranks", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2_000)
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--full", action="store_true", help="1,024 ranks x 10,000 steps x 10 keys")
    parser.add_argument("--flush-steps", type=int, default=40, help="steps of every rank per flush")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--data-dir", type=Path, help="keep the loaded run here, and reuse it when it is already there (same shape)"
    )
    args = parser.parse_args(argv)
    if args.full:
        args.ranks, args.steps, args.keys = 1_024, 10_000, 10
    started = provenance()
    with tempfile.TemporaryDirectory(prefix="trackhouse-ranks-") as tmp:
        data = args.data_dir or Path(tmp) / "data"
        marker = data / "loaded.json"
        if marker.exists():
            loaded = json.loads(marker.read_text())
        else:
            loaded = load(data, args.ranks, args.steps, args.keys, args.flush_steps)
            marker.write_text(json.dumps(loaded))
        print(f"loaded {loaded['points']:,} points in {loaded['load_seconds']:.0f} s; parts {loaded['active_parts']}")
        server = ServerUnderTest(data)
        try:
            time.sleep(SETTLE_S)
            result = measure(server.http, args.ranks, args.repeats)
        finally:
            server.stop()
        # What the queries met: parts merge in the background whenever the store is open.
        client = connect(StoreConfig.for_data_dir(data))
        result["active_parts_after"] = active_parts(client)
        client.close()
    results = {"shape": {k: getattr(args, k) for k in ("ranks", "steps", "keys", "flush_steps")}, **loaded, **result}
    path = save_report("ranks", results, started)
    for name, figures in result["latency"].items():
        print(f"{name:40} median {figures['median_ms']:7.1f} ms   p90 {figures['p90_ms']:7.1f} ms")
    print(f"checks: {result['checks']}\nsaved {path}")
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
