"""Start-up integrity (issue 11, finding 7): a damaged chDB data directory is refused, named, and never served
in part or covered by a fresh schema. Data is written through a real `trackhouse serve`, the directory is
damaged on disk as a crash or a bad disk would, and the real server and `trackhouse check` are started on it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import requests

from tests.conftest import ROOT, ServerProcess
from trackhouse.query import integrity

API = "/api/2.0/mlflow"


def write_two_runs(server: ServerProcess) -> None:
    base = f"http://127.0.0.1:{server.http_port}{API}"
    for name in ("first", "second"):
        run = requests.post(f"{base}/runs/create", json={"experiment_id": "0", "run_name": name}, timeout=60).json()
        metrics: list[dict[str, Any]] = [
            {"key": "loss", "value": s / 10, "timestamp": 1, "step": s} for s in range(500)
        ]
        answer = requests.post(
            f"{base}/runs/log-batch", json={"run_id": run["run"]["info"]["run_id"], "metrics": metrics}, timeout=60
        )
        assert answer.ok


def served_points(server: ServerProcess) -> int:
    base = f"http://127.0.0.1:{server.http_port}{API}"
    runs = requests.post(f"{base}/runs/search", json={"experiment_ids": ["0"]}, timeout=60).json().get("runs", [])
    total = 0
    for run in runs:
        history = requests.get(
            f"{base}/metrics/get-history", params={"run_id": run["info"]["run_id"], "metric_key": "loss"}, timeout=60
        ).json()
        total += len(history.get("metrics", []))
    return total


def serve_once(server: ServerProcess) -> subprocess.CompletedProcess[str]:
    """`trackhouse serve` that is expected to refuse: it must exit by itself."""
    args = [sys.executable, "-m", "trackhouse.cli", "serve", "--data-dir", str(server.data_dir)]
    args += ["--grpc-port", str(server.grpc_port), "--http-port", str(server.http_port)]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=180)


def check(data_dir: Path) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "trackhouse.cli", "check", "--data-dir", str(data_dir)]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=180)


def metrics_parts(data_dir: Path) -> list[Path]:
    table = data_dir / "data" / "trackhouse" / "metrics"
    return sorted(p for p in table.iterdir() if p.is_dir() and p.name not in integrity.NOT_PARTS)


def test_a_broken_part_is_refused_until_the_operator_decides(server_process: ServerProcess) -> None:
    server_process.start()
    write_two_runs(server_process)
    assert served_points(server_process) == 1000
    assert server_process.terminate() == 0
    assert check(server_process.data_dir).returncode == 0

    part = metrics_parts(server_process.data_dir)[0]
    columns = sorted(part.glob("*.bin"))
    columns[0].unlink()  # a lost file, as after a crash on a disk without barriers

    refused = serve_once(server_process)
    assert refused.returncode != 0
    assert "trackhouse ready" not in refused.stdout
    assert "table trackhouse.metrics has 1 detached part(s) whose rows are not served" in refused.stderr
    assert f"broken-on-start_{part.name}" in refused.stderr
    assert "to recover: restore the data directory from a backup" in refused.stderr
    # chDB moved the part aside at start; the next start still refuses, so nothing is ever served short.
    assert serve_once(server_process).returncode != 0
    checked = check(server_process.data_dir)
    assert checked.returncode == 1 and f"broken-on-start_{part.name}" in checked.stderr

    # The operator keeps the damaged part outside the directory, and chooses to serve what is left.
    detached = part.parent / "detached"
    kept = server_process.data_dir.parent / "kept-parts"
    shutil.move(detached, kept)
    assert check(server_process.data_dir).returncode == 0
    server_process.start()
    assert 0 <= served_points(server_process) < 1000
    assert server_process.terminate() == 0


def test_a_missing_metadata_folder_never_gets_a_fresh_schema(server_process: ServerProcess) -> None:
    server_process.start()
    write_two_runs(server_process)
    assert server_process.terminate() == 0
    metadata = server_process.data_dir / "metadata"
    aside = server_process.data_dir.parent / "metadata-aside"
    shutil.move(metadata, aside)

    refused = serve_once(server_process)
    assert refused.returncode != 0
    assert f"the metadata folder {metadata} is missing, but the directory holds table data" in refused.stderr
    assert "trackhouse will not create a fresh schema over existing data" in refused.stderr
    assert not metadata.exists()  # nothing created
    assert check(server_process.data_dir).returncode == 1

    shutil.move(aside, metadata)  # the operator restores it
    server_process.start()
    assert served_points(server_process) == 1000
    assert server_process.terminate() == 0


def test_a_lost_table_definition_is_refused(server_process: ServerProcess) -> None:
    server_process.start()
    write_two_runs(server_process)
    assert server_process.terminate() == 0
    definition = server_process.data_dir / "metadata" / "trackhouse" / "runs.sql"
    definition.unlink()
    refused = serve_once(server_process)
    assert refused.returncode != 0
    assert "table trackhouse.runs has data" in refused.stderr and "runs.sql is missing" in refused.stderr


def test_check_deep_finds_flipped_bits_that_start_up_cannot_see(server_process: ServerProcess) -> None:
    server_process.start()
    write_two_runs(server_process)
    assert server_process.terminate() == 0
    part = metrics_parts(server_process.data_dir)[-1]
    column = max(part.glob("*.bin"), key=lambda p: p.stat().st_size)
    with column.open("r+b") as file:  # same size, other bytes: a bad sector or a stray write
        file.seek(column.stat().st_size // 2)
        file.write(b"\xff\xfe\xfd\xfc")
    assert check(server_process.data_dir).returncode == 0  # files and sizes are all there
    deep = subprocess.run(
        [sys.executable, "-m", "trackhouse.cli", "check", "--deep", "--data-dir", str(server_process.data_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert deep.returncode == 1
    assert f"part {part.name} of table trackhouse.metrics is corrupt" in deep.stderr
    assert "CHECKSUM_DOESNT_MATCH" in deep.stderr


def test_check_on_a_fresh_or_missing_directory(tmp_path: Path) -> None:
    missing = check(tmp_path / "nothing-here")
    assert missing.returncode == 0 and "no data yet" in missing.stdout
    assert not (tmp_path / "nothing-here").exists()
