"""What resume and fork cost reads: a plain run beside a resumed one and a fork, in query/ (no HTTP).

    python -m benchmarks.attempts [--points 1000000] [--overlap 0.01] [--repeats 7]

Loads through the real sink into a fresh embedded store:
- `plain`: --points steps of one key, attempt 0;
- `resumed`: the same, then attempt 1 restarting --overlap (a fraction of the steps) before the end, and logging
  to the end again: its overlap with attempt 0 is what a restart from the last checkpoint re-logs;
- `fork`: a fork of `plain` at half its steps, with 10% of --points of its own after the fork step.
Then times (median of --repeats, in ms): the lineage lookup a read of a plain run pays (uncached: the first read
of a run in a second; cached: the others); a 25,000-point
history page (first, and at 95% of the steps); the UI's chart (320 points); the latest values. Each answer is
checked against the curve the reads must show.
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.ingest import save_results
from benchmarks.reads import timed
from trackhouse.ingest.batch import Batch, ExperimentRow, Metrics, RunRow
from trackhouse.ingest.sink import ClickHouseSink
from trackhouse.query import attempts, metrics, schema
from trackhouse.query.connection import Client, StoreConfig, connect

DB = "trackhouse"
CHUNK = 250_000
PAGE = 25_000


def write(sink: ClickHouseSink, run_id: str, steps: np.ndarray, value: np.ndarray, attempt: int) -> None:
    for start in range(0, len(steps), CHUNK):
        part = steps[start : start + CHUNK]
        n = len(part)
        sources = ((0, "", attempt),) if attempt else ()
        sink.write(
            Batch(
                metrics=Metrics(
                    run_ids=(run_id,),
                    keys=("loss",),
                    run_index=np.zeros(n, np.int32),
                    key_index=np.zeros(n, np.int32),
                    step=part,
                    timestamp=1_700_000_000_000 + part * 10 + attempt * 10**9,
                    value=value[start : start + CHUNK],
                    sources=sources,
                    source_index=np.zeros(n, np.int32) if attempt else np.empty(0, np.int32),
                )
            )
        )


def load(client: Client, points: int, overlap: float) -> dict[str, dict[int, float]]:
    """The three runs, and the curve each must show (step -> value)."""
    sink = ClickHouseSink(client, DB)
    sink.write(Batch(experiments=(ExperimentRow("400", "attempts", 1_700_000_000_000),)))
    names = ("plain", "resumed", "fork")
    sink.write(Batch(runs=tuple(RunRow(r, "400", r, "FINISHED", 1_700_000_000_000, 0, "b", 1) for r in names)))
    steps = np.arange(points, dtype=np.int64)
    first = np.sin(steps / 1000.0)
    write(sink, "plain", steps, first, 0)
    write(sink, "resumed", steps, first, 0)
    restart = points - int(points * overlap)
    attempts.start_attempt(client, DB, "resumed", 1_700_000_000_000)
    write(sink, "resumed", steps[restart:], first[restart:] + 10, 1)
    fork_step = points // 2
    attempts.record_fork(client, DB, "fork", "plain", fork_step, 1_700_000_000_000)
    own = np.arange(fork_step + 1, fork_step + 1 + points // 10, dtype=np.int64)
    write(sink, "fork", own, -np.ones(len(own)), 0)
    client.command(f"OPTIMIZE TABLE {DB}.{schema.METRICS} FINAL")
    base = dict(zip(steps.tolist(), first.tolist(), strict=True))
    return {
        "plain": base,
        "resumed": {**base, **dict(zip(steps[restart:].tolist(), (first[restart:] + 10).tolist(), strict=True))},
        "fork": {**{s: v for s, v in base.items() if s <= fork_step}, **dict.fromkeys(own.tolist(), -1.0)},
    }


def check(client: Client, run_id: str, shown: dict[int, float]) -> None:
    chart = metrics.sampled(client, DB, [run_id], "loss", 320)[run_id]
    assert 0 < len(chart) <= 320 and all(shown[s] == v for s, _, v in chart), run_id
    page = metrics.history(client, DB, run_id, "loss", 25_000)
    assert [shown[s] for s in page.step.tolist()] == page.value.tolist(), run_id
    last = max(shown)
    assert metrics.latest(client, DB, [run_id])[run_id]["loss"][::2] == (last, shown[last]), run_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--overlap", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    results: dict[str, Any] = {"points": args.points, "overlap": args.overlap, "repeats": args.repeats, "ms": {}}
    with tempfile.TemporaryDirectory() as tmp:
        client = connect(StoreConfig.for_data_dir(Path(tmp) / "data"))
        schema.migrate(client, DB)
        shown = load(client, args.points, args.overlap)
        for run_id, curve in shown.items():
            check(client, run_id, curve)
            mid = sorted(curve)[len(curve) * 95 // 100]
            superseded = run_id == "resumed" and curve[mid] != shown["plain"].get(mid)
            after = (mid, 1_700_000_000_000 + mid * 10 + (10**9 if superseded else 0), curve[mid])
            results["ms"][run_id] = {
                "history_first_page": timed(args.repeats, partial(metrics.history, client, DB, run_id, "loss", PAGE)),
                "history_page_at_95pct": timed(
                    args.repeats, partial(metrics.history, client, DB, run_id, "loss", PAGE, after)
                ),
                "chart_320": timed(args.repeats, partial(metrics.sampled, client, DB, [run_id], "loss", 320)),
                "latest": timed(args.repeats, partial(metrics.latest, client, DB, [run_id])),
            }
        results["ms"]["lineage_lookup_plain"] = {
            "uncached": timed(args.repeats, partial(attempts._lineages, client, DB, ["plain"])),
            "cached": timed(args.repeats, partial(attempts.lineages, client, DB, ["plain"])),
        }
        client.close()
    for name, rows in results["ms"].items():
        print(name, {k: round(v["median_ms"], 3) for k, v in rows.items()})
    print(save_results("attempts", results))


if __name__ == "__main__":
    main()
