"""Start-up to "ready", and the UI's first calls right after it, side by side for two source trees.

    git archive <old-commit> | tar -x -C /tmp/old
    python -m benchmarks.first_call --data-dir DIR --trees /tmp/old . [--rounds 5]

DIR is a store benchmarks.uimix loaded (`--full` for 10^5 runs; pass its sizes here when they differ). Each round
starts `trackhouse serve` from each tree in turn on DIR, takes the seconds from launch to the ready line, and then
sends the sweep scenario's calls once each, in the order a browser opening the UI sends them: what a user who
opens the UI just after a start waits. Results go to benchmarks/reports/first-call-<time>-<commit>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any

import requests

from benchmarks.history_ab import Started, alternate
from benchmarks.ingest import save_results
from benchmarks.uimix import add_full_store_arguments, calls, check, send, trackhouse_scenarios


def measure(started: Started, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"ready_s": started.ready_s, "load_average": os.getloadavg()}
    session = requests.Session()
    scenario = trackhouse_scenarios(args)["sweep"]
    for call in calls(scenario):
        elapsed, body = send(session, started.http, call)
        check(call, scenario, body)
        results[call.name] = elapsed * 1000
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_full_store_arguments(parser)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rounds = alternate(args, lambda started: measure(started, args))
    medians = {
        str(tree): {
            name: statistics.median(r[str(tree)][name] for r in rounds)
            for name in rounds[0][str(tree)]
            if name != "load_average"
        }
        for tree in args.trees
    }
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds, "medians": medians}
    print(f"results in {save_results('first-call', results)}")


if __name__ == "__main__":
    main()
