"""A stock `mlflow server` (SQLite) on a free port: the oracle for tests that claim "as stock".

Start one per test module where you can (it takes seconds, more on a busy machine), with
`stock_server(tmp_path_factory.mktemp("stock"))` in a module fixture. One worker: the tests send one request at
a time, and four workers start slowly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

from benchmarks.systems import start_stock_mlflow, stop_stock_mlflow

_START_TIMEOUT_S = 300


def stock_server(workdir: Path, artifact_root: bool = True) -> Iterator[str]:
    """Yield the base URL of a running stock server (one worker); stop it afterwards."""
    # Not settled: the tests compare answers, not speed, and need not wait for stock's job runner to start.
    process, url = start_stock_mlflow(
        workdir, workers=1, artifact_root=artifact_root, timeout_s=_START_TIMEOUT_S, settle=False
    )
    try:
        yield url
    finally:
        stop_stock_mlflow(process)


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
