"""Full metric histories over HTTP: trackhouse's streamed `get-history` beside stock MLflow's, in one run.

    python -m benchmarks.history [--points 2000000] [--rss-points 10000000] [--stock-points 20000] [--repeats 5]

Loads through the real sink into a fresh data directory, merges it, starts `trackhouse serve`, and times
(median of --repeats, each until the last byte has arrived):
- one unpaged `get-history` of a --points series (what the MLflow client gets without max_results);
- a 25,000-point page (the MLflow client's page size), first and mid-series, through page tokens;
- one unpaged `get-history` of a --rss-points series, sampling the server's RSS every 20 ms: its growth;
- stock `mlflow server` (SQLite) on a --stock-points series logged through log-batch, unpaged, same run.
Every answer is checked afterwards (point count, first and last step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

from benchmarks.ingest import ServerUnderTest, save_results
from benchmarks.reads import load
from benchmarks.systems import start_stock_mlflow, stop_stock_mlflow
from trackhouse.ingest.batch import Batch, ExperimentRow, RunRow
from trackhouse.ingest.sink import ClickHouseSink
from trackhouse.query import schema
from trackhouse.query.connection import StoreConfig, connect

DB = "trackhouse"
PAGE = 25_000


def load_all(data_dir: Path, series: dict[str, int]) -> float:
    started = time.perf_counter()
    client = connect(StoreConfig.for_data_dir(data_dir))
    schema.migrate(client, DB)
    sink = ClickHouseSink(client, DB)
    sink.write(Batch(experiments=(ExperimentRow("300", "history", 1_700_000_000_000),)))
    sink.write(Batch(runs=tuple(RunRow(r, "300", r, "FINISHED", 1_700_000_000_000, 0, "b", 1) for r in series)))
    for run_id, points in series.items():
        load(sink, run_id, points)
    client.command(f"OPTIMIZE TABLE {DB}.{schema.METRICS} FINAL")
    client.close()
    return time.perf_counter() - started


def fetch(session: requests.Session, url: str, params: dict[str, Any]) -> tuple[float, bytes]:
    """Seconds until the whole answer has arrived, and the answer."""
    started = time.perf_counter()
    with session.get(url, params=params, stream=True) as answer:
        answer.raise_for_status()
        body = b"".join(answer.iter_content(1 << 20))
    return time.perf_counter() - started, body


def check(body: bytes, points: int, first: int = 0) -> dict[str, Any]:
    metrics = json.loads(body).get("metrics", [])
    assert len(metrics) == points, (len(metrics), points)
    assert metrics[0]["step"] == first and metrics[-1]["step"] == first + points - 1
    return {"next_page_token": json.loads(body).get("next_page_token")}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def median_ms(samples: list[float]) -> dict[str, float]:
    return {
        "median_ms": statistics.median(samples) * 1000,
        "min_ms": min(samples) * 1000,
        "max_ms": max(samples) * 1000,
    }


def measure_trackhouse(http: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    session = requests.Session()
    url = f"{http}/api/2.0/mlflow/metrics/get-history"
    whole: list[float] = []
    for _ in range(args.repeats):
        seconds, body = fetch(session, url, {"run_id": "long", "metric_key": "loss"})
        whole.append(seconds)
    check(body, args.points)
    first_page: list[float] = []
    mid_page: list[float] = []
    for _ in range(args.repeats):
        seconds, body = fetch(session, url, {"run_id": "long", "metric_key": "loss", "max_results": PAGE})
        first_page.append(seconds)
        token = check(body, PAGE)["next_page_token"]
        for page in range(1, args.points // PAGE // 2):
            params = {"run_id": "long", "metric_key": "loss", "max_results": PAGE, "page_token": token}
            seconds, body = fetch(session, url, params)
            token = check(body, PAGE, first=page * PAGE)["next_page_token"]
        mid_page.append(seconds)
    results: dict[str, Any] = {
        "unpaged": median_ms(whole),
        "unpaged_points_per_s": args.points / statistics.median(whole),
        "page_first": median_ms(first_page),
        "page_mid": median_ms(mid_page),
    }
    if args.rss_points:
        before, peak, done = rss_mb(pid), [0.0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_mb(pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        seconds, body = fetch(session, url, {"run_id": "huge", "metric_key": "loss"})
        done.set()
        sampler.join()
        check(body, args.rss_points)
        results["huge_unpaged"] = {"seconds": seconds, "points_per_s": args.rss_points / seconds}
        results["huge_rss_growth_mb"] = peak[0] - before
    return results


def measure_stock(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    process, endpoint = start_stock_mlflow(workdir, workers=1, timeout_s=300)
    try:
        session = requests.Session()
        api = f"{endpoint}/api/2.0/mlflow"
        run_id = session.post(f"{api}/runs/create", json={"experiment_id": "0"}).json()["run"]["info"]["run_id"]
        for start in range(0, args.stock_points, 1000):
            batch: list[Any] = [
                {"key": "loss", "value": float(s), "timestamp": 1_700_000_000_000 + s * 10, "step": s}
                for s in range(start, min(start + 1000, args.stock_points))
            ]
            session.post(f"{api}/runs/log-batch", json={"run_id": run_id, "metrics": batch}).raise_for_status()
        samples = []
        for _ in range(args.repeats):
            seconds, body = fetch(session, f"{api}/metrics/get-history", {"run_id": run_id, "metric_key": "loss"})
            samples.append(seconds)
        check(body, args.stock_points)
        return {"unpaged": median_ms(samples), "unpaged_points_per_s": args.stock_points / statistics.median(samples)}
    finally:
        stop_stock_mlflow(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=2_000_000)
    parser.add_argument("--rss-points", type=int, default=10_000_000, help="0 skips the RSS measurement")
    parser.add_argument("--stock-points", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, Any] = {"args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="trackhouse-history-") as tmp:
        data = Path(tmp) / "data"
        series = {"long": args.points, **({"huge": args.rss_points} if args.rss_points else {})}
        results["load_seconds"] = load_all(data, series)
        server = ServerUnderTest(data)
        try:
            results["trackhouse"] = measure_trackhouse(server.http, server.process.pid, args)
            print(json.dumps(results["trackhouse"], indent=1))
        finally:
            server.process.terminate()
            server.process.wait(60)
        results["stock"] = measure_stock(Path(tmp) / "stock", args)
    ratio = results["trackhouse"]["unpaged_points_per_s"] / results["stock"]["unpaged_points_per_s"]
    results["rate_ratio"] = ratio
    out = save_results("history", results)
    t, s = results["trackhouse"], results["stock"]
    print("| read | trackhouse | stock MLflow |")
    print("|---|---|---|")
    print(
        f"| unpaged get-history | {args.points:,} points in {t['unpaged']['median_ms']:.0f} ms"
        f" ({t['unpaged_points_per_s']:,.0f} points/s) | {args.stock_points:,} points in"
        f" {s['unpaged']['median_ms']:.0f} ms ({s['unpaged_points_per_s']:,.0f} points/s) |"
    )
    print(f"| rate ratio, same run | {ratio:.0f}x | 1x |")
    print(f"| 25,000-point page, first | {t['page_first']['median_ms']:.1f} ms | |")
    print(f"| 25,000-point page, mid-series | {t['page_mid']['median_ms']:.1f} ms | |")
    if args.rss_points:
        print(
            f"| unpaged {args.rss_points:,} points | {t['huge_unpaged']['seconds']:.1f} s,"
            f" server RSS growth {t['huge_rss_growth_mb']:.0f} MB | |"
        )
    print(f"results in {out}")


if __name__ == "__main__":
    main()
