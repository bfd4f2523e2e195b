"""benchmarks.history's trackhouse measurements, side by side for two source trees on one data directory.

    git archive <old-commit> | tar -x -C /tmp/old
    python -m benchmarks.history_ab --data-dir DIR --trees /tmp/old . [--rss-points 0] [--repeats 3] [--rounds 1]

DIR holds series `long` (--points) and `huge` (--rss-points) as benchmarks.history loads them
(`load_all`); it is loaded here when empty. Each round starts `trackhouse serve` from each tree in turn on DIR
and measures it, so the trees see the same data and nearly the same machine state. Results go to
benchmarks/reports/history-ab-<time>-<commit>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.history import load_all, measure_trackhouse
from benchmarks.ingest import save_results
from tests.serving import wait_until_ready


def serve(tree: Path, data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    log = data_dir.with_name(f"{data_dir.name}-{tree.resolve().name}.log")
    command = [sys.executable, "-m", "trackhouse.cli", "serve", "--data-dir", str(data_dir)]
    with log.open("w") as out:
        process = subprocess.Popen(
            [*command, "--grpc-port", "0", "--http-port", "0"],
            cwd=tree,
            env={**os.environ, "PYTHONPATH": str(tree.resolve())},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return process, str(wait_until_ready(process, log)["http"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--trees", type=Path, nargs="+", required=True)
    parser.add_argument("--points", type=int, default=2_000_000)
    parser.add_argument("--rss-points", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    if not args.data_dir.exists():
        load_all(args.data_dir, {"long": args.points, **({"huge": args.rss_points} if args.rss_points else {})})

    def measure(started: Started) -> dict[str, Any]:
        return {"load_average": os.getloadavg(), **measure_trackhouse(started.http, started.pid, args)}

    results = {"args": {k: str(v) for k, v in vars(args).items()}, "rounds": alternate(args, measure)}
    print(f"results in {save_results('history-ab', results)}")


@dataclass(frozen=True, slots=True)
class Started:
    """A server `alternate` started: its URL, its pid, and the seconds from launch to its ready line."""

    http: str
    pid: int
    ready_s: float


def alternate(args: argparse.Namespace, measure: Callable[[Started], dict[str, Any]]) -> list[dict[str, Any]]:
    """Serve args.data_dir from each of args.trees in turn, args.rounds times, and measure each server: load on a
    shared machine falls on every tree alike. One {tree: measured} per round."""
    rounds = []
    for _ in range(args.rounds):
        measured = {}
        for tree in args.trees:
            launched = time.perf_counter()
            process, http = serve(tree, args.data_dir)
            try:
                measured[str(tree)] = measure(Started(http, process.pid, time.perf_counter() - launched))
            finally:
                process.terminate()
                process.wait(60)
            print(str(tree), json.dumps(measured[str(tree)]), flush=True)
        rounds.append(measured)
    return rounds


if __name__ == "__main__":
    main()
