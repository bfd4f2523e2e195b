"""Issue 11 findings 1 and 2: a client-chosen artifact_location can neither read the host's files nor make the
server connect to a host the client names. Through the real server, the MLflow client and raw HTTP."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils import uri

from tests.conftest import RunningServer

SECRET = b"root:x:0:0:secret"


def request(server: RunningServer, method: str, target: str, body: Any = None) -> tuple[int, dict[str, Any], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=60)
    try:
        raw = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
        connection.request(method, target, body=raw)
        response = connection.getresponse()
        data = response.read()
        try:
            parsed = json.loads(data) if data else {}
        except ValueError:
            parsed = {}
        return response.status, parsed, data
    finally:
        connection.close()


class Listener:
    """A TCP listener standing in for a host the client names: it records whether the server ever connects."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self.port: int = self._socket.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._socket.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._socket.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    running = Listener()
    yield running
    running.close()


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside every artifact root, holding a file no client may read through the server."""
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "passwd").write_bytes(SECRET)
    return directory


def _file_locations(outside: Path) -> list[str]:
    # Each resolved to `outside` in the old server (finding 1: `file:///etc#` read /etc/passwd).
    return [f"file://{outside}#", f"file://{outside}?x=", f"file://{outside};p", f"{outside}#", str(outside)]


def _host_locations(port: int) -> list[str]:
    # Finding 2: each makes MLflow's artifact repository connect to the host it names.
    host = f"127.0.0.1:{port}"
    return [
        f"ftp://{host}/x",
        f"sftp://user@{host}/x",
        f"hdfs://{host}/x",
        f"http://{host}/x",
        f"https://{host}/x",
        f"mlflow-artifacts://{host}/x",
        "s3://someone-elses-bucket/x",
        "gs://someone-elses-bucket/x",
    ]


def test_hostile_artifact_locations_are_refused_at_create(
    server: RunningServer, outside: Path, listener: Listener
) -> None:
    locations = _file_locations(outside) + _host_locations(listener.port)
    for i, location in enumerate(locations):
        status, error, _ = request(
            server, "POST", "/api/2.0/mlflow/experiments/create", {"name": f"e{i}", "artifact_location": location}
        )
        assert (status, error.get("error_code")) == (400, "INVALID_PARAMETER_VALUE"), location
        missing, _, _ = request(server, "GET", f"/api/2.0/mlflow/experiments/get-by-name?experiment_name=e{i}")
        assert missing == 404, f"{location} created an experiment"
    client = MlflowClient(tracking_uri=server.http_url)
    with pytest.raises(MlflowException, match="outside the artifact roots"):
        client.create_experiment("via-client", artifact_location=f"file://{outside}#")
    assert listener.connections == 0


def test_stock_refusals_keep_stock_wording(server: RunningServer) -> None:
    """Stock's own check runs first, so what stock refuses is refused in stock's words."""
    status, error, _ = request(
        server, "POST", "/api/2.0/mlflow/experiments/create", {"name": "f", "artifact_location": "/tmp/x#frag"}
    )
    assert (status, error["message"]) == (400, "'artifact_location' URL can't include fragments or params.")
    status, error, _ = request(
        server, "POST", "/api/2.0/mlflow/experiments/create", {"name": "r", "artifact_location": "runs:/abc/x"}
    )
    assert status == 400 and "runs:/" in error["message"]


def _old_experiment(server: RunningServer, experiment_id: str, location: str) -> str:
    """A row written before the rule (or by another tool), pointing outside the roots; then a run in it."""
    server.rows(
        "INSERT INTO trackhouse.experiments VALUES ({id:String}, {name:String}, {loc:String}, 'active', 1, 1, 1)",
        id=experiment_id,
        name=f"old-{experiment_id}",
        loc=location,
    )
    run_id: str = MlflowClient(tracking_uri=server.http_url).create_run(experiment_id).info.run_id
    return run_id


def test_old_rows_pointing_outside_are_never_read(server: RunningServer, outside: Path, listener: Listener) -> None:
    # The run's artifact root is <location>/<run_id>/artifacts; a fragment makes it resolve to `outside` itself.
    locations = [*_file_locations(outside)[:4], *_host_locations(listener.port)]
    for i, location in enumerate(locations):
        run_id = _old_experiment(server, str(900 + i), location)
        for target in (
            f"/get-artifact?run_id={run_id}&path=passwd",
            f"/api/2.0/mlflow/artifacts/list?run_id={run_id}",
            f"/ajax-api/2.0/mlflow/artifacts/list?run_uuid={run_id}&path=x",
        ):
            status, error, raw = request(server, "GET", target)
            assert (status, error.get("error_code")) == (403, "PERMISSION_DENIED"), (location, target)
            assert SECRET not in raw
        status, error, _ = request(
            server, "POST", f"/ajax-api/2.0/mlflow/upload-artifact?run_uuid={run_id}&path=planted", b"x"
        )
        assert (status, error.get("error_code")) == (403, "PERMISSION_DENIED"), location
    assert not (outside / "planted").exists()
    assert (outside / "passwd").read_bytes() == SECRET
    assert listener.connections == 0


def test_locations_under_configured_roots_work(
    start_server: Callable[..., RunningServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    team = tmp_path / "team"
    server = start_server(network={"artifacts_allowed_roots": (str(team), "s3://team-bucket/mlflow")})
    client = MlflowClient(tracking_uri=server.http_url)

    experiment_id = client.create_experiment("allowed", artifact_location=f"file://{team}/exp")
    run_id = client.create_run(experiment_id).info.run_id
    (team / "exp" / run_id / "artifacts").mkdir(parents=True)
    (team / "exp" / run_id / "artifacts" / "ok.txt").write_bytes(b"fine")
    status, _, raw = request(server, "GET", f"/get-artifact?run_id={run_id}&path=ok.txt")
    assert (status, raw) == (200, b"fine")

    # An allow-listed bucket is accepted (no connection is made at create time); its neighbours are not.
    assert client.create_experiment("bucket", artifact_location="s3://team-bucket/mlflow/a")
    for location in ("s3://team-bucket/mlflowx", "s3://team-bucket/other", f"file://{team}/../outside"):
        with pytest.raises(MlflowException, match="outside the artifact roots"):
            client.create_experiment(f"no-{location}", artifact_location=location)
    # The proxied form names a path under the destination, as stock's default does.
    proxied = client.create_experiment("proxied", artifact_location="mlflow-artifacts:/custom/place")
    assert client.get_experiment(proxied).artifact_location == "mlflow-artifacts:/custom/place"
    with pytest.raises(MlflowException):
        client.create_experiment("escape", artifact_location="mlflow-artifacts:/custom/../../x")


def test_relative_artifact_location_is_made_absolute_as_stock_does(
    start_server: Callable[..., RunningServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    server = start_server(network={"artifacts_allowed_roots": ("team",)})  # a relative root is pinned at start-up, too
    client = MlflowClient(tracking_uri=server.http_url)
    experiment_id = client.create_experiment("relative", artifact_location="team/exp")
    stored = client.get_experiment(experiment_id).artifact_location
    assert stored == uri.resolve_uri_if_local("team/exp") == str(tmp_path / "team" / "exp")  # type: ignore[no-untyped-call]
    with pytest.raises(MlflowException, match="outside the artifact roots"):
        client.create_experiment("relative-outside", artifact_location="elsewhere/exp")
