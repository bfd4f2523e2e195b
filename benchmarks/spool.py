"""The client spool: what logging costs while the server is down, what the spool costs on disk, how fast it replays.

    python -m benchmarks.spool [--steps 100000] [--repeats 3]

Each repeat logs `steps` calls of `log_metrics` with 10 keys (10 points each), timing every call:
1. server up, no spool (the baseline);
2. server down (a loopback port nobody listens on), with a spool: every point goes to disk, and memory holds at
   most 200,000 points, so the spool must keep up with the loop. Then the client
   closes, leaving its spool behind, as a killed training process would;
3. a new client on that spool, with the server up: the time until every spooled point is acknowledged is the
   replay throughput.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.ingest import ServerUnderTest, save_results, spread_of
from benchmarks.provenance import provenance
from tests.tansu import free_port
from trackhouse import Client, ClientConfig

KEYS = [f"layer.{i}.grad_norm" for i in range(10)]
#: A memory bound well under the points logged, so that the spool, not memory, has to keep up while the server is down.
CONFIG = ClientConfig(max_buffer_points=200_000, request_points=100_000)


def log_steps(client: Client, steps: int) -> np.ndarray:
    """Per-call latency of `log_metrics` (10 keys) in microseconds."""
    run = client.start_run(experiment="bench-spool")
    latencies = np.empty(steps)
    values = np.random.default_rng(0).random((steps, len(KEYS))).tolist()
    clock = time.perf_counter_ns
    for step in range(steps):
        metrics = dict(zip(KEYS, values[step], strict=True))
        start = clock()
        run.log_metrics(metrics, step=step)
        latencies[step] = clock() - start
    return latencies / 1000


def call_cost(latencies: np.ndarray) -> dict[str, float]:
    return {"call_us_p50": float(np.median(latencies)), "call_us_p99": float(np.percentile(latencies, 99))}


def server_up(target: str, steps: int) -> dict[str, float]:
    """The baseline: the same calls with the server up; points/s is from the first call until all are acknowledged."""
    with Client(target, CONFIG) as client:
        start = time.perf_counter()
        result = call_cost(log_steps(client, steps))
        client.flush()
        result["points_per_s"] = steps * len(KEYS) / (time.perf_counter() - start)
    return result


def server_down(spool: Path, steps: int) -> dict[str, float]:
    client = Client(f"127.0.0.1:{free_port()}", replace(CONFIG, close_timeout_s=0), spool_dir=spool)
    result = call_cost(log_steps(client, steps))
    while (stats := client.stats()).buffered_points or stats.unacknowledged_points:
        time.sleep(0.05)
    result["spooled_points"] = stats.spooled_points
    result["spooled_bytes"] = stats.spooled_bytes
    result["bytes_per_point"] = stats.spooled_bytes / stats.spooled_points
    client.close()  # the server never answered: the spool stays on disk for the next client
    return result


def replay(target: str, spool: Path) -> dict[str, float]:
    start = time.perf_counter()
    client = Client(target, spool_dir=spool)
    points = client.stats().spooled_points
    client.flush()
    seconds = time.perf_counter() - start
    reconnects = client.stats().reconnects
    client.close()
    return {
        "replayed_points": points,
        "replay_seconds": seconds,
        "replay_points_per_s": points / seconds,
        "replay_reconnects": reconnects,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    started = provenance()
    samples: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="trackhouse-bench-spool-") as tmp:
        server = ServerUnderTest(Path(tmp) / "data")
        try:
            for i in range(args.repeats):
                spool = Path(tmp) / f"spool{i}"
                sample = {f"up_{k}": v for k, v in server_up(server.target, args.steps).items()}
                sample |= {f"down_{k}": v for k, v in server_down(spool, args.steps).items()}
                sample |= replay(server.target, spool)
                assert not any(spool.iterdir()), "the replayed spool was not emptied"
                shutil.rmtree(spool)
                samples.append(sample)
                print(
                    f"repeat {i + 1}/{args.repeats}: log_metrics p50/p99 up {sample['up_call_us_p50']:.1f}/"
                    f"{sample['up_call_us_p99']:.1f} us, down+spool {sample['down_call_us_p50']:.1f}/"
                    f"{sample['down_call_us_p99']:.1f} us; {sample['down_bytes_per_point']:.1f} B/point;"
                    f" replay {sample['replay_points_per_s']:,.0f} points/s ({sample['replay_reconnects']} reconnects),"
                    f" live {sample['up_points_per_s']:,.0f} points/s",
                    flush=True,
                )
        finally:
            server.stop()
    results: dict[str, Any] = {"args": vars(args), "samples": samples}
    results["median"] = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
    out = save_results("spool", results, started)
    m = results["median"]
    print()
    print(f"| measure ({args.steps:,} calls of 10 keys; median of {args.repeats} repeats) | value |")
    print("|---|---|")
    print(f"| log_metrics, server up, no spool: p50 / p99 | {m['up_call_us_p50']:.1f} / {m['up_call_us_p99']:.1f} us |")
    print(
        f"| log_metrics, server down, spooling: p50 / p99 | {m['down_call_us_p50']:.1f} /"
        f" {m['down_call_us_p99']:.1f} us |"
    )
    print(f"| spool on disk | {m['down_bytes_per_point']:.1f} bytes per point |")
    replays = [s["replay_points_per_s"] for s in samples]
    print(f"| replay into a live server | {spread_of(replays)} points/s (min-max) |")
    print(
        f"| the same points logged live (server up) | {spread_of([s['up_points_per_s'] for s in samples])} points/s |"
    )
    print(f"\nresults: {out.relative_to(out.parents[2])}")


if __name__ == "__main__":
    main()
