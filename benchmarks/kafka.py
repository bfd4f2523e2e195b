"""Kafka path benchmark, side by side with the direct gRPC path in the same run.

    python -m benchmarks.kafka [--repeats 3] [--points 3000000] [--backlog-points 10000000]

- direct: client -> gRPC -> `trackhouse serve` (embedded chDB), timed until acknowledged (= stored).
- kafka: client -> gateway (gRPC) -> Tansu broker -> worker -> chDB, timed until the worker's
  inserted-points counter has grown by every point sent.
- catch-up: a backlog written straight to Kafka (`Client("kafka://...")`) while no worker runs;
  then a worker starts, timed from its ready line until the whole backlog is inserted. The worker's
  CPU time over the same span (user + system, from /proc; its embedded ClickHouse inserts included)
  gives points per worker CPU-second, which depends far less on the machine's other load.
  `--catch-up-only` runs just this.
Every process shares the same 2 cores. Results go to
benchmarks/reports/kafka-<UTC time>-<commit>.json, with the commit, date and machine load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.ingest import ROOT, ServerUnderTest, save_results, send_bulk, spread_of
from benchmarks.provenance import provenance
from benchmarks.systems import tree_cpu_seconds
from tests.tansu import KafkaBroker


def wait_for_inserted(worker: ServerUnderTest, target: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while worker.inserted_points() < target:
        if time.monotonic() > deadline:
            raise RuntimeError(f"worker inserted {worker.inserted_points()} of {target} points")
        time.sleep(0.05)


def through_kafka(gateway: ServerUnderTest, worker: ServerUnderTest, points: int) -> float:
    before = worker.inserted_points()
    started = time.perf_counter()
    sent = send_bulk(gateway.target, points)
    wait_for_inserted(worker, before + sent)
    return sent / (time.perf_counter() - started)


def direct(server: ServerUnderTest, points: int) -> float:
    started = time.perf_counter()
    sent = send_bulk(server.target, points)
    return sent / (time.perf_counter() - started)


def catch_up(tmp: Path, broker: KafkaBroker, points: int) -> dict[str, float]:
    topic = "bench.backlog"
    started = time.perf_counter()
    sent = send_bulk(f"kafka://{broker.bootstrap}/{topic}", points)
    produce_seconds = time.perf_counter() - started
    worker = ServerUnderTest(tmp / "catchup", "--role", "worker", *_kafka_args(broker, topic, "bench-catchup"))
    try:
        started, cpu_started = time.perf_counter(), tree_cpu_seconds(worker.process.pid)
        wait_for_inserted(worker, sent)
        seconds, cpu = time.perf_counter() - started, tree_cpu_seconds(worker.process.pid) - cpu_started
    finally:
        worker.stop()
    return {
        "points": sent,
        "produce_points_per_s": sent / produce_seconds,
        "catch_up_points_per_s": sent / seconds,
        "worker_cpu_seconds": cpu,
        "points_per_worker_cpu_second": sent / cpu,
    }


def _kafka_args(broker: KafkaBroker, topic: str, group: str) -> tuple[str, ...]:
    return (
        "--kafka-bootstrap",
        broker.bootstrap,
        "--kafka-topic",
        topic,
        "--kafka-group-id",
        group,
        "--kafka-partitions",
        "4",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--points", type=int, default=3_000_000)
    parser.add_argument("--backlog-points", type=int, default=10_000_000)
    parser.add_argument("--catch-up-only", action="store_true", help="only the backlog catch-up")
    args = parser.parse_args()
    started = provenance()
    results: dict[str, Any] = {"args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="trackhouse-bench-kafka-") as tmp_name:
        tmp = Path(tmp_name)
        broker = KafkaBroker(tmp / "tansu.log")
        broker.start()
        try:
            if args.catch_up_only:
                results["catch_up"] = catch_up(tmp, broker, args.backlog_points)
                save_results("kafka", results, started)
                print(json.dumps(results["catch_up"], indent=1))
                return
            kafka_args = _kafka_args(broker, "bench.writes", "bench-workers")
            worker = ServerUnderTest(tmp / "worker", "--role", "worker", *kafka_args)
            gateway = ServerUnderTest(tmp / "gateway", "--role", "gateway", *kafka_args)
            plain = ServerUnderTest(tmp / "direct")
            try:
                ratios, kafka_rates, direct_rates = [], [], []
                for i in range(args.repeats):
                    direct_rates.append(direct(plain, args.points))
                    kafka_rates.append(through_kafka(gateway, worker, args.points))
                    ratios.append(kafka_rates[-1] / direct_rates[-1])
                    print(
                        f"repeat {i + 1}/{args.repeats}: direct {direct_rates[-1]:,.0f} pts/s,"
                        f" kafka {kafka_rates[-1]:,.0f} pts/s, ratio {ratios[-1]:.2f}",
                        flush=True,
                    )
            finally:
                for server in (gateway, worker, plain):
                    server.stop()
            results["direct_points_per_s"] = direct_rates
            results["kafka_points_per_s"] = kafka_rates
            results["kafka_over_direct"] = ratios
            results["catch_up"] = catch_up(tmp, broker, args.backlog_points)
        finally:
            broker.stop()

    out = save_results("kafka", results, started)
    print()
    print("| path | points/s, median (min-max) |")
    print("|---|---|")
    print(f"| direct gRPC | {spread_of(results['direct_points_per_s'])} |")
    print(f"| gateway -> Kafka -> worker | {spread_of(results['kafka_points_per_s'])} |")
    ratios = results["kafka_over_direct"]
    low, mid, high = min(ratios), statistics.median(ratios), max(ratios)
    print(f"\nKafka / direct, same repeat: median {mid:.2f} (min {low:.2f}, max {high:.2f})")
    c = results["catch_up"]
    print(
        f"catch-up on a {c['points']:,}-point backlog: {c['catch_up_points_per_s']:,.0f} pts/s"
        f" (backlog produced at {c['produce_points_per_s']:,.0f} pts/s); results in {out.relative_to(ROOT)}"
    )


if __name__ == "__main__":
    main()
