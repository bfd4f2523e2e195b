"""The benchmark harness: realistic workloads against trackhouse and stock MLflow, in one run.

    python -m benchmarks                 # full size (minutes)
    python -m benchmarks --size quick    # the same shape, smaller (make bench QUICK=1)

Each (workload, system) pair is measured on a freshly started system, `--repeats` times,
interleaved so that every ratio compares figures taken side by side. After every write
workload the harness reads back what was stored and checks that every point sent is there
exactly once; a figure on data that was not stored counts for nothing.
Writes results.json, report.md and PNG plots to benchmarks/reports/harness-<UTC time>-<commit>/, with the
commit, date and machine load of the run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import signal
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from benchmarks import report, workloads
from benchmarks.provenance import REPORTS, provenance
from benchmarks.systems import SYSTEMS, System


@dataclass(frozen=True)
class Sizes:
    hpo_processes: int
    hpo_trials: int  # in total, split over the processes
    hpo_keys: int
    hpo_steps: int
    llm_ranks: int
    llm_keys: int
    llm_steps: int


# Stock MLflow manages a few thousand points per second, so it runs the same shapes scaled down:
# a rate measured at a smaller size, said so in the report.
SIZES: dict[str, dict[str, Sizes]] = {
    "full": {
        "trackhouse": Sizes(4, 500, 20, 1_000, 8, 500, 2_000),
        "mlflow": Sizes(2, 10, 20, 20, 8, 500, 3),
    },
    "quick": {
        "trackhouse": Sizes(2, 100, 20, 200, 8, 200, 200),
        "mlflow": Sizes(2, 4, 20, 10, 8, 200, 2),
    },
    "tiny": {
        "trackhouse": Sizes(2, 6, 5, 20, 3, 10, 20),
        "mlflow": Sizes(1, 2, 5, 3, 2, 10, 2),
    },
}
WORKLOADS = ("hpo", "llm")


def measure(system: System, workload: str, sizes: Sizes, workdir: Path) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        system.start(workdir)  # inside try: an interrupt during start-up must still stop what started
        cpu_before = system.server_cpu_seconds()
        experiment = f"bench-{workload}-{uuid.uuid4().hex[:8]}"
        with ProcessPoolExecutor(max_workers=max(sizes.hpo_processes, sizes.llm_ranks), mp_context=_spawn()) as pool:
            if workload == "hpo":
                if system.client_kind == "mlflow":
                    workloads.create_mlflow_experiment(system.endpoint, experiment)
                per_process = _split(sizes.hpo_trials, sizes.hpo_processes)
                args = [
                    (system.client_kind, system.endpoint, experiment, n, sizes.hpo_keys, sizes.hpo_steps)
                    for n in per_process
                ]
                clients = list(pool.map(workloads.hpo_trials, *zip(*args, strict=True)))
            else:
                run_id = workloads.create_llm_run(system.client_kind, system.endpoint, experiment)
                args = [
                    (system.client_kind, system.endpoint, run_id, rank, sizes.llm_keys, sizes.llm_steps)
                    for rank in range(sizes.llm_ranks)
                ]
                clients = list(pool.map(workloads.llm_rank, *zip(*args, strict=True)))
        acknowledged = time.perf_counter()
        sent = sum(c["points"] for c in clients)
        system.wait_stored(sent)
        seconds = max(c["seconds"] for c in clients) + (time.perf_counter() - acknowledged)
        server_cpu = system.server_cpu_seconds() - cpu_before
        rank_api = None
        if workload == "llm" and getattr(system, "rank_api", None):  # after the write figures: not counted there
            rank_api = workloads.rank_api(system.rank_api, clients[0]["run_ids"][0], sizes.llm_ranks)
    finally:
        system.stop()
    run_ids = sorted({r for c in clients for r in c["run_ids"]})
    stored, raw = system.stored_points(run_ids)
    calls = np.concatenate([c["call_seconds"] for c in clients])
    acks = np.concatenate([c["ack_seconds"] for c in clients])
    created = sum(len(c["run_ids"]) for c in clients) if workload == "hpo" else 0
    return {
        "system": system.name,
        "workload": workload,
        "sizes": asdict(sizes),
        "points": sent,
        "stored_distinct": stored,
        "stored_rows": raw,
        # No faults are injected, so no request is resent after it was stored: every row is one point sent.
        "stored_exactly_once": stored == raw == sent,
        "seconds": seconds,
        "points_per_s": sent / seconds,
        "runs_created_per_s": created / max(c["create_seconds"] for c in clients) if created else None,
        "ack_ms": _percentiles(acks * 1000),
        "call_us": _percentiles(calls * 1e6),
        "ack_ms_samples": np.sort(acks * 1000)[:: max(1, len(acks) // 2_000)].tolist(),
        "server_cpu_s": server_cpu,
        "client_cpu_s": sum(c["cpu_seconds"] for c in clients),
        "client_processes": len(clients),
        "rank_api": rank_api,
    }


def _percentiles(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {"p50": float("nan"), "p99": float("nan")}
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class _Interrupt:
    """Ctrl-C or SIGTERM: raise at once, and remember it in case a library swallows the exception."""

    happened = False

    @classmethod
    def install(cls) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, cls._handle)

    @classmethod
    def _handle(cls, signum: int, frame: object) -> None:
        cls.happened = True
        raise KeyboardInterrupt

    @classmethod
    def check(cls) -> None:
        if cls.happened:
            raise KeyboardInterrupt


def _spawn() -> multiprocessing.context.SpawnContext:
    return multiprocessing.get_context("spawn")  # no inherited gRPC or asyncio state


def machine() -> dict[str, Any]:
    packages = ("mlflow", "clickhouse-connect", "chdb", "grpcio", "protobuf", "aiokafka", "numpy", "pyarrow")
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": multiprocessing.cpu_count(),
        "versions": {p: metadata.version(p) for p in packages},
    }


def _run_plan(plan: list[tuple[int, str, str]], size: str, measurements: list[dict[str, Any]]) -> None:
    with tempfile.TemporaryDirectory(prefix="trackhouse-harness-") as tmp, tqdm(plan, unit="measurement") as progress:
        for index, (repeat, workload, name) in enumerate(progress):
            _Interrupt.check()
            progress.set_description(f"{workload} on {name} (repeat {repeat + 1})")
            system: System = SYSTEMS[name]()
            sizes = SIZES[size][system.client_kind]
            result = measure(system, workload, sizes, Path(tmp) / f"{index}-{name}")
            measurements.append({**result, "repeat": repeat})
            progress.write(
                f"{workload:4} {name:17} {result['points_per_s']:>14,.0f} points/s"
                f"  stored exactly once: {'yes' if result['stored_exactly_once'] else 'NO'}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="workload sizes (default full)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per (workload, system); medians are reported")
    parser.add_argument("--systems", default="grpc,kafka,mlflow", help=f"comma-separated, of {', '.join(SYSTEMS)}")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default benchmarks/reports/harness-<time>-<commit>)"
    )
    args = parser.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    chosen = [w for w in args.workloads.split(",") if w]
    unknown = sorted(set(systems) - set(SYSTEMS)) + sorted(set(chosen) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)}")
    started = provenance()
    stamp = started["measured_at"].replace("-", "").replace(":", "").rstrip("Z")
    out = args.out or REPORTS / f"harness-{stamp}-{started['commit'][:9]}"
    out.mkdir(parents=True, exist_ok=True)

    plan = [(r, w, s) for r in range(args.repeats) for w in chosen for s in systems]
    measurements: list[dict[str, Any]] = []
    _Interrupt.install()
    try:
        _run_plan(plan, args.size, measurements)
    except KeyboardInterrupt:
        print("\ninterrupted: every server the harness started has been stopped", file=sys.stderr)
        return 130

    results: dict[str, Any] = {
        "provenance": {"start": started, "end": provenance()},
        "machine": machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "measurements": measurements,
    }
    results["all_stored_exactly_once"] = all(m["stored_exactly_once"] for m in measurements)
    checked = [m["rank_api"] for m in measurements if m.get("rank_api")]
    results["rank_api_found_faults"] = all(r["found_slow_rank"] and r["found_nan_rank"] for r in checked)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    report.write(results, out)
    print(f"\n{(out / 'report.md').read_text()}\nresults in {out}")
    return 0 if results["all_stored_exactly_once"] and results["rank_api_found_faults"] else 1


if __name__ == "__main__":
    sys.exit(main())
