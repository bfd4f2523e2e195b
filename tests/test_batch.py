from __future__ import annotations

import numpy as np

from trackhouse.ingest.batch import Batch, Metrics, union_dictionaries


def metrics(run: str, keys: tuple[str, ...], key_index: list[int]) -> Metrics:
    n = len(key_index)
    return Metrics(
        run_ids=(run,),
        keys=keys,
        run_index=np.zeros(n, np.int32),
        key_index=np.array(key_index, np.int32),
        step=np.arange(n, dtype=np.int64),
        timestamp=np.zeros(n, np.int64),
        value=np.arange(n, dtype=np.float64),
    )


def test_union_dictionaries_remaps_without_repeats() -> None:
    merged, index = union_dictionaries(
        [("a", "b"), ("b", "c")], [np.array([0, 1, 1], np.int32), np.array([1, 0], np.int32)]
    )
    assert merged == ("a", "b", "c")
    assert [merged[i] for i in index] == ["a", "b", "b", "c", "b"]


def test_merge_keeps_every_point_attached_to_its_run_and_key() -> None:
    a = Batch(metrics=metrics("r1", ("loss",), [0, 0]))
    b = Batch(metrics=metrics("r2", ("acc", "loss"), [0, 1, 1]))
    m = Batch.merge([a, b, Batch()]).metrics
    pairs = [(m.run_ids[r], m.keys[k]) for r, k in zip(m.run_index, m.key_index, strict=True)]
    assert pairs == [("r1", "loss"), ("r1", "loss"), ("r2", "acc"), ("r2", "loss"), ("r2", "loss")]
    assert m.value.tolist() == [0, 1, 0, 1, 2]
