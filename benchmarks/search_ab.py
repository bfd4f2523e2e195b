"""runs/search's SQL at this commit against another revision's, on one store, interleaved in one run.

    python -m benchmarks.search_ab --data-dir DIR                  # loads uimix's sweep of 10^5 runs into DIR once
    python -m benchmarks.search_ab --data-dir DIR --baseline main  # the revision to compare with (git show)

Times `query.search.search_runs` alone (no HTTP) for the UI's runs-table calls that were slow at 10^5 runs
(benchmarks/uimix.py: a metric filter with a sort by the same metric, a param sort with a name filter), and a
few neighbours (a param sort alone, a tag sort where every run ties, the table's default order). The
baseline is the revision's query/search.py, loaded as a module beside the current one; the two alternate on every
repeat, so load on a shared machine falls on both alike. Both must return the same run ids.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np

from benchmarks import uimix
from trackhouse.query import search
from trackhouse.query.connection import StoreConfig, connect

CASES = {
    "metric filter + metric sort": ("metrics.`loss` > 0.5", ["metrics.`loss` DESC"]),
    "param sort + name filter": ("attributes.run_name LIKE '%1%'", ["params.`lr` ASC"]),
    "param sort": ("", ["params.`lr` DESC"]),
    # Every run has this tag alike: the ties exceed query.search's cap, so the whole sort answers (the worst case).
    "tag sort, all tied": ("", ["tags.`mlflow.source.type` ASC"]),
    "table (start_time)": ("", ["attributes.start_time DESC"]),
}


def baseline_module(revision: str) -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{revision}:query/search.py"], check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_search.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_search", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_search"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="a store; loaded first if it does not exist")
    parser.add_argument("--runs", type=int, default=100_000, help="sweep runs, when loading")
    parser.add_argument("--wide-runs", type=int, default=1_000, help="wide runs, when loading")
    parser.add_argument("--wide-keys", type=int, default=5_000, help="metric keys per wide run, when loading")
    parser.add_argument("--baseline", default="main")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    if not args.data_dir.exists():
        load = argparse.Namespace(
            runs=args.runs, steps=2, wide_runs=args.wide_runs, wide_keys=args.wide_keys, wide_steps=1
        )
        uimix.load_trackhouse(args.data_dir, load)
    client = connect(StoreConfig.for_data_dir(args.data_dir))
    systems: dict[str, ModuleType] = {args.baseline: baseline_module(args.baseline), "this commit": search}
    print(f"median and p95 of {args.repeats} (first call apart), ms; load average {os.getloadavg()}")
    for name, (filter_string, order_by) in CASES.items():
        times: dict[str, list[float]] = {label: [] for label in systems}
        answers: dict[str, list[str]] = {}
        for _ in range(args.repeats + 1):
            for label, module in systems.items():
                start = time.perf_counter()
                page = module.search_runs(client, uimix.DB, ["1"], filter_string, 1, 50, order_by, None)
                times[label].append((time.perf_counter() - start) * 1000)
                answers[label] = page.ids
        assert len({tuple(ids) for ids in answers.values()}) == 1, f"{name}: the answers differ"
        cells = [
            f"{label} {ts[0]:.0f} / {statistics.median(ts[1:]):.0f} / {np.percentile(ts[1:], 95):.0f}"
            for label, ts in times.items()
        ]
        print(f"{name}: " + "; ".join(cells) + " (first / median / p95)")
    client.close()


if __name__ == "__main__":
    main()
