"""The columnar batch: the one type that crosses stage boundaries on the write path.

Metric points are numpy columns with run and key dictionary-encoded, so no
Python object exists per point. Runs, params and tags are few, and stay rows.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import numpy.typing as npt

Int32Array = npt.NDArray[np.int32]
Int64Array = npt.NDArray[np.int64]
Float64Array = npt.NDArray[np.float64]

_EMPTY_I32: Int32Array = np.empty(0, np.int32)
_EMPTY_I64: Int64Array = np.empty(0, np.int64)
_EMPTY_F64: Float64Array = np.empty(0, np.float64)

#: What MLflow 3 may attach to a point: (model_id, dataset_name, dataset_digest); empty strings when absent.
Link = tuple[str, str, str]
NO_LINK: Link = ("", "", "")
#: Who logged a point: (rank, node, attempt). A process logs as one rank on one node under one attempt of its run.
Source = tuple[int, str, int]
NO_SOURCE: Source = (0, "", 0)
_H = TypeVar("_H", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Metrics:
    """Points column by column. Point i belongs to run_ids[run_index[i]] and key keys[key_index[i]]."""

    run_ids: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    run_index: Int32Array = field(default_factory=lambda: _EMPTY_I32)
    key_index: Int32Array = field(default_factory=lambda: _EMPTY_I32)
    step: Int64Array = field(default_factory=lambda: _EMPTY_I64)
    timestamp: Int64Array = field(default_factory=lambda: _EMPTY_I64)
    value: Float64Array = field(default_factory=lambda: _EMPTY_F64)
    #: Point i is linked to links[link_index[i]]; both empty (the common case) when no point has a link.
    links: tuple[Link, ...] = ()
    link_index: Int32Array = field(default_factory=lambda: _EMPTY_I32)
    #: Point i was logged by sources[source_index[i]]; both empty (a single process) when every point is NO_SOURCE.
    sources: tuple[Source, ...] = ()
    source_index: Int32Array = field(default_factory=lambda: _EMPTY_I32)

    def __len__(self) -> int:
        return len(self.value)

    @property
    def linked(self) -> bool:
        return len(self.link_index) > 0

    @property
    def sourced(self) -> bool:
        return len(self.source_index) > 0

    def _links_or_none(self) -> tuple[tuple[Link, ...], Int32Array]:
        if self.linked:
            return self.links, self.link_index
        return (NO_LINK,), np.zeros(len(self), np.int32)

    def source_columns(self) -> tuple[tuple[Source, ...], Int32Array]:
        """(sources, source_index) even when every point is NO_SOURCE."""
        if self.sourced:
            return self.sources, self.source_index
        return (NO_SOURCE,), np.zeros(len(self), np.int32)

    @staticmethod
    def concat(parts: Sequence[Metrics]) -> Metrics:
        parts = [p for p in parts if len(p)]
        if len(parts) <= 1:
            return parts[0] if parts else Metrics()
        run_ids, run_index = union_dictionaries([p.run_ids for p in parts], [p.run_index for p in parts])
        keys, key_index = union_dictionaries([p.keys for p in parts], [p.key_index for p in parts])
        links: tuple[Link, ...] = ()
        link_index = _EMPTY_I32
        if any(p.linked for p in parts):
            columns = [p._links_or_none() for p in parts]
            links, link_index = union_dictionaries([c[0] for c in columns], [c[1] for c in columns])
        sources: tuple[Source, ...] = ()
        source_index = _EMPTY_I32
        if any(p.sourced for p in parts):
            by_source = [p.source_columns() for p in parts]
            sources, source_index = union_dictionaries([c[0] for c in by_source], [c[1] for c in by_source])
        return Metrics(
            run_ids=run_ids,
            keys=keys,
            run_index=run_index,
            key_index=key_index,
            step=np.concatenate([p.step for p in parts]),
            timestamp=np.concatenate([p.timestamp for p in parts]),
            value=np.concatenate([p.value for p in parts]),
            links=links,
            link_index=link_index,
            sources=sources,
            source_index=source_index,
        )


def union_dictionaries(
    dictionaries: Sequence[tuple[_H, ...]], indices: Sequence[Int32Array]
) -> tuple[tuple[_H, ...], Int32Array]:
    """Merge dictionary-encoded columns: one dictionary without repeats, indices remapped.

    The Python work is per dictionary entry, not per point; points are remapped by numpy.
    """
    merged: dict[_H, int] = {}
    remapped = []
    for dictionary, index in zip(dictionaries, indices, strict=True):
        remap = np.fromiter((merged.setdefault(v, len(merged)) for v in dictionary), np.int32, len(dictionary))
        remapped.append(remap[index] if len(index) else _EMPTY_I32)
    return tuple(merged), np.concatenate(remapped) if remapped else _EMPTY_I32


ACTIVE = "active"
DELETED = "deleted"


@dataclass(frozen=True, slots=True)
class ExperimentRow:
    experiment_id: str
    name: str
    creation_time_ms: int
    #: Zero for experiments the write path creates on first use, so any explicit change outranks them.
    version: int = 0
    artifact_location: str = ""
    lifecycle_stage: str = ACTIVE
    last_update_time_ms: int = 0


@dataclass(frozen=True, slots=True)
class RunRow:
    run_id: str
    experiment_id: str
    name: str
    status: str
    start_time_ms: int
    end_time_ms: int
    user: str
    version: int
    #: Set on upserts that name their experiment instead of giving its id; the catalog resolves it.
    experiment_name: str = ""
    lifecycle_stage: str = ACTIVE


@dataclass(frozen=True, slots=True)
class ParamRow:
    run_id: str
    key: str
    value: str


@dataclass(frozen=True, slots=True)
class TagRow:
    run_id: str
    key: str
    value: str
    version: int
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class ExperimentTagRow:
    experiment_id: str
    key: str
    value: str
    version: int
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class DatasetRow:
    """A dataset as MLflow's client describes it; one per (experiment_id, name, digest)."""

    experiment_id: str
    name: str
    digest: str
    source_type: str
    source: str
    schema: str
    profile: str
    version: int


@dataclass(frozen=True, slots=True)
class DatasetInputRow:
    """A dataset used by a run, with the input's tags."""

    run_id: str
    experiment_id: str
    name: str
    digest: str
    tags: tuple[tuple[str, str], ...]
    logged_at_ms: int
    version: int


@dataclass(frozen=True, slots=True)
class LoggedModelRow:
    """An MLflow 3 logged model, whole: every change writes a new version of the row."""

    model_id: str
    experiment_id: str
    name: str
    artifact_location: str
    creation_time_ms: int
    last_updated_time_ms: int
    #: mlflow.entities.LoggedModelStatus as its protobuf number.
    status: int
    version: int
    model_type: str = ""
    source_run_id: str = ""
    status_message: str = ""
    lifecycle_stage: str = ACTIVE


@dataclass(frozen=True, slots=True)
class LoggedModelTagRow:
    model_id: str
    key: str
    value: str
    version: int
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class LoggedModelParamRow:
    model_id: str
    key: str
    value: str
    version: int


#: RunModelRow directions: a model the run used (runs/log-inputs) or produced (runs/outputs).
MODEL_INPUT = "input"
MODEL_OUTPUT = "output"


@dataclass(frozen=True, slots=True)
class RunModelRow:
    run_id: str
    model_id: str
    direction: str
    step: int = 0


@dataclass(frozen=True, slots=True)
class Batch:
    metrics: Metrics = field(default_factory=Metrics)
    experiments: tuple[ExperimentRow, ...] = ()
    runs: tuple[RunRow, ...] = ()
    params: tuple[ParamRow, ...] = ()
    tags: tuple[TagRow, ...] = ()
    experiment_tags: tuple[ExperimentTagRow, ...] = ()
    datasets: tuple[DatasetRow, ...] = ()
    dataset_inputs: tuple[DatasetInputRow, ...] = ()
    logged_models: tuple[LoggedModelRow, ...] = ()
    logged_model_tags: tuple[LoggedModelTagRow, ...] = ()
    logged_model_params: tuple[LoggedModelParamRow, ...] = ()
    run_models: tuple[RunModelRow, ...] = ()
    #: The requests this batch was made of (see ingest.pipeline.origin): the sink's deduplication tokens name them.
    origins: tuple[str, ...] = ()

    @property
    def points(self) -> int:
        return len(self.metrics)

    @property
    def size(self) -> int:
        """What the batch weighs against queue limits: points, plus one per metadata row."""
        rows = len(self.experiments) + len(self.runs) + len(self.params) + len(self.tags) + len(self.experiment_tags)
        rows += len(self.datasets) + len(self.dataset_inputs)
        rows += len(self.logged_models) + len(self.logged_model_tags) + len(self.logged_model_params)
        return len(self.metrics) + rows + len(self.run_models)

    def run_ids(self) -> set[str]:
        """Every run this batch writes to."""
        ids = set(self.metrics.run_ids)
        ids.update(p.run_id for p in self.params)
        ids.update(t.run_id for t in self.tags)
        return ids

    @staticmethod
    def merge(batches: Sequence[Batch]) -> Batch:
        if len(batches) == 1:
            return batches[0]
        return Batch(
            metrics=Metrics.concat([b.metrics for b in batches]),
            experiments=tuple(r for b in batches for r in b.experiments),
            runs=tuple(r for b in batches for r in b.runs),
            params=tuple(r for b in batches for r in b.params),
            tags=tuple(r for b in batches for r in b.tags),
            experiment_tags=tuple(r for b in batches for r in b.experiment_tags),
            datasets=tuple(r for b in batches for r in b.datasets),
            dataset_inputs=tuple(r for b in batches for r in b.dataset_inputs),
            logged_models=tuple(r for b in batches for r in b.logged_models),
            logged_model_tags=tuple(r for b in batches for r in b.logged_model_tags),
            logged_model_params=tuple(r for b in batches for r in b.logged_model_params),
            run_models=tuple(r for b in batches for r in b.run_models),
            origins=tuple(o for b in batches for o in b.origins),
        )
