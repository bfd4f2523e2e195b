"""A test-only ClickHouse HTTP endpoint with chDB behind it: `python -m tests.clickhouse_http --port N --data-dir D`.

No current ClickHouse server can be installed on these machines, so the multi-process tests give trackhouse's
`http://` storage path this instead. The engine is real ClickHouse (one chDB engine on the data directory); only the
HTTP framing is an adapter, and it speaks the part of ClickHouse's HTTP interface that clickhouse-connect uses
(read from clickhouse_connect/driver/_backend/http_sync.py and httpcommon.py):

- the query in the `query` URL parameter, in the body, or both (the body then follows the parameter);
- `database`, `default_format`, bound parameters as `param_<name>`, and every other URL parameter as a setting of
  that one query, as a server applies them (transport parameters such as `query_id` and `session_id` excepted);
- sessions (`session_id`): `SET` and `USE` persist within one, and a second concurrent query in a session is refused
  with SESSION_IS_LOCKED, as a server does;
- `INSERT ... FORMAT <fmt>` with the data after the statement in the body (Native, Arrow, any format chDB reads);
- compression: a request body's `Content-Encoding` (lz4 frames, zstd, gzip, deflate) is decoded, and a response is
  compressed with the first of lz4, zstd, gzip, deflate that `Accept-Encoding` names when the query sets
  `enable_http_compression=1`; `--no-compression` declines (responses go out as identity, which clients accept);
- errors as a server sends them: a non-2xx status, `X-ClickHouse-Exception-Code`, and the exception text as the body;
- `GET /ping`.

Not a server: no authentication (any user is accepted), no HTTP-level progress headers, results are materialised
before they are sent, and `client_protocol_version` is ignored (clickhouse-connect's probe then falls back to
protocol 0, as it does behind a proxy that strips the parameter). Never use it outside tests.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import chdb
import lz4.frame  # type: ignore[import-untyped]

try:
    from backports import zstd
except ImportError:  # pragma: no cover - Python 3.14 ships it
    from compression import zstd  # type: ignore[import-not-found,no-redef]

READY = "clickhouse_http ready"

#: URL parameters the HTTP layer consumes; every other one (except param_*) is a setting of the query.
TRANSPORT_PARAMETERS = frozenset(
    {
        "query",
        "database",
        "default_format",
        "user",
        "password",
        "query_id",
        "session_id",
        "session_timeout",
        "session_check",
        "quota_key",
        "compress",
        "decompress",
        "buffer_size",
        "wait_end_of_query",
        "client_protocol_version",
        "role",
        "send_progress_in_http_headers",
        "http_headers_progress_interval_ms",
        "enable_http_compression",
        "http_zlib_compression_level",
    }
)
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_INSERT_WITH_DATA = re.compile(
    r"^\s*INSERT\s+INTO\s+(?P<target>.+?)\s+FORMAT\s+(?P<format>\w+)[ \t]*\r?\n?", re.I | re.S
)
_TRAILING_FORMAT = re.compile(r"\bFORMAT\s+(\w+)\s*;?\s*$", re.I)
_CODE = re.compile(r"Code: (\d+)")
_RESULT_STATEMENT = re.compile(r"^\s*(\(|SELECT|WITH|SHOW|DESC|DESCRIBE|EXISTS|EXPLAIN|CHECK)\b", re.I)
#: ClickHouse's own mapping of exception codes to HTTP statuses (src/Server/HTTPHandler.cpp), the codes tests meet.
_HTTP_STATUS = {
    516: 401,  # AUTHENTICATION_FAILED
    164: 403,  # READONLY
    60: 404,  # UNKNOWN_TABLE
    81: 404,  # UNKNOWN_DATABASE
    46: 404,  # UNKNOWN_FUNCTION
    62: 400,  # SYNTAX_ERROR
    47: 400,  # UNKNOWN_IDENTIFIER
    115: 400,  # UNKNOWN_SETTING
    27: 400,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
    53: 400,  # TYPE_MISMATCH
    202: 429,  # TOO_MANY_SIMULTANEOUS_QUERIES
    373: 500,  # SESSION_IS_LOCKED
    159: 500,  # TIMEOUT_EXCEEDED
    48: 501,  # NOT_IMPLEMENTED
    209: 503,  # SOCKET_TIMEOUT
}
_RESPONSE_ENCODINGS: dict[str, Callable[[bytes], bytes]] = {
    "lz4": lambda data: bytes(lz4.frame.compress(data)),
    "zstd": lambda data: bytes(zstd.compress(data)),
    "gzip": gzip.compress,
    "deflate": zlib.compress,
}
MAX_SESSIONS = 256


class QueryError(Exception):
    """A ClickHouse exception: its code and text, sent as a server sends them."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Handle:
    """One chDB connection on the shared engine, with what was applied to it: `SET` and `USE` are per connection."""

    conn: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    applied: dict[str, str] = field(default_factory=dict)
    database: str = ""
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class _Request:
    query: str
    data: bytes | None  # an INSERT's data, or None
    params: dict[str, str]  # bound parameters, without the param_ prefix
    settings: dict[str, str]
    database: str
    default_format: str


class Engine:
    """The chDB engine on one data directory, and the sessions of the HTTP clients."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self._path = str(data_dir)
        self._anchor = _connect(self._path)  # keeps the engine open between requests
        self.version = self._anchor.query("SELECT version()", "TabSeparated").bytes().decode().strip()
        self.timezone = self._anchor.query("SELECT timezone()", "TabSeparated").bytes().decode().strip()
        self._sessions: OrderedDict[str, _Handle] = OrderedDict()
        self._sessions_lock = threading.Lock()
        # Inside the data directory, so it goes with the store (a mkdtemp beside it outlived every test run).
        self._spool = data_dir / "http-inserts"
        self._spool.mkdir(exist_ok=True)

    def execute(self, request: _Request, session_id: str) -> tuple[bytes, str | None, dict[str, str]]:
        """Run one request; return the body, its format (None for a statement without result) and its summary."""
        handle = self._session(session_id) if session_id else _Handle(_connect(self._path))
        if not handle.lock.acquire(blocking=False):
            raise QueryError(373, f"Session {session_id} is locked by a concurrent client. (SESSION_IS_LOCKED)")
        try:
            self._prepare(handle, request)
            return self._run(handle, request)
        finally:
            handle.last_used = time.monotonic()
            handle.lock.release()
            if not session_id:
                handle.conn.close()

    def _session(self, session_id: str) -> _Handle:
        with self._sessions_lock:
            handle = self._sessions.get(session_id)
            if handle is None:
                handle = self._sessions[session_id] = _Handle(_connect(self._path))
                self._evict()
            self._sessions.move_to_end(session_id)
            return handle

    def _evict(self) -> None:
        """Bounded: the least recently used idle sessions beyond MAX_SESSIONS go (a server expires them in time)."""
        for session_id in list(self._sessions)[: max(0, len(self._sessions) - MAX_SESSIONS)]:
            handle = self._sessions[session_id]
            if handle.lock.acquire(blocking=False):
                del self._sessions[session_id]
                handle.conn.close()

    def _prepare(self, handle: _Handle, request: _Request) -> None:
        """The query's settings apply to it alone: set what differs, reset what an earlier request set."""
        for name in [n for n in handle.applied if n not in request.settings]:
            self._query(handle, f"SET {name} = DEFAULT", "TabSeparated")
            del handle.applied[name]
        for name, value in request.settings.items():
            if handle.applied.get(name) != value:
                if not _SETTING_NAME.match(name):
                    raise QueryError(115, f"Unknown setting '{name}'. (UNKNOWN_SETTING)")
                self._query(handle, f"SET {name} = {_quote(value)}", "TabSeparated")
                handle.applied[name] = value
        if request.database and request.database != handle.database:
            self._query(handle, f"USE `{request.database.replace('`', '``')}`", "TabSeparated")
            handle.database = request.database

    def _run(self, handle: _Handle, request: _Request) -> tuple[bytes, str | None, dict[str, str]]:
        if request.data is not None:
            return self._insert(handle, request)
        trailing = _TRAILING_FORMAT.search(request.query)
        fmt = trailing.group(1) if trailing else request.default_format
        result = self._query(handle, request.query, fmt, request.params)
        body = result.bytes() or b""
        produces = bool(trailing) or bool(body) or bool(_RESULT_STATEMENT.match(request.query))
        summary = {"read_rows": str(result.rows_read()), "read_bytes": str(result.bytes_read())}
        return body, fmt if produces else None, summary

    def _insert(self, handle: _Handle, request: _Request) -> tuple[bytes, str | None, dict[str, str]]:
        match = _INSERT_WITH_DATA.match(request.query)
        assert match is not None and request.data is not None
        if not request.data:
            return b"", None, {"written_rows": "0"}
        spooled = self._spool / f"{uuid.uuid4().hex}.data"  # INFILE guesses compression by suffix: none here
        spooled.write_bytes(request.data)
        try:
            statement = f"INSERT INTO {match['target']} FROM INFILE '{spooled}' FORMAT {match['format']}"
            result = self._query(handle, statement, "TabSeparated", request.params)
        finally:
            spooled.unlink(missing_ok=True)
        return b"", None, {"written_rows": str(result.rows_read()), "written_bytes": str(result.bytes_read())}

    @staticmethod
    def _query(handle: _Handle, sql: str, fmt: str, params: dict[str, str] | None = None) -> Any:
        try:
            return handle.conn.query(sql, fmt, params=params or {})
        except Exception as exc:  # chDB raises its own error type carrying ClickHouse's text
            text = str(exc)
            start = text.find("Code: ")
            text = text[start:] if start >= 0 else text
            match = _CODE.search(text)
            raise QueryError(int(match.group(1)) if match else 1001, text.strip()) from exc

    def close(self) -> None:
        with self._sessions_lock:
            for handle in self._sessions.values():
                handle.conn.close()
            self._sessions.clear()
        self._anchor.close()


def _connect(path: str) -> Any:
    """A new chDB connection on the process's one engine (chDB allows one data directory per process)."""
    return chdb.connect(path)  # type: ignore[no-untyped-call]


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def decode_body(data: bytes, encoding: str) -> bytes:
    """A request body as sent with `Content-Encoding`: clickhouse-connect sends one compressed frame per block."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return data
    if encoding == "lz4":
        out = bytearray()
        while data:
            decompressor = lz4.frame.LZ4FrameDecompressor()
            out += decompressor.decompress(data)
            data = decompressor.unused_data
        return bytes(out)
    if encoding == "zstd":
        return bytes(zstd.decompress(data))  # every frame, concatenated
    if encoding == "gzip":
        return gzip.decompress(data)
    if encoding == "deflate":
        return zlib.decompress(data)
    raise QueryError(1001, f"Unknown Content-Encoding: {encoding}")


def parse_request(url_params: dict[str, str], body: bytes) -> _Request:
    """Split a request into query, insert data, bound parameters and settings, as ClickHouse's HTTP handler does."""
    params = {k[len("param_") :]: v for k, v in url_params.items() if k.startswith("param_")}
    settings = {k: v for k, v in url_params.items() if k not in TRANSPORT_PARAMETERS and not k.startswith("param_")}
    query, data = url_params.get("query", ""), None
    if query and _INSERT_WITH_DATA.match(query):
        data = body
    elif query:
        query = f"{query}\n{body.decode()}" if body else query
    else:
        match = _INSERT_WITH_DATA.match(body[:65536].decode(errors="replace"))
        if match and match.group(0).isascii():
            query, data = match.group(0).strip(), body[len(match.group(0).encode()) :]
        else:
            query = body.decode()
    if not query.strip():
        raise QueryError(62, "Empty query. (SYNTAX_ERROR)")
    return _Request(
        query=query,
        data=data,
        params=params,
        settings=settings,
        database=url_params.get("database", ""),
        default_format=url_params.get("default_format", "TabSeparated"),
    )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clickhouse-connect pools connections
    server: _Server

    def do_GET(self) -> None:  # http.server's naming
        parts = urlsplit(self.path)
        if parts.path.rstrip("/") == "/ping" or (parts.path == "/" and "query" not in parts.query):
            self._reply(200, b"Ok.\n", {"Content-Type": "text/plain; charset=UTF-8"})
            return
        self._query(b"")

    def do_POST(self) -> None:
        self._query(self._read_body())

    def log_message(self, format: str, *args: Any) -> None:  # quiet: a line per request is noise
        return

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _query(self, raw_body: bytes) -> None:
        url_params = dict(parse_qsl(urlsplit(self.path).query, keep_blank_values=True))
        query_id = url_params.get("query_id") or str(uuid.uuid4())
        headers = {"X-ClickHouse-Query-Id": query_id, "X-ClickHouse-Timezone": self.server.engine.timezone}
        try:
            if url_params.get("decompress") in ("1", "true"):
                raise QueryError(48, "ClickHouse's own compression of request bodies is not implemented here")
            request = parse_request(url_params, decode_body(raw_body, self.headers.get("Content-Encoding", "")))
            body, fmt, summary = self.server.engine.execute(request, url_params.get("session_id", ""))
        except QueryError as exc:
            self._error(exc, headers)
            return
        if fmt is not None:
            headers["X-ClickHouse-Format"] = fmt
        headers["X-ClickHouse-Summary"] = json.dumps(summary)
        headers["Content-Type"] = "application/octet-stream"
        if body and url_params.get("enable_http_compression") in ("1", "true") and self.server.compress:
            encoding = self._response_encoding()
            if encoding:
                body = _RESPONSE_ENCODINGS[encoding](body)
                headers["Content-Encoding"] = encoding
        self._reply(200, body, headers)

    def _response_encoding(self) -> str | None:
        offered = [e.split(";")[0].strip().lower() for e in self.headers.get("Accept-Encoding", "").split(",")]
        return next((e for e in _RESPONSE_ENCODINGS if e in offered), None)

    def _error(self, exc: QueryError, headers: dict[str, str]) -> None:
        text = f"{exc} (version {self.server.engine.version})\n"
        headers["X-ClickHouse-Exception-Code"] = str(exc.code)
        headers["Content-Type"] = "text/plain; charset=UTF-8"
        self._reply(_HTTP_STATUS.get(exc.code, 500), text.encode(), headers)

    def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Keep-Alive", "timeout=10")
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], engine: Engine, compress: bool) -> None:
        super().__init__(address, _Handler)
        self.engine = engine
        self.compress = compress


@dataclass
class ClickHouseHttp:
    """The endpoint as a child process on a free port, for tests: start(), url, stop()."""

    data_dir: Path
    log_path: Path
    port: int = 0
    compress: bool = True
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> None:
        args = [sys.executable, "-m", "tests.clickhouse_http", "--port", str(self.port)]
        args += ["--data-dir", str(self.data_dir)]
        if not self.compress:
            args.append("--no-compression")
        root = Path(__file__).resolve().parent.parent
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(args, cwd=root, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text()[offset:]
            if READY in text:
                self.port = int(text.split(READY, 1)[1].split("port=", 1)[1].split()[0])
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"clickhouse_http did not start:\n{self.log_path.read_text()[offset:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.clickhouse_http", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed on the ready line)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--no-compression", action="store_true", help="answer uncompressed whatever is offered")
    args = parser.parse_args(argv)
    engine = Engine(args.data_dir.resolve())
    server = _Server((args.host, args.port), engine, compress=not args.no_compression)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"{READY} port={server.server_address[1]} version={engine.version}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        engine.close()


if __name__ == "__main__":
    main()
