"""The two GraphQL operations the MLflow UI sends (POST /graphql): MlflowGetExperimentQuery and GetRun.

MLflow answers them from the same store as REST, in GraphQL's camelCase with
`__typename` on every object and int64 values as strings. The UI's queries are
fixed strings in its build, so they are answered by operation, not by a general
GraphQL engine. An unknown run or experiment is `null` data plus an error
message, as on a stock server.
"""

from __future__ import annotations

from typing import Any

from mlflow.exceptions import MlflowException
from starlette.requests import Request
from starlette.responses import Response

from trackhouse.compat import wire
from trackhouse.compat.backend import Backend
from trackhouse.compat.experiments import ExperimentsApi
from trackhouse.compat.runs import RunsApi
from trackhouse.query import experiments, logged_models, runs
from trackhouse.query.experiments import Experiment
from trackhouse.query.metrics import Point


class GraphQlApi:
    def __init__(self, backend: Backend, experiments_api: ExperimentsApi, runs_api: RunsApi) -> None:
        self._backend = backend
        self._experiments = experiments_api
        self._runs = runs_api

    async def handle(self, request: Request) -> Response:
        body = await wire.body(request)
        operation = body.get("operationName") or _operation_in(str(body.get("query", "")))
        variables = body.get("variables") or {}
        if operation == "MlflowGetExperimentQuery":
            field, answer = "mlflowGetExperiment", self._experiment(_input(variables, "input"))
        elif operation == "GetRun":
            field, answer = "mlflowGetRun", self._run(_input(variables, "data"))
        else:
            return wire.ok({"data": None, "errors": [f"operation {operation!r} is not supported by trackhouse"]})
        try:
            return wire.ok({"data": {field: await answer}, "errors": None})
        except MlflowException as exc:
            return wire.ok({"data": {field: None}, "errors": [exc.message]})

    async def _experiment(self, arguments: dict[str, Any]) -> dict[str, Any]:
        found = await self._experiments.experiment(str(arguments.get("experimentId", "")))
        return {
            "__typename": "MlflowGetExperimentResponse",
            "apiError": None,
            "experiment": {**_experiment(found), "creationTime": str(found.creation_time)},
        }

    async def _run(self, arguments: dict[str, Any]) -> dict[str, Any]:
        run_id = str(arguments.get("runId", ""))
        found = await self._backend.read(runs.runs, [run_id])
        if not found:
            raise MlflowException(f"Run with id={run_id} not found")
        run = found[0]
        experiment = (await self._backend.read(experiments.by_ids, [run.info.experiment_id])).get(
            run.info.experiment_id
        )
        info = run.info
        linked = (await self._backend.read(logged_models.run_models, [run_id]))[run_id]
        model_inputs = [{"__typename": "MlflowModelInput", "modelId": m} for m in linked.inputs]
        model_outputs = [
            {"__typename": "MlflowModelOutput", "modelId": m, "step": str(step)} for m, step in linked.outputs
        ]
        return {
            "__typename": "MlflowGetRunResponse",
            "apiError": None,
            "run": {
                "__typename": "MlflowRunExtension",
                "info": {
                    "__typename": "MlflowRunInfo",
                    "runName": info.name,
                    "status": info.status,
                    "runUuid": info.run_id,
                    "experimentId": info.experiment_id,
                    "artifactUri": info.artifact_uri,
                    "endTime": str(info.end_time or 0),  # MLflow's GraphQL says "0" while a run is running
                    "lifecycleStage": info.lifecycle_stage,
                    "startTime": str(info.start_time),
                    "userId": info.user,
                },
                "experiment": _experiment(experiment) if experiment else None,
                "modelVersions": [],
                "data": {
                    "__typename": "MlflowRunData",
                    "metrics": [_metric(key, point) for key, point in run.metrics.items()],
                    "params": [{"__typename": "MlflowParam", "key": k, "value": v} for k, v in run.params.items()],
                    "tags": [{"__typename": "MlflowRunTag", "key": k, "value": v} for k, v in run.tags.items()],
                },
                "inputs": {"__typename": "MlflowRunInputs", "datasetInputs": [], "modelInputs": model_inputs},
                "outputs": {"__typename": "MlflowRunOutputs", "modelOutputs": model_outputs},
            },
        }


def _experiment(found: Experiment) -> dict[str, Any]:
    return {
        "__typename": "MlflowExperiment",
        "artifactLocation": found.artifact_root,
        "effectiveTraceArchivalRetention": "",
        "experimentId": found.experiment_id,
        "lastUpdateTime": str(found.last_update_time),
        "lifecycleStage": found.lifecycle_stage,
        "name": found.name,
        "tags": [{"__typename": "MlflowExperimentTag", "key": k, "value": v} for k, v in found.tags.items()],
    }


def _metric(key: str, point: Point) -> dict[str, Any]:
    step, timestamp, value = point
    # GraphQL floats cannot be NaN or infinite; MLflow's GraphQL layer answers null for them.
    number = wire.number(value)
    return {
        "__typename": "MlflowMetricExtension",
        "key": key,
        "step": str(step),
        "timestamp": str(timestamp),
        "value": number if isinstance(number, float) else None,
    }


def _input(variables: Any, name: str) -> dict[str, Any]:
    value = variables.get(name) if isinstance(variables, dict) else None
    return value if isinstance(value, dict) else {}


def _operation_in(query: str) -> str:
    """The operation name of `query ... Name(` when the client sent no operationName."""
    words = query.replace("(", " ").replace("{", " ").split()
    return words[1] if len(words) > 1 and words[0] == "query" else ""
