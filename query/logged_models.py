"""Reading MLflow 3 logged models: the models, their tags, params and metrics, search, and run links.

A model's metrics are the points logged with its id (the `model_id` column of `metrics`), as
stock MLflow keeps them in `logged_model_metrics`. Search takes MLflow's own filter grammar
(mlflow.utils.search_logged_model_utils) and follows MLflow's SQLAlchemy store; every user
value reaches ClickHouse as a bound parameter.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.store.tracking import SEARCH_LOGGED_MODEL_MAX_RESULTS_DEFAULT
from mlflow.utils.search_logged_model_utils import EntityType, parse_filter_string
from mlflow.utils.search_utils import SearchLoggedModelsPaginationToken

from trackhouse.query import schema
from trackhouse.query.connection import Client
from trackhouse.query.errors import InvalidQueryError
from trackhouse.query.search import (
    _NUMERIC_OPERATORS,
    _as_invalid_query,
    _experiment_id,
    _Params,
    _parse,
    _string_condition,
)

#: Page tokens are stock's (offset, and the query they belong to); far longer ones are not tokens.
MAX_PAGE_TOKEN_CHARS = 100_000
#: Stock's cap does not exist; ours keeps one page's metrics and tags bounded.
MAX_SEARCH_RESULTS = 1000

_COLUMNS = (
    "model_id, experiment_id, name, artifact_location, creation_timestamp, last_updated_timestamp, status,"
    " lifecycle_stage, model_type, source_run_id, status_message, version"
)
#: Attribute names a filter or order-by may use (stock: SqlLoggedModel's columns and aliases) -> columns.
_ATTRIBUTES = {
    "model_id": "model_id",
    "experiment_id": "experiment_id",
    "name": "name",
    "artifact_location": "artifact_location",
    "creation_timestamp_ms": "creation_timestamp",
    "creation_timestamp": "creation_timestamp",
    "creation_time": "creation_timestamp",
    "last_updated_timestamp_ms": "last_updated_timestamp",
    "last_updated_timestamp": "last_updated_timestamp",
    "status": "status",
    "lifecycle_stage": "lifecycle_stage",
    "model_type": "model_type",
    "source_run_id": "source_run_id",
    "status_message": "status_message",
}
_NUMERIC_ATTRIBUTES = {"creation_timestamp", "last_updated_timestamp"}


@dataclass(frozen=True, slots=True)
class ModelMetric:
    key: str
    value: float
    timestamp: int
    step: int
    run_id: str
    dataset_name: str
    dataset_digest: str


@dataclass(frozen=True, slots=True)
class LoggedModel:
    model_id: str
    experiment_id: str
    name: str
    artifact_location: str
    creation_timestamp: int
    last_updated_timestamp: int
    status: int
    lifecycle_stage: str
    model_type: str
    source_run_id: str
    status_message: str
    version: int
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: list[ModelMetric] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SearchPage:
    ids: list[str]
    next_page_token: str | None


@dataclass(frozen=True, slots=True)
class RunModels:
    #: Model ids of runs/log-inputs' models.
    inputs: list[str] = field(default_factory=list)
    #: (model_id, step) of runs/outputs' models.
    outputs: list[tuple[str, int]] = field(default_factory=list)


def infos(client: Client, database: str, model_ids: Collection[str]) -> dict[str, LoggedModel]:
    """The newest row of each model among `model_ids` that exists, deleted ones included; no tags or metrics."""
    if not model_ids:
        return {}
    rows = client.query(
        f"SELECT {_COLUMNS} FROM {database}.{schema.LOGGED_MODELS} FINAL WHERE model_id IN {{ids:Array(String)}}",
        parameters={"ids": list(model_ids)},
    ).result_rows
    return {row[0]: LoggedModel(*row) for row in rows}


def models(client: Client, database: str, model_ids: Sequence[str]) -> list[LoggedModel]:
    """Whole models (tags, params, metrics), in the order of `model_ids`, skipping ids that do not exist."""
    found = infos(client, database, model_ids)
    if not found:
        return []
    ids = list(found)
    tags = _by_model(
        client,
        f"SELECT model_id, key, value FROM {database}.{schema.LOGGED_MODEL_TAGS} FINAL"
        " WHERE model_id IN {ids:Array(String)} AND deleted = 0 ORDER BY key",
        ids,
    )
    params = _by_model(
        client,
        f"SELECT model_id, key, value FROM {database}.{schema.LOGGED_MODEL_PARAMS} FINAL"
        " WHERE model_id IN {ids:Array(String)} ORDER BY key",
        ids,
    )
    points = metrics_of(client, database, ids)
    result = []
    for model_id in model_ids:
        if (model := found.get(model_id)) is not None:
            model.tags.update(tags[model_id])
            model.params.update(params[model_id])
            model.metrics.extend(points.get(model_id, []))
            result.append(model)
    return result


def metrics_of(client: Client, database: str, model_ids: Sequence[str]) -> dict[str, list[ModelMetric]]:
    """Every distinct point logged for each model, in time order."""
    rows = client.query(
        "SELECT DISTINCT model_id, key, value, timestamp, step, run_id, dataset_name, dataset_digest"
        f" FROM {database}.{schema.METRICS} WHERE model_id IN {{ids:Array(String)}}"
        " ORDER BY model_id, timestamp, step, key, run_id, value",
        parameters={"ids": list(model_ids)},
    ).result_rows
    found: dict[str, list[ModelMetric]] = {}
    for model_id, key, value, timestamp, step, run_id, name, digest in rows:
        found.setdefault(model_id, []).append(ModelMetric(key, float(value), timestamp, step, run_id, name, digest))
    return found


def run_models(client: Client, database: str, run_ids: Sequence[str]) -> dict[str, RunModels]:
    """The models each run used and produced, with an entry for every run."""
    found = {run_id: RunModels() for run_id in run_ids}
    if not run_ids:
        return found
    rows = client.query(
        f"SELECT DISTINCT run_id, direction, model_id, step FROM {database}.{schema.RUN_MODELS}"
        " WHERE run_id IN {ids:Array(String)} ORDER BY run_id, direction, model_id, step",
        parameters={"ids": list(run_ids)},
    ).result_rows
    for run_id, direction, model_id, step in rows:
        if direction == "input":
            found[run_id].inputs.append(model_id)
        else:
            found[run_id].outputs.append((model_id, int(step)))
    return found


@dataclass(frozen=True, slots=True)
class DatasetFilter:
    name: str
    #: Empty matches any digest.
    digest: str = ""


@dataclass(frozen=True, slots=True)
class OrderBy:
    field_name: str
    ascending: bool = True
    dataset_name: str = ""
    dataset_digest: str = ""


def search(
    client: Client,
    database: str,
    experiment_ids: Sequence[str],
    filter_string: str,
    datasets: Sequence[DatasetFilter],
    max_results: int | None,
    order_by: Sequence[OrderBy],
    page_token: str | None,
) -> SearchPage:
    """One page of the active models of `experiment_ids` that match, in MLflow's order."""
    limit = max_results or SEARCH_LOGGED_MODEL_MAX_RESULTS_DEFAULT
    if not 0 < limit <= MAX_SEARCH_RESULTS:
        raise InvalidQueryError(f"max_results must be between 1 and {MAX_SEARCH_RESULTS}, got {limit}")
    if any(not d.name for d in datasets):
        raise InvalidQueryError("`dataset_name` in the `datasets` clause must be specified.")
    token_order = [_token_order(o) for o in order_by] or None
    offset = _offset(page_token, list(experiment_ids), filter_string or None, token_order)
    query = _Search(database, [_experiment_id(e) for e in experiment_ids], datasets)
    with _as_invalid_query():
        for comparison in _parse(parse_filter_string, filter_string, "filter"):
            query.add_filter(comparison.entity.type, comparison.entity.key, comparison.op, comparison.value)
        for order in order_by:
            query.add_order(order)
    params = query.params
    sql = query.sql(params.bind(limit + 1, "UInt64"), params.bind(offset, "UInt64"))
    ids = [str(row[0]) for row in client.query(sql, parameters=params.values).result_rows]
    token = None
    if len(ids) > limit:
        ids = ids[:limit]
        token = SearchLoggedModelsPaginationToken(
            offset=offset + limit,
            experiment_ids=list(experiment_ids),
            filter_string=filter_string or None,
            order_by=token_order,
        ).encode()
    return SearchPage(ids, token)


@dataclass
class _Search:
    database: str
    experiment_ids: list[str]
    datasets: Sequence[DatasetFilter]
    params: _Params = field(default_factory=_Params)
    conditions: list[str] = field(default_factory=list)
    joins: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    has_metric_filter: bool = False

    def add_filter(self, entity: EntityType, key: str, op: str, value: Any) -> None:
        if entity == EntityType.ATTRIBUTE:
            self.conditions.append(self._attribute_condition(key, op, value))
        elif entity == EntityType.METRIC:
            self.has_metric_filter = True
            condition = f"key = {self.params.bind(key, 'String')} AND value {_NUMERIC_OPERATORS[op]} "
            self.conditions.append(f"model_id IN ({self._points(condition + self.params.number(value))})")
        else:
            table = schema.LOGGED_MODEL_PARAMS if entity == EntityType.PARAM else schema.LOGGED_MODEL_TAGS
            deleted = " AND deleted = 0" if entity == EntityType.TAG else ""
            matching = _string_condition("value", op, value, self.params)
            self.conditions.append(
                f"model_id IN (SELECT model_id FROM {self.database}.{table} FINAL"
                f" WHERE key = {self.params.bind(key, 'String')}{deleted} AND {matching})"
            )

    def _attribute_condition(self, key: str, op: str, value: Any) -> str:
        column = _ATTRIBUTES.get(key)
        if column is None:
            raise InvalidQueryError(f"Invalid attribute key '{key}' in the filter string")
        if column in _NUMERIC_ATTRIBUTES:
            return f"{column} {_NUMERIC_OPERATORS[op]} {self.params.number(value)}"
        if column == "status":  # stored as LoggedModelStatus's number; filters name it
            names = [value] if isinstance(value, str) else list(value)
            numbers = [_status_number(n) for n in names]
            if op in ("=", "!=", "IN", "NOT IN"):
                negate = "NOT " if op in ("!=", "NOT IN") else ""
                return f"status {negate}IN {self.params.bind(numbers, 'Array(Int32)')}"
            raise InvalidQueryError(f"Invalid comparison operator for status: {op!r}")
        return _string_condition(column, op, value, self.params)

    def _points(self, condition: str, datasets: Sequence[DatasetFilter] | None = None, select: str = "model_id") -> str:
        """Models with a point meeting `condition` on one of the datasets (of the search, by default)."""
        where = [condition] if condition else []
        scope = self.datasets if datasets is None else datasets
        if scope:
            where.append(f"({' OR '.join(self._dataset(d) for d in scope)})")
        # model_id != '' lets the set index skip every granule of unlinked points.
        where.append("model_id != ''")
        return f"SELECT {select} FROM {self.database}.{schema.METRICS} WHERE {' AND '.join(where)}"

    def _dataset(self, dataset: DatasetFilter) -> str:
        conditions = []
        if dataset.name:
            conditions.append(f"dataset_name = {self.params.bind(dataset.name, 'String')}")
        if dataset.digest:
            conditions.append(f"dataset_digest = {self.params.bind(dataset.digest, 'String')}")
        return f"({' AND '.join(conditions)})"

    def add_order(self, order: OrderBy) -> None:
        direction = "ASC" if order.ascending else "DESC"
        if "." not in order.field_name:
            column = _ATTRIBUTES.get(order.field_name)
            if column is None:
                raise MlflowException.invalid_parameter_value(f"Invalid order by field name: {order.field_name}")
            self.order.append(f"m.{column} {direction}")
            return
        entity, name = order.field_name.split(".", 1)
        if entity != "metrics":
            raise MlflowException.invalid_parameter_value(
                f"Invalid order by field name: {order.field_name}. Only metrics are supported."
            )
        # Each model's latest point of the metric (stock: newest timestamp, then step), models without one last.
        alias = f"o{len(self.joins)}"
        linked = order.dataset_name or order.dataset_digest
        scope = [DatasetFilter(order.dataset_name, order.dataset_digest)] if linked else []
        latest = "model_id, argMax(value, (timestamp, step)) AS v"
        points = self._points(f"key = {self.params.bind(name, 'String')}", scope, latest)
        self.joins.append(f"LEFT JOIN ({points} GROUP BY model_id) AS {alias} ON {alias}.model_id = m.model_id")
        self.order += [f"{alias}.model_id = '' ASC", f"{alias}.v {direction}"]

    def sql(self, limit: str, offset: str) -> str:
        where = [
            f"experiment_id IN {self.params.bind(self.experiment_ids, 'Array(String)')}",
            "lifecycle_stage != 'deleted'",
            *self.conditions,
        ]
        if self.datasets and not self.has_metric_filter:  # stock: models with any point on those datasets
            where.append(f"model_id IN ({self._points('')})")
        ordered = {o.split(" ")[0] for o in self.order}
        order = [*self.order]
        if "m.creation_timestamp" not in ordered:
            order.append("m.creation_timestamp DESC")
        if "m.model_id" not in ordered:
            order.append("m.model_id ASC")
        return (
            f"SELECT m.model_id FROM (SELECT model_id, {', '.join(_unique_columns())}"
            f" FROM {self.database}.{schema.LOGGED_MODELS} FINAL WHERE {' AND '.join(where)}) AS m"
            f" {' '.join(self.joins)} ORDER BY {', '.join(order)} LIMIT {limit} OFFSET {offset}"
        )


def _unique_columns() -> list[str]:
    return sorted(set(_ATTRIBUTES.values()) - {"model_id"})


def _status_number(name: object) -> int:
    """A status as stored, from its name (READY) or its number."""
    text = str(name).upper().removeprefix("LOGGED_MODEL_")
    try:
        status = LoggedModelStatus(text) if not text.isdigit() else LoggedModelStatus.from_int(int(text))
        return int(status.to_int())
    except (ValueError, MlflowException):
        raise InvalidQueryError(f"Invalid logged model status {name!r}") from None


def _token_order(order: OrderBy) -> dict[str, Any]:
    """An order-by as stock's handler and page token spell it."""
    return {
        "field_name": order.field_name,
        "ascending": order.ascending,
        "dataset_name": order.dataset_name or None,
        "dataset_digest": order.dataset_digest or None,
    }


def _offset(
    page_token: str | None, experiment_ids: list[str], filter_string: str | None, order_by: list[dict[str, Any]] | None
) -> int:
    if not page_token:
        return 0
    if len(page_token) > MAX_PAGE_TOKEN_CHARS:
        raise InvalidQueryError("Invalid page token: it is not one this server issued")
    with _as_invalid_query():
        try:
            token = SearchLoggedModelsPaginationToken.decode(page_token)
        except MlflowException:
            raise
        except Exception:
            raise InvalidQueryError("Invalid page token: it is not one this server issued") from None
        token.validate(experiment_ids, filter_string, order_by)
    offset = token.offset
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 2**63:
        raise InvalidQueryError("Invalid page token: it is not one this server issued")
    return offset


def _by_model(client: Client, query: str, model_ids: Sequence[str]) -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {model_id: {} for model_id in model_ids}
    for model_id, key, value in client.query(query, parameters={"ids": list(model_ids)}).result_rows:
        found[model_id][key] = value
    return found
