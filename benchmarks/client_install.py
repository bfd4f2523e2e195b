"""The light client install: build the project's wheel, install it without extras into a clean venv, measure it.

    python -m benchmarks.client_install [--out benchmarks/reports/client_install.json] [--repeat 9]

Prints the installed size of site-packages (less pip and setuptools) and the
median of `python -X importtime -c "from trackhouse import Client"`'s total.
tests/test_install.py uses the same helpers to log through such an install.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "data", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "test-artifacts", "results"
)


def build_wheel(out: Path) -> Path:
    """The project's wheel, built from a copy of the tree (so no build/ or egg-info lands in the checkout)."""
    source = out / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=_NOT_SOURCE)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), "."],
        cwd=source,
        check=True,
        capture_output=True,
    )
    shutil.rmtree(source)
    return next(out.glob("trackhouse-*.whl"))


def clean_env() -> dict[str, str]:
    """This environment without anything that would make the venv see the checkout or another venv."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def fresh_venv(path: Path) -> Path:
    """A clean virtual environment (no system site-packages); returns its python."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, capture_output=True)
    return path / "bin" / "python"


def index_reachable(python: Path, scratch: Path) -> bool:
    """Whether pip in `python`'s venv can fetch a package at all (the install test is skipped otherwise)."""
    probe = subprocess.run(
        [str(python), "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(scratch), "protobuf>=5.28"],
        capture_output=True,
        env=clean_env(),
        timeout=300,
    )
    return probe.returncode == 0


def install(python: Path, wheel: Path) -> None:
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(wheel)],
        check=True,
        capture_output=True,
        env=clean_env(),
        timeout=600,
    )


def site_packages(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        env=clean_env(),
    )
    return Path(out.stdout.strip())


def installed_bytes(site: Path) -> int:
    """Bytes under site-packages, less pip's and setuptools' own files (a venv starts with them)."""
    skip = ("pip", "setuptools", "_distutils_hack", "pkg_resources", "distutils-precedence.pth")
    total = 0
    for entry in site.iterdir():
        if entry.name.split("-")[0] in skip:
            continue
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file() and not p.is_symlink()]
        total += sum(p.stat().st_size for p in files)
    return total


def import_seconds(python: Path, cwd: Path) -> float:
    """`from trackhouse import Client`: the cumulative time -X importtime reports for `trackhouse` (in microseconds)."""
    out = subprocess.run(
        [str(python), "-X", "importtime", "-c", "from trackhouse import Client"],
        check=True,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=clean_env(),
    )
    rows = [line.split("|") for line in out.stderr.splitlines() if line.startswith("import time:")]
    return next(int(r[1]) for r in rows if r[2].strip() == "trackhouse" and not r[2].startswith("  ")) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "reports" / "client_install.json")
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        wheel = build_wheel(work)
        python = fresh_venv(work / "venv")
        install(python, wheel)
        site = site_packages(python)
        size = installed_bytes(site)
        times = sorted(import_seconds(python, work) for _ in range(args.repeat))
        packages = sorted(p.name for p in site.glob("*.dist-info"))
    report = {
        "what": "pip install trackhouse (no extras) into a clean venv",
        "site_packages_mb_without_pip_setuptools": round(size / 1e6, 1),
        "import_seconds_median": round(statistics.median(times), 3),
        "import_seconds_all": [round(t, 3) for t in times],
        "distributions": packages,
        "python": platform.python_version(),
        "note": "2-core machine shared with other work; import time is -X importtime's cumulative total",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
