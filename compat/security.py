"""The HTTP edge's policy, in one place: Host validation, CORS, authentication and roles.

Outermost first: Host validation (DNS rebinding), then CORS (answers preflights, which carry no
credentials, and blocks cross-origin writes), then authentication. Handlers never repeat any of it.
Host and CORS behave as stock MLflow 3's `mlflow/server/fastapi_security.py` and `security_utils.py`
(same defaults, same fnmatch patterns); they are restated here because importing `mlflow.server`
loads Flask and the SQL stores (seconds of start-up); tests compare with stock's own functions.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from trackhouse.ingest.auth import REALM, Authenticator, AuthError, Principal

log = logging.getLogger(__name__)

#: Answer without credentials: load balancers and orchestrators probe it, and it tells nothing but up or down.
#: /metrics is NOT public: it reveals traffic and error volumes, and Prometheus scrapers send Bearer tokens
#: or Basic credentials (`authorization` / `basic_auth` in a scrape config) as easily as none.
PUBLIC_PATHS = frozenset({"/health"})
#: Stock exempts these from Host validation, so orchestrators can probe by IP.
HOST_EXEMPT_PATHS = frozenset({"/health", "/version"})
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: POST endpoints that only read, below /api/ or /ajax-api/ (or at the top for GraphQL). Every other
#: POST, PUT, PATCH and DELETE is a write: an endpoint missing here fails closed (403 for a reader).
READ_POSTS = frozenset(
    {
        "2.0/mlflow/experiments/search",
        "2.0/mlflow/runs/search",
        "2.0/mlflow/logged-models/search",
        "2.0/mlflow/experiments/search-datasets",
        "3.0/mlflow/traces/search",
        "3.0/mlflow/traces/metrics",
        "3.0/mlflow/issues/search",
        "3.0/mlflow/datasets/search",
        # The MLflow client reads a model's latest versions by POST (load_model("models:/name/Production")).
        "2.0/mlflow/registered-models/get-latest-versions",
        # The UI posts its telemetry here; trackhouse stores none of it.
        "3.0/mlflow/ui-telemetry",
        # MLflow's GraphQL serves the UI's queries; its schema's mutations are not served here.
        "graphql",
    }
)
_API_PREFIXES = ("/api/", "/ajax-api/")

# Stock's defaults (mlflow/server/security_utils.py): loopback names with any port, and private address ranges.
_LOCALHOST = ("localhost", "127.0.0.1", "[::1]", "0.0.0.0")
_PRIVATE = ("192.168.*", "10.*", *(f"172.{i}.*" for i in range(16, 32)), "fc00:*", "fd00:*")
DEFAULT_ALLOWED_HOSTS = (*_LOCALHOST, *(h.replace("[", "[[]", 1) + ":*" for h in _LOCALHOST), *_PRIVATE)
_LOCALHOST_ORIGINS = (
    r"^http://localhost(:[0-9]+)?$",
    r"^http://127\.0\.0\.1(:[0-9]+)?$",
    r"^http://\[::1\](:[0-9]+)?$",
)
_STATE_CHANGING = frozenset({"POST", "PUT", "DELETE", "PATCH"})
INVALID_HOST_MSG = "Invalid Host header - possible DNS rebinding attack detected"
CORS_BLOCKED_MSG = "Cross-origin request blocked"


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    #: Checks credentials; None serves without authentication (loopback, or an explicit operator opt-out).
    authenticator: Authenticator | None = None
    #: Host header patterns (fnmatch); empty means stock's defaults; "*" turns the check off.
    allowed_hosts: tuple[str, ...] = ()
    #: Origins allowed to make cross-origin writes (fnmatch patterns; "*" for any, without credentials).
    cors_allowed_origins: tuple[str, ...] = ()


def is_write(method: str, path: str) -> bool:
    """Whether a request changes state, by method and MLflow endpoint (the table is READ_POSTS)."""
    if method in READ_METHODS:
        return False
    for prefix in _API_PREFIXES:
        if path.startswith(prefix):
            path = path.removeprefix(prefix)
            break
    else:
        path = path.removeprefix("/")
    return path.rstrip("/") not in READ_POSTS


def is_allowed_host(allowed: Sequence[str], host: str) -> bool:
    """Stock's `is_allowed_host_header`: exact names, or fnmatch patterns when they hold a `*`."""
    if not host:
        return False
    if "*" in allowed:
        return True
    return any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed)


def is_localhost_origin(origin: str) -> bool:
    try:
        return urlsplit(origin).hostname in ("localhost", "127.0.0.1", "[::1]", "::1")
    except ValueError:
        return False


def blocks_cross_origin(origin: str, method: str, allowed: Sequence[str]) -> bool:
    """Stock's `should_block_cors_request`: a state-changing request from a foreign origin not on the list."""
    if not origin or method not in _STATE_CHANGING or is_localhost_origin(origin):
        return False
    if "*" in allowed:
        return False
    return not any(fnmatch.fnmatch(origin, a) if "*" in a else origin == a for a in allowed)


def _is_api(path: str) -> bool:
    return path.startswith(_API_PREFIXES)


async def _plain(send: Send, status: int, text: str) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": text.encode()})


async def _mlflow_error(send: Send, status: int, code: str, message: str, extra: list[tuple[bytes, bytes]]) -> None:
    body = orjson.dumps({"error_code": code, "message": message})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class HostValidation:
    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str]) -> None:
        self._app = app
        self._allowed = tuple(allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in HOST_EXEMPT_PATHS:
            host = Headers(scope=scope).get("host", "")
            if not is_allowed_host(self._allowed, host):
                log.warning("refused a request with Host header %.100r (not in --allowed-hosts)", host)
                await _plain(send, 403, INVALID_HOST_MSG)
                return
        await self._app(scope, receive, send)


class CrossOriginBlocking:
    """Browsers send a cross-origin "simple" POST without a preflight; this refuses it on the server."""

    def __init__(self, app: ASGIApp, allowed_origins: Sequence[str]) -> None:
        self._app = app
        self._allowed = tuple(allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _is_api(scope["path"]):
            origin = Headers(scope=scope).get("origin", "")
            if blocks_cross_origin(origin, scope["method"], self._allowed):
                log.warning("blocked a cross-origin %s from %.100r", scope["method"], origin)
                await _plain(send, 403, CORS_BLOCKED_MSG)
                return
        await self._app(scope, receive, send)


class Authentication:
    """401 (with a Basic challenge, so a browser asks) without valid credentials; 403 for a reader's write."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator) -> None:
        self._app = app
        self._auth = authenticator
        # A cache miss costs one scrypt (about 16 MiB for tens of ms) in a worker thread; two at a time
        # bound the memory and CPU that a flood of wrong passwords can take.
        self._hashing: asyncio.Semaphore | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self._app(scope, receive, send)
            return
        authorization = Headers(scope=scope).get("authorization")
        try:
            principal = self._auth.cached(authorization) or await self._check(authorization)
        except AuthError as exc:
            challenge = [(b"www-authenticate", f'Basic realm="{REALM}", charset="UTF-8"'.encode())]
            await _mlflow_error(send, 401, "UNAUTHENTICATED", str(exc), challenge)
            return
        if not principal.can_write and is_write(scope["method"], scope["path"]):
            message = f"user {principal.name!r} has the read role; {scope['method']} {scope['path']} needs write"
            await _mlflow_error(send, 403, "PERMISSION_DENIED", message, [])
            return
        scope["user"] = principal
        await self._app(scope, receive, send)

    async def _check(self, authorization: str | None) -> Principal:
        if self._hashing is None:
            self._hashing = asyncio.Semaphore(2)
        async with self._hashing:
            return await asyncio.to_thread(self._auth.check, authorization)


def middleware(config: SecurityConfig) -> list[Middleware]:
    """The edge's policy as Starlette middleware, outermost first."""
    stack: list[Middleware] = []
    hosts = config.allowed_hosts or DEFAULT_ALLOWED_HOSTS
    if "*" not in hosts:
        stack.append(Middleware(HostValidation, allowed_hosts=hosts))
    origins = list(config.cors_allowed_origins)
    cors: dict[str, Any] = {
        "allow_methods": ["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"],
        "allow_headers": ["*"],
        "expose_headers": ["*"],
    }
    if "*" in origins:
        # As stock: a wildcard origin never gets credentialed CORS (a browser then strips Authorization).
        stack.append(Middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=False, **cors))
    else:
        regex = "|".join(_LOCALHOST_ORIGINS)
        stack.append(
            Middleware(CORSMiddleware, allow_origins=origins, allow_origin_regex=regex, allow_credentials=True, **cors)
        )
        stack.append(Middleware(CrossOriginBlocking, allowed_origins=origins))
    if config.authenticator is not None:
        stack.append(Middleware(Authentication, authenticator=config.authenticator))
    return stack
