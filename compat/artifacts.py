"""MLflow's proxied-artifact routes, served from MLflow's own artifact repository at a configured destination.

Mirrors a stock `mlflow server --serve-artifacts`: the `mlflow-artifacts` service (handlers.py and the ASGI
artifact_router.py), `artifacts/list` and the UI's `/get-artifact`, with the same JSON, headers and errors.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import posixpath
import shutil
import tempfile
import unicodedata
import urllib.parse
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf.json_format import ParseError
from google.protobuf.message import Message
from mlflow.entities.multipart_upload import MultipartUploadPart
from mlflow.environment_variables import MLFLOW_PRESIGNED_DOWNLOAD_URL_TTL_SECONDS
from mlflow.exceptions import (
    MlflowException,
    _UnsupportedMultipartDownloadException,
    _UnsupportedMultipartUploadException,
)
from mlflow.protos import mlflow_artifacts_pb2 as artifacts_pb2
from mlflow.protos.databricks_pb2 import (
    ENDPOINT_NOT_FOUND,
    INVALID_PARAMETER_VALUE,
    PERMISSION_DENIED,
    RESOURCE_DOES_NOT_EXIST,
)
from mlflow.protos.service_pb2 import ListArtifacts
from mlflow.store.artifact.artifact_repo import (
    ARTIFACT_STREAM_CHUNK_SIZE,
    ArtifactRepository,
    MultipartDownloadMixin,
    MultipartUploadMixin,
    StreamUploadMixin,
)
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.utils import mime_type_utils, proto_json_utils, uri
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from trackhouse.compat.artifact_roots import ArtifactRoots
from trackhouse.compat.routing import guarded
from trackhouse.query.errors import NotFoundError

# MLflow leaves these unannotated; naming their real types once keeps the calls below checked.
_validate_path_is_safe: Callable[[str], str] = uri.validate_path_is_safe
_resolve_uri_if_local: Callable[[str], str] = uri.resolve_uri_if_local
_guess_mime_type: Callable[[str], str] = mime_type_utils._guess_mime_type
_message_to_json: Callable[[Message], str] = proto_json_utils.message_to_json
_parse_dict: Callable[[dict[str, Any], Message], None] = proto_json_utils.parse_dict

_M = TypeVar("_M", bound=Message)

_PROXIED_SCHEMES = ("http", "https", "mlflow-artifacts")
# An http(s) run root names the download route; what follows this anchor is the destination path.
_HTTP_ROOT_ANCHOR = "/api/2.0/mlflow-artifacts/artifacts/"
_TOKEN_CHARS = frozenset("!#$%&'*+-.0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ^_`abcdefghijklmnopqrstuvwxyz|~")


@dataclass(frozen=True, slots=True)
class ArtifactsConfig:
    #: Where proxied artifacts live: a local directory path or URI (file:///..., s3://bucket/prefix, ...).
    destination: str
    #: Other roots experiments may keep artifacts under (`s3://bucket/prefix`, ...); nothing else is touched.
    allowed_roots: tuple[str, ...] = ()
    #: False on a reader: uploads and deletes are refused, whatever the route.
    writable: bool = True

    def roots(self) -> ArtifactRoots:
        return ArtifactRoots(self.destination, self.allowed_roots)


#: The UI's upload route (stock serves it under /ajax-api only), and stock's cap on it.
UI_UPLOAD_PATH = "/ajax-api/2.0/mlflow/upload-artifact"
UI_UPLOAD_MAX_BYTES = 10 * 1024 * 1024
_PROXY_PREFIXES = ("/api/2.0/mlflow-artifacts/artifacts/", "/ajax-api/2.0/mlflow-artifacts/artifacts/")


def is_upload(method: str, path: str) -> bool:
    """Whether a request's body is an artifact's bytes, which streams under the upload cap, not the body cap."""
    if method == "PUT":
        return path.startswith(_PROXY_PREFIXES)
    return method == "POST" and path == UI_UPLOAD_PATH


RunArtifactUri = Callable[[str], Awaitable[str]]
_Endpoint = Callable[[Request], Awaitable[Response]]


def artifact_routes(config: ArtifactsConfig, run_artifact_uri: RunArtifactUri) -> list[BaseRoute]:
    """The routes, under both `/api/2.0` and `/ajax-api/2.0`, plus `/get-artifact`. Fails fast on a bad destination."""
    # A relative destination is pinned now, so a later chdir cannot move where artifacts go.
    destination = get_artifact_repository(_resolve_uri_if_local(config.destination))
    service = _ArtifactService(destination, run_artifact_uri, config.roots(), config.writable)
    # The first call imports mlflow.models for its text-file names; pay for that at start-up, not in a request.
    _guess_mime_type("MLmodel")
    routes: list[BaseRoute] = []
    for prefix in ("/api/2.0", "/ajax-api/2.0"):
        service_root = f"{prefix}/mlflow-artifacts"
        routes += [
            _route(f"{service_root}/artifacts", service.list_destination, "GET"),
            _route(f"{service_root}/artifacts/{{artifact_path:path}}", service.download, "GET"),
            _route(f"{service_root}/artifacts/{{artifact_path:path}}", service.upload, "PUT"),
            _route(f"{service_root}/artifacts/{{artifact_path:path}}", service.delete, "DELETE"),
            _route(f"{service_root}/mpu/create/{{artifact_path:path}}", service.create_multipart, "POST"),
            _route(f"{service_root}/mpu/complete/{{artifact_path:path}}", service.complete_multipart, "POST"),
            _route(f"{service_root}/mpu/abort/{{artifact_path:path}}", service.abort_multipart, "POST"),
            _route(f"{service_root}/presigned/{{artifact_path:path}}", service.presigned_download, "GET"),
            _route(f"{prefix}/mlflow/artifacts/list", service.list_run, "GET"),
        ]
    routes.append(_route(UI_UPLOAD_PATH, service.upload_for_run, "POST"))
    # Stock serves the UI's preview route only without an API prefix.
    routes.append(_route("/get-artifact", service.get_artifact, "GET"))
    return routes


class _ArtifactService:
    def __init__(
        self, destination: ArtifactRepository, run_artifact_uri: RunArtifactUri, roots: ArtifactRoots, writable: bool
    ) -> None:
        self._destination = destination
        self._run_artifact_uri = run_artifact_uri
        self._roots = roots
        self._writable = writable

    async def download(self, request: Request) -> Response:
        path = _artifact_path(request)
        return await _send_artifact(self._destination, path)

    async def upload(self, request: Request) -> Response:
        self._check_writable()
        head, tail = posixpath.split(_artifact_path(request))
        if not tail:
            raise MlflowException.invalid_parameter_value(
                "Artifact path must include a filename (cannot end with '/')."
            )
        await _upload_stream(self._destination, request.stream(), tail, head or None)
        return _json(artifacts_pb2.UploadArtifact.Response())

    async def upload_for_run(self, request: Request) -> Response:
        """The UI's upload: stock's parameters, checks and messages; the body streams, as every upload here does."""
        self._check_writable()
        run_id = request.query_params.get("run_uuid")
        if not run_id:
            raise MlflowException.invalid_parameter_value("Request must specify run_uuid.")
        path = request.query_params.get("path")
        if not path:
            raise MlflowException.invalid_parameter_value("Request must specify path.")
        directory, name = posixpath.split(_safe_path(path))
        if not name:
            raise MlflowException.invalid_parameter_value(
                "Artifact path must include a filename (cannot end with '/')."
            )
        if int(request.headers.get("content-length") or 0) > UI_UPLOAD_MAX_BYTES:
            raise _ui_upload_too_large()
        chunks = request.stream()
        first = b""
        async for first in chunks:
            if first:
                break
        if not first:
            raise MlflowException.invalid_parameter_value("Request must specify data.")
        root = await self._run_root(run_id)
        destination_path = _destination_path(root, directory or None)
        if destination_path is not None:
            repo, target = self._destination, destination_path
        else:
            repo, target = await asyncio.to_thread(get_artifact_repository, root), directory
        await _upload_stream(repo, _capped(first, chunks), name, target or None)
        return Response(media_type="application/json")

    async def delete(self, request: Request) -> Response:
        self._check_writable()
        path = _artifact_path(request)
        await asyncio.to_thread(self._destination.delete_artifacts, path)
        return _json(artifacts_pb2.DeleteArtifact.Response())

    async def list_destination(self, request: Request) -> Response:
        path = request.query_params.get("path")
        safe = _safe_path(path) if path is not None else None
        infos = await asyncio.to_thread(self._destination.list_artifacts, safe)
        response = ListArtifacts.Response()
        for info in infos:
            response.files.add(path=posixpath.basename(info.path), is_dir=info.is_dir, file_size=info.file_size)
        return _json(response)

    async def list_run(self, request: Request) -> Response:
        run_id = _required(request, "run_id", "run_uuid")
        path = request.query_params.get("path")
        relative = _safe_path(path) if path is not None else None
        root = await self._run_root(run_id)
        response = ListArtifacts.Response(root_uri=root)
        if (destination_path := _destination_path(root, relative)) is not None:
            # Names come back relative to the run's root, not to the destination.
            for info in await asyncio.to_thread(self._destination.list_artifacts, destination_path):
                name = posixpath.basename(info.path)
                run_path = posixpath.join(relative, name) if relative else name
                response.files.add(path=run_path, is_dir=info.is_dir, file_size=info.file_size)
        else:
            repo = await asyncio.to_thread(get_artifact_repository, root)
            response.files.extend(info.to_proto() for info in await asyncio.to_thread(repo.list_artifacts, relative))
        return _json(response)

    async def get_artifact(self, request: Request) -> Response:
        run_id = _required(request, "run_id", "run_uuid")
        path = _safe_path(_required(request, "path"))
        root = await self._run_root(run_id)
        if (destination_path := _destination_path(root, path)) is not None:
            return await _send_artifact(self._destination, destination_path)
        repo = await asyncio.to_thread(get_artifact_repository, root)
        return await _send_artifact(repo, path)

    async def create_multipart(self, request: Request) -> Response:
        self._check_writable()
        path = _artifact_path(request)
        message = await _parse_body(request, artifacts_pb2.CreateMultipartUpload(), "path")
        repo = _multipart_repo(self._destination)
        created = await asyncio.to_thread(repo.create_multipart_upload, message.path, message.num_parts, path)
        return _json(created.to_proto())

    async def complete_multipart(self, request: Request) -> Response:
        self._check_writable()
        path = _artifact_path(request)
        message = await _parse_body(request, artifacts_pb2.CompleteMultipartUpload(), "path", "parts")
        parts = [MultipartUploadPart.from_proto(part) for part in message.parts]
        repo = _multipart_repo(self._destination)
        await asyncio.to_thread(repo.complete_multipart_upload, message.path, message.upload_id, parts, path)
        return _json(artifacts_pb2.CompleteMultipartUpload.Response())

    async def abort_multipart(self, request: Request) -> Response:
        self._check_writable()
        path = _artifact_path(request)
        message = await _parse_body(request, artifacts_pb2.AbortMultipartUpload(), "path")
        repo = _multipart_repo(self._destination)
        await asyncio.to_thread(repo.abort_multipart_upload, message.path, message.upload_id, path)
        return _json(artifacts_pb2.AbortMultipartUpload.Response())

    async def presigned_download(self, request: Request) -> Response:
        path = _artifact_path(request)
        repo = self._destination
        if not isinstance(repo, MultipartDownloadMixin):
            raise _UnsupportedMultipartDownloadException()
        expiration = MLFLOW_PRESIGNED_DOWNLOAD_URL_TTL_SECONDS.get()
        presigned = await asyncio.to_thread(repo.get_download_presigned_url, path, expiration)
        return Response(json.dumps(presigned.to_dict()), media_type="application/json")

    async def _run_root(self, run_id: str) -> str:
        """The run's artifact root, which must lie under the configured roots: a stored row is never trusted."""
        try:
            root = await self._run_artifact_uri(run_id)
        except NotFoundError:
            raise MlflowException(f"Run with id={run_id} not found", error_code=RESOURCE_DOES_NOT_EXIST) from None
        self._roots.check_stored(root)
        return root

    def _check_writable(self) -> None:
        if not self._writable:
            raise MlflowException(
                "This node is read-only (--role reader): it does not write or delete artifacts;"
                " send them to a node that stores.",
                error_code=PERMISSION_DENIED,
            )


def _route(path: str, endpoint: _Endpoint, method: str) -> Route:
    return Route(path, guarded(endpoint), methods=[method])


def _json(message: Message) -> Response:
    return Response(_message_to_json(message), media_type="application/json")


def _safe_path(path: str) -> str:
    """Stock's traversal check: decodes repeatedly, then rejects `..`, absolute, drive and backslash paths."""
    try:
        return _validate_path_is_safe(path)
    except ValueError:  # more percent-encoding layers than MLflow is willing to peel
        raise MlflowException("Invalid path", error_code=INVALID_PARAMETER_VALUE) from None


def _artifact_path(request: Request) -> str:
    path: str = request.path_params["artifact_path"]
    if not path:
        # Flask's `<path:...>` never matches an empty path; Starlette's does, and an empty path means the
        # destination root, which a DELETE would wipe.
        raise MlflowException(f"No API endpoint for {request.url.path}", error_code=ENDPOINT_NOT_FOUND)
    return _safe_path(path)


def _required(request: Request, *names: str) -> str:
    for name in names:
        if value := request.query_params.get(name):
            return value
    raise MlflowException.invalid_parameter_value(
        f"Missing value for required parameter '{names[0]}'. "
        "See the API docs for more information about request parameters."
    )


def _destination_path(run_root: str, relative: str | None) -> str | None:
    """Where a proxied run root (and a path in it) lives under the destination; None if the root is not proxied."""
    parsed = urllib.parse.urlparse(run_root)
    if parsed.scheme not in _PROXIED_SCHEMES:
        return None
    if parsed.scheme == "mlflow-artifacts":
        root_path = parsed.path.lstrip("/")
    elif _HTTP_ROOT_ANCHOR in parsed.path:
        root_path = parsed.path.split(_HTTP_ROOT_ANCHOR, 1)[1].lstrip("/")
    else:
        raise MlflowException(f"Cannot resolve the proxied run artifact root {run_root!r}")
    return posixpath.join(root_path, relative) if relative is not None else root_path


def _multipart_repo(repo: ArtifactRepository) -> MultipartUploadMixin:
    if not isinstance(repo, MultipartUploadMixin):
        raise _UnsupportedMultipartUploadException()
    return repo


async def _parse_body(request: Request, message: _M, *required: str) -> _M:
    try:
        body = json.loads(await request.body() or b"{}")
        if not isinstance(body, dict):
            raise ValueError("not a JSON object")
        _parse_dict(body, message)
    except (ValueError, ParseError) as e:
        raise MlflowException.invalid_parameter_value(f"Malformed request body: {e}") from None
    for name in required:
        if body.get(name) in (None, ""):  # stock's _assert_required: present, though `parts` may be empty
            raise MlflowException.invalid_parameter_value(
                f"Missing value for required parameter '{name}'. "
                "See the API docs for more information about request parameters."
            )
    return message


async def _upload_stream(
    repo: ArtifactRepository, chunks: AsyncIterable[bytes], name: str, directory: str | None
) -> None:
    """Store a request body as one artifact, chunk by chunk.

    The body-limit middleware caps the stream, and a stream cut short leaves nothing behind: MLflow's stream
    upload stages and then publishes, and the spooled copy here is removed.
    """
    if isinstance(repo, StreamUploadMixin):
        await repo.log_artifact_from_async_stream(chunks, name, artifact_path=directory)
    else:
        await _upload_via_temp_file(repo, chunks, name, directory)


async def _capped(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The UI upload's body, cut off with stock's error at stock's 10 MB (a chunked body declares no length)."""
    size = len(first)
    yield first
    async for chunk in rest:
        size += len(chunk)
        if size > UI_UPLOAD_MAX_BYTES:
            raise _ui_upload_too_large()
        yield chunk


def _ui_upload_too_large() -> MlflowException:
    return MlflowException("Artifact size is too large. Max size is 10MB.", error_code=INVALID_PARAMETER_VALUE)


async def _upload_via_temp_file(
    repo: ArtifactRepository, chunks: AsyncIterable[bytes], name: str, directory: str | None
) -> None:
    """Repositories that cannot take a stream get a spooled file, never the whole body in memory."""
    tmp_dir = await asyncio.to_thread(tempfile.mkdtemp)
    try:
        tmp_path = os.path.join(tmp_dir, name)
        with open(tmp_path, "wb") as f:
            async for chunk in chunks:
                await asyncio.to_thread(f.write, chunk)
        await asyncio.to_thread(repo.log_artifact, tmp_path, directory)
    finally:
        await asyncio.to_thread(shutil.rmtree, tmp_dir, True)


async def _send_artifact(repo: ArtifactRepository, path: str) -> Response:
    """Always an attachment, so a browser never renders an artifact as a page of this server's origin."""
    local_path = await asyncio.to_thread(_local_file, repo, path)
    if local_path is not None:
        return FileResponse(local_path, headers=_attachment_headers(local_path, path))
    tmp_dir = await asyncio.to_thread(tempfile.mkdtemp)
    try:
        downloaded: str = await asyncio.to_thread(repo.download_artifacts, path, tmp_dir)
        file_path = _require_file(os.path.abspath(downloaded), path)
        size = await asyncio.to_thread(os.path.getsize, file_path)
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, tmp_dir, True)
        raise
    headers = {**_attachment_headers(file_path, path), "Content-Length": str(size)}
    return StreamingResponse(_read_then_remove(file_path, tmp_dir), headers=headers)


def _local_file(repo: ArtifactRepository, path: str) -> str | None:
    local_path = repo.get_local_path(path)
    return None if local_path is None else _require_file(os.path.abspath(local_path), path)


def _require_file(file_path: str, artifact_path: str) -> str:
    if os.path.isdir(file_path):
        raise MlflowException.invalid_parameter_value(
            f"Artifact path refers to a directory, not a file: '{artifact_path}'"
        )
    return file_path


def _read_then_remove(file_path: str, tmp_dir: str) -> Iterator[bytes]:
    # Starlette iterates a sync generator in its threadpool; closing it (even on disconnect) removes the copy.
    try:
        with open(file_path, "rb") as f:
            while chunk := f.read(ARTIFACT_STREAM_CHUNK_SIZE):
                yield chunk
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _attachment_headers(file_path: str, artifact_path: str) -> dict[str, str]:
    # Set as a header, not a media_type, so Starlette adds no charset: stock sends the bare type.
    return {
        "Content-Type": _guess_mime_type(file_path),
        "Content-Disposition": _content_disposition(pathlib.PurePosixPath(artifact_path).name),
        "X-Content-Type-Options": "nosniff",
    }


def _content_disposition(filename: str) -> str:
    """Stock's RFC 6266 value: headers are ASCII, so non-ASCII names also get an RFC 5987 `filename*`."""
    try:
        filename.encode("ascii")
    except UnicodeEncodeError:
        fallback = unicodedata.normalize("NFKD", filename).encode("ascii", "ignore").decode("ascii") or "download"
        quoted = urllib.parse.quote(filename, safe="!#$&+-.^_`|~")
        return f"attachment; filename={_quote_header_value(fallback)}; filename*=UTF-8''{quoted}"
    return f"attachment; filename={_quote_header_value(filename)}"


def _quote_header_value(value: str) -> str:
    # werkzeug.http.quote_header_value(allow_token=True), which stock uses; werkzeug is not our dependency.
    if not value:
        return '""'
    if _TOKEN_CHARS.issuperset(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
