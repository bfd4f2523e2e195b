"""Authentication and roles: the users-and-tokens file, HTTP (Bearer and Basic) and gRPC (call metadata).

Real servers on free loopback ports, the real `trackhouse auth` command, raw gRPC stubs with metadata.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import ROOT, RunningServer
from tests.test_ingest_grpc import points, run_upsert
from trackhouse.compat.security import READ_POSTS, is_write
from trackhouse.ingest import auth
from trackhouse.ingest.codec import encode_request
from trackhouse.v1 import ingest_pb2

API = "/api/2.0/mlflow"


@dataclass(frozen=True)
class Users:
    path: Path
    writer_token: str
    reader_token: str

    writer = ("alice", "alice-password")
    reader = ("bob", "bob-password")


@pytest.fixture
def users(tmp_path: Path) -> Users:
    path = tmp_path / "auth.json"
    auth.add_user(path, *Users.writer, role="write")
    auth.add_user(path, *Users.reader, role="read")
    return Users(path, auth.add_token(path, "ci", "write"), auth.add_token(path, "dashboards", "read"))


@pytest.fixture
def secured(start_server: Callable[..., RunningServer], users: Users) -> RunningServer:
    return start_server(network={"auth_file": users.path})


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --- the file ---------------------------------------------------------------------------------------------------


def test_the_file_holds_salted_hashes_never_the_secrets(users: Users) -> None:
    text = users.path.read_text()
    for secret in ("alice-password", "bob-password", users.writer_token, users.writer_token.split("_", 2)[2]):
        assert secret not in text
    document = json.loads(text)
    hashes = [e["hash"] for e in document["users"].values()]
    assert all(h.startswith("scrypt$") for h in hashes)
    assert len({h.split("$")[4] for h in hashes}) == len(hashes)  # a salt per entry
    assert users.path.stat().st_mode & 0o077 == 0


def test_auth_command_writes_the_file_and_prints_a_token_once(tmp_path: Path) -> None:
    path = tmp_path / "users.json"

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "trackhouse.cli", "auth", "--auth-file", str(path), *args]
        return subprocess.run(command, cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=60)

    assert run("add-user", "carol", "--role", "read", "--password-stdin", stdin="carol-pw\n").returncode == 0
    made = run("add-token", "ci", "--role", "write")
    token = made.stdout.strip().splitlines()[-1]
    assert made.returncode == 0 and token.startswith("th_")
    listed = run("list").stdout
    assert "carol  read" in listed and "ci  write" in listed and token not in listed
    checker = auth.Authenticator(path)
    assert checker.check(basic("carol", "carol-pw")) == auth.Principal("carol", "read")
    assert checker.check(f"Bearer {token}") == auth.Principal("ci", "write")
    assert run("add-user", "x", "--role", "admin", "--password-stdin", stdin="p\n").returncode != 0
    assert run("remove", "carol").returncode == 0
    assert "carol" not in run("list").stdout


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer th_nope_nope",
        "Bearer not-a-trackhouse-token",
        basic("alice", "wrong"),
        basic("nobody", "alice-password"),
        "Basic !!!not-base64!!!",
        "Digest username=alice",
        "Bearer " + "x" * 20_000,
    ],
)
def test_bad_credentials_are_refused(users: Users, authorization: str | None) -> None:
    with pytest.raises(auth.AuthError):
        auth.Authenticator(users.path).check(authorization)


def test_a_token_is_refused_once_it_is_removed(users: Users, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "_RELOAD_S", 0.0)
    checker = auth.Authenticator(users.path)
    assert checker.check(f"Bearer {users.reader_token}").role == "read"  # now cached
    auth.remove(users.path, "dashboards")
    with pytest.raises(auth.AuthError):
        checker.check(f"Bearer {users.reader_token}")


def test_a_credential_added_while_serving_works_at_once(users: Users) -> None:
    checker = auth.Authenticator(users.path)
    assert checker.check(f"Bearer {users.writer_token}").name == "ci"  # the reload interval starts now
    added = auth.add_token(users.path, "new", "read")
    assert checker.check(f"Bearer {added}") == auth.Principal("new", "read")


def test_a_malformed_file_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    path.write_text('{"users": {"eve": {"role": "root", "hash": "x"}}}')
    with pytest.raises(auth.AuthFileError, match="malformed"):
        auth.Authenticator(path)


# --- which requests are writes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "write"),
    [
        ("GET", f"{API}/experiments/get-by-name", False),
        ("GET", f"{API}/metrics/get-history", False),
        ("GET", "/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval", False),
        ("POST", f"{API}/runs/search", False),
        ("POST", "/ajax-api/2.0/mlflow/runs/search", False),
        ("POST", f"{API}/experiments/search", False),
        ("POST", "/ajax-api/2.0/mlflow/logged-models/search", False),
        ("POST", "/graphql", False),
        ("POST", "/ajax-api/graphql", False),
        ("GET", "/get-artifact", False),
        ("GET", "/api/2.0/mlflow-artifacts/artifacts/x/y.txt", False),
        ("POST", f"{API}/runs/create", True),
        ("POST", f"{API}/runs/log-batch", True),
        ("POST", f"{API}/runs/log-metric", True),
        ("POST", f"{API}/runs/update", True),
        ("POST", f"{API}/experiments/create", True),
        ("POST", "/ajax-api/2.0/mlflow/experiments/delete", True),
        ("POST", f"{API}/runs/search/../create", True),
        ("PUT", "/api/2.0/mlflow-artifacts/artifacts/x/y.txt", True),
        ("DELETE", "/api/2.0/mlflow-artifacts/artifacts/x/y.txt", True),
        ("POST", "/api/2.0/mlflow-artifacts/mpu/create/x", True),
        ("PATCH", f"{API}/registered-models/update", True),
        ("POST", f"{API}/some-future-endpoint", True),  # unknown: fails closed
        ("POST", "/graphql/x", True),
    ],
)
def test_the_write_table(method: str, path: str, write: bool) -> None:
    assert is_write(method, path) is write


def test_every_read_post_is_an_endpoint_that_only_reads() -> None:
    # A guard on the table itself: adding an entry is a decision, reviewed here.
    assert all(
        "search" in p
        or p
        in (
            "graphql",
            "3.0/mlflow/traces/metrics",
            "3.0/mlflow/ui-telemetry",
            "2.0/mlflow/registered-models/get-latest-versions",
        )
        for p in READ_POSTS
    )


# --- HTTP ---------------------------------------------------------------------------------------------------------


def test_http_without_credentials_gets_401_with_a_basic_challenge(secured: RunningServer) -> None:
    for method, path in (
        ("GET", "/"),
        ("GET", f"{API}/experiments/get?experiment_id=0"),
        ("POST", f"{API}/runs/search"),
    ):
        response = requests.request(method, secured.http_url + path, json={}, timeout=30)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith('Basic realm="trackhouse"')
        assert response.json()["error_code"] == "UNAUTHENTICATED"
    wrong = requests.get(secured.http_url + "/metrics", headers={"Authorization": basic("alice", "x")}, timeout=30)
    assert wrong.status_code == 401


def test_health_is_public_and_metrics_needs_credentials(secured: RunningServer, users: Users) -> None:
    assert requests.get(secured.http_url + "/health", timeout=30).json() == {"status": "ok"}
    assert requests.get(secured.http_url + "/metrics", timeout=30).status_code == 401
    scraped = requests.get(secured.http_url + "/metrics", headers=_bearer(users.reader_token), timeout=30)
    assert scraped.status_code == 200 and "trackhouse_" in scraped.text


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_reader_reads_and_searches_but_cannot_write(secured: RunningServer, users: Users) -> None:
    writer, reader = {"Authorization": basic(*Users.writer)}, {"Authorization": basic(*Users.reader)}
    url = secured.http_url + API
    created = requests.post(f"{url}/experiments/create", json={"name": "roles"}, headers=writer, timeout=30)
    assert created.status_code == 200
    experiment_id = created.json()["experiment_id"]
    run = requests.post(f"{url}/runs/create", json={"experiment_id": experiment_id}, headers=writer, timeout=30)
    run_id = run.json()["run"]["info"]["run_id"]

    search = requests.post(f"{url}/runs/search", json={"experiment_ids": [experiment_id]}, headers=reader, timeout=30)
    assert search.status_code == 200 and search.json()["runs"][0]["info"]["run_id"] == run_id
    graphql = requests.post(
        secured.http_url + "/graphql",
        json={
            "query": "query q($id: String) { mlflowGetRun(input: {runId: $id}) { run { info { runId } } } }",
            "variables": {"id": run_id},
        },
        headers=reader,
        timeout=30,
    )
    assert graphql.status_code == 200
    for path, body in (
        ("runs/log-metric", {"run_id": run_id, "key": "loss", "value": 1.0, "timestamp": 1, "step": 0}),
        ("runs/create", {"experiment_id": experiment_id}),
        ("experiments/delete", {"experiment_id": experiment_id}),
    ):
        refused = requests.post(f"{url}/{path}", json=body, headers=reader, timeout=30)
        assert refused.status_code == 403, path
        assert refused.json()["error_code"] == "PERMISSION_DENIED"
    token_write = requests.post(
        f"{url}/runs/log-metric",
        json={"run_id": run_id, "key": "loss", "value": 1.0, "timestamp": 1, "step": 0},
        headers=_bearer(users.writer_token),
        timeout=30,
    )
    assert token_write.status_code == 200
    history = requests.get(
        f"{url}/metrics/get-history", params={"run_id": run_id, "metric_key": "loss"}, headers=reader, timeout=30
    )
    assert [m["value"] for m in history.json()["metrics"]] == [1.0]  # the reader's refused write stored nothing


def test_the_rank_api_is_a_read_behind_authentication(secured: RunningServer, users: Users) -> None:
    """/api/2.0/trackhouse/ (issue 16) answers a reader, as MLflow's GETs do, and nobody without credentials;
    `trackhouse ranks` sends MLflow's token variable."""
    writer = {"Authorization": basic(*Users.writer)}
    url = secured.http_url + API
    experiment_id = requests.post(f"{url}/experiments/create", json={"name": "ranked"}, headers=writer, timeout=30)
    run = requests.post(
        f"{url}/runs/create", json={"experiment_id": experiment_id.json()["experiment_id"]}, headers=writer, timeout=30
    )
    run_id = run.json()["run"]["info"]["run_id"]
    logged = {"run_id": run_id, "key": "loss", "value": 0.5, "timestamp": 1, "step": 3}
    assert requests.post(f"{url}/runs/log-metric", json=logged, headers=writer, timeout=30).status_code == 200
    ranks = f"{secured.http_url}/api/2.0/trackhouse/runs/ranks"
    query = {"run_id": run_id, "metric_key": "loss"}
    assert requests.get(ranks, params=query, timeout=30).status_code == 401
    answer = requests.get(ranks, params=query, headers=_bearer(users.reader_token), timeout=30)
    assert answer.status_code == 200 and answer.json()["ranks"][0]["last_value"] == 0.5
    command = [sys.executable, "-m", "trackhouse.cli", "ranks", run_id, "--tracking-uri", secured.http_url]
    env = {**os.environ, "MLFLOW_TRACKING_TOKEN": users.reader_token}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0 and "1 ranks" in done.stdout, done.stderr
    env["MLFLOW_TRACKING_TOKEN"] = "wrong"
    refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode == 1 and "401" in refused.stderr and "wrong" not in refused.stderr


def test_no_auth_file_means_no_authentication_on_loopback(server: RunningServer) -> None:
    assert requests.get(server.http_url + f"{API}/experiments/get?experiment_id=0", timeout=30).status_code == 200


# --- gRPC ---------------------------------------------------------------------------------------------------------


def _write(target: str, metadata: tuple[tuple[str, str], ...] | None, rid: str) -> ingest_pb2.WriteAck:
    with grpc.insecure_channel(target) as channel:
        write = channel.unary_unary(
            "/trackhouse.v1.Ingest/Write", request_serializer=None, response_deserializer=ingest_pb2.WriteAck.FromString
        )
        body = encode_request(ingest_pb2.WriteRequest(runs=[run_upsert(rid)]), [points(rid, 10)])
        ack: ingest_pb2.WriteAck = write(body, metadata=metadata, timeout=30)
        return ack


def _stream(target: str, metadata: tuple[tuple[str, str], ...] | None, rid: str) -> list[ingest_pb2.WriteAck]:
    with grpc.insecure_channel(target) as channel:
        stream = channel.stream_stream(
            "/trackhouse.v1.Ingest/WriteStream",
            request_serializer=None,
            response_deserializer=ingest_pb2.WriteAck.FromString,
        )
        body = encode_request(ingest_pb2.WriteRequest(runs=[run_upsert(rid)], sequence=1), [points(rid, 10)])
        return list(stream(iter([body]), metadata=metadata, timeout=30))


@pytest.mark.parametrize("call", [_write, _stream], ids=["Write", "WriteStream"])
def test_grpc_checks_the_authorization_metadata(secured: RunningServer, users: Users, call) -> None:  # type: ignore[no-untyped-def]
    cases = [
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer th_0_nope"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", basic("alice", "wrong")),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", f"Bearer {users.reader_token}"),), grpc.StatusCode.PERMISSION_DENIED),
        ((("authorization", basic(*Users.reader)),), grpc.StatusCode.PERMISSION_DENIED),
    ]
    for i, (metadata, code) in enumerate(cases):
        with pytest.raises(grpc.RpcError) as info:
            call(secured.target, metadata, f"{i:032x}")
        assert info.value.code() == code, metadata
    assert secured.scalar("SELECT count() FROM trackhouse.metrics") == 0

    call(secured.target, (("authorization", f"Bearer {users.writer_token}"),), "a" * 32)
    call(secured.target, (("authorization", basic(*Users.writer)),), "b" * 32)
    assert secured.scalar("SELECT count(DISTINCT run_id) FROM trackhouse.metrics") == 2


def test_grpc_health_stays_open(secured: RunningServer) -> None:
    with grpc.insecure_channel(secured.target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_without_auth_file_accepts_anyone(server: RunningServer) -> None:
    assert _write(server.target, None, "c" * 32).points == 10
    assert np.int64(server.scalar("SELECT count() FROM trackhouse.metrics")) == 10
