"""Client-side workloads. Each function runs in its own process and returns plain numbers.

- HPO sweep: one process drives many concurrent trials, interleaved step by step as a
  sweep scheduler would, each logging a few params and `keys` metrics per step.
- LLM run: one process is one rank (trackhouse: attach_run with its rank and node); all ranks log `keys`
  metrics per step into one run, one rank three times slower and one whose loss turns to NaN.

trackhouse is driven through ingest.client, stock MLflow through MlflowClient.log_batch
(MLflow's fastest write call), so each system gets its best client.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

TIMESTAMP_MS = 1_700_000_000_000


@dataclass
class ClientResult:
    run_ids: list[str]
    points: int
    seconds: float  # from the first call until every point is acknowledged
    cpu_seconds: float  # this client process's own CPU
    call_seconds: list[float] = field(default_factory=list)  # caller cost of each logging call (sampled)
    ack_seconds: list[float] = field(default_factory=list)  # acknowledgement latency per request
    create_seconds: float = 0.0  # creating this process's runs until they are stored

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def hpo_trials(kind: str, endpoint: str, experiment: str, trials: int, keys: int, steps: int) -> dict[str, Any]:
    cpu0, t0 = time.process_time(), time.perf_counter()
    names = [f"metric_{k}" for k in range(keys)]
    rng = np.random.default_rng(trials * 7 + keys)
    values = rng.random((steps, keys))
    calls: list[float] = []
    if kind == "trackhouse":
        from trackhouse import Client

        with Client(endpoint) as client:
            created = time.perf_counter()
            runs = [
                client.start_run(experiment=experiment, params={"lr": 10 ** -(i % 5), "seed": i}) for i in range(trials)
            ]
            client.flush()
            create_seconds = time.perf_counter() - created
            for step in range(steps):
                row = dict(zip(names, values[step].tolist(), strict=True))
                for run in runs:
                    c0 = time.perf_counter()
                    run.log_metrics(row, step=step, timestamp_ms=TIMESTAMP_MS + step)
                    calls.append(time.perf_counter() - c0)
            for run in runs:
                run.finish()
        ack = client.ack_latencies()
        run_ids = [r.run_id for r in runs]
    else:
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        mlflow_client = MlflowClient(endpoint)
        created = time.perf_counter()
        experiment_id = _mlflow_experiment(mlflow_client, experiment)
        run_ids = []
        for i in range(trials):
            run_id = mlflow_client.create_run(experiment_id).info.run_id
            mlflow_client.log_batch(run_id, params=[Param("lr", str(10 ** -(i % 5))), Param("seed", str(i))])
            run_ids.append(run_id)
        create_seconds = time.perf_counter() - created
        for step in range(steps):
            for run_id in run_ids:
                metrics = [
                    Metric(n, float(v), TIMESTAMP_MS + step, step) for n, v in zip(names, values[step], strict=True)
                ]
                c0 = time.perf_counter()
                mlflow_client.log_batch(run_id, metrics=metrics)
                calls.append(time.perf_counter() - c0)
        for run_id in run_ids:
            mlflow_client.set_terminated(run_id)
        ack = calls  # synchronous: the call returns when the write is committed
    return ClientResult(
        run_ids=run_ids,
        points=trials * keys * steps,
        seconds=time.perf_counter() - t0,
        cpu_seconds=time.process_time() - cpu0,
        call_seconds=calls[:: max(1, len(calls) // 20_000)],
        ack_seconds=ack,
        create_seconds=create_seconds,
    ).to_dict()


#: The LLM workload's injected faults, found afterwards through the rank API (benchmarks.rank_api).
SLOW_RANK = 1
NAN_RANK = 2
#: The slow rank's clock runs this many times slower per step: a third of the others' step rate.
SLOW_FACTOR = 3
#: The NaN rank's loss turns to NaN from this fraction of the steps on.
NAN_FROM = 0.7
LLM_KEY = "loss"


def llm_names(keys: int) -> list[str]:
    """The same keys on every rank: `loss`, then per-layer statistics."""
    stats = ("grad_norm", "weight_norm", "act_mean", "act_std")
    return [LLM_KEY, *(f"layer.{k // 4}.{stats[k % 4]}" for k in range(keys - 1))]


def llm_values(rank: int, keys: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timestamps, values[step, key]) of one rank, faults injected."""
    values = np.random.default_rng(rank).random((steps, keys))
    if rank == NAN_RANK:
        values[int(steps * NAN_FROM) :, 0] = np.nan
    per_step = SLOW_FACTOR if rank == SLOW_RANK else 1
    return TIMESTAMP_MS + np.arange(steps) * per_step, values


def llm_rank(kind: str, endpoint: str, run_id: str, rank: int, keys: int, steps: int) -> dict[str, Any]:
    cpu0, t0 = time.process_time(), time.perf_counter()
    timestamps, values = llm_values(rank, keys, steps)
    calls: list[float] = []
    if kind == "trackhouse":
        from trackhouse import Client

        names = llm_names(keys)
        with Client(endpoint) as client:
            run = client.attach_run(run_id, rank=rank, node=f"node{rank // 4}")  # four ranks per node
            for step in range(steps):
                row = dict(zip(names, values[step].tolist(), strict=True))
                c0 = time.perf_counter()
                run.log_metrics(row, step=step, timestamp_ms=int(timestamps[step]))
                calls.append(time.perf_counter() - c0)
        ack = client.ack_latencies()
    else:
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        # MLflow has no rank: each rank logs its own keys, as users of stock MLflow do.
        names = [f"rank{rank}/{name}" for name in llm_names(keys)]
        mlflow_client = MlflowClient(endpoint)
        for step in range(steps):
            stamp = int(timestamps[step])
            metrics = [Metric(n, float(v), stamp, step) for n, v in zip(names, values[step], strict=True)]
            c0 = time.perf_counter()
            for start in range(0, keys, 1000):  # MLflow's limit per log_batch
                mlflow_client.log_batch(run_id, metrics=metrics[start : start + 1000])
            calls.append(time.perf_counter() - c0)
        ack = calls
    return ClientResult(
        run_ids=[run_id],
        points=keys * steps,
        seconds=time.perf_counter() - t0,
        cpu_seconds=time.process_time() - cpu0,
        call_seconds=calls,
        ack_seconds=ack,
    ).to_dict()


def rank_api(http: str, run_id: str, ranks: int, repeats: int = 10) -> dict[str, Any]:
    """Latency of the rank API's aggregate and straggler queries on the LLM run, and whether they find the
    injected slow rank and NaN rank."""
    import requests

    base = f"{http}/api/2.0/trackhouse/"
    calls = {
        "aggregate": ("metrics/aggregate", {"run_id": run_id, "metric_key": LLM_KEY}),
        "stragglers": ("runs/stragglers", {"run_id": run_id}),
        "ranks": ("runs/ranks", {"run_id": run_id, "metric_key": LLM_KEY}),
    }
    latency_ms, answers = {}, {}
    with requests.Session() as session:
        for name, (path, params) in calls.items():
            session.get(base + path, params=params).raise_for_status()  # warm-up
            seconds = []
            for _ in range(repeats):
                c0 = time.perf_counter()
                answer = session.get(base + path, params=params)
                answer.raise_for_status()
                answers[name] = answer.json()
                seconds.append(time.perf_counter() - c0)
            latency_ms[name] = float(np.median(seconds) * 1000)
    stragglers = [s["rank"] for s in answers["stragglers"]["stragglers"]]
    nan_ranks = [r["rank"] for r in answers["ranks"]["ranks"] if r["nan_count"]]
    return {
        "latency_ms": latency_ms,
        "stragglers": stragglers,
        "nan_ranks": nan_ranks,
        "found_slow_rank": ranks <= SLOW_RANK or stragglers == [SLOW_RANK],
        "found_nan_rank": nan_ranks == ([NAN_RANK] if ranks > NAN_RANK else []),
    }


def create_llm_run(kind: str, endpoint: str, experiment: str) -> str:
    """Rank 0's job: create the run, stored before any rank logs into it."""
    if kind == "trackhouse":
        from trackhouse import Client

        with Client(endpoint) as client:
            run = client.start_run(experiment=experiment, name="llm-pretrain", params={"layers": 48, "ranks": "many"})
        return run.run_id
    from mlflow import MlflowClient

    mlflow_client = MlflowClient(endpoint)
    return str(mlflow_client.create_run(_mlflow_experiment(mlflow_client, experiment)).info.run_id)


def create_mlflow_experiment(endpoint: str, name: str) -> None:
    """Create the experiment up front: MLflow refuses a second concurrent create of one name."""
    from mlflow import MlflowClient

    _mlflow_experiment(MlflowClient(endpoint), name)


def _mlflow_experiment(client: Any, name: str) -> str:
    existing = client.get_experiment_by_name(name)
    return str(existing.experiment_id if existing else client.create_experiment(name))
