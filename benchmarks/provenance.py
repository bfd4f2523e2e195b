"""Where and when a figure was measured, so every README table can name its date, commit and machine load.

Result files the README cites are written to benchmarks/reports/ (committed), named
`<name>-<UTC date and time>-<short commit>.json`, and carry this record under "provenance".
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "benchmarks" / "reports"


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def busy_processes(threshold_pct: float = 20.0) -> list[str]:
    """Other processes using at least `threshold_pct` of a core right now (ps's lifetime average), for the record."""
    try:
        lines = subprocess.run(
            ["ps", "-eo", "pid=,pcpu=,comm="], capture_output=True, text=True, check=True, timeout=10
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return []
    busy = []
    for line in lines:
        pid, pcpu, comm = line.split(None, 2)
        if int(pid) != os.getpid() and float(pcpu) >= threshold_pct:
            busy.append(f"{comm} ({pcpu}%)")
    return busy


def provenance() -> dict[str, Any]:
    """The commit, time (UTC), machine and load average at the moment of the call."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "measured_at": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(status) and status != "unknown",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_1_5_15": list(os.getloadavg()),
        "busy_processes": busy_processes(),
    }


def save_report(name: str, results: dict[str, Any], started: dict[str, Any]) -> Path:
    """Write `results` with the provenance taken at the start (`started`) and now, and return the path."""
    ended = provenance()
    stamp = started["measured_at"].replace("-", "").replace(":", "").rstrip("Z")
    out = REPORTS / f"{name}-{stamp}-{started['commit'][:9]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"provenance": {"start": started, "end": ended}, **results}
    out.write_text(json.dumps(record, indent=2) + "\n")
    return out
