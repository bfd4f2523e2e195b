"""`trackhouse serve` as a child process: waiting for it to be ready. For tests and benchmarks."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

READY = "trackhouse ready"


def wait_until_ready(
    process: subprocess.Popen[bytes], log_path: Path, offset: int = 0, timeout: float = 60.0
) -> dict[str, str]:
    """Wait for the ready line after `offset` in the log; return its fields (grpc=..., http=...).

    Raises RuntimeError, with the log, if the process exits first or the timeout passes.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text()[offset:]
        if READY in text:
            line = text.split(READY, 1)[1].splitlines()[0]
            return dict(field.split("=", 1) for field in line.split() if "=" in field)
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"server did not become ready:\n{log_path.read_text()[offset:]}")
