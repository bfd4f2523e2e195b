"""MLflow 3's links: the model and dataset a metric names, and the models a run used and produced."""

from __future__ import annotations

from typing import Any

import numpy as np

from trackhouse.compat.errors import invalid
from trackhouse.ingest.batch import NO_LINK, Int32Array, Link
from trackhouse.query import logged_models

#: Bounds on each field; stock's columns hold 36 (ids, digests) and 500 (names) characters.
MAX_LINK_CHARS = 500
_FIELDS = ("model_id", "dataset_name", "dataset_digest")
_NONE: tuple[tuple[Link, ...], Int32Array] = ((), np.empty(0, np.int32))


def metric_links(entries: list[Any]) -> tuple[tuple[Link, ...], Int32Array]:
    """Each entry's link, dictionary-encoded; nothing at all when no entry has one (the usual case)."""
    if not any(isinstance(e, dict) and any(e.get(name) for name in _FIELDS) for e in entries):
        return _NONE
    dictionary: dict[Link, int] = {}
    index = np.empty(len(entries), np.int32)
    for i, entry in enumerate(entries):
        link = tuple(_field(entry, name, i, len(entries)) for name in _FIELDS) if isinstance(entry, dict) else NO_LINK
        index[i] = dictionary.setdefault(link, len(dictionary))  # type: ignore[arg-type]
    return tuple(dictionary), index


def _field(entry: dict[str, Any], name: str, i: int, count: int) -> str:
    raw = entry.get(name) or ""
    where = name if count == 1 else f"metrics[{i}].{name}"
    if not isinstance(raw, str):
        raise invalid(f"Invalid value {raw!r} for parameter '{where}' supplied: expected a string.")
    if len(raw) > MAX_LINK_CHARS:
        raise invalid(f"Invalid value for parameter '{where}' supplied: longer than {MAX_LINK_CHARS} characters.")
    return raw


def with_run_models(runs: list[dict[str, Any]], linked: dict[str, logged_models.RunModels]) -> None:
    """Add each run's model inputs and outputs (logged_models.run_models, read beside the run's other parts) to its
    wire shape (runs/get, runs/search), as stock has them."""
    for run in runs:
        found = linked[run["info"]["run_id"]]  # run_models has an entry for every run it was asked about
        if found.inputs:
            run.setdefault("inputs", {})["model_inputs"] = [{"model_id": m} for m in found.inputs]
        if found.outputs:
            outputs = [{"model_id": m, "step": step} for m, step in found.outputs]
            run.setdefault("outputs", {})["model_outputs"] = outputs
