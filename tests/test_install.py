"""`pip install trackhouse` is the client alone: grpcio, protobuf and numpy, and none of the server's modules."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from benchmarks import client_install
from tests.conftest import ROOT, RunningServer

CLIENT_REQUIREMENTS = {"grpcio", "protobuf", "numpy"}
# grpcio imports these companions when they happen to be installed (they are here, for the server and the
# tests), and itself requires typing-extensions; none is a requirement of ours.
GRPC_COMPANIONS = {"grpc_tools", "grpc_health", "grpc_reflection", "typing_extensions"}
SERVER_MODULES = ("chdb", "clickhouse_connect", "mlflow", "starlette", "uvicorn", "aiokafka", "pyarrow", "orjson")

# Logs through the client and prints which third-party modules it loaded. argv: target, expected run count.
LOG_AND_REPORT = """
import json, sys
import numpy as np
from trackhouse import Client

with Client(sys.argv[1]) as client:
    run = client.start_run(experiment="light-install", params={"lr": 0.1})
    for step in range(100):
        run.log_metrics({"loss": 1 / (step + 1)}, step=step)
    run.log_series("grad", np.arange(10_000), np.ones(10_000))
    run.finish()
top = {name.split(".")[0] for name in sys.modules}
print(json.dumps({"run_id": run.run_id, "modules": sorted(top - set(sys.stdlib_module_names))}))
"""


def base_requirements() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {Requirement(r).name for r in project["dependencies"]}


def log_in_subprocess(python: Path | str, target: str, env: dict[str, str], cwd: Path) -> dict[str, object]:
    out = subprocess.run(
        [str(python), "-c", LOG_AND_REPORT, target], check=True, capture_output=True, text=True, env=env, cwd=cwd
    )
    report: dict[str, object] = json.loads(out.stdout.splitlines()[-1])
    return report


def check_stored(server: RunningServer, run_id: object) -> None:
    counts = server.rows(
        "SELECT key, count() FROM trackhouse.metrics WHERE run_id = {r:String} GROUP BY key ORDER BY key", r=run_id
    )
    assert counts == [("grad", 10_000), ("loss", 100)]


def test_the_base_requirements_are_exactly_the_clients() -> None:
    assert base_requirements() == CLIENT_REQUIREMENTS
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    server = {Requirement(r).name for r in extras["server"]}
    assert {"chdb", "clickhouse-connect", "mlflow", "starlette", "uvicorn", "aiokafka", "pyarrow"} <= server
    assert {Requirement(r).name for r in extras["kafka"]} == {"aiokafka"}


def test_using_the_client_loads_only_its_own_requirements(server: RunningServer, tmp_path: Path) -> None:
    env = {**client_install.clean_env(), "PYTHONPATH": str(ROOT)}
    report = log_in_subprocess(sys.executable, server.target, env, tmp_path)
    modules = set(report["modules"])  # type: ignore[call-overload]
    assert not modules & set(SERVER_MODULES)
    # Every third-party module it loaded belongs to a base requirement. (Private names are the interpreter's,
    # Cython's and the editable install's; a namespace such as `google` counts when a requirement provides it.)
    owners = importlib.metadata.packages_distributions()
    public = {m for m in modules if not m.startswith("_") and m not in ("trackhouse", "cython_runtime")}
    public -= GRPC_COMPANIONS
    foreign = {m for m in public if not {d.lower() for d in owners.get(m, [m])} & CLIENT_REQUIREMENTS}
    assert not foreign, foreign
    check_stored(server, report["run_id"])


@pytest.mark.slow
def test_the_wheel_without_extras_logs_to_a_server(start_server: Callable[..., RunningServer], tmp_path: Path) -> None:
    """Build the project's own wheel, install it alone into a clean venv, and log through it."""
    python = client_install.fresh_venv(tmp_path / "venv")
    if not client_install.index_reachable(python, tmp_path / "probe"):
        pytest.skip("pip cannot reach a package index here, so the client's requirements cannot be installed")
    client_install.install(python, client_install.build_wheel(tmp_path / "dist"))
    site = client_install.site_packages(python)
    installed = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    assert not installed & {"chdb", "clickhouse_connect", "mlflow", "starlette", "uvicorn", "aiokafka", "pyarrow"}
    server = start_server()
    report = log_in_subprocess(python, server.target, client_install.clean_env(), tmp_path)
    assert not set(report["modules"]) & set(SERVER_MODULES)  # type: ignore[call-overload]
    check_stored(server, report["run_id"])
    # The command is installed too; without the server's extra it names the extra instead of a traceback.
    command = python.parent / "trackhouse"
    refused = subprocess.run([str(command), "serve"], capture_output=True, text=True, env=client_install.clean_env())
    assert refused.returncode == 1 and "pip install 'trackhouse[server]'" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
