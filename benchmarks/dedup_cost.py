"""What insert deduplication (tokens + non_replicated_deduplication_window, migration 12) costs a flush, on chDB.

Two databases in one embedded store: one as migrated, one with the window set back to 0 (tokens are then ignored).
Flushes of the same shape alternate between them; medians of sink.write wall time (points and their summaries).

    PYTHONPATH=. python -m benchmarks.dedup_cost [--points 100000] [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from trackhouse.ingest.batch import Batch, Metrics
from trackhouse.ingest.sink import ClickHouseSink
from trackhouse.query import schema
from trackhouse.query.connection import StoreConfig, connect


def flush(points: int, round_: int, origins: tuple[str, ...]) -> Batch:
    keys = 50
    rng = np.random.default_rng(round_)
    return Batch(
        metrics=Metrics(
            run_ids=(f"run{round_}",),
            keys=tuple(f"layer{k}/grad_norm" for k in range(keys)),
            run_index=np.zeros(points, np.int32),
            key_index=(np.arange(points) % keys).astype(np.int32),
            step=(np.arange(points) // keys).astype(np.int64),
            timestamp=1_700_000_000_000 + (np.arange(points) // keys).astype(np.int64),
            value=rng.random(points),
        ),
        origins=origins,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        client = connect(StoreConfig.for_data_dir(Path(directory) / "data"))
        for database in ("plain", "dedup"):
            schema.migrate(client, database)
        for table in schema.DEDUPLICATED_TABLES:
            client.command(f"ALTER TABLE plain.{table} MODIFY SETTING non_replicated_deduplication_window = 0")
        sinks = {"plain": ClickHouseSink(client, "plain"), "dedup": ClickHouseSink(client, "dedup")}
        times: dict[str, list[float]] = {"plain": [], "dedup": []}
        for round_ in range(args.rounds + 2):
            for name, sink in sinks.items():
                batch = flush(args.points, round_, (f"grpc:w:{round_}",) if name == "dedup" else ())
                started = time.perf_counter()
                sink.write(batch)
                if round_ >= 2:  # warm-up rounds are not counted
                    times[name].append(time.perf_counter() - started)
        client.close()
    plain, dedup = (statistics.median(times[n]) * 1000 for n in ("plain", "dedup"))
    print(f"{args.points} points per flush, {args.rounds} rounds, medians (shared machine):")
    print(f"  no window, no token     {plain:8.1f} ms")
    print(f"  window 1000 + tokens    {dedup:8.1f} ms   ratio {dedup / plain:.2f}")


if __name__ == "__main__":
    main()
