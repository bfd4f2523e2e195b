"""The HTTP edge's limits: request-body caps, as one ASGI middleware around the whole app.

Handlers read bodies as they please (`request.body()`, `request.stream()`); this middleware is the only place
that bounds them. A declared Content-Length over the cap is refused before a byte of the body is read; a body
without one (chunked) is counted as it streams, and the read that crosses the cap fails, so the app never
holds more than the cap plus one chunk. Either way the client gets 413 with MLflow's JSON error, and the
connection is closed rather than drained.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass

from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from trackhouse.ingest.config import ConfigError

#: MLflow's largest legal requests: log-batch is capped at 1 MB, but log-inputs may carry a dataset profile of
#: up to 16 MB (MAX_DATASET_PROFILE_SIZE) plus a 1 MB schema, JSON-escaped. 32 MiB holds that with headroom.
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
#: One artifact per PUT; 5 GiB is S3's single-PUT limit. Uploads stream, so memory stays flat in any case.
DEFAULT_MAX_UPLOAD_BYTES = 5 * 1024**3
#: A request head (request line and headers) must arrive whole within this many seconds.
DEFAULT_HEADER_TIMEOUT_S = 10
#: ...and be at most this large (llhttp, under uvicorn's httptools protocol, has no limit of its own).
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
#: An idle kept-alive connection is closed after this many seconds.
DEFAULT_KEEP_ALIVE_TIMEOUT_S = 5
#: Open connections beyond this are refused with 503 as they arrive.
DEFAULT_MAX_CONNECTIONS = 1000


@dataclass(frozen=True, slots=True)
class HttpLimits:
    #: Largest request body, except artifact uploads.
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    #: Largest artifact upload (PUT to the mlflow-artifacts proxy); streamed to the repository in chunks.
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    keep_alive_timeout_s: float = DEFAULT_KEEP_ALIVE_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_upload_bytes", "max_header_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        for name in ("header_timeout_s", "keep_alive_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")


class BodyTooLarge(Exception):
    """Raised into the app by a read that crosses the cap; the middleware answers 413 in its stead."""


class BodyLimit:
    def __init__(self, app: ASGIApp, limits: HttpLimits, is_upload: Callable[[str, str], bool]) -> None:
        self._app = app
        self._limits = limits
        self._is_upload = is_upload

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        upload = self._is_upload(scope["method"], scope["path"])
        cap, flag = (
            (self._limits.max_upload_bytes, "--max-upload-bytes")
            if upload
            else (self._limits.max_body_bytes, "--max-body-bytes")
        )
        declared = _content_length(scope)
        if declared is None:
            await _error(send, 400, "Content-Length must be one non-negative integer.")
            return
        if declared > cap:
            await _too_large(send, cap, flag)
            return
        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                raise BodyTooLarge()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    exceeded = True
                    raise BodyTooLarge()
            return message

        async def checked_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # whatever the app makes of the failed read, the client gets the 413 below
            started = started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(BodyTooLarge):
            await self._app(scope, limited_receive, checked_send)
        if exceeded and not started:
            await _too_large(send, cap, flag)


def _content_length(scope: Scope) -> int | None:
    """The declared body length (0 when none is declared), or None when the header is malformed."""
    values = [v for k, v in scope["headers"] if k == b"content-length"]
    if not values:
        return 0
    if len(set(values)) != 1 or not values[0].isdigit():
        return None
    return int(values[0])


async def _too_large(send: Send, cap: int, flag: str) -> None:
    await _error(send, 413, f"Request body is larger than this server's limit of {cap} bytes ({flag}).")


async def _error(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error_code": ErrorCode.Name(INVALID_PARAMETER_VALUE), "message": message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        # The rest of the body is never read, so the connection cannot carry another request.
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
