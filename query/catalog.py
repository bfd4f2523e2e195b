"""Lookups the write path needs before it accepts a request: experiments by name, runs, params.

All user input travels as bound parameters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection

from trackhouse.query import schema
from trackhouse.query.connection import Client


def experiment_id_for_name(name: str) -> str:
    """A deterministic 18-digit id, so that nodes creating the same experiment concurrently agree.

    MLflow ids are digit strings; these look the same and never collide with "0".
    """
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return str(10**17 + digest % (9 * 10**17))


_ID_CANDIDATES = 8


def allocate_experiment_id(client: Client, database: str, name: str) -> str:
    """The id for a new experiment called `name`: the name's own id unless another experiment holds it.

    A renamed experiment keeps the id derived from its old name, so creating an
    experiment with that old name must pick the next candidate, as every node would.
    """
    candidates = [experiment_id_for_name(name if i == 0 else f"{name}\x00{i}") for i in range(_ID_CANDIDATES)]
    rows = client.query(
        f"SELECT experiment_id, name FROM {database}.{schema.EXPERIMENTS} FINAL"
        " WHERE experiment_id IN {ids:Array(String)}",
        parameters={"ids": candidates},
    ).result_rows
    holders = dict(rows)
    for candidate in candidates:
        if holders.get(candidate, name) == name:
            return candidate
    raise RuntimeError(f"no free experiment id among {_ID_CANDIDATES} candidates for {name!r}")


def experiment_ids_by_name(client: Client, database: str, names: Collection[str]) -> dict[str, str]:
    """Active experiments among `names`, as name -> id."""
    if not names:
        return {}
    rows = client.query(
        f"SELECT name, experiment_id FROM {database}.{schema.EXPERIMENTS} FINAL"
        " WHERE name IN {names:Array(String)} AND lifecycle_stage = 'active'",
        parameters={"names": list(names)},
    ).result_rows
    return {name: experiment_id for name, experiment_id in rows}


def existing_experiments(client: Client, database: str, experiment_ids: Collection[str]) -> set[str]:
    """The experiments among `experiment_ids` that exist and are not deleted."""
    return _active(client, f"{database}.{schema.EXPERIMENTS}", "experiment_id", experiment_ids)


def active_runs(client: Client, database: str, run_ids: Collection[str]) -> set[str]:
    """The runs among `run_ids` that exist and are not deleted."""
    return _active(client, f"{database}.{schema.RUNS}", "run_id", run_ids)


def _active(client: Client, table: str, id_column: str, ids: Collection[str]) -> set[str]:
    if not ids:
        return set()
    rows = client.query(
        f"SELECT {id_column} FROM {table} FINAL"
        f" WHERE {id_column} IN {{ids:Array(String)}} AND lifecycle_stage = 'active'",
        parameters={"ids": list(ids)},
    ).result_rows
    return {row[0] for row in rows}


def param_values(
    client: Client, database: str, run_ids: Collection[str], keys: Collection[str]
) -> dict[tuple[str, str], str]:
    """Stored params of `run_ids` restricted to `keys`, as (run_id, key) -> the winning value."""
    if not run_ids or not keys:
        return {}
    rows = client.query(
        f"SELECT run_id, key, {schema.PARAM_VALUE} FROM {database}.{schema.PARAMS}"
        " WHERE run_id IN {ids:Array(String)} AND key IN {keys:Array(String)} GROUP BY run_id, key",
        parameters={"ids": list(run_ids), "keys": list(keys)},
    ).result_rows
    return {(run_id, key): value for run_id, key, value in rows}


def run_rows(client: Client, database: str, run_ids: Collection[str]) -> dict[str, tuple[object, ...]]:
    """Each of `run_ids`' newest stored row, in schema.RUN_COLUMNS order (end_time may be None)."""
    if not run_ids:
        return {}
    rows = client.query(
        f"SELECT {', '.join(schema.RUN_COLUMNS)} FROM {database}.{schema.RUNS} FINAL"
        " WHERE run_id IN {ids:Array(String)}",
        parameters={"ids": list(run_ids)},
    ).result_rows
    return {str(row[0]): tuple(row) for row in rows}
