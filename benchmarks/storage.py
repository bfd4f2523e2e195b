"""Bytes per stored point: what rank, node and attempt (migration 9) cost on disk.

    python -m benchmarks.storage [--ranks 8] [--keys 10] [--steps 100000]

Loads the same distributed-training series (every rank logs every key at every step: a slowly falling loss with
noise, timestamps about 250 ms apart with jitter) through the real sink into three fresh embedded stores, merges each
(OPTIMIZE FINAL, the state background merges reach), and reads the compressed size of the `metrics` table and of
every table from system.columns:

- `before_migration_9`: the schema as it was before the rank, node and attempt columns existed (points unlabelled);
- `unlabelled`: today's schema, points logged without a rank (a single process: the common case);
- `ranked`: today's schema, each rank's points labelled with its rank and its node (ranks // 8 per node).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.provenance import provenance, save_report
from trackhouse.ingest.batch import Batch, ExperimentRow, Metrics, RunRow
from trackhouse.ingest.sink import ClickHouseSink
from trackhouse.query import schema
from trackhouse.query.connection import StoreConfig, connect

DB = "trackhouse"
RUN = "5" * 32
T0 = 1_700_000_000_000
STEPS_PER_BATCH = 2_000


def series_batches(ranks: int, keys: int, steps: int, labelled: bool) -> list[Metrics]:
    """The workload, a flush's worth of steps at a time, as the sink receives it."""
    rng = np.random.default_rng(0)
    names = tuple(f"train/metric_{k}" for k in range(keys))
    sources = tuple((r, f"node-{r // 8}", 0) for r in range(ranks))
    out = []
    for start in range(0, steps, STEPS_PER_BATCH):
        step = np.arange(start, min(start + STEPS_PER_BATCH, steps), dtype=np.int64)
        n = len(step) * keys * ranks
        # Point order: rank, key, step, as one flush of every rank's stream.
        rank_of = np.repeat(np.arange(ranks, dtype=np.int32), len(step) * keys)
        key_of = np.tile(np.repeat(np.arange(keys, dtype=np.int32), len(step)), ranks)
        steps_all = np.tile(step, ranks * keys)
        value = 2.0 * np.exp(-steps_all / max(steps, 1)) + 0.05 * rng.standard_normal(n)
        timestamp = T0 + steps_all * 250 + rng.integers(0, 40, n)
        m = Metrics(
            run_ids=(RUN,),
            keys=names,
            run_index=np.zeros(n, np.int32),
            key_index=key_of,
            step=steps_all,
            timestamp=timestamp,
            value=value,
        )
        if labelled:
            m = Metrics(**{**_fields(m), "sources": sources, "source_index": rank_of})
        out.append(m)
    return out


def _fields(m: Metrics) -> dict[str, Any]:
    return {name: getattr(m, name) for name in Metrics.__slots__}


def measure(data_dir: Path, batches: list[Metrics], migrations: int | None) -> dict[str, Any]:
    client = connect(StoreConfig.for_data_dir(data_dir))
    original = schema.MIGRATIONS
    if migrations is not None:
        schema.MIGRATIONS = tuple(m for m in original if m[0] <= migrations)
    try:
        schema.migrate(client, DB)
    finally:
        schema.MIGRATIONS = original
    sink = ClickHouseSink(client, DB)
    if migrations is not None and migrations < 10:  # a sink of that time wrote no rank summaries (migration 10)
        sink._write_rank_summaries = lambda *_: None  # type: ignore[method-assign]
    sink.write(Batch(experiments=(ExperimentRow("7", "storage", T0),)))
    sink.write(Batch(runs=(RunRow(RUN, "7", "llm", "RUNNING", T0, 0, "bench", 1),)))
    started = time.perf_counter()
    for m in batches:
        sink.write(Batch(metrics=m))
    load_s = time.perf_counter() - started
    for table in client.query(f"SELECT name FROM system.tables WHERE database = '{DB}'").result_columns[0]:
        client.command(f"OPTIMIZE TABLE {DB}.{table} FINAL")
    points = sum(len(m) for m in batches)
    per_column = dict(
        client.query(
            f"SELECT name, data_compressed_bytes FROM system.columns WHERE database = '{DB}' AND table = 'metrics'"
        ).result_rows
    )
    # system.parts, not system.columns: the latter leaves out tables whose columns' sizes are not loaded.
    (total,) = client.query(
        f"SELECT sum(data_compressed_bytes) FROM system.parts WHERE database = '{DB}' AND active"
    ).result_rows[0]
    client.close()
    return {
        "points": points,
        "load_seconds": round(load_s, 2),
        "metrics_bytes_per_point": round(sum(per_column.values()) / points, 3),
        "all_tables_bytes_per_point": round(int(total) / points, 3),
        "metrics_column_bytes_per_point": {k: round(v / points, 3) for k, v in per_column.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--steps", type=int, default=100_000)
    args = parser.parse_args()
    started = provenance()
    results: dict[str, Any] = {"workload": vars(args)}
    with tempfile.TemporaryDirectory(prefix="trackhouse-storage-") as tmp:
        plain = series_batches(args.ranks, args.keys, args.steps, labelled=False)
        results["before_migration_9"] = measure(Path(tmp) / "before", plain, migrations=8)
        results["unlabelled"] = measure(Path(tmp) / "unlabelled", plain, migrations=None)
        del plain
        ranked = series_batches(args.ranks, args.keys, args.steps, labelled=True)
        results["ranked"] = measure(Path(tmp) / "ranked", ranked, migrations=None)
    for name in ("before_migration_9", "unlabelled", "ranked"):
        r = results[name]
        print(
            f"{name:>20}: {r['metrics_bytes_per_point']:.3f} B/point in metrics, "
            f"{r['all_tables_bytes_per_point']:.3f} B/point in all tables ({r['points']:,} points)"
        )
    print(f"report: {save_report('storage', results, started)}")
    print(json.dumps({k: results[k]["metrics_column_bytes_per_point"] for k in ("unlabelled", "ranked")}))


if __name__ == "__main__":
    main()
