"""compat.registry_store on a real SQLite file: MLflow's store, off the event loop, with the seams trackhouse adds."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from mlflow.exceptions import MlflowException

from trackhouse.compat.registry import LoggedModelRef
from trackhouse.compat.registry_store import RegistryConfig, RegistryStore
from trackhouse.ingest.errors import PermanentError


def test_config_refuses_unknown_schemes_and_hides_passwords(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Invalid database engine"):
        RegistryConfig("redis://localhost/0")
    assert "secret" not in repr(RegistryConfig("postgresql://user:secret@db/registry"))
    assert RegistryConfig.for_data_dir(tmp_path).store_uri == f"sqlite:///{tmp_path.resolve()}/registry.db"


def test_a_version_from_a_logged_model_takes_its_location_and_run(tmp_path: Path) -> None:
    """MLflow's store asks `MlflowClient` about a `models:/<model_id>` source; it gets the API's answer instead."""
    store = RegistryStore(RegistryConfig.for_data_dir(tmp_path))
    model = LoggedModelRef("m-abc", "mlflow-artifacts:/1/models/m-abc/artifacts", "run-1")

    async def scenario() -> tuple[Any, str, int]:
        await store.write(lambda s, name: s.create_registered_model(name), "from-logged")
        version = await store.write(
            lambda s, *args, **kwargs: s.create_model_version(*args, **kwargs),
            "from-logged",
            "models:/m-abc",
            model_id="m-abc",
            logged_models={"m-abc": model},
        )
        uri = await store.read(lambda s: s.get_model_version_download_uri("from-logged", "1"))
        with pytest.raises(MlflowException, match="m-unknown"):  # not handed over: never looked up elsewhere
            await store.write(lambda s: s.create_model_version("from-logged", "models:/m-unknown"))
        stored = await store.read(lambda s: s.search_model_versions("name = 'from-logged'"))
        return version, uri, len(stored)

    try:
        version, uri, count = asyncio.run(scenario())
    finally:
        store.close()
    # MLflow's SQL store keeps no model_id column: the source names the logged model, as in stock.
    assert (version.version, version.source, version.run_id) == (1, "models:/m-abc", "run-1")
    assert uri == model.artifact_location
    assert count == 1
    with contextlib.closing(sqlite3.connect(tmp_path / "registry.db")) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)  # readers never wait for the writer


def test_a_read_only_store_reads_and_refuses_writes(tmp_path: Path) -> None:
    store = RegistryStore(RegistryConfig.for_data_dir(tmp_path), read_only=True)

    async def scenario() -> list[Any]:
        # Before anything was registered, a search answers without creating (and migrating) the file.
        nothing: list[Any] = []
        assert await store.read(lambda s: s.search_registered_models(), absent=nothing) is nothing
        assert not (tmp_path / "registry.db").exists()
        with pytest.raises(PermanentError, match="read-only"):
            await store.write(lambda s: s.create_registered_model("nope"))
        return list(await store.read(lambda s: s.search_registered_models()))

    try:
        assert asyncio.run(scenario()) == []
    finally:
        store.close()
