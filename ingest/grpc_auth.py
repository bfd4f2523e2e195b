"""Authentication on gRPC: the same credentials as HTTP, in the `authorization` call metadata.

The contract with clients: metadata key `authorization`, value `Bearer <token>` or `Basic
<base64 user:password>`. No credentials or wrong ones: UNAUTHENTICATED. A reader writing: PERMISSION_DENIED.
The standard health service stays open, so load balancers can probe without a secret.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from trackhouse.ingest.auth import Authenticator, AuthError, Principal

METADATA_KEY = "authorization"
PUBLIC_SERVICES = ("/grpc.health.v1.Health/",)
#: Methods a reader may call; every other method needs the write role (an unknown method fails closed).
READ_METHODS: frozenset[str] = frozenset({"/trackhouse.v1.Ingest/GetLimits"})  # the handshake writes nothing

if TYPE_CHECKING:  # generic only in the stubs
    _Handler = grpc.RpcMethodHandler[Any, Any]
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Handler = grpc.RpcMethodHandler
    _Interceptor = grpc.aio.ServerInterceptor
_Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]]


class AuthInterceptor(_Interceptor):
    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator
        self._hashing: asyncio.Semaphore | None = None

    async def intercept_service(
        self, continuation: _Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> _Handler:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)  # None for an unknown method (the stubs disagree)
        if handler is None or method.startswith(PUBLIC_SERVICES):
            return handler
        authorization = _authorization(handler_call_details.invocation_metadata)
        try:
            principal = self._auth.cached(authorization) or await self._check(authorization)
        except AuthError as exc:
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, str(exc))
        if not principal.can_write and method not in READ_METHODS:
            message = f"user {principal.name!r} has the read role; {method} needs write"
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED, message)
        return handler

    async def _check(self, authorization: str | None) -> Principal:
        if self._hashing is None:  # bounds the memory and CPU a flood of bad credentials can take
            self._hashing = asyncio.Semaphore(2)
        async with self._hashing:
            return await asyncio.to_thread(self._auth.check, authorization)


def _authorization(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == METADATA_KEY:
            return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return None


def _refusal(handler: _Handler, code: grpc.StatusCode, message: str) -> _Handler:
    """A handler of the same shape as the refused one, that aborts before reading a request."""

    async def abort_unary(_: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, message)

    async def abort_stream(_: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover  (makes this an async generator, as a streaming handler must be)

    shapes = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    streaming = (handler.request_streaming, handler.response_streaming)
    behaviour = abort_stream if handler.response_streaming else abort_unary
    refusal: _Handler = shapes[streaming](
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    return refusal
