"""The gRPC `trackhouse.v1.Runs` service: resume and fork for trackhouse's client, served by compat.attempts
(the same instance as the HTTP endpoints, so one node numbers a run's attempts in one place)."""

from __future__ import annotations

from typing import Any

import grpc
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE, ErrorCode

from trackhouse.compat.attempts import AttemptsApi
from trackhouse.compat.errors import as_mlflow
from trackhouse.ingest.batch import RunRow
from trackhouse.ingest.errors import IngestError, RetryableError
from trackhouse.v1 import runs_pb2

SERVICE_NAME = "trackhouse.v1.Runs"
_GRPC_CODES = {
    ErrorCode.Name(RESOURCE_DOES_NOT_EXIST): grpc.StatusCode.NOT_FOUND,
    ErrorCode.Name(TEMPORARILY_UNAVAILABLE): grpc.StatusCode.UNAVAILABLE,
    ErrorCode.Name(INTERNAL_ERROR): grpc.StatusCode.INTERNAL,
}


def runs_service(attempts: AttemptsApi) -> grpc.GenericRpcHandler[Any, Any]:
    async def resume(request: runs_pb2.ResumeRunRequest, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            attempt, row = await attempts.resume_running(request.run_id)
            return runs_pb2.ResumeRunReply(attempt=attempt, run=_ref(row))
        except Exception as exc:
            await _abort(context, exc)
            raise

    async def fork(request: runs_pb2.ForkRunRequest, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            row = await attempts.fork(request.parent_run_id, request.fork_step, request.name, request.run_id or None)
            return runs_pb2.ForkRunReply(run=_ref(row))
        except Exception as exc:
            await _abort(context, exc)
            raise

    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "ResumeRun": grpc.unary_unary_rpc_method_handler(
                resume,
                request_deserializer=runs_pb2.ResumeRunRequest.FromString,
                response_serializer=runs_pb2.ResumeRunReply.SerializeToString,
            ),
            "ForkRun": grpc.unary_unary_rpc_method_handler(
                fork,
                request_deserializer=runs_pb2.ForkRunRequest.FromString,
                response_serializer=runs_pb2.ForkRunReply.SerializeToString,
            ),
        },
    )


def _ref(row: RunRow) -> runs_pb2.RunRef:
    return runs_pb2.RunRef(
        run_id=row.run_id,
        experiment_id=row.experiment_id,
        name=row.name,
        start_time_ms=row.start_time_ms,
        user=row.user,
    )


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> None:
    """Map this service's errors to gRPC codes through the MLflow API's one mapping (compat.errors.as_mlflow), so
    query errors (a run not found, an attempt number contended) answer here as they do over HTTP. Abort raises,
    ending the call."""
    if isinstance(exc, IngestError) and not isinstance(exc, RetryableError):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    error = as_mlflow(exc)
    await context.abort(_GRPC_CODES.get(error.error_code, grpc.StatusCode.INVALID_ARGUMENT), error.message)
