"""MLflow's run endpoints: lifecycle, search, and the logging calls, which feed the one write pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import numpy as np
from mlflow.entities import Param, ViewType
from mlflow.protos import service_pb2 as pb
from mlflow.utils.name_utils import _generate_random_name
from mlflow.utils.validation import (
    MAX_BATCH_LOG_REQUEST_SIZE,
    _validate_batch_log_limits,
    _validate_length_limit,
    _validate_metric_name,
    _validate_param_keys_unique,
    _validate_param_name,
    _validate_tag_name,
    missing_value,
)
from starlette.requests import Request
from starlette.responses import Response

from trackhouse.compat import handlers, wire
from trackhouse.compat.backend import Backend, next_version, now_ms
from trackhouse.compat.datasets import DatasetsApi
from trackhouse.compat.datasets import checked as checked_dataset_inputs
from trackhouse.compat.errors import invalid, not_found
from trackhouse.compat.experiments import ExperimentsApi
from trackhouse.compat.links import metric_links, with_run_models
from trackhouse.compat.routing import Endpoint
from trackhouse.ingest import validation
from trackhouse.ingest.batch import (
    ACTIVE,
    DELETED,
    Batch,
    Float64Array,
    Int32Array,
    Int64Array,
    Metrics,
    ParamRow,
    RunRow,
    TagRow,
)
from trackhouse.ingest.catalog import ParamChangedError
from trackhouse.ingest.errors import UnknownRunError
from trackhouse.query import datasets, logged_models, runs, search
from trackhouse.query.runs import RUN_NAME_TAG, RunInfo

DEFAULT_SEARCH_RESULTS = 1000
_USER_TAG = "mlflow.user"


class RunsApi:
    def __init__(self, backend: Backend, experiments: ExperimentsApi, datasets: DatasetsApi | None = None) -> None:
        self._backend = backend
        self._experiments = experiments
        self._datasets = datasets or DatasetsApi(backend)
        #: Logged models own a run's model inputs; compat.app connects them (None: the models are refused).
        self.log_model_inputs: Callable[[str, list[str]], Awaitable[None]] | None = None
        #: compat.attempts: opens a run's next attempt (MLflow's resume), and says which attempt REST points of a
        #: run belong to. compat.app connects them; None: no attempts (every point is the first attempt's).
        self.resume_attempt: Callable[[str], Awaitable[int]] | None = None
        self.current_attempt: Callable[[str], Awaitable[int]] | None = None

    def endpoints(self) -> list[Endpoint]:
        return [
            ("runs/create", "POST", self.create),
            ("runs/get", "GET", self.get),
            ("runs/update", "POST", self.update),
            ("runs/delete", "POST", self.delete),
            ("runs/restore", "POST", self.restore),
            ("runs/search", "POST", self.search),
            ("runs/log-batch", "POST", self.log_batch),
            ("runs/log-metric", "POST", self.log_metric),
            ("runs/log-parameter", "POST", self.log_param),
            ("runs/set-tag", "POST", self.set_tag),
            ("runs/delete-tag", "POST", self.delete_tag),
            ("runs/log-inputs", "POST", self.log_inputs),
        ]

    async def create(self, request: Request) -> Response:
        message = await wire.parse(request, pb.CreateRun())
        experiment = await self._experiments.active_experiment(message.experiment_id or "0")
        given = {tag.key: tag.value for tag in message.tags}
        name = message.run_name or given.get(RUN_NAME_TAG) or _generate_random_name()
        if message.run_name and given.get(RUN_NAME_TAG, name) != name:
            raise invalid(
                f"Both 'run_name' argument and 'mlflow.runName' tag are specified, but with different"
                f" values (run_name='{name}', mlflow.runName='{given[RUN_NAME_TAG]}')."
            )
        name = validation.fit_run_name(name)
        given[RUN_NAME_TAG] = name
        user = message.user_id or given.get(_USER_TAG, "")
        validation.check_user(user)
        run_id = uuid.uuid4().hex
        version = next_version()
        row = RunRow(
            run_id=run_id,
            experiment_id=experiment.experiment_id,
            name=name,
            status="RUNNING",
            start_time_ms=message.start_time or now_ms(),
            end_time_ms=0,
            user=user,
            version=version,
        )
        tags = tuple(_tag(run_id, key, value, version) for key, value in given.items())
        await self._backend.write(Batch(runs=(row,), tags=tags))
        return wire.ok({"run": wire.run(await self._run(run_id))})

    async def get(self, request: Request) -> Response:
        message = await wire.parse(request, pb.GetRun())
        run_id = wire.required(message.run_id or message.run_uuid, "run_id")
        found = await self._wire_runs([run_id])
        if not found:
            raise not_found(f"Run with id={run_id} not found")
        return wire.ok({"run": found[0]})

    async def update(self, request: Request) -> Response:
        message = await wire.parse(request, pb.UpdateRun())
        info = await self.active_run(wire.required(message.run_id or message.run_uuid, "run_id"))
        changed = info
        if _is_resume(message, info) and self.resume_attempt is not None:
            await self.resume_attempt(info.run_id)
        if message.HasField("status"):
            changed = replace(changed, status=pb.RunStatus.Name(message.status))
        if message.HasField("end_time"):
            changed = replace(changed, end_time=message.end_time)
        tags: tuple[TagRow, ...] = ()
        if message.HasField("run_name") and message.run_name:
            changed = replace(changed, name=validation.fit_run_name(message.run_name))
            tags = (_tag(info.run_id, RUN_NAME_TAG, changed.name, next_version()),)
        row = run_row(changed)
        await self._backend.write(Batch(runs=(row,), tags=tags))
        return wire.ok({"run_info": wire.run_info(replace(changed, version=row.version))})

    async def delete(self, request: Request) -> Response:
        return await self._set_stage(request, pb.DeleteRun(), DELETED)

    async def restore(self, request: Request) -> Response:
        return await self._set_stage(request, pb.RestoreRun(), ACTIVE)

    async def search(self, request: Request) -> Response:
        message = await wire.parse(request, pb.SearchRuns())
        view_type = int(message.run_view_type) if message.HasField("run_view_type") else ViewType.ACTIVE_ONLY
        max_results = message.max_results if message.HasField("max_results") else DEFAULT_SEARCH_RESULTS
        page = await self._backend.read(
            search.search_runs,
            list(message.experiment_ids),
            message.filter,
            view_type,
            max_results,
            list(message.order_by),
            message.page_token or None,
        )
        payload: dict[str, Any] = {"runs": await self._wire_runs(page.ids)}
        if page.next_page_token:
            payload["next_page_token"] = page.next_page_token
        return wire.ok(payload)

    async def _wire_runs(self, run_ids: list[str]) -> list[dict[str, Any]]:
        """The runs among `run_ids` that exist, in that order, in MLflow's wire shape (runs/get, runs/search).

        A search page holds up to 50,000 runs: its six parts are read concurrently, on the backend's clients, which
        take them in this order. The rendered metrics go first, as the heaviest read (ClickHouse renders them: a
        page of runs with thousands of keys each holds 10^5+ metrics), so that the other five share the other
        client meanwhile instead of leaving it idle at the end."""
        # gather starts its reads as it is called, so the rendered metrics take the clients first (a page known to
        # be heavy in two halves at once).
        rendered, (found, params, tags, inputs, models) = await asyncio.gather(
            asyncio.gather(
                *(
                    self._backend.read(runs.latest_metrics_json, part)
                    for part in runs.latest_metrics_reads(self._backend.database, run_ids)
                )
            ),
            asyncio.gather(
                self._backend.read(runs.infos, run_ids),
                self._backend.read(runs.params_of, run_ids),
                self._backend.read(runs.tags_of, run_ids),
                self._backend.read(datasets.inputs_of, run_ids),
                self._backend.read(logged_models.run_models, run_ids),
            ),
        )
        latest = {run_id: text for part in rendered for run_id, text in part.items()}
        matched = runs.assemble(run_ids, found, params, tags, {}, inputs)
        shaped = [wire.run(run, latest[run.info.run_id]) for run in matched]
        with_run_models(shaped, models)
        return shaped

    async def log_batch(self, request: Request) -> Response:
        body = await wire.body(request, MAX_BATCH_LOG_REQUEST_SIZE)
        run_id = wire.required(_string(body.get("run_id") or body.get("run_uuid"), "run_id"), "run_id")
        metrics = _list(body, "metrics")
        params = _list(body, "params")
        tags = _list(body, "tags")
        # Stock's order (SqlAlchemyStore.log_batch): each entry, then the limits, then repeated param keys.
        batch = Batch(
            metrics=_metrics(run_id, metrics),
            params=tuple(_param(run_id, p, f"params[{i}]") for i, p in enumerate(params)),
            tags=tuple(
                _tag(
                    run_id,
                    _field(t, "key", f"tags[{i}]"),
                    _string(t.get("value", ""), "value"),
                    next_version(),
                    f"tags[{i}].key",
                )
                for i, t in enumerate(tags)
            ),
        )
        _validate_batch_log_limits(metrics, params, tags)
        _validate_param_keys_unique([Param(p.key, p.value) for p in batch.params])
        await self._log(run_id, batch)
        return wire.ok()

    async def log_metric(self, request: Request) -> Response:
        body = await wire.body(request)
        run_id = wire.required(_string(body.get("run_id") or body.get("run_uuid"), "run_id"), "run_id")
        await self._log(run_id, Batch(metrics=_metrics(run_id, [body], single=True)))
        return wire.ok()

    async def log_param(self, request: Request) -> Response:
        body = await wire.body(request)
        run_id = wire.required(_string(body.get("run_id") or body.get("run_uuid"), "run_id"), "run_id")
        try:
            await self._log(run_id, Batch(params=(_param(run_id, body, ""),)))
        except ParamChangedError as exc:
            raise invalid(exc.single()) from None  # stock words log-parameter's error its own way
        return wire.ok()

    async def set_tag(self, request: Request) -> Response:
        message = await wire.parse(request, pb.SetTag())
        run_id = wire.required(message.run_id or message.run_uuid, "run_id")
        key = wire.required(message.key, "key")
        await self._log(run_id, Batch(tags=(_tag(run_id, key, message.value, next_version()),)))
        return wire.ok()

    async def delete_tag(self, request: Request) -> Response:
        message = await wire.parse(request, pb.DeleteTag())
        run_id = wire.required(message.run_id, "run_id")
        key = wire.required(message.key, "key")
        found = await self._run(run_id)
        _check_active(found.info)
        if key not in found.tags:
            raise not_found(f"No tag with name: {key} in run with id {run_id}")
        row = TagRow(run_id, key, "", next_version(), deleted=True)
        await self._backend.write(Batch(tags=(row,)))
        return wire.ok()

    async def log_inputs(self, request: Request) -> Response:
        message = await wire.parse(request, pb.LogInputs())
        run_id = wire.required(message.run_id, "run_id")
        dataset_inputs = checked_dataset_inputs(message.datasets)  # as stock: the request, then the run
        info = await self.active_run(run_id)
        await self._datasets.log(info, dataset_inputs)
        model_ids = [model.model_id for model in message.models]
        if model_ids:
            if self.log_model_inputs is None:
                raise invalid("Logged models are not served here")
            await self.log_model_inputs(run_id, model_ids)
        return wire.ok()

    async def existing_run(self, run_id: str) -> RunInfo:
        info = (await self._backend.read(runs.infos, [run_id])).get(run_id)
        if info is None:
            raise not_found(f"Run with id={run_id} not found")
        return info

    async def artifact_uri(self, run_id: str) -> str:
        return (await self.existing_run(run_id)).artifact_uri

    async def active_run(self, run_id: str) -> RunInfo:
        info = await self.existing_run(run_id)
        _check_active(info)
        return info

    async def run(self, run_id: str) -> runs.Run:
        """The whole run, or MLflow's not-found error."""
        return await self._run(run_id)

    async def _run(self, run_id: str) -> runs.Run:
        found = await self._backend.read(runs.runs, [run_id])
        if not found:
            raise not_found(f"Run with id={run_id} not found")
        return found[0]

    async def _log(self, run_id: str, batch: Batch) -> None:
        """Write through the pipeline; its run cache makes the common case free of lookups."""
        renamed = next((t.value for t in batch.tags if t.key == RUN_NAME_TAG), None)
        if renamed is not None:  # MLflow keeps the run name and its tag in step
            info = await self.active_run(run_id)
            batch = replace(batch, runs=(run_row(replace(info, name=renamed)),))
        batch = await self._with_attempt(run_id, batch)
        try:
            await self._backend.write(batch)
        except UnknownRunError as exc:
            await self.active_run(exc.run_id)  # raises MLflow's exact error for a missing or deleted run
            raise

    async def _with_attempt(self, run_id: str, batch: Batch) -> Batch:
        """MLflow's writes carry no attempt: their points belong to the run's current attempt (compat.attempts)."""
        if not batch.points or self.current_attempt is None:
            return batch
        attempt = await self.current_attempt(run_id)
        if not attempt:
            return batch
        metrics = replace(batch.metrics, sources=((0, "", attempt),), source_index=np.zeros(batch.points, np.int32))
        return replace(batch, metrics=metrics)

    async def _set_stage(self, request: Request, message: pb.DeleteRun | pb.RestoreRun, stage: str) -> Response:
        parsed = await wire.parse(request, message)
        info = await self.existing_run(wire.required(parsed.run_id, "run_id"))
        if info.lifecycle_stage != stage:
            await self._backend.write(Batch(runs=(run_row(replace(info, lifecycle_stage=stage)),)))
        return wire.ok()


def _is_resume(message: pb.UpdateRun, info: RunInfo) -> bool:
    """MLflow resumes a run (`mlflow.start_run(run_id=...)`) by setting it RUNNING, with no name unless the caller
    gave one. A killed job leaves its run RUNNING, so that counts too; a rename of a running run does not
    (MlflowClient.update_run(run_id, name=...) sends the status it read)."""
    if not message.HasField("status") or message.status != pb.RunStatus.Value("RUNNING"):
        return False
    return info.status != "RUNNING" or not message.run_name


def _check_active(info: RunInfo) -> None:
    if info.lifecycle_stage != ACTIVE:
        raise invalid(f"The run {info.run_id} must be in the 'active' state. Current state is {info.lifecycle_stage}.")


def run_row(info: RunInfo) -> RunRow:
    return RunRow(
        run_id=info.run_id,
        experiment_id=info.experiment_id,
        name=info.name,
        status=info.status,
        start_time_ms=info.start_time,
        end_time_ms=info.end_time or 0,
        user=info.user,
        version=next_version(info.version),
        lifecycle_stage=info.lifecycle_stage,
    )


def _tag(run_id: str, key: str, value: str, version: int, path: str = "key") -> TagRow:
    _check_key(key, "tag", path)
    return TagRow(run_id, key, validation.fit_value("tag", key, value, validation.MAX_TAG_VALUE_LENGTH), version)


def _param(run_id: str, body: dict[str, Any], path: str) -> ParamRow:
    key = _field(body, "key", path)
    _check_key(key, "param", _join(path, "key"))
    value = body.get("value", "")
    if not isinstance(value, str):  # the MLflow client always sends strings; str() what JSON allows
        value = _json_scalar(value, _join(path, "value"))
    return ParamRow(run_id, key, validation.fit_value("param", key, value, validation.MAX_PARAM_VALUE_LENGTH))


def _json_scalar(value: object, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"Invalid value {value!r} for parameter '{name}' supplied: expected a string.")
    return str(value)


def _metrics(run_id: str, entries: list[Any], single: bool = False) -> Metrics:
    """Columns for the points of one run, built a column at a time; any oddity takes the careful path."""
    if not entries:
        return Metrics()
    columns = _plain_columns(entries)
    if columns is None:
        columns = _checked_columns(entries, single)
    keys, key_index, step, timestamp, value = columns
    for i, key in enumerate(keys):
        if validation.key_problem(key) is not None:
            first = int(np.argmax(key_index == i))
            _check_key(key, "metric", "name" if single else f"metrics[{first}].name")
    links, link_index = metric_links(entries)
    return Metrics(
        run_ids=(run_id,),
        keys=keys,
        run_index=np.zeros(len(entries), np.int32),
        key_index=key_index,
        step=step,
        timestamp=timestamp,
        value=value,
        links=links,
        link_index=link_index,
    )


_Columns = tuple[tuple[str, ...], Int32Array, Int64Array, Int64Array, Float64Array]


def _plain_columns(entries: list[Any]) -> _Columns | None:
    """The common case, as the MLflow client sends it: string keys, numeric values, integer steps and timestamps.

    Whole columns go to numpy at once (about 10x faster than entry by entry, measured); None means
    something is unusual (a missing field, a string value such as "NaN", a bool) and every entry is checked.
    """
    try:
        keys = [e["key"] for e in entries]
        values = [e["value"] for e in entries]
        timestamps = [e["timestamp"] for e in entries]
        steps = [e.get("step", 0) for e in entries]
    except (KeyError, TypeError, AttributeError):
        return None
    if (
        not set(map(type, keys)) <= {str}
        or not set(map(type, values)) <= {float, int}
        or not set(map(type, timestamps)) <= {int}
        or not set(map(type, steps)) <= {int}
    ):
        return None
    try:
        step, timestamp = np.array(steps, np.int64), np.array(timestamps, np.int64)
    except OverflowError:
        return None
    index = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    key_index = np.fromiter((index[k] for k in keys), np.int32, len(keys))
    return tuple(index), key_index, step, timestamp, np.array(values, np.float64)


def _checked_columns(entries: list[Any], single: bool) -> _Columns:
    """Entry by entry, naming the first bad field as MLflow would."""
    keys: dict[str, int] = {}
    key_index = np.empty(len(entries), np.int32)
    step = np.empty(len(entries), np.int64)
    timestamp = np.empty(len(entries), np.int64)
    value = np.empty(len(entries), np.float64)
    for i, entry in enumerate(entries):
        path = "" if single else f"metrics[{i}]"
        if not isinstance(entry, dict):
            raise invalid(f"Invalid value for parameter '{path or 'metric'}': expected an object.")
        key = _field(entry, "key", path)
        key_index[i] = keys.setdefault(key, len(keys))
        value[i] = _double(_present(entry, "value", path), _join(path, "value"))
        timestamp[i] = _int64(_present(entry, "timestamp", path), _join(path, "timestamp"))
        step[i] = _int64(entry.get("step", 0), _join(path, "step"))
    return tuple(keys), key_index, step, timestamp, value


_SPECIAL = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


def _double(raw: object, name: str) -> float:
    """A double as protobuf's JSON reader takes it: a number, or a string holding one (NaN and infinities too)."""
    if isinstance(raw, int | float):  # bool too: stock MLflow's handlers take float(true), 1.0
        return float(raw)
    if isinstance(raw, str):
        if raw in _SPECIAL:
            return _SPECIAL[raw]
        try:
            return float(raw)
        except ValueError:
            pass
    raise invalid(f"Invalid value {raw!r} for parameter '{name}' supplied: expected a number.")


def _int64(raw: object, name: str) -> int:
    number = None
    if isinstance(raw, int) and not isinstance(raw, bool):
        number = raw
    elif isinstance(raw, float) and raw.is_integer() and abs(raw) < 2**53:
        # Only below 2**53 is a double an exact integer. Past it, it may be a rounded one: orjson reads an
        # integer beyond int64 (say -2**63 - 1) as the nearest double, which would pass as -2**63.
        number = int(raw)
    elif isinstance(raw, str):
        with contextlib.suppress(ValueError):
            number = int(raw)
    if number is None or not -(2**63) <= number < 2**63:
        raise invalid(f"Invalid value {raw!r} for parameter '{name}' supplied: expected a 64-bit integer.")
    return number


def _present(entry: dict[str, Any], name: str, path: str) -> object:
    if entry.get(name) is None:
        if not path:  # log-metric: stock's request check
            handlers.check_required(None, name)
        raise invalid(missing_value(_join(path, name)))  # log-batch: stock's store check
    return entry[name]


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _field(entry: dict[str, Any], name: str, path: str) -> str:
    where = _join(path, name)
    return wire.required(_string(entry.get(name), where), where)


def _string(raw: object, name: str) -> str:
    if raw is None:
        return ""
    if not isinstance(raw, str):
        raise invalid(f"Invalid value {raw!r} for parameter '{name}' supplied: expected a string.")
    return raw


def _list(body: dict[str, Any], name: str) -> list[Any]:
    value = body.get(name) or []
    if not isinstance(value, list):
        raise invalid(f"Invalid value for parameter '{name}' supplied: expected an array.")
    return value


#: MLflow's own check of each kind of key, and the name its length message gives the key.
_KEY_CHECKS = {
    "metric": (_validate_metric_name, "Metric name"),
    "param": (_validate_param_name, "Param key"),
    "tag": (_validate_tag_name, None),
}


def _check_key(key: str, what: str, path: str) -> None:
    """MLflow's checks of a key, with its words; the cached check lets good keys through without them."""
    if validation.key_problem(key) is None:
        return
    check, entity = _KEY_CHECKS[what]
    check(key, path)
    _validate_length_limit(entity or path, validation.MAX_KEY_LENGTH, key)
