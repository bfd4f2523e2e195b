from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trackhouse.cli import _parser, build_config

ROOT = Path(__file__).resolve().parent.parent


def test_every_flag_reads_its_environment_variable_and_the_flag_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACKHOUSE_GRPC_PORT", "6001")
    monkeypatch.setenv("TRACKHOUSE_HTTP_PORT", "6002")
    monkeypatch.setenv("TRACKHOUSE_FLUSH_POINTS", "1000")
    monkeypatch.setenv("TRACKHOUSE_MAX_QUEUE_POINTS", "5000")
    monkeypatch.setenv("TRACKHOUSE_CLICKHOUSE_URL", "http://u:p@ch:8123/metricsdb")
    config = build_config(_parser().parse_args(["serve", "--http-port", "7000"]))
    assert (config.grpc.port, config.http_port) == (6001, 7000)
    assert (config.batcher.flush_points, config.batcher.max_queue_points) == (1000, 5000)
    assert config.store.url == "http://u:p@ch:8123/metricsdb"
    assert config.store.resolved_database == "metricsdb"


def test_embedded_storage_is_the_default(tmp_path: Path) -> None:
    config = build_config(_parser().parse_args(["serve", "--data-dir", str(tmp_path / "d")]))
    assert config.store.embedded
    assert config.store.url == f"chdb://{(tmp_path / 'd').resolve()}"
    assert config.store.resolved_database == "trackhouse"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--flush-points", "10", "--max-queue-points", "5"], "must be at least flush_points"),
        (["--clickhouse-url", "mysql://nope"], "must start with chdb://, http:// or https://"),
    ],
)
def test_bad_configuration_fails_fast_with_a_clear_message(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trackhouse.cli", "serve", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert message in result.stderr
