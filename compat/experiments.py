"""MLflow's experiment endpoints: create, get, get-by-name, search, update, delete, restore, tags."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace

from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.protos import service_pb2 as pb
from mlflow.utils.validation import MAX_EXPERIMENT_TAG_VAL_LENGTH, _parse_experiment_id
from starlette.requests import Request
from starlette.responses import Response

from trackhouse.compat import wire
from trackhouse.compat.artifact_roots import ArtifactRoots
from trackhouse.compat.backend import Backend, next_version, now_ms
from trackhouse.compat.errors import RESOURCE_ALREADY_EXISTS, invalid, not_found
from trackhouse.compat.routing import Endpoint
from trackhouse.ingest import validation
from trackhouse.ingest.batch import ACTIVE, DELETED, Batch, ExperimentRow, ExperimentTagRow
from trackhouse.query import catalog, experiments, search
from trackhouse.query.experiments import Experiment

DEFAULT_SEARCH_RESULTS = 1000


class ExperimentsApi:
    def __init__(self, backend: Backend, artifact_roots: ArtifactRoots) -> None:
        self._backend = backend
        self._artifact_roots = artifact_roots

    def endpoints(self) -> list[Endpoint]:
        return [
            ("experiments/create", "POST", self.create),
            ("experiments/get", "GET", self.get),
            ("experiments/get-by-name", "GET", self.get_by_name),
            ("experiments/search", "GET", self.search),
            ("experiments/search", "POST", self.search),
            ("experiments/update", "POST", self.update),
            ("experiments/delete", "POST", self.delete),
            ("experiments/restore", "POST", self.restore),
            ("experiments/set-experiment-tag", "POST", self.set_tag),
            ("experiments/delete-experiment-tag", "POST", self.delete_tag),
        ]

    async def create(self, request: Request) -> Response:
        message = await wire.parse(request, pb.CreateExperiment())
        name = wire.required(message.name, "name")
        validation.check_experiment_name(name)
        location = ""
        if message.artifact_location:
            location = await asyncio.to_thread(self._artifact_roots.validate_new, message.artifact_location)
        tag_values = [(tag.key, _tag_value(tag.key, tag.value)) for tag in message.tags]
        async with self._backend.experiment_names() as taken:
            await self._check_name_free(name, taken)
            experiment_id = await self._backend.read(catalog.allocate_experiment_id, name)
            now = now_ms()
            version = next_version()
            tags = tuple(ExperimentTagRow(experiment_id, key, value, version) for key, value in tag_values)
            row = ExperimentRow(
                experiment_id,
                name,
                now,
                version=version,
                artifact_location=location,
                last_update_time_ms=now,
            )
            await self._backend.write(Batch(experiments=(row,), experiment_tags=tags))
        return wire.ok({"experiment_id": experiment_id})

    async def get(self, request: Request) -> Response:
        message = await wire.parse(request, pb.GetExperiment())
        found = await self.experiment(wire.required(message.experiment_id, "experiment_id"))
        return wire.ok({"experiment": wire.experiment(found)})

    async def get_by_name(self, request: Request) -> Response:
        message = await wire.parse(request, pb.GetExperimentByName())
        name = wire.required(message.experiment_name, "experiment_name")
        found = await self._backend.read(experiments.by_name, name)
        if found is None:
            raise not_found(f"Could not find experiment with name '{name}'")
        return wire.ok({"experiment": wire.experiment(found)})

    async def search(self, request: Request) -> Response:
        message = await wire.parse(request, pb.SearchExperiments())
        view_type = int(message.view_type) if message.HasField("view_type") else ViewType.ACTIVE_ONLY
        max_results = message.max_results if message.HasField("max_results") else DEFAULT_SEARCH_RESULTS
        page = await self._backend.read(
            search.search_experiments,
            view_type,
            max_results,
            message.filter,
            list(message.order_by),
            message.page_token or None,
        )
        found = await self._backend.read(experiments.by_ids, page.ids)
        payload: dict[str, object] = {"experiments": [wire.experiment(found[i]) for i in page.ids if i in found]}
        if page.next_page_token:
            payload["next_page_token"] = page.next_page_token
        return wire.ok(payload)

    async def update(self, request: Request) -> Response:
        message = await wire.parse(request, pb.UpdateExperiment())
        experiment_id = wire.required(message.experiment_id, "experiment_id")
        new_name = wire.required(message.new_name, "new_name")
        async with self._backend.experiment_names() as taken:
            found = await self.experiment(experiment_id)  # read under the lock: a concurrent rename may win
            if found.lifecycle_stage != ACTIVE:
                raise invalid("Cannot rename a non-active experiment.")
            validation.check_experiment_name(new_name)
            if new_name != found.name:
                await self._check_name_free(new_name, taken)
                await self._store(replace(found, name=new_name))
        return wire.ok()

    async def delete(self, request: Request) -> Response:
        return await self._set_stage(request, pb.DeleteExperiment(), DELETED)

    async def restore(self, request: Request) -> Response:
        return await self._set_stage(request, pb.RestoreExperiment(), ACTIVE)

    async def set_tag(self, request: Request) -> Response:
        message = await wire.parse(request, pb.SetExperimentTag())
        found = await self.active_experiment(wire.required(message.experiment_id, "experiment_id"))
        key = wire.required(message.key, "key")
        row = ExperimentTagRow(found.experiment_id, key, _tag_value(key, message.value), next_version())
        await self._backend.write(Batch(experiment_tags=(row,)))
        return wire.ok()

    async def delete_tag(self, request: Request) -> Response:
        message = await wire.parse(request, pb.DeleteExperimentTag())
        found = await self.active_experiment(wire.required(message.experiment_id, "experiment_id"))
        key = wire.required(message.key, "key")
        if key not in found.tags:
            raise not_found(f"No tag with name: {key} in experiment with id {found.experiment_id}")
        row = ExperimentTagRow(found.experiment_id, key, "", next_version(), deleted=True)
        await self._backend.write(Batch(experiment_tags=(row,)))
        return wire.ok()

    async def experiment(self, experiment_id: str) -> Experiment:
        found = (await self._backend.read(experiments.by_ids, [experiment_id])).get(experiment_id)
        if found is None:
            # Stock's ids are integers: "abc" is an invalid id, and "007" is experiment 7.
            canonical = str(_parse_experiment_id(experiment_id))
            if canonical != experiment_id:
                found = (await self._backend.read(experiments.by_ids, [canonical])).get(canonical)
        if found is None:
            raise not_found(f"No Experiment with id={experiment_id} exists")
        return found

    async def active_experiment(self, experiment_id: str) -> Experiment:
        """The experiment, which must not be deleted: runs and tags are only added to active ones."""
        found = await self.experiment(experiment_id)
        if found.lifecycle_stage != ACTIVE:
            raise invalid(
                f"The experiment {found.experiment_id} must be in the 'active' state. "
                f"Current state is {found.lifecycle_stage}."
            )
        return found

    async def _set_stage(
        self, request: Request, message: pb.DeleteExperiment | pb.RestoreExperiment, stage: str
    ) -> Response:
        parsed = await wire.parse(request, message)
        found = await self.experiment(wire.required(parsed.experiment_id, "experiment_id"))
        if found.lifecycle_stage != stage:
            await self._store(replace(found, lifecycle_stage=stage))
        return wire.ok()

    async def _store(self, changed: Experiment) -> None:
        row = ExperimentRow(
            changed.experiment_id,
            changed.name,
            changed.creation_time,
            version=next_version(changed.version),
            artifact_location=changed.artifact_location,
            lifecycle_stage=changed.lifecycle_stage,
            last_update_time_ms=now_ms(),
        )
        await self._backend.write(Batch(experiments=(row,)))

    async def _check_name_free(self, name: str, taken: Callable[[str], str | None]) -> None:
        """Raise unless `name` is free: not stored (live or deleted), and not just taken by a write in flight."""
        existing = await self._backend.read(experiments.by_name, name)
        pending = taken(name) if existing is None else None
        # Taken in flight: created through the write path (gRPC, by name), not stored yet. A stored row under
        # that id means this node's memory is stale (renamed elsewhere), and the name is free.
        if pending is not None and not await self._backend.read(experiments.by_ids, [pending]):
            raise MlflowException(f"Experiment(name={name}) already exists.", error_code=RESOURCE_ALREADY_EXISTS)
        if existing is not None:
            state = "" if existing.lifecycle_stage == ACTIVE else " (deleted)"
            raise MlflowException(f"Experiment(name={name}) already exists{state}.", error_code=RESOURCE_ALREADY_EXISTS)


def _tag_value(key: str, value: str) -> str:
    validation.check_key(key, "tag")
    if len(value) > MAX_EXPERIMENT_TAG_VAL_LENGTH:
        raise invalid(
            f"Experiment tag '{key}' had value length {len(value)}, which exceeded length limit of"
            f" {MAX_EXPERIMENT_TAG_VAL_LENGTH}"
        )
    return value
