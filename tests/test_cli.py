from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trackhouse.cli import SERVE_OPTIONS, Option, _flag, _parser, build_config

ROOT = Path(__file__).resolve().parent.parent


def _sample(option: Option, which: int) -> str:
    """Two distinct valid values for `option`, as text: which=0 for the environment, 1 for the flag."""
    if option.flag == "--log-level":
        return ("DEBUG", "WARNING")[which]
    if option.flag == "--role":
        return ("reader", "worker")[which]
    if option.flag == "--clickhouse-url":
        return ("http://u:p@ch:8123/envdb", "http://u:p@ch:8123/flagdb")[which]
    if option.flag == "--kafka-security-protocol":
        return ("SSL", "SASL_SSL")[which]
    if option.flag == "--http-compression":
        return ("off", "on")[which]
    if option.cast is _flag:  # a switch: false from the environment, the flag itself says true
        return ("false", "")[which]
    if option.cast is Path:
        return f"/tmp/from-{('env', 'flag')[which]}"
    if isinstance(option.default, int) or option.cast is int or option.flag.endswith("-port"):
        return str(4001 + which)
    return f"from-{('env', 'flag')[which]}"


@pytest.mark.parametrize("option", SERVE_OPTIONS, ids=lambda o: o.flag)
def test_each_option_reads_its_environment_variable_and_its_flag_wins(
    option: Option, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Iterates over SERVE_OPTIONS itself, so an option added later is covered without editing this test."""
    dest = option.flag.removeprefix("--").replace("-", "_")
    env_value, flag_value = _sample(option, 0), _sample(option, 1)
    monkeypatch.setenv(option.env, env_value)
    from_env = getattr(_parser().parse_args(["serve"]), dest)
    switch = option.cast is _flag
    from_flag = getattr(_parser().parse_args(["serve", option.flag, *([] if switch else [flag_value])]), dest)
    assert from_env == option.cast(env_value)
    assert from_flag == (True if switch else option.cast(flag_value))
    assert from_env != from_flag
    monkeypatch.delenv(option.env)
    assert getattr(_parser().parse_args(["serve"]), dest) == option.default


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
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def _serve(args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trackhouse.cli", "serve", "--data-dir", str(tmp_path / "d"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--log-level", "FOO"], {}, "argument --log-level: 'FOO': must be one of DEBUG, INFO"),
        ([], {"TRACKHOUSE_LOG_LEVEL": "FOO"}, "TRACKHOUSE_LOG_LEVEL='FOO': must be one of DEBUG"),
        ([], {"TRACKHOUSE_GRPC_PORT": "abc"}, "argument --grpc-port: TRACKHOUSE_GRPC_PORT='abc': not an integer"),
        (["--http-port", "99999"], {}, "argument --http-port: '99999': must be a port number from 0 to 65535"),
        ([], {"TRACKHOUSE_FLUSH_POINTS": "1e3"}, "TRACKHOUSE_FLUSH_POINTS='1e3': not an integer"),
        (["--role", "nope"], {}, "role must be one of all, gateway, worker, reader, not 'nope'"),
        (["--role", "worker"], {}, "role worker needs Kafka (--kafka-bootstrap)"),
    ],
)
def test_every_bad_setting_gives_one_line_and_exit_status_2(
    args: list[str], env: dict[str, str], message: str, tmp_path: Path
) -> None:
    result = _serve(args, env, tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [result.stderr.strip()]  # one line: no usage dump, no traceback
    assert message in result.stderr


def test_a_valid_flag_wins_over_a_malformed_environment_variable(tmp_path: Path) -> None:
    """The malformed variable is never parsed, so the server starts; --role with no Kafka stops it right after."""
    result = _serve(["--grpc-port", "0", "--role", "worker"], {"TRACKHOUSE_GRPC_PORT": "abc"}, tmp_path)
    assert result.returncode == 2
    assert "TRACKHOUSE_GRPC_PORT" not in result.stderr
    assert "role worker needs Kafka" in result.stderr
