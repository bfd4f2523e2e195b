"""MLflow's error JSON at the HTTP edge: every error the API raises is mapped here, once.

MLflow answers `{"error_code": ..., "message": ...}` with a status per code
(mlflow.protos.databricks_pb2 codes; MlflowException knows the statuses).
"""

from __future__ import annotations

import logging

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INTERNAL_ERROR,
    INVALID_PARAMETER_VALUE,
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
    TEMPORARILY_UNAVAILABLE,
)
from starlette.responses import Response

from trackhouse.compat.limits import BodyTooLarge
from trackhouse.ingest.errors import PermanentError, RetryableError
from trackhouse.query.errors import ContendedError, InvalidQueryError, NotFoundError

log = logging.getLogger(__name__)

__all__ = [
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_ALREADY_EXISTS",
    "RESOURCE_DOES_NOT_EXIST",
    "invalid",
    "not_found",
    "to_response",
]


def invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def not_found(message: str) -> MlflowException:
    return MlflowException(message, error_code=RESOURCE_DOES_NOT_EXIST)


def as_mlflow(exc: Exception) -> MlflowException:
    """The MLflow error a trackhouse error means to an MLflow client."""
    match exc:
        case MlflowException():
            return exc
        case NotFoundError():
            return not_found(str(exc))
        case InvalidQueryError() | PermanentError():
            return invalid(str(exc))
        case BodyTooLarge():  # the body-limit middleware answers 413 in place of this
            return invalid("request body over the limit")
        case RetryableError() | ContendedError():
            # 503: the MLflow client retries it with backoff, which is what a full queue wants.
            return MlflowException(str(exc), error_code=TEMPORARILY_UNAVAILABLE)
    log.exception("unexpected error in the MLflow API", exc_info=exc)
    return MlflowException(f"internal error: {type(exc).__name__}", error_code=INTERNAL_ERROR)


def to_response(exc: Exception) -> Response:
    error = as_mlflow(exc)
    headers = {}
    if isinstance(exc, RetryableError):
        headers["Retry-After"] = str(max(1, -(-exc.retry_after_ms // 1000)))
    return Response(
        error.serialize_as_json(),
        status_code=error.get_http_status_code(),
        media_type="application/json",
        headers=headers,
    )
