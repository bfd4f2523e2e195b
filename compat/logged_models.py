"""MLflow 3's logged-model endpoints, runs/outputs, and the model part of runs/log-inputs.

Semantics follow MLflow's SQLAlchemy store (create, finalize, delete, tags, params, search);
answers are MLflow's own entities serialised as its handlers serialise them, so the shapes are
stock's. A model's metrics are the points logged with its id (see query.logged_models).
"""

from __future__ import annotations

import asyncio
import json
import math
import posixpath
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from mlflow.entities import LoggedModel, LoggedModelStatus, Metric
from mlflow.exceptions import MlflowException
from mlflow.protos import service_pb2 as pb
from mlflow.protos.databricks_pb2 import BAD_REQUEST
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.utils import uri
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS
from mlflow.utils.name_utils import _generate_random_name
from mlflow.utils.proto_json_utils import message_to_json
from mlflow.utils.validation import MAX_ENTITIES_PER_BATCH, _validate_logged_model_name
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from trackhouse.compat import wire
from trackhouse.compat.artifacts import ArtifactsConfig, _destination_path, _safe_path, _send_artifact
from trackhouse.compat.backend import Backend, next_version, now_ms
from trackhouse.compat.errors import invalid, not_found
from trackhouse.compat.experiments import ExperimentsApi
from trackhouse.compat.registry import LoggedModelRef
from trackhouse.compat.routing import Endpoint, guarded
from trackhouse.compat.runs import RunsApi
from trackhouse.ingest import validation
from trackhouse.ingest.batch import (
    ACTIVE,
    DELETED,
    MODEL_INPUT,
    MODEL_OUTPUT,
    Batch,
    LoggedModelParamRow,
    LoggedModelRow,
    LoggedModelTagRow,
    RunModelRow,
)
from trackhouse.query import logged_models as models
from trackhouse.query.logged_models import DatasetFilter, OrderBy

# MLflow leaves these unannotated; naming their types keeps the calls checked.
_append_to_uri_path: Callable[..., str] = uri.append_to_uri_path
_resolve_uri_if_local: Callable[[str], str] = uri.resolve_uri_if_local

#: Stock's column is 500 characters wide.
MAX_NAME_CHARS = 500
#: The most tags or params one request may set (MLflow's per-batch limit on entities).
MAX_ENTRIES = MAX_ENTITIES_PER_BATCH
#: A finite double as stock stores ±Inf (SQL cannot hold infinities), so its wire carries these.
_MAX_DOUBLE = 1.7976931348623157e308


class LoggedModelsApi:
    def __init__(self, backend: Backend, experiments: ExperimentsApi, runs: RunsApi) -> None:
        self._backend = backend
        self._experiments = experiments
        self._runs = runs

    def endpoints(self) -> list[Endpoint]:
        return [
            ("logged-models", "POST", self.create),
            ("logged-models/search", "POST", self.search),
            ("logged-models/{model_id}", "GET", self.get),
            ("logged-models/{model_id}", "PATCH", self.finalize),
            ("logged-models/{model_id}", "DELETE", self.delete),
            ("logged-models/{model_id}/tags", "PATCH", self.set_tags),
            ("logged-models/{model_id}/tags/{tag_key:path}", "DELETE", self.delete_tag),
            ("logged-models/{model_id}/params", "POST", self.log_params),
            ("runs/outputs", "POST", self.log_outputs),
        ]

    async def create(self, request: Request) -> Response:
        message = await wire.parse(request, pb.CreateLoggedModel())
        experiment = await self._experiments.active_experiment(wire.required(message.experiment_id, "experiment_id"))
        name = message.name if message.HasField("name") else None
        _validate_logged_model_name(name)
        name = name or _generate_random_name()
        if len(name) > MAX_NAME_CHARS:
            raise invalid(f"Invalid model name: longer than {MAX_NAME_CHARS} characters.")
        model_id = f"m-{uuid.uuid4().hex}"
        created = now_ms()
        version = next_version()
        row = LoggedModelRow(
            model_id=model_id,
            experiment_id=experiment.experiment_id,
            name=name,
            artifact_location=_append_to_uri_path(experiment.artifact_root, "models", model_id, "artifacts"),
            creation_time_ms=created,
            last_updated_time_ms=created,
            status=LoggedModelStatus.PENDING.to_int(),
            version=version,
            model_type=_bounded(message.model_type, "model_type"),
            source_run_id=_bounded(message.source_run_id, "source_run_id"),
        )
        tags = _tags(model_id, [(t.key, t.value) for t in message.tags], version)
        params = _params(model_id, [(p.key, p.value) for p in message.params], version)
        await self._backend.write(Batch(logged_models=(row,), logged_model_tags=tags, logged_model_params=params))
        return _model_response(await self._model(model_id))

    async def get(self, request: Request) -> Response:
        allow_deleted = request.query_params.get("allow_deleted", "false").lower() == "true"
        return _model_response(await self._model(_model_id(request), allow_deleted))

    async def finalize(self, request: Request) -> Response:
        message = await wire.parse(request, pb.FinalizeLoggedModel())
        if not message.HasField("status"):
            raise invalid("Missing value for required parameter 'status'. See the API docs for more information.")
        try:
            status = LoggedModelStatus.from_int(message.status).to_int()
        except Exception:
            raise invalid(f"Invalid value {message.status!r} for parameter 'status' supplied.") from None
        info = await self._record(_model_id(request))
        await self._backend.write(Batch(logged_models=(_changed(info, status=status),)))
        return _model_response(await self._model(info.model_id, allow_deleted=True))

    async def delete(self, request: Request) -> Response:
        info = await self._record(_model_id(request))
        await self._backend.write(Batch(logged_models=(_changed(info, lifecycle_stage=DELETED),)))
        return wire.ok()

    async def set_tags(self, request: Request) -> Response:
        message = await wire.parse(request, pb.SetLoggedModelTags())
        info = await self._record(_model_id(request))
        tags = dict((t.key, t.value) for t in message.tags)  # a repeated key keeps its last value, as stock
        rows = _tags(info.model_id, list(tags.items()), next_version())
        if rows:
            await self._backend.write(Batch(logged_model_tags=rows))
        return wire.ok()

    async def delete_tag(self, request: Request) -> Response:
        model_id = _model_id(request)
        key = request.path_params["tag_key"]
        found = await self._model(model_id, allow_deleted=True)
        if key not in found.tags:
            raise not_found(f"No tag with key {key!r} found for model with ID {model_id!r}.")
        tombstone = LoggedModelTagRow(model_id, key, "", next_version(), deleted=True)
        await self._backend.write(Batch(logged_model_tags=(tombstone,)))
        return wire.ok()

    async def log_params(self, request: Request) -> Response:
        message = await wire.parse(request, pb.LogLoggedModelParamsRequest())
        info = await self._record(_model_id(request))
        rows = _params(info.model_id, [(p.key, p.value) for p in message.params], next_version())
        if rows:
            await self._backend.write(Batch(logged_model_params=rows))
        return wire.ok()

    async def search(self, request: Request) -> Response:
        message = await wire.parse(request, pb.SearchLoggedModels())
        if not message.experiment_ids:
            raise invalid(
                "Missing value for required parameter 'experiment_ids'. See the API docs for more information."
            )
        datasets = [DatasetFilter(d.dataset_name, d.dataset_digest) for d in message.datasets]
        order_by = [
            OrderBy(o.field_name, o.ascending if o.HasField("ascending") else True, o.dataset_name, o.dataset_digest)
            for o in message.order_by
        ]
        page = await self._backend.read(
            models.search,
            list(message.experiment_ids),
            message.filter,
            datasets,
            message.max_results or None,
            order_by,
            message.page_token or None,
        )
        found = await self._backend.read(models.models, page.ids)
        response = pb.SearchLoggedModels.Response()
        response.models.extend(_entity(m).to_proto() for m in found)
        if page.next_page_token:
            response.next_page_token = page.next_page_token
        return _json(response)

    async def log_outputs(self, request: Request) -> Response:
        message = await wire.parse(request, pb.LogOutputs())
        run_id = wire.required(message.run_id, "run_id")
        if not message.models:
            raise invalid("Missing value for required parameter 'models'. See the API docs for more information.")
        _check_count(len(message.models), "models")
        await self._runs.active_run(run_id)
        rows = tuple(
            RunModelRow(run_id, _bounded(m.model_id, "model_id"), MODEL_OUTPUT, m.step) for m in message.models
        )
        await self._backend.write(Batch(run_models=rows))
        return wire.ok()

    async def log_model_inputs(self, run_id: str, model_ids: list[str]) -> None:
        """runs/log-inputs' `models`: the run must be active, as stock checks before logging any input."""
        _check_count(len(model_ids), "models")
        await self._runs.active_run(run_id)
        if model_ids:
            rows = tuple(RunModelRow(run_id, _bounded(m, "model_id"), MODEL_INPUT) for m in model_ids)
            await self._backend.write(Batch(run_models=rows))

    async def _record(self, model_id: str) -> models.LoggedModel:
        """The model's newest row, deleted or not (stock's _get_logged_model_record)."""
        info = (await self._backend.read(models.infos, [model_id])).get(model_id)
        if info is None:
            raise _model_not_found(model_id)
        return info

    async def _model(self, model_id: str, allow_deleted: bool = False) -> models.LoggedModel:
        found = await self._backend.read(models.models, [model_id])
        if not found or (found[0].lifecycle_stage == DELETED and not allow_deleted):
            raise _model_not_found(model_id)
        return found[0]

    async def artifact_location(self, model_id: str) -> str:
        return (await self._model(model_id)).artifact_location

    async def registry_ref(self, model_id: str) -> LoggedModelRef:
        """What the model registry needs of a model (compat.registry.LoggedModels)."""
        model = await self._model(model_id)
        return LoggedModelRef(model.model_id, model.artifact_location, model.source_run_id or None)

    async def link_version(self, model_id: str, name: str, version: str) -> None:
        """Stock's set_model_versions_tags: the model's `mlflow.modelVersions` tag lists versions made from it."""
        model = await self._model(model_id)
        # Stock's store passes the version as its integer, so the JSON holds a number.
        versions: list[dict[str, Any]] = [{"name": name, "version": int(version) if version.isdigit() else version}]
        if existing := model.tags.get(MLFLOW_MODEL_VERSIONS):
            known = json.loads(existing)
            versions = known if versions[0] in known else known + versions
        rows = _tags(model_id, [(MLFLOW_MODEL_VERSIONS, json.dumps(versions))], next_version())
        await self._backend.write(Batch(logged_model_tags=rows))


def artifact_routes(config: ArtifactsConfig, api: LoggedModelsApi) -> list[BaseRoute]:
    """Listing (both prefixes) and download (the UI's prefix only, as stock) under a model's location."""
    destination = get_artifact_repository(_resolve_uri_if_local(config.destination))

    async def list_artifacts(request: Request) -> Response:
        message = await wire.parse(request, pb.ListLoggedModelArtifacts())
        relative = _safe_path(message.artifact_directory_path) if message.HasField("artifact_directory_path") else None
        root = await api.artifact_location(_model_id(request))
        response = pb.ListLoggedModelArtifacts.Response(root_uri=root)
        if (destination_path := _destination_path(root, relative)) is not None:
            for info in await asyncio.to_thread(destination.list_artifacts, destination_path):
                name = posixpath.basename(info.path)
                path = posixpath.join(relative, name) if relative else name
                response.files.add(path=path, is_dir=info.is_dir, file_size=info.file_size)
        else:
            repo = await asyncio.to_thread(get_artifact_repository, root)
            response.files.extend(i.to_proto() for i in await asyncio.to_thread(repo.list_artifacts, relative))
        return _json(response)

    async def download(request: Request) -> Response:
        path = request.query_params.get("artifact_file_path")
        if not path:
            raise MlflowException(
                'Request must include the "artifact_file_path" query parameter.', error_code=BAD_REQUEST
            )
        path = _safe_path(path)
        root = await api.artifact_location(_model_id(request))
        if (destination_path := _destination_path(root, path)) is not None:
            return await _send_artifact(destination, destination_path)
        return await _send_artifact(await asyncio.to_thread(get_artifact_repository, root), path)

    routes: list[BaseRoute] = [
        Route(f"{prefix}logged-models/{{model_id}}/artifacts/directories", guarded(list_artifacts), methods=["GET"])
        for prefix in ("/api/2.0/mlflow/", "/ajax-api/2.0/mlflow/")
    ]
    routes.append(
        Route("/ajax-api/2.0/mlflow/logged-models/{model_id}/artifacts/files", guarded(download), methods=["GET"])
    )
    return routes


def _model_id(request: Request) -> str:
    return str(request.path_params["model_id"])


def _model_not_found(model_id: str) -> MlflowException:
    return not_found(f"Logged model with ID '{model_id}' not found.")


def _changed(info: models.LoggedModel, **changes: Any) -> LoggedModelRow:
    """The model's row with `changes`, as a newer version (every change also touches last_updated)."""
    row = LoggedModelRow(
        model_id=info.model_id,
        experiment_id=info.experiment_id,
        name=info.name,
        artifact_location=info.artifact_location,
        creation_time_ms=info.creation_timestamp,
        last_updated_time_ms=now_ms(),
        status=info.status,
        version=next_version(info.version),
        model_type=info.model_type,
        source_run_id=info.source_run_id,
        status_message=info.status_message,
        lifecycle_stage=info.lifecycle_stage or ACTIVE,
    )
    return replace(row, **changes)


def _check_count(count: int, what: str) -> None:
    if count > MAX_ENTRIES:
        raise invalid(f"A request can contain at most {MAX_ENTRIES} {what}. Got {count} {what}.")


def _bounded(value: str, name: str) -> str:
    if len(value) > MAX_NAME_CHARS:
        raise invalid(f"Invalid value for parameter '{name}' supplied: longer than {MAX_NAME_CHARS} characters.")
    return value


def _tags(model_id: str, entries: list[tuple[str, str]], version: int) -> tuple[LoggedModelTagRow, ...]:
    _check_count(len(entries), "tags")
    rows = []
    for key, value in entries:
        validation.check_key(key, "tag")
        fitted = validation.fit_value("tag", key, value, validation.MAX_TAG_VALUE_LENGTH)
        rows.append(LoggedModelTagRow(model_id, key, fitted, version))
    return tuple(rows)


def _params(model_id: str, entries: list[tuple[str, str]], version: int) -> tuple[LoggedModelParamRow, ...]:
    _check_count(len(entries), "params")
    rows = []
    for key, value in entries:
        validation.check_key(key, "param")
        fitted = validation.fit_value("param", key, value, validation.MAX_PARAM_VALUE_LENGTH)
        rows.append(LoggedModelParamRow(model_id, key, fitted, version))
    return tuple(rows)


def _entity(model: models.LoggedModel) -> LoggedModel:
    return LoggedModel(
        experiment_id=model.experiment_id,
        model_id=model.model_id,
        name=model.name,
        artifact_location=model.artifact_location,
        creation_timestamp=model.creation_timestamp,
        last_updated_timestamp=model.last_updated_timestamp,
        model_type=model.model_type,
        source_run_id=model.source_run_id,
        status=model.status,
        status_message=model.status_message or None,
        tags=model.tags,
        params=model.params,
        metrics=[
            Metric(
                key=m.key,
                value=math.copysign(_MAX_DOUBLE, m.value) if math.isinf(m.value) else m.value,
                timestamp=m.timestamp,
                step=m.step,
                run_id=m.run_id,
                dataset_name=m.dataset_name or None,
                dataset_digest=m.dataset_digest or None,
                model_id=model.model_id,
            )
            for m in model.metrics
        ],
    )


def _model_response(model: models.LoggedModel) -> Response:
    return _json(pb.GetLoggedModel.Response(model=_entity(model).to_proto()))


def _json(message: Any) -> Response:
    return Response(message_to_json(message), media_type="application/json")
