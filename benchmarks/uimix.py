"""The MLflow UI's own call mix at scale, on trackhouse and on stock MLflow, side by side in one run.

    python -m benchmarks.uimix                       # small: 2,000 runs; 50 runs x 500 keys (a few minutes)
    python -m benchmarks.uimix --full                # the issue's sizes: 10^5 runs; 1,000 runs x 5,000 keys
    python -m benchmarks.uimix --runs N --wide-runs N --wide-keys N --stock-runs N --stock-wide-runs N

The calls are the ones MLflow 3.18's UI sends, recorded from its pages in Chromium (see CALLS): the home page
and the experiments list, an experiment's runs table (and its chart view), a run's page and its charts, the
single-metric page and the compare page. Each is sent --repeats times; the first call is reported apart from the
p50/p95 of the rest, and every call is timed until its whole answer has arrived. Beside the times, the CPU the
server's processes spent per repeated call (user + system, from /proc): divided by the machine's cores, it is the
least wall time any schedule of that work could take here, so it tells a slow call from a call this machine cannot
make fast.

Two experiments are loaded through the real sink (trackhouse) and through MLflow's own SqlAlchemyStore into the
SQLite file a stock `mlflow server` then serves (stock):
- "sweep": --runs runs, each with 10 metrics of --steps steps, 3 params and the tags MLflow's client sets;
- "wide": --wide-runs runs, each with --wide-keys metric keys of --wide-steps steps (per-layer logging).
Stock gets the same shapes at --stock-runs and --stock-wide-runs runs: it loads at hundreds of rows per second,
so the full sizes would take hours. The report says which sizes each system had.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import requests

from benchmarks.ingest import ServerUnderTest, save_results
from benchmarks.provenance import provenance
from benchmarks.systems import cpu_share, settled, start_stock_mlflow, stop_stock_mlflow, tree_cpu_seconds
from trackhouse.ingest.batch import Batch, ExperimentRow, Metrics, ParamRow, RunRow, TagRow
from trackhouse.ingest.sink import ClickHouseSink
from trackhouse.query import schema
from trackhouse.query.connection import StoreConfig, connect

DB = "trackhouse"
START_MS = 1_700_000_000_000
SWEEP_KEYS = ("loss", "accuracy", *(f"m{i}" for i in range(8)))
#: Other experiments beside the two measured ones, so the experiments list has something to sort.
OTHER_EXPERIMENTS = 200
#: The UI's chart view plots the first runs of the table (10 by default), one call per visible chart.
CHART_RUNS = 10
UI = "/ajax-api/2.0/mlflow"

EXPERIMENT_QUERY = (
    "query MlflowGetExperimentQuery($input: MlflowGetExperimentInput!) {\n mlflowGetExperiment(input: $input) {\n"
    "  apiError { code message __typename }\n  experiment { artifactLocation creationTime experimentId"
    " lastUpdateTime lifecycleStage name tags { key value __typename } __typename }\n  __typename\n }\n}\n"
)
RUN_QUERY = (
    "query GetRun($data: MlflowGetRunInput!) {\n mlflowGetRun(input: $data) {\n"
    "  apiError { helpUrl code message __typename }\n  run {\n"
    "   info { runName status runUuid experimentId artifactUri endTime lifecycleStage startTime userId __typename }\n"
    "   experiment { experimentId name tags { key value __typename } artifactLocation lifecycleStage"
    " lastUpdateTime __typename }\n   modelVersions { status version name source __typename }\n"
    "   data { metrics { key value step timestamp __typename } params { key value __typename }"
    " tags { key value __typename } __typename }\n"
    "   inputs { datasetInputs { dataset { digest name profile schema source sourceType __typename }"
    " tags { key value __typename } __typename } modelInputs { modelId __typename } __typename }\n"
    "   outputs { modelOutputs { modelId step __typename } __typename }\n   __typename\n  }\n  __typename\n }\n}\n"
)


@dataclass(frozen=True)
class Scenario:
    """What the calls need to know about one loaded experiment on one system."""

    name: str
    experiment_id: str
    run_ids: list[str]  # in the UI's default order: newest first
    chart_key: str


@dataclass(frozen=True)
class Call:
    name: str
    page: str
    method: str
    path: str
    params: Any = None
    body: Any = None


def calls(s: Scenario) -> list[Call]:
    """The UI's requests for `s`, as recorded from MLflow 3.18's pages in Chromium (bodies byte-equivalent)."""
    run, shown = s.run_ids[0], s.run_ids[:CHART_RUNS]
    exp = [s.experiment_id]
    chart = {"run_ids": shown, "metric_key": s.chart_key, "max_results": 320}
    return [
        Call("experiments/search (home)", "home", "GET", f"{UI}/experiments/search",
             {"max_results": 5, "order_by": "last_update_time DESC"}),
        Call("experiments/search (list)", "experiments", "GET", f"{UI}/experiments/search",
             {"max_results": 25, "order_by": "last_update_time DESC",
              "filter": "tags.`mlflow.experiment.isGateway` IS NULL"}),
        Call("graphql MlflowGetExperimentQuery", "runs table", "POST", "/graphql",
             body={"operationName": "MlflowGetExperimentQuery", "query": EXPERIMENT_QUERY,
                   "variables": {"input": {"experimentId": s.experiment_id}}}),
        Call("runs/search (table, 50)", "runs table", "POST", f"{UI}/runs/search",
             body={"experiment_ids": exp, "order_by": ["attributes.start_time DESC"],
                   "run_view_type": "ACTIVE_ONLY", "filter": "", "max_results": 50}),
        Call("runs/search (table, 100)", "runs table", "POST", f"{UI}/runs/search",
             body={"experiment_ids": exp, "run_view_type": "ACTIVE_ONLY", "max_results": 100,
                   "order_by": ["attributes.start_time DESC"]}),
        Call("runs/search (metric filter, metric sort)", "runs table", "POST", f"{UI}/runs/search",
             body={"experiment_ids": exp, "order_by": [f"metrics.`{s.chart_key}` DESC"],
                   "run_view_type": "ACTIVE_ONLY", "filter": f"metrics.`{s.chart_key}` > 0.5", "max_results": 50}),
        Call("runs/search (param sort, name filter)", "runs table", "POST", f"{UI}/runs/search",
             body={"experiment_ids": exp, "order_by": ["params.`lr` ASC"], "run_view_type": "ACTIVE_ONLY",
                   "filter": "attributes.run_name LIKE '%1%'", "max_results": 50}),
        Call("experiments/search-datasets", "runs table", "POST", f"{UI}/experiments/search-datasets",
             body={"experiment_ids": exp}),
        Call("logged-models/search", "runs table", "POST", f"{UI}/logged-models/search",
             body={"experiment_ids": exp, "order_by": [{"field_name": "creation_time", "ascending": False}]}),
        Call("get-history-bulk-interval (10 runs)", "chart view", "GET", f"{UI}/metrics/get-history-bulk-interval",
             chart),
        Call("graphql GetRun", "run", "POST", "/graphql",
             body={"operationName": "GetRun", "query": RUN_QUERY, "variables": {"data": {"runId": run}}}),
        Call("runs/search (child runs)", "run", "POST", f"{UI}/runs/search",
             body={"experiment_ids": exp, "filter": f"tags.`mlflow.parentRunId` = '{run}'",
                   "order_by": ["attributes.start_time DESC"], "max_results": 10}),
        Call("get-history-bulk-interval (1 run)", "run charts", "GET", f"{UI}/metrics/get-history-bulk-interval",
             {"run_ids": run, "metric_key": s.chart_key, "max_results": 320}),
        Call("experiments/get", "metric", "GET", f"{UI}/experiments/get", {"experiment_id": s.experiment_id}),
        Call("runs/get", "metric", "GET", f"{UI}/runs/get", {"run_id": run}),
        Call("get-history (25,000 page)", "metric", "GET", f"{UI}/metrics/get-history",
             {"run_uuid": run, "metric_key": s.chart_key, "max_results": 25000}),
        Call("runs/search (compare, 3 runs)", "compare", "POST", f"{UI}/runs/search",
             body={"experiment_ids": exp, "filter": "run_id IN ({})".format(",".join(f"'{r}'" for r in shown[:3])),
                   "run_view_type": "ALL", "max_results": 3}),
    ]  # fmt: skip


def send(session: requests.Session, base: str, call: Call) -> tuple[float, bytes]:
    """Seconds until the whole answer has arrived, and the answer."""
    started = time.perf_counter()
    if call.method == "GET":
        answer = session.get(base + call.path, params=call.params)
    else:
        answer = session.post(base + call.path, json=call.body)
    body = answer.content
    elapsed = time.perf_counter() - started
    if answer.status_code != 200:
        raise RuntimeError(f"{call.name}: {answer.status_code} {body[:300]!r}")
    return elapsed, body


def measure(base: str, server_pid: int, scenario: Scenario, repeats: int) -> dict[str, Any]:
    """Per call: the first call's time, then p50/p95 of `repeats` more, the server's CPU per repeated call (process
    `server_pid` and its children), and the answer's size."""
    session = requests.Session()
    results: dict[str, Any] = {}
    for call in calls(scenario):
        first, body = send(session, base, call)
        check(call, scenario, body)
        cpu_before = tree_cpu_seconds(server_pid)
        samples = [send(session, base, call)[0] for _ in range(repeats)]
        cpu = tree_cpu_seconds(server_pid) - cpu_before
        results[call.name] = {
            "page": call.page,
            "first_ms": first * 1000,
            "p50_ms": statistics.median(samples) * 1000,
            "p95_ms": float(np.percentile(samples, 95)) * 1000,
            "max_ms": max(samples) * 1000,
            "server_cpu_ms": cpu / repeats * 1000,
            "bytes": len(body),
        }
        print(f"  {scenario.name:6} {call.name:42} {_row(results[call.name])}", flush=True)
    return results


def idle_cpu(server_pid: int, seconds: float = 5.0) -> float:
    """Milliseconds of CPU per second that the server's processes spend with no call to answer: the part of the
    per-call CPU figures that is not the calls' own."""
    return cpu_share(server_pid, seconds) * 1000


def check(call: Call, scenario: Scenario, body: bytes) -> None:
    """The answer is the one the page needs: otherwise a fast figure would mean nothing."""
    answer = json.loads(body)
    if call.name.startswith("runs/search (table"):
        runs = answer["runs"]
        assert [r["info"]["run_id"] for r in runs] == scenario.run_ids[: len(runs)], call.name
        assert len(runs) == min(call.body["max_results"], len(scenario.run_ids)), call.name
    elif call.name.startswith("get-history-bulk-interval"):
        run_ids = {m["run_id"] for m in answer["metrics"]}
        expected = call.params["run_ids"]
        assert run_ids == ({expected} if isinstance(expected, str) else set(expected)), call.name
    elif call.name == "graphql GetRun":
        assert answer["data"]["mlflowGetRun"]["run"]["info"]["runUuid"] == scenario.run_ids[0]
    elif call.name == "runs/get":
        assert answer["run"]["info"]["run_id"] == scenario.run_ids[0]
    elif call.name.startswith("runs/search (compare"):
        assert len(answer["runs"]) == 3


def _row(r: dict[str, Any]) -> str:
    return (
        f"first {r['first_ms']:8.1f}  p50 {r['p50_ms']:8.1f}  p95 {r['p95_ms']:8.1f} ms"
        f"  server CPU {r['server_cpu_ms']:7.1f} ms  {r['bytes']:>10,} B"
    )


# Loading. Run i starts at START_MS + i seconds, so the UI's default order (newest first) is known.


def _run_ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:031x}"[-32:] for i in range(n)]


def wide_keys(n: int) -> tuple[str, ...]:
    """Per-layer logging: ten statistics for each of n / 10 layers."""
    kinds = ("grad_norm", "weight_norm", "act_mean", "act_std", "update", "lr", "m", "v", "g2", "clip")
    return tuple(f"layer.{k // 10}.{kinds[k % 10]}" for k in range(n))


def add_full_store_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of a benchmark that serves a store this module loaded, from one or more source trees."""
    parser.add_argument("--data-dir", type=Path, required=True, help="a store benchmarks.uimix loaded")
    parser.add_argument("--trees", type=Path, nargs="+", required=True, help="source trees to serve it from, in turn")
    parser.add_argument("--runs", type=int, default=100_000, help="runs of the store's sweep experiment")
    parser.add_argument("--wide-runs", type=int, default=1_000, help="runs of the store's wide experiment")
    parser.add_argument("--wide-keys", type=int, default=5_000, help="keys per wide run")


def trackhouse_scenarios(args: argparse.Namespace) -> dict[str, Scenario]:
    return {
        "sweep": Scenario("sweep", "1", _run_ids("a", args.runs)[::-1], "loss"),
        "wide": Scenario("wide", "2", _run_ids("b", args.wide_runs)[::-1], wide_keys(args.wide_keys)[0]),
    }


def load_trackhouse(data_dir: Path, args: argparse.Namespace) -> None:
    client = connect(StoreConfig.for_data_dir(data_dir))
    schema.migrate(client, DB)
    sink = ClickHouseSink(client, DB)
    experiments = [ExperimentRow(str(1000 + i), f"other-{i}", START_MS + i) for i in range(OTHER_EXPERIMENTS)]
    experiments += [ExperimentRow("1", "sweep", START_MS), ExperimentRow("2", "wide", START_MS)]
    sink.write(Batch(experiments=tuple(experiments)))
    rng = np.random.default_rng(1)
    sweep = _run_ids("a", args.runs)
    for start in range(0, args.runs, 5_000):
        ids = sweep[start : start + 5_000]
        _write_runs(sink, "1", ids, start, rng)
        _write_points(sink, ids, SWEEP_KEYS, args.steps, rng)
    wide = _run_ids("b", args.wide_runs)
    keys = wide_keys(args.wide_keys)
    per_batch = max(1, 2_000_000 // (args.wide_keys * args.wide_steps))
    for start in range(0, args.wide_runs, per_batch):
        ids = wide[start : start + per_batch]
        _write_runs(sink, "2", ids, start, rng)
        _write_points(sink, ids, keys, args.wide_steps, rng)
    for table in (schema.METRICS, schema.METRIC_BUCKETS, schema.LATEST_METRICS, schema.RUNS, schema.PARAMS,
                  schema.TAGS):  # fmt: skip
        client.command(f"OPTIMIZE TABLE {DB}.{table} FINAL")
    client.close()


def _write_runs(sink: ClickHouseSink, experiment_id: str, ids: list[str], first: int, rng: np.random.Generator) -> None:
    rows = tuple(
        RunRow(r, experiment_id, f"run-{first + i}", "FINISHED", START_MS + (first + i) * 1000, START_MS + 10**7,
               "bench", 1)
        for i, r in enumerate(ids)
    )  # fmt: skip
    tags = tuple(
        TagRow(r, key, value, 1)
        for r in ids
        for key, value in (
            ("mlflow.user", "bench"),
            ("mlflow.source.name", "train.py"),
            ("mlflow.source.type", "LOCAL"),
        )
    )
    params = tuple(
        ParamRow(r, key, value)
        for r in ids
        for key, value in (("lr", f"{rng.random():.6f}"), ("batch_size", "64"), ("optimizer", "adam"))
    )
    sink.write(Batch(runs=rows, tags=tags, params=params))


def _write_points(
    sink: ClickHouseSink, ids: list[str], keys: tuple[str, ...], steps: int, rng: np.random.Generator
) -> None:
    per_run = len(keys) * steps
    n = len(ids) * per_run
    sink.write(
        Batch(
            metrics=Metrics(
                run_ids=tuple(ids),
                keys=keys,
                run_index=np.repeat(np.arange(len(ids), dtype=np.int32), per_run),
                key_index=np.tile(np.repeat(np.arange(len(keys), dtype=np.int32), steps), len(ids)),
                step=np.tile(np.arange(steps, dtype=np.int64), len(ids) * len(keys)),
                timestamp=np.tile(START_MS + np.arange(steps, dtype=np.int64) * 1000, len(ids) * len(keys)),
                value=rng.random(n),
            )
        )
    )


def load_stock(workdir: Path, args: argparse.Namespace, keys: int) -> dict[str, Scenario]:
    """The same shapes through MLflow's own store into the SQLite file the stock server will serve."""
    from mlflow.entities import Metric, Param, RunStatus, RunTag
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    workdir.mkdir(parents=True, exist_ok=True)
    store: Any = cast(Any, SqlAlchemyStore)(f"sqlite:///{workdir / 'mlflow.db'}", str(workdir / "artifacts"))
    rng = np.random.default_rng(1)
    for i in range(OTHER_EXPERIMENTS):
        store.create_experiment(f"other-{i}")
    scenarios = {}
    for name, runs, run_keys, steps in (
        ("sweep", args.stock_runs, list(SWEEP_KEYS), args.steps),
        ("wide", args.stock_wide_runs, list(wide_keys(keys)), args.wide_steps),
    ):
        experiment_id = store.create_experiment(name)
        ids = []
        for i in range(runs):
            tags = [RunTag("mlflow.source.name", "train.py"), RunTag("mlflow.source.type", "LOC")]
            run = store.create_run(experiment_id, "bench", START_MS + i * 1000, tags, f"run-{i}")
            run_id = run.info.run_id
            ids.append(run_id)
            params = [Param("lr", f"{rng.random():.6f}"), Param("batch_size", "64"), Param("optimizer", "adam")]
            points = [Metric(k, float(rng.random()), START_MS + s * 1000, s) for k in run_keys for s in range(steps)]
            for start in range(0, len(points), 997):  # 1,000 entries per call, with the params
                store.log_batch(run_id, points[start : start + 997], params if start == 0 else [], [])
            store.update_run_info(run_id, RunStatus.FINISHED, START_MS + 10**7, None)
        scenarios[name] = Scenario(name, experiment_id, ids[::-1], run_keys[0])
    store.engine.dispose()
    return scenarios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the issue's sizes: 10^5 runs; 1,000 runs x 5,000 keys")
    parser.add_argument("--runs", type=int, default=2_000, help="runs in the sweep experiment")
    parser.add_argument("--steps", type=int, default=20, help="steps per metric in the sweep")
    parser.add_argument("--wide-runs", type=int, default=50, help="runs in the wide experiment")
    parser.add_argument("--wide-keys", type=int, default=500, help="metric keys per wide run")
    parser.add_argument("--wide-steps", type=int, default=3, help="steps per key in the wide runs")
    parser.add_argument("--stock-runs", type=int, default=300, help="runs in stock's sweep")
    parser.add_argument("--stock-wide-runs", type=int, default=5, help="runs in stock's wide experiment")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-stock", action="store_true")
    parser.add_argument("--scenarios", default="sweep,wide", help="which experiments to measure, comma-separated")
    parser.add_argument(
        "--data-dir", type=Path, help="keep trackhouse's data here; reused (not reloaded) when it exists, same sizes"
    )
    args = parser.parse_args()
    if args.full:
        args.runs, args.wide_runs, args.wide_keys = 100_000, 1_000, 5_000
        args.stock_runs, args.stock_wide_runs = 2_000, 10
    started = provenance()
    results: dict[str, Any] = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    results.update(trackhouse={}, stock={})
    with tempfile.TemporaryDirectory(prefix="trackhouse-uimix-") as tmp:
        data = args.data_dir or Path(tmp) / "data"
        scenarios = trackhouse_scenarios(args)
        if not data.exists():
            began = time.perf_counter()
            load_trackhouse(data, args)
            results["trackhouse_load_seconds"] = time.perf_counter() - began
            print(f"trackhouse loaded in {results['trackhouse_load_seconds']:.0f} s", flush=True)
        server = ServerUnderTest(data)
        try:
            # As stock is (start_stock_mlflow): the first calls measure serving, not the end of a start-up.
            if not settled(server.process.pid, 120):
                raise RuntimeError("trackhouse's server did not settle in 120 s")
            results["trackhouse_idle_cpu_ms_per_s"] = idle_cpu(server.process.pid)
            for scenario in scenarios.values():
                if scenario.name in args.scenarios.split(","):
                    found = measure(server.http, server.process.pid, scenario, args.repeats)
                    results["trackhouse"][scenario.name] = found
        finally:
            server.stop()
        if not args.skip_stock:
            began = time.perf_counter()
            stock_scenarios = load_stock(Path(tmp) / "stock", args, args.wide_keys)
            results["stock_load_seconds"] = time.perf_counter() - began
            print(f"stock loaded in {results['stock_load_seconds']:.0f} s", flush=True)
            process, endpoint = start_stock_mlflow(Path(tmp) / "stock", workers=1, timeout_s=600)
            try:
                results["stock_idle_cpu_ms_per_s"] = idle_cpu(process.pid)
                for scenario in stock_scenarios.values():
                    if scenario.name in args.scenarios.split(","):
                        results["stock"][scenario.name] = measure(endpoint, process.pid, scenario, args.repeats)
            finally:
                stop_stock_mlflow(process)
    out = save_results("uimix", results, started)
    print(table(results, args))
    for system in ("trackhouse", "stock"):
        if f"{system}_idle_cpu_ms_per_s" in results:
            print(f"{system}'s server, idle: {results[f'{system}_idle_cpu_ms_per_s']:.1f} ms of CPU per second")
    print(f"results in {out}")


def table(results: dict[str, Any], args: argparse.Namespace) -> str:
    sizes = {
        "sweep": (f"{args.runs:,} runs", f"{args.stock_runs:,} runs"),
        "wide": (f"{args.wide_runs:,} runs x {args.wide_keys:,} keys", f"{args.stock_wide_runs:,} runs"),
    }
    lines = []
    for name, (ours, theirs) in sizes.items():
        if name not in results["trackhouse"]:
            continue
        lines += [
            f"\n{name}: trackhouse {ours}; stock {theirs}",
            "| page | call | trackhouse first | p50 | p95 | CPU | stock first | p50 | p95 | CPU"
            " | KB (trackhouse / stock) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        stock = results["stock"].get(name, {})
        for call, r in results["trackhouse"][name].items():
            s = stock.get(call)
            theirs_cells = (
                f"{s['first_ms']:.0f} | {s['p50_ms']:.0f} | {s['p95_ms']:.0f} | {s['server_cpu_ms']:.0f}"
                if s
                else "- | - | - | -"
            )
            size = f"{r['bytes'] / 1000:,.1f} / {s['bytes'] / 1000:,.1f}" if s else f"{r['bytes'] / 1000:,.1f} / -"
            lines.append(
                f"| {r['page']} | {call} | {r['first_ms']:.0f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f}"
                f" | {r['server_cpu_ms']:.0f} | {theirs_cells} | {size} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
