"""MLflow's GraphQL endpoint (POST /graphql), executed on MLflow's own schema (mlflow/server/graphql/).

Stock's root resolvers turn their input into a request message and call the
handler-level function of the matching REST call. trackhouse does the same
through its own REST handlers: a resolver sends the request message to the
app's router as an in-process sub-request (no network, no middleware: the
GraphQL request already passed them), and parses the JSON answer into MLflow's
response message. The schema renders those messages exactly as on a stock
server: camelCase fields, `__typename`, int64 as strings, NaN metrics as null.
The only seams are graphql-core middleware that answers the fields whose stock
resolvers would call Flask handlers, and stock's query-safety check (at most
10 root fields and aliases, depth 10, 1000 selections) runs unchanged before
anything executes.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import math
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlencode

import orjson
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from graphene.types.resolver import dict_or_attr_resolver  # type: ignore[import-untyped]
from graphql import (
    ExecutionContext,
    ExecutionResult,
    GraphQLError,
    GraphQLList,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLOutputType,
    GraphQLResolveInfo,
    GraphQLSchema,
    Undefined,
    execute,
    parse,
    validate,
)
from graphql.language import DocumentNode, FieldNode
from graphql.pyutils import Path
from graphql.type.scalars import serialize_float, serialize_string
from mlflow.exceptions import MlflowException
from mlflow.protos import model_registry_pb2 as registry_pb
from mlflow.protos import service_pb2 as pb
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, ErrorCode
from mlflow.utils.proto_json_utils import parse_dict
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from trackhouse.compat import handlers, wire

#: Where the sub-requests go: the UI's prefix, which every MLflow endpoint is mounted under.
_PREFIX = "/ajax-api/2.0/mlflow/"
#: The parser stops here, so a hostile query costs the event loop little; the UI's largest query has ~200 tokens.
MAX_QUERY_TOKENS = 20_000
#: A sub-request's answer is JSON of one REST call; this bounds what a resolver buffers.
_MAX_ANSWER_BYTES = 256 * 1024 * 1024
#: Stock stores ±Inf metric values as ±DBL_MAX (its SQL store clamps them), so that is what its GraphQL answers.
_DOUBLE_MAX = sys.float_info.max
#: Prepared (parsed, checked, validated) queries kept: the UI's pages send a few dozen distinct ones.
_CACHED_QUERIES = 128
_MAX_CACHED_QUERY_CHARS = 16 * 1024
_METRIC_TYPES = frozenset({"MlflowMetricExtension", "MlflowMetricWithRunId", "MlflowModelMetric", "MlflowMetric"})

Resolver = Callable[..., Awaitable[Any]]


class GraphQlApi:
    def __init__(self) -> None:
        # MLflow's schema lives in mlflow.server, whose import takes seconds: start it now, off the event loop.
        handlers.preload()
        self._middleware = _Resolvers()

    async def handle(self, request: Request) -> Response:
        body = await wire.body(request)
        query, variables, operation = body.get("query"), body.get("variables"), body.get("operationName")
        wrong_types = not isinstance(variables, dict | None) or not isinstance(operation, str | None)
        if not isinstance(query, str) or wrong_types:
            return _failure("A GraphQL request needs a string 'query', and optionally 'variables' and 'operationName'")
        schema = await asyncio.to_thread(_schema)
        try:
            document, refused = _prepared(schema, query)
        except GraphQLError as exc:
            # Stock answers a syntax error with an HTML 500 page; a client can act on this instead.
            return _failure(exc.message)
        result = refused or await _execute(schema, document, variables, operation, request, self._middleware)
        errors = [error.message for error in result.errors] if result.errors else None
        return wire.ok({"data": result.data, "errors": errors})


def _prepared(schema: GraphQLSchema, query: str) -> tuple[DocumentNode, ExecutionResult | None]:
    """The parsed document, and the answer that refuses it (stock's safety check, then validation) if any.

    Both depend on the query's text and the schema alone, and the UI sends the same few queries again and again:
    profiled on GetRun, validating its document was a sixth of the call. So short queries are prepared once.
    """
    if len(query) > _MAX_CACHED_QUERY_CHARS:
        return _prepare(schema, query)
    return _prepare_cached(schema, query)


def _prepare(schema: GraphQLSchema, query: str) -> tuple[DocumentNode, ExecutionResult | None]:
    document = parse(query, max_tokens=MAX_QUERY_TOKENS)
    refused = _check_query_safety(document)
    if refused is None:
        problems = validate(schema, document)
        refused = ExecutionResult(data=None, errors=problems) if problems else None
    return document, refused


_prepare_cached = functools.lru_cache(maxsize=_CACHED_QUERIES)(_prepare)


async def _execute(
    schema: GraphQLSchema,
    document: Any,
    variables: dict[str, Any] | None,
    operation: str | None,
    request: Request,
    middleware: _Resolvers,
) -> ExecutionResult:
    result = execute(
        schema,
        document,
        variable_values=variables,
        operation_name=operation,
        context_value=request,
        middleware=[middleware],
        execution_context_class=_MetricListsContext,
    )
    return await result if isinstance(result, Awaitable) else result


class _Resolvers:
    """graphql-core middleware: trackhouse's answers for the fields whose stock resolvers call Flask handlers."""

    def __init__(self) -> None:
        self._fields: dict[tuple[str, str], Resolver] = {
            ("Query", "mlflowGetExperiment"): _root("GET", "experiments/get", pb.GetExperiment),
            ("Query", "mlflowGetRun"): _root("GET", "runs/get", pb.GetRun),
            ("Query", "mlflowGetMetricHistoryBulkInterval"): _root(
                "GET", "metrics/get-history-bulk-interval", pb.GetMetricHistoryBulkInterval
            ),
            ("Query", "mlflowListArtifacts"): _root("GET", "artifacts/list", pb.ListArtifacts),
            ("Query", "mlflowSearchModelVersions"): _root(
                "GET", "model-versions/search", registry_pb.SearchModelVersions, missing_ok=True
            ),
            ("Query", "mlflowSearchRuns"): _root("POST", "runs/search", pb.SearchRuns),
            ("Mutation", "mlflowSearchRuns"): _root("POST", "runs/search", pb.SearchRuns),
            ("Mutation", "mlflowSearchDatasets"): _root("POST", "experiments/search-datasets", pb.SearchDatasets),
            ("MlflowRunExtension", "experiment"): _run_experiment,
            ("MlflowRunExtension", "modelVersions"): _run_model_versions,
        }

    def resolve(self, next_: Callable[..., Any], root: Any, info: GraphQLResolveInfo, **args: Any) -> Any:
        field = self._fields.get((info.parent_type.name, info.field_name))
        if field is not None:
            return field(root, info, **args)
        value = next_(root, info, **args)
        metric_value = info.field_name == "value" and info.parent_type.name in _METRIC_TYPES
        if metric_value and isinstance(value, float) and math.isinf(value):
            return math.copysign(_DOUBLE_MAX, value)
        return value


def _root(method: str, path: str, message_type: Any, missing_ok: bool = False) -> Resolver:
    """A root field answered by the REST call at `path`, as stock's resolvers call its handlers."""

    async def resolve(_: Any, info: GraphQLResolveInfo, input: Any = None) -> Message:
        request_message = message_type()
        parse_dict(vars(input) if input is not None else {}, request_message)
        return await _call(info.context, method, path, request_message, message_type.Response(), missing_ok)

    return resolve


async def _run_experiment(root: Any, info: GraphQLResolveInfo) -> Message:
    request_message = pb.GetExperiment(experiment_id=root.info.experiment_id)
    answer = pb.GetExperiment.Response()
    await _call(info.context, "GET", "experiments/get", request_message, answer)
    return answer.experiment


async def _run_model_versions(root: Any, info: GraphQLResolveInfo) -> list[Message]:
    request_message = registry_pb.SearchModelVersions(filter=f"run_id='{root.info.run_id}'")
    answer = registry_pb.SearchModelVersions.Response()
    await _call(info.context, "GET", "model-versions/search", request_message, answer, missing_ok=True)
    return list(answer.model_versions)


async def _call(
    request: Request, method: str, path: str, message: Message, response: Message, missing_ok: bool = False
) -> Message:
    """`message` sent to the app's own route for `path`; its JSON answer parsed into `response`.

    With `missing_ok`, a path no route serves answers the empty `response`."""
    fields = MessageToDict(message, preserving_proto_field_name=True)
    body = b""
    query = b""
    if method == "GET":
        query = urlencode(fields, doseq=True).encode()
    else:
        body = orjson.dumps(fields)
    scope = {
        **{k: v for k, v in request.scope.items() if k in ("app", "client", "server", "scheme", "state")},
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "path": _PREFIX + path,
        "raw_path": (_PREFIX + path).encode(),
        "root_path": "",
        "query_string": query,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    }
    status, answer = await _send(request.app.router, scope, body)
    try:
        payload = orjson.loads(answer) if answer.strip() else ({} if status < 400 else None)
    except orjson.JSONDecodeError:
        payload = None  # not an MLflow answer: no route, or a body the edge wrote
    if status == 404 and missing_ok and not isinstance(payload, dict):
        return response  # a service this node does not serve (the registry without a store) has nothing
    if status >= 400:
        raise _error(status, payload)
    _parse_answer(payload, response)
    return response


def _parse_answer(payload: Any, response: Message) -> None:
    """parse_dict(payload, response), with the metrics of a run's data added directly.

    json_format parses field by field in Python: profiled on a run with 5,000 metric keys, it took a third of a
    GetRun. A metric of the plain shape REST answers (key, value, timestamp, step) is added in one call instead;
    anything else goes through parse_dict whole, so its answers and errors are json_format's."""
    runs = _runs_of(payload, response)
    if not runs:
        parse_dict(payload, response)
        return
    metrics: list[list[tuple[str, float, int, int]]] = []
    for run in runs:
        data = run.get("data") if isinstance(run, dict) else None
        plain = _plain_metrics(data.get("metrics", []) if isinstance(data, dict) else [])
        if plain is None:
            parse_dict(payload, response)
            return
        metrics.append(plain)
    stripped = {**payload}
    stripped_runs = [{**run, "data": {k: v for k, v in run["data"].items() if k != "metrics"}} for run in runs]
    if isinstance(response, pb.GetRun.Response):
        stripped["run"] = stripped_runs[0]
    else:
        stripped["runs"] = stripped_runs
    parse_dict(stripped, response)
    messages = [response.run] if isinstance(response, pb.GetRun.Response) else list(getattr(response, "runs"))  # noqa: B009
    for message, plain in zip(messages, metrics, strict=True):
        add = message.data.metrics.add
        for key, value, timestamp, step in plain:
            add(key=key, value=value, timestamp=timestamp, step=step)


def _runs_of(payload: Any, response: Message) -> list[Any]:
    """The runs in a runs/get or runs/search answer whose data has metrics; empty for any other answer."""
    if not isinstance(payload, dict):
        return []
    runs: list[Any]
    if isinstance(response, pb.GetRun.Response):
        runs = [payload.get("run")]
    elif isinstance(response, pb.SearchRuns.Response) and isinstance(payload.get("runs"), list):
        runs = payload["runs"]
    else:
        return []
    with_data = all(isinstance(r, dict) and isinstance(r.get("data"), dict) for r in runs)
    return runs if with_data and any("metrics" in r["data"] for r in runs) else []


#: How json_format reads a double given as a string.
_SPECIAL_DOUBLES = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_INT64 = (-(2**63), 2**63 - 1)
_METRIC_FIELDS = frozenset({"key", "value", "timestamp", "step"})


def _plain_metrics(entries: Any) -> list[tuple[str, float, int, int]] | None:
    """(key, value, timestamp, step) of each metric, or None where one is not of that plain shape.

    Checked a column at a time (a run may have thousands of metrics): keys are strings; values numbers or the
    strings json_format reads as NaN and infinities; timestamps and steps int64. A missing field is its default."""
    if not isinstance(entries, list) or not all(type(e) is dict and e.keys() <= _METRIC_FIELDS for e in entries):
        return None
    keys = [e.get("key", "") for e in entries]
    values = [e.get("value", 0.0) for e in entries]
    timestamps = [e.get("timestamp", 0) for e in entries]
    steps = [e.get("step", 0) for e in entries]
    value_types = set(map(type, values))
    if str in value_types:
        values = [_SPECIAL_DOUBLES.get(v) if type(v) is str else v for v in values]
        value_types = set(map(type, values))
    if not set(map(type, keys)) <= {str} or not value_types <= {float, int}:
        return None
    if not set(map(type, timestamps)) | set(map(type, steps)) <= {int}:
        return None
    if entries and (min(min(timestamps), min(steps)) < _INT64[0] or max(max(timestamps), max(steps)) > _INT64[1]):
        return None
    return list(zip(keys, map(float, values), timestamps, steps, strict=True))


async def _send(app: Any, scope: dict[str, Any], body: bytes) -> tuple[int, bytes]:
    sent = False
    status = 500
    chunks: list[bytes] = []
    size = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.Event().wait()  # no disconnect: the sub-request lives as long as its resolver
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(event: dict[str, Any]) -> None:
        nonlocal status, size
        if event["type"] == "http.response.start":
            status = int(event["status"])
        elif event["type"] == "http.response.body":
            size += len(event.get("body", b""))
            if size > _MAX_ANSWER_BYTES:
                raise MlflowException(f"The answer is over {_MAX_ANSWER_BYTES} bytes", INTERNAL_ERROR)
            chunks.append(event.get("body", b""))

    try:
        await app(scope, receive, send)
    except HTTPException as exc:  # the router's own answers (no route), which the app's middleware would write
        return exc.status_code, b""
    return status, b"".join(chunks)


class _MetricListsContext(ExecutionContext):
    """graphql-core's execution, with lists of metrics completed in one pass.

    graphql-core completes a list item by item and field by field, through the middleware, with a resolve info
    per field: profiled on a run with 5,000 metric keys, that was two thirds of a GetRun. A metric's fields are
    scalars without arguments, so a list of them is answered here with the same resolvers, the same infinity
    clamp as `_Resolvers` and the same serializers. Anything unexpected (an error, a null, another type) goes
    back to graphql-core's own path, which then answers exactly as it always did, errors included.
    """

    def complete_list_value(
        self,
        return_type: GraphQLList[GraphQLOutputType],
        field_nodes: list[FieldNode],
        info: GraphQLResolveInfo,
        path: Path,
        result: Any,
    ) -> Any:
        completed = self._metrics(return_type, field_nodes, info, result)
        if completed is None:
            return super().complete_list_value(return_type, field_nodes, info, path, result)
        return completed

    def _metrics(
        self, return_type: GraphQLList[GraphQLOutputType], field_nodes: list[FieldNode], info: Any, result: Any
    ) -> list[dict[str, Any]] | None:
        item_type = return_type.of_type
        if isinstance(item_type, GraphQLNonNull):
            item_type = item_type.of_type
        if not isinstance(item_type, GraphQLObjectType) or item_type.name not in _METRIC_TYPES:
            return None
        if item_type.is_type_of is not None or not isinstance(result, Iterable) or isinstance(result, str | dict):
            return None
        items = list(result)
        if not all(isinstance(item, Message) for item in items):
            return None  # what the default resolvers read: message fields (a dict or awaitable they would not)
        plan = []
        for name, nodes in self.collect_subfields(item_type, field_nodes).items():
            field_name = nodes[0].name.value
            if field_name == "__typename":
                plan.append((name, field_name, None, None))
                continue
            field = item_type.fields.get(field_name)
            scalar = field.type.of_type if field is not None and isinstance(field.type, GraphQLNonNull) else None
            if field is None or scalar is not None or field.resolve is None or not hasattr(field.type, "serialize"):
                return None  # a non-null or unresolved field: graphql-core knows its errors
            plan.append((name, field_name, field.resolve, field.type.serialize))
        if not plan:
            return None
        try:
            columns = [self._column(item_type.name, items, info, *planned) for planned in plan]
        except Exception:  # graphql-core's own path answers it, with its located error
            return None
        names = [name for name, *_ in plan]
        return [dict(zip(names, row, strict=True)) for row in zip(*columns, strict=True)]

    @staticmethod
    def _column(
        type_name: str,
        items: list[Message],
        info: Any,
        name: str,
        field_name: str,
        resolve: Callable[..., Any] | None,
        serialize: Callable[[Any], Any] | None,
    ) -> Iterable[Any]:
        """One field of every item, resolved and serialized: a column at a time, which costs a third of item
        by item. graphene's default resolver of a message field is getattr, so that is read directly."""
        if resolve is None or serialize is None:
            return itertools.repeat(type_name, len(items))
        if isinstance(resolve, functools.partial) and resolve.func is dict_or_attr_resolver and not resolve.keywords:
            attname, default = resolve.args
            values = [getattr(item, attname, default) for item in items]
        else:
            values = [resolve(item, info) for item in items]
        serialized = _serialized_column(field_name, values, serialize)
        if serialized is not None:
            return serialized
        return [_serialized(field_name, value, serialize) for value in values]


def _serialized_column(field_name: str, values: list[Any], serialize: Callable[[Any], Any]) -> list[Any] | None:
    """`_serialized` of each value, for the scalars of a metric's fields whose serializers are known, where a
    whole column is answered at once: String of str is the str itself, Float of a finite float is the float
    (infinities clamped first, as `_serialized` does), and MLflow's LongString of an int is its str(). None means
    "value by value" (another serializer, or a value these shortcuts do not cover)."""
    types = set(map(type, values))
    present = [v for v in values if v is not None] if type(None) in types else values
    if serialize is serialize_string and types <= {str, type(None)}:
        return values
    if serialize is serialize_float and types <= {float, type(None)}:
        if field_name == "value" and not all(map(math.isfinite, present)):
            values = [math.copysign(_DOUBLE_MAX, v) if v is not None and math.isinf(v) else v for v in values]
            present = [v for v in values if v is not None]
        return values if all(map(math.isfinite, present)) else None
    if _is_long_string(serialize) and types <= {int, type(None)}:
        return [None if v is None else str(v) for v in values] if len(present) < len(values) else list(map(str, values))
    return None


def _is_long_string(serialize: Callable[[Any], Any]) -> bool:
    """MLflow's LongString (mlflow.server.graphql.graphql_custom_scalars: str() of an int64), named here rather
    than imported, because importing mlflow.server takes seconds (handlers.preload does it off the event loop)."""
    qualified = (getattr(serialize, "__module__", None), getattr(serialize, "__qualname__", None))
    return qualified == ("mlflow.server.graphql.graphql_custom_scalars", "LongString.serialize")


def _serialized(field_name: str, value: Any, serialize: Callable[[Any], Any]) -> Any:
    if value is None:
        return None
    if field_name == "value" and isinstance(value, float) and math.isinf(value):
        value = math.copysign(_DOUBLE_MAX, value)  # as `_Resolvers` does on graphql-core's path
    serialized = serialize(value)
    if serialized is Undefined:
        raise ValueError(f"{field_name} does not serialize")
    return serialized


def _error(status: int, payload: Any) -> MlflowException:
    if isinstance(payload, dict) and isinstance(payload.get("message"), str):
        code = payload.get("error_code")
        known = code if isinstance(code, str) and code in ErrorCode.keys() else "INTERNAL_ERROR"  # noqa: SIM118
        return MlflowException(payload["message"], ErrorCode.Value(known))
    return MlflowException(f"The request failed with HTTP status {status}", INTERNAL_ERROR)


def _failure(message: str) -> Response:
    return Response(orjson.dumps({"data": None, "errors": [message]}), 400, media_type="application/json")


def _schema() -> GraphQLSchema:
    return handlers.graphql_schema().graphql_schema  # type: ignore[no-any-return]


def _check_query_safety(document: Any) -> ExecutionResult | None:
    from mlflow.server.graphql.graphql_no_batching import check_query_safety

    return check_query_safety(document)
