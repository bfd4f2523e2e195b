"""Reading experiments and their tags. The newest version of each row wins (FINAL)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from trackhouse.query import schema
from trackhouse.query.connection import Client

_COLUMNS = "experiment_id, name, artifact_location, lifecycle_stage, creation_time, last_update_time, version"


@dataclass(frozen=True, slots=True)
class Experiment:
    experiment_id: str
    name: str
    #: As stored; empty means the default, see `artifact_root`.
    artifact_location: str
    lifecycle_stage: str
    creation_time: int
    last_update_time: int
    version: int
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def artifact_root(self) -> str:
        """Where the experiment's runs keep artifacts: the proxied store unless the creator chose a location."""
        return self.artifact_location or default_artifact_location(self.experiment_id)


def default_artifact_location(experiment_id: str) -> str:
    return f"mlflow-artifacts:/{experiment_id}"


def by_ids(client: Client, database: str, experiment_ids: Collection[str]) -> dict[str, Experiment]:
    """Experiments among `experiment_ids`, deleted ones included, with their tags."""
    if not experiment_ids:
        return {}
    return _with_tags(
        client,
        database,
        client.query(
            f"SELECT {_COLUMNS} FROM {database}.{schema.EXPERIMENTS} FINAL"
            " WHERE experiment_id IN {ids:Array(String)}",
            parameters={"ids": list(experiment_ids)},
        ).result_rows,
    )


def by_name(client: Client, database: str, name: str) -> Experiment | None:
    """The experiment called `name`, active or deleted: MLflow keeps names unique across both."""
    rows = client.query(
        f"SELECT {_COLUMNS} FROM {database}.{schema.EXPERIMENTS} FINAL WHERE name = {{name:String}}"
        " ORDER BY lifecycle_stage = 'active' DESC, last_update_time DESC LIMIT 1",
        parameters={"name": name},
    ).result_rows
    found = _with_tags(client, database, rows)
    return next(iter(found.values()), None)


def _with_tags(client: Client, database: str, rows: list[tuple[object, ...]]) -> dict[str, Experiment]:
    experiments = {str(r[0]): Experiment(*r) for r in rows}  # type: ignore[arg-type]
    if experiments:
        tag_rows = client.query(
            f"SELECT experiment_id, key, value FROM {database}.{schema.EXPERIMENT_TAGS} FINAL"
            " WHERE experiment_id IN {ids:Array(String)} AND deleted = 0 ORDER BY key",
            parameters={"ids": list(experiments)},
        ).result_rows
        for experiment_id, key, value in tag_rows:
            experiments[experiment_id].tags[key] = value
    return experiments
