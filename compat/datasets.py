"""MLflow's dataset calls: the dataset part of runs/log-inputs, runs' `inputs`, and experiments/search-datasets.

Requests are checked by MLflow's own validators (mlflow.utils.validation), so
limits and messages are stock's. As in stock's SQL store, a dataset is stored
once per (experiment, name, digest), the first description wins, and a run
keeps one input per dataset: logging it again changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mlflow.entities import DatasetInput as DatasetInputEntity
from mlflow.exceptions import MlflowException
from mlflow.protos import service_pb2 as pb
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.utils.validation import _parse_experiment_ids, _validate_dataset_inputs
from starlette.requests import Request
from starlette.responses import Response

from trackhouse.compat import wire
from trackhouse.compat.backend import Backend, next_version, now_ms
from trackhouse.compat.routing import Endpoint
from trackhouse.ingest.batch import Batch, DatasetInputRow, DatasetRow
from trackhouse.query import datasets
from trackhouse.query.datasets import DatasetSummary
from trackhouse.query.runs import RunInfo

#: Stock's handler (search_datasets_impl) refuses more experiments than this in one request.
MAX_EXPERIMENT_IDS_PER_REQUEST = 20


class DatasetsApi:
    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def endpoints(self) -> list[Endpoint]:
        return [("experiments/search-datasets", "POST", self.search)]

    async def search(self, request: Request) -> Response:
        message = await wire.parse(request, pb.SearchDatasets())
        return wire.ok(await self.search_payload(message))

    async def search_payload(self, message: pb.SearchDatasets) -> dict[str, Any]:
        """The SearchDatasets answer as JSON, for REST and GraphQL alike."""
        experiment_ids = list(message.experiment_ids)
        if not experiment_ids:
            raise MlflowException(
                "SearchDatasets request must specify at least one experiment_id.", INVALID_PARAMETER_VALUE
            )
        if len(experiment_ids) > MAX_EXPERIMENT_IDS_PER_REQUEST:
            raise MlflowException(
                f"SearchDatasets request cannot specify more than {MAX_EXPERIMENT_IDS_PER_REQUEST}"
                f" experiment_ids. Received {len(experiment_ids)} experiment_ids.",
                INVALID_PARAMETER_VALUE,
            )
        ids = [str(i) for i in _parse_experiment_ids(list(experiment_ids))]  # stock's check and message for "abc"
        found = await self._backend.read(datasets.summaries, ids)
        return {"dataset_summaries": [_summary(s) for s in found]} if found else {}

    async def log(self, info: RunInfo, inputs: Sequence[DatasetInputEntity]) -> None:
        """Store `inputs` (already `checked`) as inputs of the run `info`, skipping what is stored."""
        unique: dict[tuple[str, str], DatasetInputEntity] = {}
        for entry in inputs:  # stock keeps the first of a request's repeats
            unique.setdefault((entry.dataset.name, entry.dataset.digest), entry)
        if not unique:
            return
        experiment_id = info.experiment_id
        stored = await self._backend.read(datasets.stored_datasets, experiment_id, list(unique))
        used = await self._backend.read(datasets.stored_inputs, info.run_id)
        version, logged_at = next_version(), now_ms()
        new_datasets = tuple(
            DatasetRow(
                experiment_id,
                d.name,
                d.digest,
                d.source_type,
                d.source,
                d.schema or "",
                d.profile or "",
                version,
            )
            for key, entry in unique.items()
            if key not in stored
            for d in (entry.dataset,)
        )
        # Versions count up within the request, so the run lists its inputs in the order they came.
        new_inputs = tuple(
            DatasetInputRow(
                info.run_id,
                experiment_id,
                name,
                digest,
                tuple((tag.key, tag.value) for tag in entry.tags),
                logged_at,
                version + i,
            )
            for i, ((name, digest), entry) in enumerate(unique.items())
            if (name, digest) not in used
        )
        if new_datasets or new_inputs:
            await self._backend.write(Batch(datasets=new_datasets, dataset_inputs=new_inputs))


def checked(inputs: Sequence[pb.DatasetInput]) -> list[DatasetInputEntity]:
    """The request's dataset inputs as MLflow's entities, checked by MLflow's own validator."""
    entities = [DatasetInputEntity.from_proto(p) for p in inputs]
    _validate_dataset_inputs(entities)
    return entities


def _summary(summary: DatasetSummary) -> dict[str, str]:
    shape = {"experiment_id": summary.experiment_id, "name": summary.name, "digest": summary.digest}
    if summary.context is not None:
        shape["context"] = summary.context
    return shape
