"""A sweep search page's reads on two table layouts, side by side in one process: query.layout's fine one against
the previous one (1,024-row granules, ClickHouse's 64 KiB compressed blocks).

    python -m benchmarks.uimix --full --data-dir DIR --skip-stock --repeats 1   # loads DIR once
    python -m benchmarks.page_parts --data-dir DIR [--repeats 30]

`compat.runs.search` answers a page with a search statement and six part reads of the page's 50 runs (infos,
params, tags, rendered latest metrics, dataset inputs, logged models), the parts on two read clients at once. Here
each is called on its own, in this process, for benchmarks.uimix's two sorted sweep searches over 10^5 runs, against
two copies of DIR's run tables (databases beside DIR's own, dropped at the end), one per layout. The calls alternate
between the copies, --repeats times after one warm-up call each, so that load on a shared machine falls on both
alike; each answer must be the same on both. Medians of wall and CPU time are reported: CPU time counts ClickHouse's
own threads, which is what two concurrent part reads share on a small machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from mlflow.entities import ViewType

from benchmarks import uimix, wide_ab
from benchmarks.ingest import save_results
from benchmarks.provenance import provenance
from trackhouse.query import datasets, layout, logged_models, runs, schema, search
from trackhouse.query.connection import Client, StoreConfig, connect

#: benchmarks.uimix's calls measured here: the sweep's two sorted searches, as benchmarks.wide_ab names them.
CALLS = wide_ab.CALLS["sweep"]
PARTS: tuple[Callable[..., Any], ...] = (
    runs.infos,
    runs.params_of,
    runs.tags_of,
    runs.latest_metrics_json,
    datasets.inputs_of,
    logged_models.run_models,
)


#: The layouts compared, each in a database of its own.
LAYOUTS: dict[str, Mapping[str, int]] = {
    "previous": {"index_granularity": 1024, "min_compress_block_size": 0},
    "fine": layout.FINE_SETTINGS,
}
#: Tables neither the searches nor the part reads touch (points, sampled and per-rank series): not copied.
UNREAD = frozenset({schema.METRICS, schema.METRIC_BUCKETS, schema.RANK_SERIES, schema.RANK_BUCKETS, schema.RANK_SPANS})


def copy_store(client: Client, database: str, settings: Mapping[str, int]) -> None:
    """DIR's tables (but UNREAD) into a fresh `database`, then laid out with `settings`."""
    client.command(f"DROP DATABASE IF EXISTS {database} SYNC")
    schema.migrate(client, database)
    tables = client.query(
        "SELECT name FROM system.tables WHERE database = {db:String} AND engine LIKE '%MergeTree'",
        parameters={"db": uimix.DB},
    ).result_rows
    for (table,) in tables:
        # The by-key copies are filled by the views on params and tags as those are copied.
        if table in UNREAD or table in (schema.PARAMS_BY_KEY, schema.TAGS_BY_KEY, schema.MIGRATIONS_TABLE):
            continue
        client.command(f"TRUNCATE TABLE {database}.{table}")
        client.command(
            f"INSERT INTO {database}.{table} SELECT * FROM {uimix.DB}.{table}",
            settings={"insert_deduplicate": 0, "optimize_on_insert": 0},
        )
    layout.rebuild(client, database, settings)
    for table in layout.FINE_TABLES:
        client.command(f"OPTIMIZE TABLE {database}.{table} FINAL")


def timed(calls: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU milliseconds of each call, alternating between them, after one unmeasured call each."""
    answers = {name: call() for name, call in calls.items()}
    first = next(iter(answers.values()))
    assert all(answer == first for answer in answers.values()), "the layouts' answers differ"
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            call()
            wall[name].append((time.perf_counter() - wall_start) * 1000)
            cpu[name].append((time.process_time() - cpu_start) * 1000)
    return {name: {"wall_ms": statistics.median(wall[name]), "cpu_ms": statistics.median(cpu[name])} for name in calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="a store benchmarks.uimix loaded")
    parser.add_argument("--runs", type=int, default=100_000, help="runs of the store's sweep experiment")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    started = provenance()
    sweep = uimix.trackhouse_scenarios(argparse.Namespace(runs=args.runs, wide_runs=0, wide_keys=1))["sweep"]
    client = connect(StoreConfig.for_data_dir(args.data_dir))
    databases = {name: f"page_parts_{name}" for name in LAYOUTS}
    results: dict[str, Any] = {
        "args": {**vars(args), "data_dir": str(args.data_dir)},
        "layouts": {n: dict(s) for n, s in LAYOUTS.items()},
    }
    results["calls"] = {}
    try:
        for name, settings in LAYOUTS.items():
            copy_store(client, databases[name], settings)
        print(f"{'':22} {'previous wall / CPU':>20} {'fine wall / CPU':>20}  ms")
        for call in uimix.calls(sweep):
            if call.name not in CALLS:
                continue
            body = call.body
            arguments = (body["experiment_ids"], body["filter"], ViewType.ACTIVE_ONLY, body["max_results"])

            def page(database: str) -> list[str]:
                return search.search_runs(client, database, *arguments, body["order_by"], None).ids  # noqa: B023

            ids = page(uimix.DB)
            row: dict[str, dict[str, Any]] = {
                "search": timed({n: partial(page, db) for n, db in databases.items()}, args.repeats)
            }
            for part in PARTS:
                reads = {n: partial(part, client, db, ids) for n, db in databases.items()}
                row[part.__name__] = timed(reads, args.repeats)
            row["six_parts_cpu_ms"] = {n: sum(row[p.__name__][n]["cpu_ms"] for p in PARTS) for n in LAYOUTS}
            results["calls"][call.name] = row
            print(call.name)
            for part_name, figures in row.items():
                cells = [
                    f"{f['wall_ms']:8.1f} {f['cpu_ms']:8.1f}" if isinstance(f, dict) else f"{'':8} {f:8.1f}"
                    for f in figures.values()
                ]
                print(f"  {part_name:20} {cells[0]:>20} {cells[1]:>20}", flush=True)
    finally:
        for database in databases.values():
            client.command(f"DROP DATABASE IF EXISTS {database} SYNC")
        client.close()
    out = save_results("page-parts", results, started)
    print(f"results in {out}")


if __name__ == "__main__":
    main()
