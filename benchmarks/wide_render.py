"""Where a page's latest metrics spend their time: query.runs.latest_metrics_json stage by stage, and its two ways.

    python -m benchmarks.uimix --full --data-dir DIR --skip-stock --repeats 1   # loads DIR once
    python -m benchmarks.wide_render --data-dir DIR [--repeats 25]

The UI's runs table over benchmarks.uimix's wide experiment (1,000 runs x 5,000 keys at --full) asks for 50 runs at
a time, and MLflow's wire shape carries every run's latest value of every key: 250,000 metric objects, 22 MB of
JSON. Pages of many keys are rendered by ClickHouse (query.runs.rendered_metrics_sql); here each stage of that
statement is timed on its own: the merged rows, decoded, rendered as JSON objects, grouped into one array per run
(all counted inside ClickHouse), then the arrays carried into Python. Pages of few keys are rendered in Python from
a plain read instead (query.runs.FEW_METRICS_ROWS): the last two rows time latest_metrics_json itself, on a page it
has not read before (a plain read first, which a heavy page overflows) and on one it has (which it then knows).
Four pages: the wide table's and the sweep's metric search (50 runs x 10 keys), and one run of each, as a run's
page reads it. The calls alternate, --repeats times after one warm-up call each, so that load on a shared machine
falls on all alike; medians of wall time are reported.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from mlflow.entities import ViewType

from benchmarks import uimix
from benchmarks.ingest import save_results
from benchmarks.provenance import provenance
from trackhouse.query import runs, search
from trackhouse.query.connection import Client, StoreConfig, connect

#: Each page: its scenario, the benchmarks.uimix call that finds its runs, and how many of them it shows.
PAGES = {
    "wide: table of 50": ("wide", "runs/search (table, 50)", 50),
    "wide: one run": ("wide", "runs/search (table, 50)", 1),
    "sweep: metric search": ("sweep", "runs/search (metric filter, metric sort)", 50),
    "sweep: one run": ("sweep", "runs/search (metric filter, metric sort)", 1),
}


def page_ids(client: Client, scenario: uimix.Scenario, name: str) -> list[str]:
    body = next(call.body for call in uimix.calls(scenario) if call.name == name)
    arguments = (
        body["experiment_ids"],
        body.get("filter", ""),
        ViewType.ACTIVE_ONLY,
        body["max_results"],
        body.get("order_by", []),
    )
    return search.search_runs(client, uimix.DB, *arguments, None).ids


def stages(client: Client, ids: list[str]) -> dict[str, Callable[[], object]]:
    """Each stage as a call; the first four count their rows and bytes inside ClickHouse."""
    sql = runs.rendered_metrics_sql(uimix.DB)
    counted = {
        "merged rows": f"SELECT count() FROM ({sql.stored})",
        "decoded": f"SELECT count(), sum(st), sum(ts), sum(v) FROM ({sql.decoded})",
        "rendered objects": f"SELECT count(), sum(length(m)) FROM ({sql.rendered})",
        "one array per run": f"SELECT count(), sum(length(json)) FROM ({sql.statement})",
    }
    calls: dict[str, Callable[[], object]] = {
        name: partial(client.query, statement, parameters={"runs": ids}) for name, statement in counted.items()
    }

    def rendered_there() -> object:  # rows, not the result: clickhouse-connect decodes strings when they are read
        return client.query(sql.statement, parameters={"runs": ids}).result_rows

    calls["ClickHouse's, into Python"] = rendered_there

    def unseen() -> object:
        runs.forget_keys()
        return runs.latest_metrics_json(client, uimix.DB, ids)

    calls["as read, page unseen"] = unseen
    calls["as read, page seen"] = partial(runs.latest_metrics_json, client, uimix.DB, ids)
    return calls


def timed(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall milliseconds of each call, alternating between them, after one unmeasured call each."""
    for call in calls.values():
        call()
    wall: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            began = time.perf_counter()
            call()
            wall[name].append((time.perf_counter() - began) * 1000)
    return {name: statistics.median(samples) for name, samples in wall.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="a store benchmarks.uimix --full loaded")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    started = provenance()
    sizes = argparse.Namespace(runs=100_000, wide_runs=1_000, wide_keys=5_000)  # uimix --full
    scenarios = uimix.trackhouse_scenarios(sizes)
    client = connect(StoreConfig.for_data_dir(args.data_dir))
    results: dict[str, Any] = {"args": {**vars(args), "data_dir": str(args.data_dir)}, "pages": {}}
    try:
        for page, (scenario, name, shown) in PAGES.items():
            ids = page_ids(client, scenarios[scenario], name)[:shown]
            rendered = runs.latest_metrics_json(client, uimix.DB, ids)
            medians = timed(stages(client, ids), args.repeats)
            size = sum(len(text) for text in rendered.values())
            results["pages"][page] = {"call": name, "runs": len(ids), "json_bytes": size, "median_ms": medians}
            print(f"{page}: {len(ids)} runs of {name}, {size:,} bytes of JSON")
            for stage, ms in medians.items():
                print(f"  {stage:28} {ms:7.1f} ms", flush=True)
    finally:
        client.close()
    print(f"results in {save_results('wide-render', results, started)}")


if __name__ == "__main__":
    main()
