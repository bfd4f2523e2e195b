"""The UI's chart calls (`get-history-bulk-interval`) from benchmarks.uimix, side by side for two source trees.

    git archive <old-commit> | tar -x -C /tmp/old
    python -m benchmarks.chart_ab --data-dir DIR --trees /tmp/old . [--repeats 30] [--rounds 2]

DIR is a store benchmarks.uimix loaded (`--full` for 10^5 runs; pass its sizes here when they differ). Each
round starts `trackhouse serve` from each tree in turn on DIR and sends each chart call of both scenarios once
(first call), then --repeats times: p50 and p95 of those. Results go to
benchmarks/reports/chart-ab-<time>-<commit>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any

import numpy as np
import requests

from benchmarks.history_ab import alternate
from benchmarks.ingest import save_results
from benchmarks.uimix import add_full_store_arguments, calls, check, send, trackhouse_scenarios


def measure(http: str, args: argparse.Namespace) -> dict[str, Any]:
    session = requests.Session()
    results: dict[str, Any] = {"load_average": os.getloadavg()}
    for scenario in trackhouse_scenarios(args).values():
        for call in calls(scenario):
            if not call.name.startswith("get-history-bulk-interval"):
                continue
            first, body = send(session, http, call)
            check(call, scenario, body)
            samples = [send(session, http, call)[0] for _ in range(args.repeats)]
            results[f"{scenario.name} {call.name}"] = {
                "first_ms": first * 1000,
                "p50_ms": statistics.median(samples) * 1000,
                "p95_ms": float(np.percentile(samples, 95)) * 1000,
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_full_store_arguments(parser)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rounds = alternate(args, lambda started: measure(started.http, args))
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds}
    print(f"results in {save_results('chart-ab', results)}")


if __name__ == "__main__":
    main()
