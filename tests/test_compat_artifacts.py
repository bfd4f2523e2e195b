"""compat/artifacts.py in a real trackhouse server, driven by MLflow's own client and by raw HTTP."""

from __future__ import annotations

import http.client
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
from mlflow.entities import FileInfo
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from tests.conftest import RunningServer

EXPERIMENT_ID = "0"  # the Default experiment, whose artifacts live under mlflow-artifacts:/0


class _Repository(Protocol):
    """The slice of ArtifactRepository these tests call, typed: MLflow leaves these methods unannotated."""

    def log_artifact(self, local_file: str, artifact_path: str | None = None) -> None: ...
    def delete_artifacts(self, artifact_path: str | None = None) -> None: ...
    def list_artifacts(self, path: str | None = None) -> list[FileInfo]: ...


@dataclass
class HttpResult:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class ArtifactServer:
    """A real trackhouse server (tests/conftest.py) serving artifacts from `destination`."""

    running: RunningServer
    destination: Path

    @property
    def url(self) -> str:
        return self.running.http_url

    @property
    def port(self) -> int:
        return self.running.server.http_port

    def new_run(self) -> str:
        """A real run (runs/create) in the Default experiment, whose artifacts the server proxies."""
        run = self.client().create_run(EXPERIMENT_ID)
        assert run.info.artifact_uri == f"mlflow-artifacts:/{EXPERIMENT_ID}/{run.info.run_id}/artifacts"
        return str(run.info.run_id)

    def artifact_uri(self, run_id: str) -> str:
        """The run's artifact root as runs/get reports it."""
        uri = self.client().get_run(run_id).info.artifact_uri
        assert isinstance(uri, str)
        return uri

    def stored(self, run_id: str, path: str) -> Path:
        """Where the run's artifact `path` lies in the destination: its mlflow-artifacts:/ path, under it."""
        proxied = self.artifact_uri(run_id).removeprefix("mlflow-artifacts:/")
        return self.destination / proxied / path

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.url)

    def repo(self, run_id: str) -> _Repository:
        return get_artifact_repository(self.artifact_uri(run_id), tracking_uri=self.url)

    def request(self, method: str, target: str, body: bytes | None = None) -> HttpResult:
        """Raw HTTP, so traversal paths reach the server exactly as written (no dot-segment normalisation)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, target, body=body)
            response = connection.getresponse()
            return HttpResult(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            connection.close()


@pytest.fixture
def start_artifact_server(start_server: Callable[..., RunningServer], tmp_path: Path) -> Callable[..., ArtifactServer]:
    """Factory: start_artifact_server(destination) where destination may use `{tmp}` for tmp_path.

    chDB opens one data directory per process, so every server of a test shares `tmp/data`; the
    artifacts destination is what differs.
    """

    def start(destination: str) -> ArtifactServer:
        running = start_server(data_dir=tmp_path / "data", artifacts_destination=destination.format(tmp=tmp_path))
        return ArtifactServer(running, tmp_path / "dest")

    return start


@pytest.fixture
def server(start_artifact_server: Callable[[str], ArtifactServer]) -> ArtifactServer:
    return start_artifact_server("{tmp}/dest")


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "destination", ["{tmp}/dest", "file://{tmp}/dest", "dest"], ids=["plain-path", "file-uri", "relative-path"]
)
def test_client_uploads_lists_and_downloads(
    start_artifact_server: Callable[[str], ArtifactServer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    destination: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    server = start_artifact_server(destination)
    # A relative destination was resolved at start-up; moving the working directory must not move it.
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    run_id = server.new_run()
    client = server.client()
    payload = os.urandom(3 * 1024 * 1024 + 17)  # several upload chunks
    client.log_artifact(run_id, str(_write(tmp_path / "src" / "weights.bin", payload)))
    _write(tmp_path / "tree" / "config.json", b'{"lr": 0.1}')
    _write(tmp_path / "tree" / "deep" / "notes.txt", b"hello")
    client.log_artifacts(run_id, str(tmp_path / "tree"), artifact_path="bundle")

    assert server.stored(run_id, "weights.bin").read_bytes() == payload
    assert server.stored(run_id, "bundle/deep/notes.txt").read_bytes() == b"hello"
    root = [(f.path, f.is_dir, f.file_size) for f in client.list_artifacts(run_id)]
    assert root == [("bundle", True, None), ("weights.bin", False, len(payload))]
    sub = [(f.path, f.is_dir, f.file_size) for f in client.list_artifacts(run_id, "bundle")]
    assert sub == [("bundle/config.json", False, 11), ("bundle/deep", True, None)]

    downloaded = client.download_artifacts(run_id, "weights.bin", str(tmp_path / "out"))
    assert Path(downloaded).read_bytes() == payload
    tree = Path(client.download_artifacts(run_id, "bundle", str(tmp_path / "out")))
    assert (tree / "deep" / "notes.txt").read_bytes() == b"hello"


def test_list_destination_matches_stock_json(server: ArtifactServer) -> None:
    run_id = server.new_run()
    _write(server.stored(run_id, "a.txt"), b"abc")
    _write(server.stored(run_id, "dir/b.txt"), b"b")
    prefix = f"{EXPERIMENT_ID}/{run_id}/artifacts"

    listed = server.request("GET", f"/api/2.0/mlflow-artifacts/artifacts?path={prefix}")
    assert listed.status == 200
    assert listed.headers["content-type"] == "application/json"
    assert listed.json() == {
        "files": [{"path": "a.txt", "is_dir": False, "file_size": 3}, {"path": "dir", "is_dir": True}]
    }
    nothing = server.request("GET", f"/ajax-api/2.0/mlflow-artifacts/artifacts?path={prefix}/missing")
    assert (nothing.status, nothing.json()) == (200, {})


def test_run_artifacts_list_returns_root_uri_and_run_relative_paths(server: ArtifactServer) -> None:
    run_id = server.new_run()
    _write(server.stored(run_id, "model/MLmodel"), b"flavors: {}")
    _write(server.stored(run_id, "metrics.csv"), b"a,b")

    root = server.request("GET", f"/api/2.0/mlflow/artifacts/list?run_id={run_id}")
    assert root.status == 200
    assert root.json() == {
        "root_uri": f"mlflow-artifacts:/{EXPERIMENT_ID}/{run_id}/artifacts",
        "files": [{"path": "metrics.csv", "is_dir": False, "file_size": 3}, {"path": "model", "is_dir": True}],
    }
    sub = server.request("GET", f"/ajax-api/2.0/mlflow/artifacts/list?run_uuid={run_id}&path=model&page_token=x")
    assert sub.json()["files"] == [{"path": "model/MLmodel", "is_dir": False, "file_size": 11}]


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("notes.txt", "text/plain"),
        ("data.json", "text/plain"),
        ("script.js", "text/plain"),
        ("MLmodel", "text/plain"),
        ("page.html", "text/html"),
        ("plot.png", "image/png"),
        ("blob", "application/octet-stream"),
    ],
)
def test_get_artifact_preview_is_an_attachment_with_stock_content_type(
    server: ArtifactServer, name: str, content_type: str
) -> None:
    run_id = server.new_run()
    _write(server.stored(run_id, f"dir/{name}"), b"<script>alert(1)</script>")

    preview = server.request("GET", f"/get-artifact?run_uuid={run_id}&path=dir/{name}")
    assert preview.status == 200
    assert preview.body == b"<script>alert(1)</script>"
    assert preview.headers["content-type"] == content_type
    assert preview.headers["content-disposition"] == f"attachment; filename={name}"
    assert preview.headers["x-content-type-options"] == "nosniff"
    download = server.request(
        "GET", f"/api/2.0/mlflow-artifacts/artifacts/{EXPERIMENT_ID}/{run_id}/artifacts/dir/{name}"
    )
    assert (download.status, download.headers["content-type"], download.body) == (200, content_type, preview.body)


def test_non_ascii_file_name_gets_rfc5987_disposition(server: ArtifactServer) -> None:
    run_id = server.new_run()
    _write(server.stored(run_id, "résumé.txt"), b"x")
    response = server.request("GET", f"/get-artifact?run_id={run_id}&path=r%C3%A9sum%C3%A9.txt")
    assert (
        response.headers["content-disposition"]
        == "attachment; filename=resume.txt; filename*=UTF-8''r%C3%A9sum%C3%A9.txt"
    )


def test_remote_destination_spools_uploads_and_downloads(
    start_artifact_server: Callable[[str], ArtifactServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A destination with no local path and no stream upload (HttpArtifactRepository): here, another server."""
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    storage = start_artifact_server("{tmp}/dest")
    proxy = start_artifact_server(f"{storage.url}/api/2.0/mlflow-artifacts/artifacts")
    run_id = proxy.new_run()
    payload = os.urandom(2 * 1024 * 1024 + 3)
    proxy.client().log_artifact(run_id, str(_write(tmp_path / "src" / "data.json", payload)), artifact_path="d")

    assert storage.stored(run_id, "d/data.json").read_bytes() == payload
    assert [(f.path, f.file_size) for f in proxy.client().list_artifacts(run_id, "d")] == [
        ("d/data.json", len(payload))
    ]
    preview = proxy.request("GET", f"/get-artifact?run_id={run_id}&path=d/data.json")
    assert (preview.status, preview.headers["content-type"], preview.body) == (200, "text/plain", payload)
    assert preview.headers["content-length"] == str(len(payload))
    directory = proxy.request("GET", f"/get-artifact?run_id={run_id}&path=d")
    assert (directory.status, directory.json()["error_code"]) == (400, "INVALID_PARAMETER_VALUE")
    proxy.repo(run_id).delete_artifacts("d")
    assert not storage.stored(run_id, "d").exists()
    # The download spool goes once the response's last chunk is read, a moment after the client has it all.
    deadline = time.monotonic() + 10
    while any(spool.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(spool.iterdir())


def test_delete_through_the_mlflow_artifacts_repository(server: ArtifactServer, tmp_path: Path) -> None:
    run_id = server.new_run()
    repo = server.repo(run_id)
    repo.log_artifact(str(_write(tmp_path / "keep.txt", b"k")))
    repo.log_artifact(str(_write(tmp_path / "gone.txt", b"g")), artifact_path="sub")

    repo.delete_artifacts("sub")
    assert [f.path for f in repo.list_artifacts()] == ["keep.txt"]
    repo.delete_artifacts()  # the whole run root, as `mlflow gc` does
    assert not server.stored(run_id, "").exists()


def test_missing_artifacts_and_directories(server: ArtifactServer) -> None:
    run_id = server.new_run()
    _write(server.stored(run_id, "dir/f.txt"), b"f")
    base = f"/api/2.0/mlflow-artifacts/artifacts/{EXPERIMENT_ID}/{run_id}/artifacts"

    missing = server.request("GET", f"{base}/nope.txt")
    assert (missing.status, missing.json()["error_code"]) == (404, "RESOURCE_DOES_NOT_EXIST")
    directory = server.request("GET", f"/get-artifact?run_id={run_id}&path=dir")
    assert (directory.status, directory.json()["error_code"]) == (400, "INVALID_PARAMETER_VALUE")
    no_name = server.request("PUT", f"{base}/dir/", body=b"x")
    assert (no_name.status, no_name.json()["error_code"]) == (400, "INVALID_PARAMETER_VALUE")
    # An empty artifact path would name the destination root; it is no endpoint, as in stock.
    empty = server.request("DELETE", "/api/2.0/mlflow-artifacts/artifacts/")
    assert (empty.status, empty.json()["error_code"]) == (404, "ENDPOINT_NOT_FOUND")
    assert server.stored(run_id, "dir/f.txt").exists()


@pytest.mark.parametrize(
    "target",
    [
        "/api/2.0/mlflow/artifacts/list?run_id=unknown",
        "/ajax-api/2.0/mlflow/artifacts/list?run_uuid=unknown&path=a",
        "/get-artifact?run_id=unknown&path=a.txt",
    ],
)
def test_unknown_run_is_resource_does_not_exist(server: ArtifactServer, target: str) -> None:
    response = server.request("GET", target)
    assert response.status == 404
    assert response.json() == {
        "error_code": "RESOURCE_DOES_NOT_EXIST",
        "message": "Run with id=unknown not found",
        "sqlstate": "KAM00",
        "error_class": "RESOURCE_NOT_FOUND",
    }


@pytest.mark.parametrize(
    "target", ["/api/2.0/mlflow/artifacts/list", "/get-artifact?path=a", "/get-artifact?run_id={run}"]
)
def test_missing_parameters_are_invalid(server: ArtifactServer, target: str) -> None:
    run_id = server.new_run()  # a run that exists, so only the missing parameter is wrong
    response = server.request("GET", target.format(run=run_id))
    assert (response.status, response.json()["error_code"]) == (400, "INVALID_PARAMETER_VALUE")


# Each escapes the destination (tmp/dest) to tmp/outside.txt, or names an absolute path; as raw URL text.
TRAVERSAL_PATHS = [
    "../outside.txt",
    f"{EXPERIMENT_ID}/run/artifacts/../../../../outside.txt",
    "%2E%2E/outside.txt",
    "%252E%252E/outside.txt",  # decoded twice: once by the server, once by MLflow's validation
    "..%2Foutside.txt",
    "/etc/passwd",
    "%2Fetc%2Fpasswd",
    "file:///etc/passwd",
    "%23/../outside.txt",  # stock refuses any '#'
]


@pytest.mark.parametrize("path", TRAVERSAL_PATHS)
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_traversal_in_artifact_paths_is_rejected(
    server: ArtifactServer, tmp_path: Path, method: str, path: str
) -> None:
    _write(tmp_path / "outside.txt", b"secret")
    body = b"overwrite" if method == "PUT" else None

    response = server.request(method, f"/api/2.0/mlflow-artifacts/artifacts/{path}", body=body)
    assert response.status == 400
    assert response.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    assert (tmp_path / "outside.txt").read_bytes() == b"secret"


@pytest.mark.parametrize("path", TRAVERSAL_PATHS)
@pytest.mark.parametrize(
    "endpoint",
    [
        "/api/2.0/mlflow-artifacts/artifacts?path=",
        "/api/2.0/mlflow/artifacts/list?run_id={run}&path=",
        "/get-artifact?run_id={run}&path=",
    ],
)
def test_traversal_in_query_paths_is_rejected(server: ArtifactServer, endpoint: str, path: str) -> None:
    run_id = server.new_run()
    response = server.request("GET", endpoint.format(run=run_id) + path)
    assert response.status == 400
    assert response.json() == {
        "error_code": "INVALID_PARAMETER_VALUE",
        "message": "Invalid path",
        "sqlstate": "KAM00",
        "error_class": "INVALID_PARAMETER_VALUE",
    }


def test_multipart_and_presigned_are_not_implemented_for_local_storage(server: ArtifactServer) -> None:
    run_id = server.new_run()
    _write(server.stored(run_id, "a.bin"), b"a")
    root = f"{EXPERIMENT_ID}/{run_id}/artifacts"
    body = json.dumps({"path": "big.bin", "num_parts": 2}).encode()

    created = server.request("POST", f"/api/2.0/mlflow-artifacts/mpu/create/{root}", body=body)
    assert created.status == 501
    assert created.json() == {
        "error_code": "NOT_IMPLEMENTED",
        "message": "Multipart upload is not supported for the current artifact repository",
    }
    no_path = server.request("POST", f"/api/2.0/mlflow-artifacts/mpu/abort/{root}", body=b'{"upload_id": "u"}')
    assert (no_path.status, no_path.json()["error_code"]) == (400, "INVALID_PARAMETER_VALUE")
    presigned = server.request("GET", f"/ajax-api/2.0/mlflow-artifacts/presigned/{root}/a.bin")
    assert (presigned.status, presigned.json()["error_code"]) == (501, "NOT_IMPLEMENTED")
