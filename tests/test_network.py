"""Putting trackhouse on a network: TLS on both servers, unchanged MLflow scripts with MLflow's own environment
variables, the non-loopback rule, Host and CORS checks as stock MLflow 3, Kafka security settings, and no secret
in any output. Real servers, the real MLflow client in a subprocess, raw gRPC, a certificate made at test time."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests

from tests.certs import Certificates, make_certificates
from tests.conftest import ROOT, RunningServer
from tests.serving import wait_until_ready
from tests.tansu import KafkaBroker, free_port
from tests.test_ingest_grpc import points, run_upsert
from trackhouse import Client
from trackhouse.cli import _parser, build_config
from trackhouse.compat import security
from trackhouse.ingest import auth
from trackhouse.ingest.codec import encode_request
from trackhouse.ingest.config import ConfigError
from trackhouse.ingest.forwarder_kafka import KafkaForwarder
from trackhouse.ingest.receiver_kafka import KafkaReceiver
from trackhouse.ingest.telemetry import Telemetry
from trackhouse.query.connection import StoreConfig
from trackhouse.query.redaction import Redactor, redact_url
from trackhouse.server import is_loopback
from trackhouse.v1 import ingest_pb2

PASSWORD = "alice-s3cret-pw"


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return make_certificates(tmp_path / "tls")


@pytest.fixture
def tls_server(start_server: Callable[..., RunningServer], certs: Certificates, tmp_path: Path) -> RunningServer:
    path = tmp_path / "auth.json"
    auth.add_user(path, "alice", PASSWORD, role="write")
    auth.add_user(path, "bob", "bob-pw", role="read")
    return start_server(network={"auth_file": path, "tls_cert": certs.cert, "tls_key": certs.key})


MLFLOW_SCRIPT = textwrap.dedent(
    """
    import sys
    import mlflow

    mlflow.set_experiment("over-the-network")
    with mlflow.start_run() as run:
        mlflow.log_param("lr", 0.01)
        for step in range(5):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
    client = mlflow.MlflowClient()
    history = client.get_metric_history(run.info.run_id, "loss")
    print("RUN", run.info.run_id, len(history))
    """
)


def run_mlflow_script(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """An unchanged MLflow script, configured only by MLflow's environment variables."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run(
        [sys.executable, "-c", script], env={**base, **env}, capture_output=True, text=True, timeout=180
    )


def test_an_unchanged_mlflow_script_works_with_a_token_over_tls(
    tls_server: RunningServer, certs: Certificates, tmp_path: Path
) -> None:
    token = auth.add_token(tmp_path / "auth.json", "ci", "write")
    url = f"https://localhost:{tls_server.server.http_port}"
    result = run_mlflow_script(
        MLFLOW_SCRIPT,
        {"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_TOKEN": token, "MLFLOW_TRACKING_SERVER_CERT_PATH": str(certs.ca)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_id, count = result.stdout.split("RUN ", 1)[1].split()
    assert count == "5"
    assert tls_server.scalar("SELECT count() FROM trackhouse.metrics WHERE run_id = {r:String}", r=run_id) == 5


def test_an_unchanged_mlflow_script_works_with_basic_credentials_and_a_reader_is_refused(
    tls_server: RunningServer, certs: Certificates
) -> None:
    env = {
        "MLFLOW_TRACKING_URI": f"https://127.0.0.1:{tls_server.server.http_port}",
        "MLFLOW_TRACKING_SERVER_CERT_PATH": str(certs.ca),
        "MLFLOW_TRACKING_USERNAME": "alice",
        "MLFLOW_TRACKING_PASSWORD": PASSWORD,
    }
    assert run_mlflow_script(MLFLOW_SCRIPT, env).returncode == 0
    reader = {**env, "MLFLOW_TRACKING_USERNAME": "bob", "MLFLOW_TRACKING_PASSWORD": "bob-pw"}
    search = "import mlflow; print('FOUND', len(mlflow.search_runs(experiment_names=['over-the-network'])))"
    found = run_mlflow_script(search, reader)
    assert found.returncode == 0 and "FOUND 1" in found.stdout, found.stderr[-3000:]
    refused = run_mlflow_script(MLFLOW_SCRIPT, reader)
    assert refused.returncode != 0 and "PERMISSION_DENIED" in refused.stderr
    wrong = run_mlflow_script(search, {**env, "MLFLOW_TRACKING_PASSWORD": "wrong"})
    assert wrong.returncode != 0 and "UNAUTHENTICATED" in wrong.stderr
    # Without the CA the certificate is unknown. MLflow retries connection errors for minutes by default.
    untrusted_env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_SERVER_CERT_PATH"}
    untrusted = run_mlflow_script(search, {**untrusted_env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    assert untrusted.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr


def test_plain_http_to_the_tls_port_gets_nothing(tls_server: RunningServer) -> None:
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{tls_server.server.http_port}/health", timeout=30)


def test_grpc_over_tls_with_a_token_in_the_metadata(tls_server: RunningServer, certs: Certificates) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
    rid = "f" * 32
    body = encode_request(ingest_pb2.WriteRequest(runs=[run_upsert(rid)]), [points(rid, 10)])
    basic = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    with grpc.secure_channel(f"localhost:{tls_server.server.grpc_port}", credentials) as channel:
        write = channel.unary_unary(
            "/trackhouse.v1.Ingest/Write", request_serializer=None, response_deserializer=ingest_pb2.WriteAck.FromString
        )
        with pytest.raises(grpc.RpcError) as info:
            write(body, timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert write(body, metadata=(("authorization", basic),), timeout=30).points == 10
    with grpc.insecure_channel(f"127.0.0.1:{tls_server.server.grpc_port}") as plain:
        insecure_write = plain.unary_unary(
            "/trackhouse.v1.Ingest/Write", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as info:
            insecure_write(body, metadata=(("authorization", basic),), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert tls_server.scalar("SELECT count() FROM trackhouse.metrics") == 10


# --- the non-loopback rule ----------------------------------------------------------------------------------------


def serve_args(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "trackhouse.cli", "serve", "--data-dir", str(tmp_path / "d"), *args]


def test_a_non_loopback_host_without_auth_refuses_to_start_with_one_clear_line(tmp_path: Path) -> None:
    result = subprocess.run(
        serve_args(tmp_path, "--host", "0.0.0.0", "--grpc-port", "0", "--http-port", "0"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "trackhouse: refusing to listen on 0.0.0.0 without authentication: pass --auth-file (create it with"
        " `trackhouse auth add-user`), or --allow-unauthenticated-network to accept the risk"
    ]
    assert not (tmp_path / "d").exists()  # refused before touching anything


def test_the_non_loopback_rule_and_its_two_ways_out(tmp_path: Path) -> None:
    auth.add_user(tmp_path / "a.json", "alice", "pw-alice", role="write")
    with pytest.raises(ConfigError, match=r"refusing to listen on 10\.1\.2\.3"):
        build_config(_parser().parse_args(["serve", "--host", "10.1.2.3"]))
    opted_out = build_config(_parser().parse_args(["serve", "--host", "0.0.0.0", "--allow-unauthenticated-network"]))
    assert opted_out.allow_unauthenticated_network
    assert build_config(_parser().parse_args(["serve", "--host", "::", "--auth-file", str(tmp_path / "a.json")]))
    assert build_config(_parser().parse_args(["serve", "--host", "localhost"]))
    assert [is_loopback(h) for h in ("127.0.0.1", "127.9.9.9", "::1", "[::1]", "localhost")] == [True] * 5
    assert [is_loopback(h) for h in ("0.0.0.0", "", "::", "10.0.0.1", "example.com")] == [False] * 5


def test_tls_needs_both_files(tmp_path: Path, certs: Certificates) -> None:
    with pytest.raises(ConfigError, match="both --tls-cert and --tls-key"):
        build_config(_parser().parse_args(["serve", "--tls-cert", str(certs.cert)]))
    with pytest.raises(ConfigError, match="not a readable file"):
        build_config(_parser().parse_args(["serve", "--tls-cert", str(certs.cert), "--tls-key", "/nonexistent"]))


# --- Host and CORS, as stock MLflow 3 -------------------------------------------------------------------------------


def test_host_validation_refuses_dns_rebinding(server: RunningServer) -> None:
    url = server.http_url + "/api/2.0/mlflow/experiments/get?experiment_id=0"
    for host in (f"127.0.0.1:{server.server.http_port}", f"localhost:{server.server.http_port}", "192.168.1.20:5000"):
        assert requests.get(url, headers={"Host": host}, timeout=30).status_code == 200, host
    for host in ("evil.example.com", "evil.example.com:5000", "8.8.8.8"):
        refused = requests.get(url, headers={"Host": host}, timeout=30)
        assert refused.status_code == 403 and refused.text == security.INVALID_HOST_MSG, host
    assert requests.get(server.http_url + "/health", headers={"Host": "evil.example.com"}, timeout=30).ok


def test_allowed_hosts_replaces_the_defaults(start_server: Callable[..., RunningServer]) -> None:
    running = start_server(network={"allowed_hosts": ("tracking.example.com", "*.internal.example.com:*")})
    url = running.http_url + "/api/2.0/mlflow/experiments/get?experiment_id=0"
    assert requests.get(url, headers={"Host": "tracking.example.com"}, timeout=30).ok
    assert requests.get(url, headers={"Host": "a.internal.example.com:5000"}, timeout=30).ok
    assert requests.get(url, headers={"Host": f"127.0.0.1:{running.server.http_port}"}, timeout=30).status_code == 403


def test_the_defaults_and_matching_are_stock_mlflows() -> None:
    with warnings.catch_warnings():  # importing mlflow.server loads Flask and SQLAlchemy, which warn
        warnings.simplefilter("ignore")
        from mlflow.server import security_utils as stock

    assert list(security.DEFAULT_ALLOWED_HOSTS) == stock.get_default_allowed_hosts()
    hosts = ["localhost", "127.0.0.1:5000", "[::1]:80", "10.2.3.4:443", "172.20.0.1", "172.32.0.1", "evil.com", ""]
    for host in hosts:
        assert security.is_allowed_host(security.DEFAULT_ALLOWED_HOSTS, host) == stock.is_allowed_host_header(
            stock.get_default_allowed_hosts(), host
        ), host
    origins = ["", "http://localhost:3000", "https://app.example.com", "https://evil.com", "http://[::1]:8080"]
    for allowed in ([], ["https://app.example.com"], ["https://*.example.com"], ["*"]):
        for origin in origins:
            for method in ("GET", "POST", "DELETE"):
                ours = security.blocks_cross_origin(origin, method, allowed)
                assert ours == stock.should_block_cors_request(origin, method, allowed), (origin, method, allowed)


def test_cors_blocks_foreign_writes_and_answers_allowed_origins(start_server: Callable[..., RunningServer]) -> None:
    running = start_server(network={"cors_allowed_origins": ("https://app.example.com",)})
    url = running.http_url + "/api/2.0/mlflow/experiments/create"
    foreign = requests.post(url, json={"name": "x"}, headers={"Origin": "https://evil.example"}, timeout=30)
    assert foreign.status_code == 403 and foreign.text == security.CORS_BLOCKED_MSG
    allowed = requests.post(url, json={"name": "cors"}, headers={"Origin": "https://app.example.com"}, timeout=30)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
    preflight = requests.options(
        url,
        headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"},
        timeout=30,
    )
    assert preflight.status_code == 200 and "POST" in preflight.headers["access-control-allow-methods"]
    local = requests.post(url, json={"name": "local"}, headers={"Origin": "http://localhost:3000"}, timeout=30)
    assert local.status_code == 200
    names = requests.get(
        running.http_url + "/api/2.0/mlflow/experiments/search", params={"max_results": 100}, timeout=30
    ).json()
    assert {e["name"] for e in names["experiments"]} == {"Default", "cors", "local"}


def test_cors_preflight_needs_no_credentials(start_server: Callable[..., RunningServer], tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    auth.add_user(path, "alice", "pw-alice", role="write")
    running = start_server(network={"auth_file": path, "cors_allowed_origins": ("https://app.example.com",)})
    preflight = requests.options(
        running.http_url + "/api/2.0/mlflow/runs/search",
        headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"},
        timeout=30,
    )
    assert preflight.status_code == 200


# --- Kafka security settings ------------------------------------------------------------------------------------


def test_kafka_sasl_and_tls_settings_reach_aiokafka(certs: Certificates) -> None:
    args = [
        "serve",
        "--kafka-bootstrap", "broker:9093",
        "--kafka-security-protocol", "SASL_SSL",
        "--kafka-sasl-mechanism", "SCRAM-SHA-512",
        "--kafka-sasl-username", "svc",
        "--kafka-sasl-password", "kafka-s3cret",
        "--kafka-ssl-cafile", str(certs.ca),
    ]  # fmt: skip
    config = build_config(_parser().parse_args(args)).kafka
    assert config is not None
    assert "kafka-s3cret" not in repr(config)

    async def clients() -> list[object]:
        forwarder = KafkaForwarder(config, 1 << 20, Telemetry())
        receiver = KafkaReceiver(None, config, 1 << 20, Telemetry())  # type: ignore[arg-type]  # never started
        found = [forwarder._producer.client, receiver._consumer._client, receiver._dead_letter_producer.client]
        for unstarted in (forwarder._producer, receiver._consumer, receiver._dead_letter_producer):
            await unstarted.stop()
        return found

    for client in asyncio.run(clients()):
        assert client._security_protocol == "SASL_SSL"  # type: ignore[attr-defined]
        assert client._sasl_mechanism == "SCRAM-SHA-512"  # type: ignore[attr-defined]
        assert (client._sasl_plain_username, client._sasl_plain_password) == ("svc", "kafka-s3cret")  # type: ignore[attr-defined]
        assert client._ssl_context is not None  # type: ignore[attr-defined]


# --- no secret in any output ----------------------------------------------------------------------------------------


def test_redaction_helper() -> None:
    assert redact_url("http://user:pa%40ss@ch.example:8123/db") == "http://user:***@ch.example:8123/db"
    assert redact_url("https://ch.example:8443/db") == "https://ch.example:8443/db"
    assert redact_url("chdb:///tmp/x") == "chdb:///tmp/x"
    store = StoreConfig("http://user:S3cret-pw@ch.example:8123/db")
    assert store.display_url == "http://user:***@ch.example:8123/db"
    assert "S3cret-pw" not in repr(store) and "S3cret-pw" not in repr(
        build_config(_parser().parse_args(["serve", "--clickhouse-url", store.url]))
    )
    redact = Redactor(["pa@ss", "pa%40ss"])
    assert redact("failed: http://user:pa%40ss@h and pa@ss") == "failed: http://user:***@h and ***"


def test_the_clickhouse_password_never_appears_in_the_start_up_error(tmp_path: Path) -> None:
    secret = "Ch-S3cret-Passw0rd"
    url = f"http://trackhouse:{secret}@127.0.0.1:{free_port()}/metricsdb"
    result = subprocess.run(
        serve_args(tmp_path, "--clickhouse-url", url, "--grpc-port", "0", "--http-port", "0", "--log-level", "DEBUG"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "cannot start" in output
    assert secret not in output
    bad_scheme = subprocess.run(
        serve_args(tmp_path, "--clickhouse-url", f"mysql://u:{secret}@h/db"), cwd=ROOT, capture_output=True, text=True
    )
    assert "must start with chdb://" in bad_scheme.stderr and secret not in bad_scheme.stderr + bad_scheme.stdout


def test_no_secret_in_the_ready_line_logs_or_metrics(tmp_path: Path, kafka_broker: KafkaBroker) -> None:
    """A whole serving life, at DEBUG: start, write, scrape /metrics, stop; the Kafka password is never printed."""
    secret = "Kafka-S3cret-Passw0rd"
    http_port = free_port()
    log_path = tmp_path / "serve.log"
    args = serve_args(
        tmp_path,
        "--grpc-port", "0",
        "--http-port", str(http_port),
        "--log-level", "DEBUG",
        "--kafka-bootstrap", kafka_broker.bootstrap,
        "--kafka-sasl-username", "svc",
        "--kafka-sasl-password", secret,
    )  # fmt: skip
    with log_path.open("w") as log:
        process = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        ready = wait_until_ready(process, log_path)
        assert ready["storage"].startswith("chdb://")
        base = f"http://127.0.0.1:{http_port}"
        created = requests.post(base + "/api/2.0/mlflow/experiments/create", json={"name": "x"}, timeout=30)
        assert created.status_code == 200
        metrics = requests.get(base + "/metrics", timeout=30).text
        assert secret not in metrics
    finally:
        process.terminate()
        process.wait(60)
    assert secret not in log_path.read_text()


def test_the_trackhouse_client_logs_over_tls_with_a_token_and_a_reader_is_refused(
    tls_server: RunningServer, certs: Certificates, tmp_path: Path
) -> None:
    """The client helper's side of the metadata contract against this server: grpcs://, a CA bundle, a token."""
    writer_token = auth.add_token(tmp_path / "auth.json", "ci", "write")
    reader_token = auth.add_token(tmp_path / "auth.json", "dashboards", "read")
    target = f"grpcs://localhost:{tls_server.server.grpc_port}"
    with Client(target, token=writer_token, ca_bundle=certs.ca) as client:
        run = client.start_run(experiment="over-grpcs", name="tls")
        run.log_series("loss", np.arange(1000), np.linspace(1, 0, 1000))
        run.finish()
    assert tls_server.scalar("SELECT count() FROM trackhouse.metrics") == 1000

    reader = Client(target, token=reader_token, ca_bundle=certs.ca)
    refused = reader.start_run(experiment="over-grpcs", name="reader")
    refused.log_series("loss", np.arange(10), np.zeros(10))
    with pytest.raises(Exception, match=r"PERMISSION_DENIED|read role"):
        reader.close()
    assert tls_server.scalar("SELECT count() FROM trackhouse.metrics") == 1000
