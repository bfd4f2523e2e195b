"""MLflow's search grammar for `runs/search` and `experiments/search`, as parameterised ClickHouse SQL.

MLflow's own parser reads filter and order-by strings; this module translates what it returns,
following the semantics of MLflow's SQLAlchemy store. User input (keys, values, experiment ids,
page tokens) reaches ClickHouse only as bound parameters: the SQL text holds nothing but names
chosen here (tables, columns, operators from fixed maps, and parameter names p0, p1, ...).
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from mlflow.entities import LifecycleStage
from mlflow.exceptions import MlflowException
from mlflow.store.tracking import SEARCH_MAX_RESULTS_THRESHOLD
from mlflow.utils.search_utils import SearchExperimentsUtils, SearchUtils

from trackhouse.query import attempts, metrics, schema
from trackhouse.query.connection import Client
from trackhouse.query.errors import InvalidQueryError

#: re2, behind LIKE, fails to compile patterns of roughly 70,000 characters (measured); MLflow's
#: longest values (tags) have 8,000, so this leaves room for wildcards and stays clear of re2.
MAX_LIKE_PATTERN_CHARS = 10_000
#: Tokens this module issues are a few dozen characters; anything much longer is not one.
_MAX_TOKEN_CHARS = 200

_T = TypeVar("_T")

# MLflow's search helpers carry no annotations; these give them types. Each check validates the
# comparator for its kind of key, raising MlflowException with MLflow's message, and says whether
# the key is of that kind.
_translate_key_alias: Callable[[str], str] = SearchUtils.translate_key_alias
_is_metric: Callable[[str, str], bool] = SearchUtils.is_metric
_is_param: Callable[[str, str], bool] = SearchUtils.is_param
_is_tag: Callable[[str, str], bool] = SearchUtils.is_tag
_is_dataset: Callable[[str, str], bool] = SearchUtils.is_dataset
_is_string_attribute: Callable[[str, str, str], bool] = SearchUtils.is_string_attribute
_is_numeric_attribute: Callable[[str, str, str], bool] = SearchUtils.is_numeric_attribute
_is_experiment_tag: Callable[[str, str], bool] = SearchExperimentsUtils.is_tag
_is_string_experiment_attribute: Callable[[str, str, str], bool] = SearchExperimentsUtils.is_string_attribute
_is_numeric_experiment_attribute: Callable[[str, str, str], bool] = SearchExperimentsUtils.is_numeric_attribute
_create_page_token: Callable[[int], bytes] = SearchUtils.create_page_token
_parse_page_token: Callable[[str], int] = SearchUtils.parse_start_offset_from_page_token

# The comparators MLflow's parser accepts, each mapped to the only text of it that reaches SQL.
#: A run's latest value of a metric, from metric_latest's packed point.
_LATEST_VALUE = schema.latest_point_sql("latest")[2]
_NUMERIC_OPERATORS = {op: op for op in (">", ">=", "=", "!=", "<", "<=")}
_STRING_OPERATORS = {op: op for op in ("=", "!=", "LIKE", "ILIKE")}
_LIST_OPERATORS = {"IN": "IN", "NOT IN": "NOT IN"}
#: IS NULL holds for the runs that are not among the key's owners; IS NOT NULL for those that are.
_NULL_OPERATORS = {"IS NULL": "NOT IN", "IS NOT NULL": "IN"}

#: Run attributes as columns of the `r` subquery; artifact_uri is derived instead (see _RunQuery).
_RUN_COLUMNS = {
    "run_id": "run_id",
    "run_name": "name",
    "status": "status",
    "user_id": "user",
    "start_time": "start_time",
    "end_time": "end_time",
}
_RUN_SELECT = "run_id, experiment_id, name, status, start_time, end_time, user"
_RUN_NAME_TAG = "mlflow.runName"
#: The keys MLflow's parser allows after `datasets.` (SearchUtils.DATASET_ATTRIBUTES), as dataset_inputs columns.
_DATASET_COLUMNS = {"name": "name", "digest": "digest", "context": "context"}
_NULLABLE_RUN_COLUMNS = {"end_time"}

#: Experiment ids are integers in MLflow, so sort them as numbers: shorter digit strings first.
_EXPERIMENT_ORDER_COLUMNS = {
    "experiment_id": ("length(experiment_id)", "experiment_id"),
    "name": ("name",),
    "creation_time": ("creation_time",),
    "last_update_time": ("last_update_time",),
}
_DEFAULT_EXPERIMENT_ORDER = ("creation_time DESC", "experiment_id ASC")
#: Where the subqueries reading a key's per-run rows may be narrowed to a page's candidate runs (see
#: _leading_page). A comment, so the statement reads the same without it; user text never reaches the SQL.
_WITHIN = "/*within*/"
#: Where the per-key reads of metric_latest leave out resumed and forked runs, and where their shown latest points
#: are added instead (see _RunQuery.use_lineages). Comments too: without lineages the statement is unchanged.
_NOT_LINEAGE = "/*not-lineage*/"
_LINEAGE_ROWS = re.compile(r"/\*lineage-rows:(\{p\d+:String\})\*/")
#: Pages reaching deeper than this many runs are answered by the whole-sort statement alone.
_MAX_LEADING_ROWS = 10_000
#: Rows tied with a page's last beyond this many send it to the whole sort too.
_MAX_LEADING_TIES = 1_000
#: _scan reads 2 x the page's depth and this many more of the key's rows, for runs that fail the filters.
_SCAN_EXTRA = 100
#: The sorts _leading_page answers. A metric sort over 10^5 runs measured no faster that way (its stored rows,
#: restricted to the passing runs, cost as much as the whole sort; benchmarks/search_ab.py), so it sorts all.
#: Adding "metric" would also need leading_sql to read resumed and forked runs' shown points (use_lineages).
_LEADING_KEY_TYPES = frozenset({"parameter", "tag"})


@dataclass(frozen=True, slots=True)
class Page:
    #: Run or experiment ids, in result order.
    ids: list[str]
    #: Pass back as page_token for the next page; None on the last page.
    next_page_token: str | None


def search_runs(
    client: Client,
    database: str,
    experiment_ids: Sequence[str],
    filter_string: str,
    view_type: int,
    max_results: int,
    order_by: Sequence[str],
    page_token: str | None,
) -> Page:
    """One page of the runs of `experiment_ids` matching `filter_string`, ordered like MLflow orders them."""
    _check_max_results(max_results)
    experiments = [_experiment_id(e) for e in experiment_ids]
    stages = LifecycleStage.view_type_to_stages(view_type)
    query = _RunQuery(database)
    with _as_invalid_query():
        for clause in _parse(SearchUtils.parse_search_filter, filter_string, "filter"):
            query.add_filter(clause)
        for clause_text in order_by:
            query.add_order(*_parse(SearchUtils.parse_order_by_for_search_runs, clause_text, "order_by clause"))
    if len(query.ordered_keys) < len(order_by):
        raise InvalidQueryError(f"`order_by` contains duplicate fields: {list(order_by)}")
    offset = _offset(page_token)
    if not experiments or not stages:
        return Page([], None)
    query.scope(experiments, stages)
    if keys := query.metric_keys():
        special = attempts.resumed_or_forked(client, database, experiments)
        if special:
            query.use_lineages(special, metrics.latest(client, database, special, keys))
    return _leading_page(client, query, offset, max_results) or _page(
        client, query.sql(), query.params, offset, max_results
    )


def search_experiments(
    client: Client,
    database: str,
    view_type: int,
    max_results: int,
    filter_string: str,
    order_by: Sequence[str],
    page_token: str | None,
) -> Page:
    """One page of the experiments matching `filter_string`, ordered like MLflow orders them."""
    _check_max_results(max_results)
    params = _Params()
    stages = LifecycleStage.view_type_to_stages(view_type)
    where = ["lifecycle_stage IN " + params.bind(stages, "Array(String)")]
    with _as_invalid_query():
        for clause in _parse(SearchExperimentsUtils.parse_search_filter, filter_string, "filter"):
            where.append(_experiment_condition(clause, params, database))
        order = _experiment_order(order_by)
    offset = _offset(page_token)
    sql = (
        f"SELECT experiment_id FROM {database}.{schema.EXPERIMENTS} FINAL"
        f" WHERE {' AND '.join(where)} ORDER BY {', '.join(order)}"
    )
    return _page(client, sql, params, offset, max_results)


class _Params:
    """Bound parameters, named p0, p1, ... in the order they are bound."""

    def __init__(self) -> None:
        self.values: dict[str, object] = {}

    def bind(self, value: object, type_name: str) -> str:
        name = f"p{len(self.values)}"
        self.values[name] = value
        return f"{{{name}:{type_name}}}"

    def number(self, value: int | float) -> str:
        """A bound number. Integers stay exact in Int64; beyond it they compare as the float they round to."""
        if isinstance(value, int) and -(2**63) <= value < 2**63:
            return self.bind(value, "Int64")
        try:
            return self.bind(float(value), "Float64")
        except OverflowError:
            return self.bind(math.copysign(math.inf, value), "Float64")


@dataclass
class _RunQuery:
    """A runs/search statement assembled from parsed filter and order-by clauses."""

    database: str
    params: _Params = field(default_factory=_Params)
    #: Conditions on the columns of runs, applied to the newest row of each run.
    conditions: list[str] = field(default_factory=list)
    #: Conditions on artifact_uri, which needs the run's experiment.
    outer_conditions: list[str] = field(default_factory=list)
    joins: list[str] = field(default_factory=list)
    #: Metric filters as (key, comparison of the key's latest value), placed by sql() (see there).
    metric_filters: list[tuple[str, str]] = field(default_factory=list)
    #: The join alias of each metric the runs are ordered by.
    metric_joins: dict[str, str] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    ordered_keys: set[tuple[str, str]] = field(default_factory=set)
    needs_experiment: bool = False
    #: The first order_by key, when it is a metric, param or tag (see _leading_page).
    leading: _Leading | None = None
    #: The experiment and lifecycle conditions, bound once by scope().
    scoped: list[str] = field(default_factory=list)
    #: Bound resumed and forked runs, and their shown latest points (see use_lineages); "" when there are none.
    lineage_runs: str = ""
    lineage_rows: str = ""

    def add_filter(self, clause: dict[str, Any]) -> None:
        key_type, comparator, value = clause["type"], clause["comparator"].upper(), clause["value"]
        key = _translate_key_alias(clause["key"])
        if _is_string_attribute(key_type, key, comparator) or (key == _RUN_NAME_TAG and _is_tag(key_type, comparator)):
            self._add_string_attribute(key, comparator, value)
        elif _is_numeric_attribute(key_type, key, comparator):
            self.conditions.append(f"{_RUN_COLUMNS[key]} {_NUMERIC_OPERATORS[comparator]} {self.params.number(value)}")
        elif _is_metric(key_type, comparator):
            self.metric_filters.append((key, f"{_NUMERIC_OPERATORS[comparator]} {self.params.number(_float(value))}"))
        elif _is_param(key_type, comparator) or _is_tag(key_type, comparator):
            self._add_param_or_tag(key_type, key, comparator, value)
        elif _is_dataset(key_type, comparator):
            # As MLflow's SQL store: a run matches when any of its dataset inputs does; `context` is
            # the input's mlflow.data.context tag, and an input without one matches no comparison.
            matching = _string_condition(_DATASET_COLUMNS[key], comparator, value, self.params)
            self.conditions.append(
                f"run_id IN (SELECT run_id FROM {self.database}.{schema.DATASET_INPUTS} WHERE {matching})"
            )
        else:
            raise InvalidQueryError(f"Invalid search expression type '{key_type}'")

    def _add_string_attribute(self, key: str, comparator: str, value: Any) -> None:
        if key in (_RUN_NAME_TAG, "run_name"):
            # MLflow matches the run name through the mlflow.runName tag, which a run without a name lacks.
            if comparator in _NULL_OPERATORS:
                self.conditions.append("name = ''" if comparator == "IS NULL" else "name != ''")
                return
            self.conditions.append(f"name != '' AND {_string_condition('name', comparator, value, self.params)}")
        elif key == "artifact_uri":
            self.needs_experiment = True
            self.outer_conditions.append(_string_condition(_ARTIFACT_URI, comparator, value, self.params))
        else:
            self.conditions.append(_string_condition(_RUN_COLUMNS[key], comparator, value, self.params))

    def _add_param_or_tag(self, key_type: str, key: str, comparator: str, value: Any) -> None:
        source = self._key_source(key_type, key)
        if comparator in _NULL_OPERATORS:
            self.conditions.append(f"run_id {_NULL_OPERATORS[comparator]} (SELECT run_id FROM {source})")
        else:
            matching = _string_condition("value", comparator, value, self.params)
            self.conditions.append(f"run_id IN (SELECT run_id FROM {source} AND {matching})")

    def _latest(self, key: str) -> str:
        """Each run's latest point of metric `key`: its maximum (step, timestamp, value).

        Unmerged parts may hold several rows per run. Reading one key's range of metric_latest_by_key, in run order,
        and keeping each run's first row cost 12-13 ms over 100,000 runs whether the key's rows were in one part or
        in six, and 20 with ten more small parts (a sweep being written). FINAL took 5.5, 23 and 30; GROUP BY run_id
        37, 23 and 24 (measured in-process). Stores at rest have a handful of parts: ClickHouse merges parts of
        similar sizes only. Resumed and forked runs are left out here and added once each (_place_lineages).
        """
        bound = self.params.bind(key, "String")
        return (
            f"SELECT run_id, latest FROM {self.database}.{schema.LATEST_BY_KEY}"
            f" WHERE key = {bound}{_WITHIN}{_NOT_LINEAGE} ORDER BY run_id, latest DESC LIMIT 1 BY run_id"
            f"/*lineage-rows:{bound}*/"
        )

    def metric_keys(self) -> set[str]:
        """The metrics the search filters or sorts on."""
        return {key for key, _ in self.metric_filters} | set(self.metric_joins)

    def use_lineages(self, run_ids: Sequence[str], shown: dict[str, dict[str, tuple[int, int, float]]]) -> None:
        """Compare resumed and forked runs by the latest points their reads show (query.metrics.latest), not by
        metric_latest's latest stored ones: a superseded attempt's later step, or no row for a fork's parent's
        keys. `shown` is run -> key -> (step, timestamp, value)."""
        rows = [
            (key, run_id, step, timestamp, value)
            for run_id, points in shown.items()
            for key, (step, timestamp, value) in points.items()
        ]
        self.lineage_runs = self.params.bind(sorted(run_ids), "Array(String)")
        self.lineage_rows = self.params.bind(rows, "Array(Tuple(String, String, Int64, Int64, Float64))")

    def _place_lineages(self, statement: str) -> str:
        if not self.lineage_runs:
            return statement
        packed = schema.pack_sql("t.3", "t.4", schema.value_order_sql("t.5", schema.NAN_LOW))
        statement = statement.replace(_NOT_LINEAGE, f" AND run_id NOT IN {self.lineage_runs}")
        return _LINEAGE_ROWS.sub(
            lambda m: (
                f" UNION ALL SELECT t.2 AS run_id, {packed} AS latest FROM"
                f" (SELECT arrayJoin({self.lineage_rows}) AS t) WHERE t.1 = {m.group(1)}"
            ),
            statement,
        )

    def _key_source(self, key_type: str, key: str) -> str:
        """FROM and WHERE of the rows holding `key` for the runs that have it."""
        bound = self.params.bind(key, "String")
        if key_type == "parameter":
            # Each run's winning value (schema.PARAM_VALUE): a losing claim of another node never matches.
            return (
                f"(SELECT run_id, {schema.PARAM_VALUE} AS value FROM {self.database}.{schema.PARAMS_BY_KEY}"
                f" WHERE key = {bound}{_WITHIN} GROUP BY run_id) WHERE 1"
            )
        # FINAL first, then the filter: the newest version of a tag decides, and a tombstone hides it.
        return f"{self.database}.{schema.TAGS_BY_KEY} FINAL WHERE key = {bound} AND deleted = 0{_WITHIN}"

    def _key_values(self, key_type: str, key: str) -> str:
        """Each run's value of param or tag `key`, one row per run that has it, flagged `present`.

        Flat, and grouped once: the winning param per run, or the newest tag per (run, key) by FINAL. Selecting
        from _key_source and grouping again cost a third of a param sort over 10^5 runs (measured).
        """
        bound = self.params.bind(key, "String")
        if key_type == "parameter":
            return (
                f"SELECT run_id, {schema.PARAM_VALUE} AS value, 1 AS present"
                f" FROM {self.database}.{schema.PARAMS_BY_KEY} WHERE key = {bound}{_WITHIN} GROUP BY run_id"
            )
        return (
            f"SELECT run_id, value, 1 AS present FROM {self.database}.{schema.TAGS_BY_KEY} FINAL"
            f" WHERE key = {bound} AND deleted = 0{_WITHIN}"
        )

    def add_order(self, key_type: str, key: str, ascending: bool) -> None:
        key = _translate_key_alias(key)
        self.ordered_keys.add((key_type, key))
        direction = "ASC" if ascending else "DESC"
        if key_type == "attribute" or (key_type, key) == ("tag", _RUN_NAME_TAG):
            self.order.extend(self._attribute_order(key, direction))
        elif key_type in ("metric", "parameter", "tag"):
            self.order.extend(self._joined_order(key_type, key, direction))
        else:
            raise InvalidQueryError(f"Invalid identifier type '{key_type}'")

    def _attribute_order(self, key: str, direction: str) -> list[str]:
        # As in MLflow, runs without a value sort last in both directions.
        if key == "artifact_uri":
            self.needs_experiment = True
            return [f"{_ARTIFACT_URI} {direction}"]
        if key in (_RUN_NAME_TAG, "run_name"):
            return ["r.name = '' ASC", f"r.name {direction}"]
        column = f"r.{_RUN_COLUMNS[key]}"
        if key in _NULLABLE_RUN_COLUMNS:
            return [f"isNull({column}) ASC", f"{column} {direction}"]
        return [f"{column} {direction}"]

    def _joined_order(self, key_type: str, key: str, direction: str) -> list[str]:
        alias = f"o{len(self.joins)}"
        if key_type == "metric":
            self.metric_joins[key] = alias
            source = f"SELECT run_id, {_LATEST_VALUE} AS value, 1 AS present FROM ({self._latest(key)})"
            # MLflow: numbers, then NaN, then runs without the metric, whatever the direction.
            rank = f"if({alias}.present = 1, if(isNaN({alias}.value), 1, 0), 2)"
        else:
            source = self._key_values(key_type, key)
            rank = f"if({alias}.present = 1, 0, 1)"
        if not self.order:
            self.leading = _Leading(key_type, key, direction, alias, rank)
        self.joins.append(f"LEFT JOIN ({source}) AS {alias} ON {alias}.run_id = r.run_id")
        return [f"{rank} ASC", f"{alias}.value {direction}"]

    def scope(self, experiment_ids: list[str], stages: list[str]) -> None:
        self.scoped = [
            "experiment_id IN " + self.params.bind(experiment_ids, "Array(String)"),
            "lifecycle_stage IN " + self.params.bind(stages, "Array(String)"),
        ]

    def _runs_where(self) -> list[str]:
        """Conditions on each run's newest row: scope, attributes, params, tags, datasets, unsorted metrics."""
        where = [*self.scoped, *self.conditions]
        for key, comparison in self.metric_filters:
            if key not in self.metric_joins:
                where.append(f"run_id IN (SELECT run_id FROM ({self._latest(key)}) WHERE {_LATEST_VALUE} {comparison})")
        return where

    def has_leading(self) -> bool:
        """Whether _leading_page may answer: a leading key of a kind it answers, and no artifact_uri filter
        (which needs the experiment)."""
        return self.leading is not None and self.leading.key_type in _LEADING_KEY_TYPES and not self.needs_experiment

    def passing_sql(self, within: str = "") -> str:
        """The runs passing every filter but those on the leading metric's own value."""
        where = " AND ".join(self._runs_where())
        statement = f"SELECT run_id FROM {self.database}.{schema.RUNS} FINAL WHERE {where}{within}"
        return self._place_lineages(statement.replace(_WITHIN, within))

    def leading_sql(self, rows: str, cap: str | None) -> str:
        """The leading key's stored rows in its order, as (run_id, rank, sort value, cutoff value): with `cap`, the
        first `rows` of the runs passing every filter and their ties (at most `cap` in all); without, the first
        `rows` of every run.

        The rows are read as stored, without merging each run's versions (the saving: no GROUP BY, FINAL or join
        over every run). A run's true value is one of its stored rows, so a run missing from these rows sorts
        no earlier than the last of them; _leading_page checks the rest.
        """
        lead = self.leading
        assert lead is not None
        bound = self.params.bind(lead.key, "String")
        where = [f"run_id IN ({self.passing_sql()})"] if cap is not None else []
        if lead.key_type == "metric":
            table = f"{self.database}.{schema.LATEST_BY_KEY}"
            source = f"SELECT run_id, {_LATEST_VALUE} AS value FROM {table} WHERE key = {bound}"
            rank = "if(isNaN(value), 1, 0)"
            # NaNs tie among themselves, and -0 with 0, as the final ORDER BY compares them.
            sort_value = "if(isNaN(value) OR value = 0, 0., value)"
            cutoff = "value"
            where += [f"value {comparison}" for key, comparison in self.metric_filters if key == lead.key]
        else:
            table = schema.PARAMS_BY_KEY if lead.key_type == "parameter" else schema.TAGS_BY_KEY
            tombstone = "" if lead.key_type == "parameter" else " AND deleted = 0"
            source = f"SELECT run_id, value FROM {self.database}.{table} WHERE key = {bound}{tombstone}"
            rank, sort_value, cutoff = "0", "value", "hex(value)"
        order = f"ORDER BY rank ASC, sort_value {lead.direction}"
        statement = f"SELECT run_id, {rank} AS rank, {sort_value} AS sort_value, {cutoff} FROM ({source})"
        if where:
            statement += f" WHERE {' AND '.join(where)}"
        if cap is None:
            return f"{statement} {order} LIMIT {rows}"
        return f"SELECT * FROM ({statement} {order} LIMIT {rows} WITH TIES) {order} LIMIT {cap}"

    def within_cutoff(self, rank: int, value: object) -> str:
        """Whether a run's leading value sorts no later than the phase-one cutoff (rank, value)."""
        lead = self.leading
        assert lead is not None
        if lead.key_type == "metric":
            bound = self.params.bind(value, "Float64")
        else:
            bound = f"unhex({self.params.bind(value, 'String')})"
        rank_bound = self.params.bind(rank, "UInt8")
        op = ">=" if lead.direction == "DESC" else "<="
        return (
            f"({lead.rank} < {rank_bound} OR ({lead.rank} = {rank_bound}"
            f" AND ({lead.rank} != 0 OR {lead.alias}.value {op} {bound})))"
        )

    def leading_columns(self) -> str:
        """Each run's leading rank and value as statement columns, for sorts_within (params and tags in hex)."""
        lead = self.leading
        assert lead is not None
        value = f"{lead.alias}.value" if lead.key_type == "metric" else f"hex({lead.alias}.value)"
        return f"{lead.rank}, {value}"

    def sorts_within(self, rank: int, value: object, cutoff: tuple[int, object]) -> bool:
        """within_cutoff, in Python, for a row of leading_columns. A param's or tag's value is compared in hex, which
        orders as its bytes do (as ClickHouse orders strings); a metric's as a float (NaN ranks apart, -0 = 0)."""
        lead = self.leading
        assert lead is not None
        cutoff_rank, cutoff_value = cutoff
        if rank != cutoff_rank:
            return rank < cutoff_rank
        if rank != 0:
            return True
        return bool(value >= cutoff_value if lead.direction == "DESC" else value <= cutoff_value)  # type: ignore[operator]

    def requires_leading_key(self) -> bool:
        """Whether every matching run has the leading key: a filter on the same metric."""
        lead = self.leading
        return lead is not None and lead.key_type == "metric" and any(k == lead.key for k, _ in self.metric_filters)

    def sql(self, within: str = "", select: str = "r.run_id") -> str:
        """The statement; `within` narrows every per-key read to some runs (" AND run_id IN ...")."""
        where = self._runs_where()
        if within:
            where.append(within.removeprefix(" AND "))
        outer_conditions = list(self.outer_conditions)
        for key, comparison in self.metric_filters:
            alias = self.metric_joins.get(key)
            if alias is not None:
                # The UI filters and sorts by the same metric: test the value the sort already joined, rather
                # than read the key's latest points a second time (half the time over 10^5 runs; measured).
                outer_conditions.append(f"{alias}.present = 1 AND {alias}.value {comparison}")
        runs = f"SELECT {_RUN_SELECT} FROM {self.database}.{schema.RUNS} FINAL WHERE {' AND '.join(where)}"
        joins = list(self.joins)
        if self.needs_experiment:
            joins.insert(
                0,
                f"LEFT JOIN (SELECT experiment_id, artifact_location FROM {self.database}.{schema.EXPERIMENTS} FINAL)"
                " AS e ON e.experiment_id = r.experiment_id",
            )
        order = list(self.order)
        if ("attribute", "start_time") not in self.ordered_keys:
            order.append("r.start_time DESC")
        order.append("r.run_id ASC")
        outer_where = f" WHERE {' AND '.join(outer_conditions)}" if outer_conditions else ""
        statement = f"SELECT {select} FROM ({runs}) AS r {' '.join(joins)}{outer_where} ORDER BY {', '.join(order)}"
        return self._place_lineages(statement.replace(_WITHIN, within))


@dataclass(frozen=True, slots=True)
class _Leading:
    """The first order_by key of a runs search, when it is a metric, param or tag."""

    key_type: str
    key: str
    direction: str
    #: The join alias of its values in the statement, and its rank there (values, then NaN, then missing).
    alias: str
    rank: str


def _leading_page(client: Client, query: _RunQuery, offset: int, max_results: int) -> Page | None:
    """A page of a search led by a param or tag sort, from the runs that can be on it; None to sort all.

    Sorting every matching run by a joined param cost about 120-200 ms over 10^5 runs (measured). Instead:
    1. Find candidates among the leading key's stored rows, read as stored (no merge of versions, no join): the
       first `need` rows of passing runs, and the rows tied with the last of them (see _scan, _filtered).
    2. Order the candidates by the full statement, with each run's true (merged) values, and flag the runs
       that sort no later than the last row of step 1 (the cutoff).
    A run that is not a candidate has every stored row, so its true value too, strictly after the cutoff. So when
    the first `need` runs of step 2 are all flagged, no other run can come before any of them: they are the
    answer. Otherwise (a stale version took a place in step 1; fewer matching rows than `need`) the whole sort
    answers, unless every matching run must have the key (a filter on the same metric): then step 1 saw them all.
    """
    need = offset + max_results + 1
    if need > _MAX_LEADING_ROWS or not query.has_leading():
        return None
    found = _scan(client, query, need)
    if found == "tied":
        return None
    if found is None:
        found = _filtered(client, query, need)
        if found is None:
            return None
    candidates, cutoff, ordered = found
    if ordered is None:
        within = f" AND run_id IN {query.params.bind(candidates, 'Array(String)')}"
        flag = "1" if cutoff is None else query.within_cutoff(*cutoff)
        limit = query.params.bind(need, "UInt64")
        statement = f"{query.sql(within, f'r.run_id, {flag}')} LIMIT {limit}"
        rows = [(str(row[0]), bool(row[1])) for row in _rows(client, statement, query.params)]
    else:
        # _scan ordered a superset of the candidates: the statement's order is total, so the candidates' rows keep
        # theirs, as the statement over the candidates alone would give them.
        chosen = set(candidates)
        rows = [
            (run_id, cutoff is None or query.sorts_within(rank, value, cutoff))
            for run_id, rank, value in ordered
            if run_id in chosen
        ][:need]
    if cutoff is not None and (len(rows) < need or not all(flagged for _, flagged in rows)):
        return None
    ids = [run_id for run_id, _ in rows[offset:]]
    return Page(ids[:max_results], _token(offset + max_results) if len(ids) > max_results else None)


#: Candidate runs, the cutoff (rank, value) they were chosen by (none when they are every matching run), and when
#: _scan found them, every scanned run that passes the filters, in the statement's order, as (run, rank, value).
_Candidates = tuple[list[str], tuple[int, object] | None, list[tuple[str, int, object]] | None]


def _scan(client: Client, query: _RunQuery, need: int) -> _Candidates | Literal["tied"] | None:
    """Candidates from the first rows of the key over all runs, kept when their run passes the filters.

    The cheap way when most runs pass (the UI's usual filters): the first rows come off a top-N sort of the key's
    rows alone, and the full statement over their runs tells which pass and orders them, in one read (a separate
    read of the passing runs cost 15 of a param sort's 70 ms over 10^5 runs; measured). None when too few pass;
    "tied" when the ties of the cutoff run past the rows read (a tag every run has alike), which the whole sort
    answers better.
    """
    scan = 2 * need + _SCAN_EXTRA
    rows = _rows(client, query.leading_sql(query.params.bind(scan, "UInt64"), None), query.params)
    every_row = len(rows) < scan
    if not every_row and (rows[need - 1][1], rows[need - 1][2]) == (rows[-1][1], rows[-1][2]):
        # The need-th passing row sorts between these two, so it ties with the last row read: "tied" below, or
        # too few passing rows. Either way the whole sort answers; it is known before reading the runs.
        return "tied"
    ids = list(dict.fromkeys(str(row[0]) for row in rows))
    within = f" AND run_id IN {query.params.bind(ids, 'Array(String)')}"
    ordered = [
        (str(run_id), int(rank), value)
        for run_id, rank, value in _rows(
            client, query.sql(within, f"r.run_id, {query.leading_columns()}"), query.params
        )
    ]
    passing = {run_id for run_id, _, _ in ordered}
    kept = [row for row in rows if str(row[0]) in passing]
    if len(kept) < need:
        if every_row and query.requires_leading_key():
            return list(dict.fromkeys(str(row[0]) for row in kept)), None, ordered
        return None
    last = kept[need - 1]
    tied = [i for i, row in enumerate(kept) if (row[1], row[2]) == (last[1], last[2])]
    if not every_row and (rows[-1][1], rows[-1][2]) == (last[1], last[2]):
        return "tied"
    chosen = kept[: tied[-1] + 1]
    return list(dict.fromkeys(str(row[0]) for row in chosen)), (last[1], last[3]), ordered


def _filtered(client: Client, query: _RunQuery, need: int) -> _Candidates | None:
    """Candidates from the first rows of the key among the runs passing the filters (a selective filter)."""
    # Ties may be many: beyond the cap, they are better sorted whole than sent to Python.
    cap = need + _MAX_LEADING_TIES
    statement = query.leading_sql(query.params.bind(need, "UInt64"), query.params.bind(cap, "UInt64"))
    rows = _rows(client, statement, query.params)
    if len(rows) >= cap:
        return None
    ids = list(dict.fromkeys(str(row[0]) for row in rows))
    if len(rows) < need:
        return (ids, None, None) if query.requires_leading_key() else None
    return ids, (rows[-1][1], rows[-1][3]), None


#: As query.runs derives it: the experiment's artifact location, or the proxied default, then the run.
_ARTIFACT_URI = (
    "concat(if(e.artifact_location = '', concat('mlflow-artifacts:/', r.experiment_id), e.artifact_location),"
    " '/', r.run_id, '/artifacts')"
)


def _string_condition(column: str, comparator: str, value: Any, params: _Params) -> str:
    if comparator in _LIST_OPERATORS:
        if not isinstance(value, tuple | list) or not all(isinstance(v, str) for v in value):
            raise InvalidQueryError(f"'{comparator}' expects a list of quoted strings")
        return f"{column} {_LIST_OPERATORS[comparator]} {params.bind(list(value), 'Array(String)')}"
    if not isinstance(value, str):
        raise InvalidQueryError(f"'{comparator}' expects a single quoted string")
    if comparator in ("LIKE", "ILIKE"):
        if len(value) > MAX_LIKE_PATTERN_CHARS:
            raise InvalidQueryError(f"{comparator} patterns are limited to {MAX_LIKE_PATTERN_CHARS} characters")
        # MLflow's patterns have no escape character; ClickHouse's have the backslash, so make it literal.
        value = value.replace("\\", "\\\\")
    return f"{column} {_STRING_OPERATORS[comparator]} {params.bind(value, 'String')}"


def _experiment_condition(clause: dict[str, Any], params: _Params, database: str) -> str:
    key_type, key, comparator, value = clause["type"], clause["key"], clause["comparator"].upper(), clause["value"]
    if key_type == "attribute" and key == "experiment_id":
        if comparator not in ("=", "!=", "IN", "NOT IN"):
            raise InvalidQueryError(f"Invalid comparator for experiment_id: {clause['comparator']}")
        ids = [_experiment_id(v) for v in value] if isinstance(value, tuple) else _experiment_id(value)
        return _string_condition("experiment_id", comparator, ids, params)
    if _is_numeric_experiment_attribute(key_type, key, comparator):
        if isinstance(value, float) or comparator not in _NUMERIC_OPERATORS:
            raise InvalidQueryError(f"Invalid value for numeric attribute '{key}': {str(value)!r}")
        return f"{key} {_NUMERIC_OPERATORS[comparator]} {params.number(value)}"
    if _is_string_experiment_attribute(key_type, key, comparator):
        if comparator not in _STRING_OPERATORS:
            raise InvalidQueryError(f"Invalid comparator for string attribute: {clause['comparator']}")
        return _string_condition(key, comparator, value, params)
    if _is_experiment_tag(key_type, comparator):
        source = (
            f"SELECT experiment_id FROM {database}.{schema.EXPERIMENT_TAGS} FINAL"
            f" WHERE key = {params.bind(key, 'String')} AND deleted = 0"
        )
        if comparator in _NULL_OPERATORS:
            return f"experiment_id {_NULL_OPERATORS[comparator]} ({source})"
        if comparator not in _STRING_OPERATORS:
            raise InvalidQueryError(f"Invalid comparator for tag: {clause['comparator']}")
        return f"experiment_id IN ({source} AND {_string_condition('value', comparator, value, params)})"
    raise InvalidQueryError(f"Invalid token type: {key_type}")


def _experiment_order(order_by: Sequence[str]) -> list[str]:
    order: list[str] = []
    keys: set[str] = set()
    for clause_text in order_by or _DEFAULT_EXPERIMENT_ORDER:
        parse = SearchExperimentsUtils.parse_order_by_for_search_experiments
        key_type, key, ascending = _parse(parse, clause_text, "order_by clause")
        if key_type != "attribute":
            raise InvalidQueryError(f"Invalid order_by entity: {key_type}")
        keys.add(key)
        order.extend(f"{column} {'ASC' if ascending else 'DESC'}" for column in _EXPERIMENT_ORDER_COLUMNS[key])
    if "experiment_id" not in keys:
        order.extend(f"{column} DESC" for column in _EXPERIMENT_ORDER_COLUMNS["experiment_id"])
    return order


#: Search statements join each sorted or filtered key's values to the runs by run_id, 10^5 rows a side in a large
#: experiment. A merge join that sorts the right side ran them 10-35% faster than the default hash join over the
#: UI's searches on the uimix --full store (a metric filter + sort over 10^5 runs: 88 -> 55 ms median; alternated in
#: one process), and no slower on any other search measured. Each side is at most the scope's runs.
JOINS = {"join_algorithm": "partial_merge"}


def _rows(client: Client, statement: str, params: _Params) -> Sequence[Sequence[Any]]:
    """A search statement's rows: every search statement runs with its bound parameters and JOINS."""
    rows: Sequence[Sequence[Any]] = client.query(statement, parameters=params.values, settings=JOINS).result_rows
    return rows


def _page(client: Client, sql: str, params: _Params, offset: int, max_results: int) -> Page:
    # One row beyond the page tells whether another page follows.
    limit = params.bind(max_results + 1, "UInt64")
    skip = params.bind(offset, "UInt64")
    rows = _rows(client, f"{sql} LIMIT {limit} OFFSET {skip}", params)
    ids = [str(row[0]) for row in rows[:max_results]]
    return Page(ids, _token(offset + max_results) if len(rows) > max_results else None)


def _check_max_results(max_results: int) -> None:
    if isinstance(max_results, bool) or not isinstance(max_results, int) or max_results < 1:
        raise InvalidQueryError(
            f"Invalid value {max_results} for parameter 'max_results' supplied. It must be a positive integer"
        )
    if max_results > SEARCH_MAX_RESULTS_THRESHOLD:
        raise InvalidQueryError(
            f"Invalid value {max_results} for parameter 'max_results' supplied."
            f" It must be at most {SEARCH_MAX_RESULTS_THRESHOLD}"
        )


def _experiment_id(value: object) -> str:
    """MLflow's experiment ids are integers: '007' means experiment 7, and 'abc' is no id at all."""
    try:
        return str(int(str(value)))
    except ValueError:
        raise InvalidQueryError(f"Invalid experiment ID '{value}'. Experiment ID must be a valid integer.") from None


@contextmanager
def _as_invalid_query() -> Iterator[None]:
    """MLflow's checks raise MlflowException; callers get InvalidQueryError with MLflow's message."""
    try:
        yield
    except MlflowException as error:
        raise InvalidQueryError(error.message) from error


def _parse(parse: Callable[[str], _T], text: str, what: str) -> _T:
    try:
        text.encode()
    except UnicodeEncodeError:
        # JSON can carry lone surrogates, which no UTF-8 driver can send.
        raise InvalidQueryError(f"Invalid {what}: it is not valid Unicode text") from None
    try:
        return parse(text)
    except MlflowException:
        raise
    except Exception as error:
        # sqlparse, shlex and ast raise their own errors on some malformed input.
        raise InvalidQueryError(f"Invalid {what} {text!r}: it could not be parsed") from error


def _float(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise InvalidQueryError(f"Expected numeric value type for metric. Found {value}") from None


def _token(offset: int) -> str:
    return _create_page_token(offset).decode()  # stock's tokens, byte for byte


def _offset(page_token: str | None) -> int:
    """The offset in a page token, with stock's messages for the tokens stock rejects (its parser's own).

    Stock's parser also takes tokens it never issues ({"offset": "10"}, 2.5, true, a negative number) and
    fails with a 500 on others (a JSON list); those get an invalid-token error here.
    """
    if not page_token:
        return 0
    if len(page_token) > _MAX_TOKEN_CHARS:
        raise InvalidQueryError("Invalid page token, it is longer than any this server issues")
    try:
        _parse_page_token(page_token)
        parsed = json.loads(base64.b64decode(page_token))
        offset = parsed["offset"]
    except MlflowException as error:
        raise InvalidQueryError(error.message) from None
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError):
        raise InvalidQueryError("Invalid page token, could not parse it") from None
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 < offset < 2**63:
        raise InvalidQueryError(f"Invalid page token, parsed value={parsed}")
    return offset
