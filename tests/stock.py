"""A stock `mlflow server` (SQLite) on a free port: the oracle for tests that claim "as stock".

Start one per test module where you can (it takes seconds, more on a busy machine), with
`stock_server(tmp_path_factory.mktemp("stock"))` in a module fixture. One worker: the tests send one request at
a time, and four workers start slowly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

from tests.tansu import free_port

_START_TIMEOUT_S = 300


def stock_server(workdir: Path, artifact_root: bool = True) -> Iterator[str]:
    """Yield the base URL of a running stock server; stop it afterwards.

    Without `artifact_root`, stock's default applies: artifacts proxied under `mlflow-artifacts:/`."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
    ]
    if artifact_root:
        command += ["--default-artifact-root", str(workdir / "artifacts")]
    log_path = workdir / "mlflow.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, log_path.read_text)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Any) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.5)
    raise RuntimeError(f"stock mlflow server did not start:\n{log()[-2000:]}")


def answer(method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    """(status, JSON body) of one request, for comparing two servers' answers to it."""
    response = requests.request(method, url, timeout=30, **kwargs)
    try:
        body = response.json()
    except ValueError:
        body = response.text
    return response.status_code, body


def error_answer(method: str, url: str, **kwargs: Any) -> tuple[int, str, str]:
    """(status, error_code, message) of a request that should fail."""
    status, body = answer(method, url, **kwargs)
    assert isinstance(body, dict), f"{status}: {body!r}"
    return status, body.get("error_code", ""), body.get("message", "")
