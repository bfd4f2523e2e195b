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
import math
import sys
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

import orjson
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from graphql import ExecutionResult, GraphQLError, GraphQLResolveInfo, GraphQLSchema, execute, parse, validate
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
        try:
            document = parse(query, max_tokens=MAX_QUERY_TOKENS)
        except GraphQLError as exc:
            # Stock answers a syntax error with an HTML 500 page; a client can act on this instead.
            return _failure(exc.message)
        schema = await asyncio.to_thread(_schema)
        result = _check_query_safety(document) or await _execute(
            schema, document, variables, operation, request, self._middleware
        )
        errors = [error.message for error in result.errors] if result.errors else None
        return wire.ok({"data": result.data, "errors": errors})


async def _execute(
    schema: GraphQLSchema,
    document: Any,
    variables: dict[str, Any] | None,
    operation: str | None,
    request: Request,
    middleware: _Resolvers,
) -> ExecutionResult:
    problems = validate(schema, document)
    if problems:
        return ExecutionResult(data=None, errors=problems)
    result = execute(
        schema,
        document,
        variable_values=variables,
        operation_name=operation,
        context_value=request,
        middleware=[middleware],
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
    parse_dict(payload, response)
    return response


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
