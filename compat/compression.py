"""Compressed HTTP answers: Accept-Encoding negotiation and one streaming compressor per response.

MLflow's wire shapes are verbose JSON: a wide experiment's runs/search page is 22 MB and a 25,000-point history
page 2 MB, 5.6-7.4x smaller compressed (zstd level 1 and gzip level 1 measured on those answers; see README
"Compressed answers"). Over loopback the bytes cost less than compressing them does, so by default (`auto`) only
a peer on another host gets compressed answers; `on` compresses for every peer (e.g. behind a same-host proxy that
does not compress), `off` never. uvicorn puts a same-host proxy's X-Forwarded-For client in `scope["client"]`, so
`auto` already sees the real peer behind a proxy that forwards it.

Starlette's GZipMiddleware does not fit: it matches "gzip" as a substring (so `gzip;q=0` still gets gzip), offers
no zstd and no per-peer policy, and compresses artifact downloads. This middleware, per response:
- leaves alone what is already encoded, partial (206), an attachment (artifact downloads stay byte-exact), not
  text or JSON, or smaller than `min_bytes` (a streamed answer is held until it is known to be larger, at most
  `min_bytes` and one chunk);
- compresses a whole body at once with the right Content-Length, and a streamed one chunk by chunk, flushing each
  so that the client decodes as the answer arrives, with memory bounded by one chunk;
- compresses large pieces in its own small thread pool, never on the event loop and never in the pool the reads
  use (zlib and zstd release the GIL, so they run beside the reads).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from trackhouse.ingest.config import ConfigError

try:  # the standard library's from Python 3.14; the backport (clickhouse-connect needs it too) before
    from compression import zstd  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # pragma: no cover - depends on the Python version
    try:
        from backports import zstd  # type: ignore[no-redef,unused-ignore]
    except ImportError:
        zstd = None

MODES = ("auto", "on", "off")
#: A smaller answer fits in one TCP segment (1,460 bytes of payload on Ethernet) once headers are added:
#: compressing it saves no packet and no round trip.
DEFAULT_MIN_BYTES = 1400
#: Level 1 of each: higher levels cost far more time than they save bytes. On the 22 MB wide runs/search page,
#: compressed whole on this 2-core machine: gzip-1 266 ms for a 6.1x ratio, gzip-9 855 ms for 6.6x; zstd-1 37 ms
#: for 7.4x, zstd-3 77 ms for 6.3x (benchmarks/compression.py, README "Compressed answers").
DEFAULT_GZIP_LEVEL = 1
DEFAULT_ZSTD_LEVEL = 1
#: Pieces at least this large are compressed in the pool, not on the event loop (about 1 ms of gzip-1).
THREAD_MIN_BYTES = 128 * 1024
#: Media types worth compressing: text and JSON. Anything else (images, archives, model files) is passed as is.
_COMPRESSIBLE = ("text/", "application/json", "application/javascript", "image/svg+xml")
_NOT_COMPRESSED_STATUSES = frozenset({204, 206, 304})
#: As many compressions at once as cores: more would only queue for the CPU. Its own pool, so that compressing
#: never waits behind, nor holds up, the reads in the default one. Threads start on first use.
_POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="compress")


@dataclass(frozen=True, slots=True)
class CompressionConfig:
    #: auto: compress for peers on another host; on: for every peer; off: never.
    mode: str = "auto"
    #: Answers smaller than this are sent as they are.
    min_bytes: int = DEFAULT_MIN_BYTES
    gzip_level: int = DEFAULT_GZIP_LEVEL
    zstd_level: int = DEFAULT_ZSTD_LEVEL

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"HTTP compression must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.min_bytes < 0:
            raise ConfigError("min_bytes must not be negative")
        if not 1 <= self.gzip_level <= 9:
            raise ConfigError("gzip_level must be from 1 to 9")
        if not 1 <= self.zstd_level <= 22:
            raise ConfigError("zstd_level must be from 1 to 22")

    @property
    def codings(self) -> tuple[str, ...]:
        """What this server can send, best first: zstd is faster and smaller on our answers (see above)."""
        return ("zstd", "gzip") if zstd is not None else ("gzip",)


def negotiate(accept_encoding: str, offered: Sequence[str]) -> str | None:
    """The coding among `offered` (best first) that the client prefers by q-value; None for identity.

    RFC 9110 12.5.3: `*` stands for every coding not named; q=0 means "not acceptable". An entry that does not
    parse is ignored. When nothing offered is acceptable the answer goes uncompressed, even if identity was
    refused: the RFC lets a server answer without a coding rather than with 406.
    """
    weights: dict[str, float] = {}
    for entry in accept_encoding.split(","):
        name, _, parameters = entry.partition(";")
        name = name.strip().lower()
        weight = _q(parameters)
        if name and weight is not None:
            weights[name] = weight
    wildcard = weights.get("*", 0.0)
    best, best_weight = None, 0.0
    for coding in offered:  # best first, so a tie goes to the server's preference
        weight = weights.get(coding, wildcard)
        if weight > best_weight:
            best, best_weight = coding, weight
    identity = weights.get("identity")
    # Identity is the fallback, least preferred unless the client ranks it above every coding we offer.
    return best if identity is None or best_weight >= identity else None


def _q(parameters: str) -> float | None:
    """The q-value of one entry's parameters (1 when absent), or None when they do not parse."""
    weight = 1.0
    for parameter in filter(None, (p.strip() for p in parameters.split(";"))):
        name, _, value = parameter.partition("=")
        value = value.strip()
        if name.strip().lower() != "q" or not 0 < len(value) <= 5 or not value.replace(".", "", 1).isdigit():
            return None
        weight = float(value)
    return weight if 0 <= weight <= 1 else None


def is_same_host(scope: Scope) -> bool:
    """Whether the peer is this host: a loopback address, or the very address it connected to."""
    client, server = scope.get("client"), scope.get("server")
    if not client:
        return True  # a Unix socket, or a transport that knows no peer: never a remote laptop
    try:
        peer = ipaddress.ip_address(client[0])
    except ValueError:
        return False
    mapped = getattr(peer, "ipv4_mapped", None)
    return (
        peer.is_loopback
        or (mapped is not None and mapped.is_loopback)
        or (server is not None and client[0] == server[0])
    )


class _Compressor(Protocol):
    def more(self, data: bytes) -> bytes:
        """`data` compressed and flushed, so that the client can decode everything sent so far."""

    def last(self, data: bytes) -> bytes:
        """`data` compressed, and the stream ended."""


class _Gzip:
    def __init__(self, level: int) -> None:
        self._c = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)

    def more(self, data: bytes) -> bytes:
        return self._c.compress(data) + self._c.flush(zlib.Z_SYNC_FLUSH)

    def last(self, data: bytes) -> bytes:
        return self._c.compress(data) + self._c.flush()


class _Zstd:
    def __init__(self, level: int) -> None:
        assert zstd is not None
        self._c = zstd.ZstdCompressor(level)

    def more(self, data: bytes) -> bytes:
        return bytes(self._c.compress(data, zstd.ZstdCompressor.FLUSH_BLOCK))

    def last(self, data: bytes) -> bytes:
        return bytes(self._c.compress(data, zstd.ZstdCompressor.FLUSH_FRAME))


def _compressor(coding: str, config: CompressionConfig) -> _Compressor:
    return _Zstd(config.zstd_level) if coding == "zstd" else _Gzip(config.gzip_level)


def is_compressible(headers: Headers) -> bool:
    if "content-encoding" in headers or headers.get("content-disposition", "").lower().startswith("attachment"):
        return False
    media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
    return media_type.startswith(_COMPRESSIBLE) or media_type.endswith("+json")


class Compression:
    """ASGI middleware: compresses answers as CompressionConfig says (see the module's docstring)."""

    def __init__(self, app: ASGIApp, config: CompressionConfig) -> None:
        self._app = app
        self._config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "HEAD":
            await self._app(scope, receive, send)
            return
        coding = None
        if self._config.mode == "on" or not is_same_host(scope):
            coding = negotiate(_accept_encoding(scope), self._config.codings)
        responder = _Responder(send, coding, self._config)
        await self._app(scope, receive, responder.send)


def _accept_encoding(scope: Scope) -> str:
    return ",".join(v.decode("latin-1") for k, v in scope["headers"] if k == b"accept-encoding")


class _Responder:
    """One response's path through the middleware: passed through, held until its size is known, or compressed."""

    def __init__(self, send: Send, coding: str | None, config: CompressionConfig) -> None:
        self._send = send
        self._coding = coding
        self._config = config
        self._start: Message | None = None  # held until we know whether to compress
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._compressor: _Compressor | None = None
        self._passing = False

    async def send(self, message: Message) -> None:
        if self._passing:
            await self._send(message)
        elif message["type"] == "http.response.start":
            await self._on_start(message)
        elif message["type"] == "http.response.body" and self._compressor is not None:
            await self._compressed(message.get("body", b""), message.get("more_body", False))
        elif message["type"] == "http.response.body":
            await self._on_body(message.get("body", b""), message.get("more_body", False))
        else:  # trailers, pathsend and whatever else comes: the answer goes as it is
            await self._pass_held(more=True)
            await self._send(message)

    async def _on_start(self, message: Message) -> None:
        headers = MutableHeaders(raw=message.setdefault("headers", []))
        if message["status"] in _NOT_COMPRESSED_STATUSES or not is_compressible(headers):
            self._passing = True
            await self._send(message)
            return
        headers.add_vary_header("Accept-Encoding")  # the answer depends on it, for every cache on the way
        length = headers.get("content-length")
        if self._coding is None or (length is not None and length.isdigit() and int(length) < self._config.min_bytes):
            self._passing = True
            await self._send(message)
            return
        self._start = message

    async def _on_body(self, body: bytes, more: bool) -> None:
        """Held until the answer is known to be at least min_bytes: a tiny answer goes as it is."""
        self._held.append(body)
        self._held_bytes += len(body)
        if self._held_bytes < self._config.min_bytes:
            if not more:
                await self._pass_held(more=False)
            return
        assert self._start is not None and self._coding is not None
        self._compressor = _compressor(self._coding, self._config)
        data, self._held = b"".join(self._held), []
        compressed = await self._run(self._compressor.more if more else self._compressor.last, data)
        headers = MutableHeaders(raw=self._start["headers"])
        headers["content-encoding"] = self._coding
        if more:  # streamed: the length is not known before the end (uvicorn then sends it chunked)
            del headers["content-length"]
        else:
            headers["content-length"] = str(len(compressed))
        if "etag" in headers and not headers["etag"].startswith("W/"):
            headers["etag"] = "W/" + headers["etag"]  # another representation: the strong validator is not its own
        del headers["accept-ranges"]  # ranges would count the uncompressed bytes
        await self._send(self._start)
        await self._send({"type": "http.response.body", "body": compressed, "more_body": more})

    async def _compressed(self, body: bytes, more: bool) -> None:
        assert self._compressor is not None
        if more and not body:
            return  # nothing to flush: an empty block would cost bytes and a send
        compressed = await self._run(self._compressor.more if more else self._compressor.last, body)
        await self._send({"type": "http.response.body", "body": compressed, "more_body": more})

    async def _pass_held(self, more: bool) -> None:
        """The held start and body, unchanged; `more`: the app has not ended the body yet."""
        self._passing = True
        body, self._held = b"".join(self._held), []
        if self._start is not None:
            start, self._start = self._start, None
            if not more:  # the whole answer is here: its length is known, so it need not go chunked
                MutableHeaders(raw=start["headers"])["content-length"] = str(len(body))
            await self._send(start)
        if body or not more:
            await self._send({"type": "http.response.body", "body": body, "more_body": more})

    async def _run(self, step: _Step, data: bytes) -> bytes:
        if len(data) < THREAD_MIN_BYTES:
            return step(data)
        return await asyncio.get_running_loop().run_in_executor(_POOL, step, data)


class _Step(Protocol):
    def __call__(self, data: bytes, /) -> bytes: ...
