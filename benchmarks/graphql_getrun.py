"""GraphQL GetRun on one wide run, answered by the fast metric path and by the path before it, side by side.

    python -m benchmarks.graphql_getrun --keys 5000 --repeats 20

One run of --keys metric keys x 3 steps is loaded through the real sink (as benchmarks.uimix's wide experiment);
one in-process server answers the UI's GetRun query alternately with compat.graphql's fast path and with
graphql-core's item-by-item completion plus json_format's parse_dict (what it ran before), so both see the same
machine load. Prints the p50/p95 of each in milliseconds and of `runs/get`, and checks the answers are identical.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests
from graphql import ExecutionContext
from mlflow.utils.proto_json_utils import parse_dict

from benchmarks.uimix import RUN_QUERY, UI, _run_ids, load_trackhouse
from trackhouse.compat import graphql
from trackhouse.ingest.config import BatcherConfig
from trackhouse.ingest.receiver_grpc import GrpcConfig
from trackhouse.query.connection import StoreConfig
from trackhouse.server import Server, ServerConfig

FAST = (graphql._MetricListsContext, graphql._parse_answer)
BEFORE = (ExecutionContext, parse_dict)


def _use(path: tuple[Any, Any]) -> None:
    graphql._MetricListsContext, graphql._parse_answer = path  # type: ignore[misc]


def _timed(session: requests.Session, method: str, url: str, **kwargs: Any) -> tuple[float, bytes]:
    started = time.perf_counter()
    response = session.request(method, url, timeout=120, **kwargs)
    response.raise_for_status()
    return (time.perf_counter() - started) * 1000, response.content


def _summary(times: list[float]) -> str:
    return f"p50 {statistics.median(times):7.1f}  p95 {statistics.quantiles(times, n=20)[-1]:7.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=5_000, help="metric keys of the run")
    parser.add_argument("--repeats", type=int, default=20, help="calls of each path after one warm-up call")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        load_trackhouse(data_dir, argparse.Namespace(runs=1, steps=2, wide_runs=1, wide_keys=args.keys, wide_steps=3))
        config = ServerConfig(
            store=StoreConfig.for_data_dir(data_dir),
            grpc=GrpcConfig(port=0),
            http_port=0,
            artifacts_destination=str(data_dir / "artifacts"),
            batcher=BatcherConfig(),
        )
        server = Server(config)
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(120)
        try:
            base = f"http://127.0.0.1:{server.http_port}"
            run = _run_ids("b", 1)[0]
            body = {"operationName": "GetRun", "query": RUN_QUERY, "variables": {"data": {"runId": run}}}
            times: dict[str, list[float]] = {"fast": [], "before": [], "runs/get": []}
            answers: dict[str, bytes] = {}
            with requests.Session() as session:
                for i in range(args.repeats + 1):
                    for name, path in (("fast", FAST), ("before", BEFORE)):
                        _use(path)
                        took, answers[name] = _timed(session, "POST", f"{base}/graphql", json=body)
                        times[name] += [took] if i else []
                    took, _ = _timed(session, "GET", f"{base}{UI}/runs/get", params={"run_id": run})
                    times["runs/get"] += [took] if i else []
            _use(FAST)
            assert answers["fast"] == answers["before"], "the two paths answered differently"
            print(f"GraphQL GetRun, one run of {args.keys:,} keys, {args.repeats} calls each (ms):")
            for name, measured in times.items():
                print(f"  {name:9} {_summary(measured)}")
        finally:
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(60)


if __name__ == "__main__":
    main()
