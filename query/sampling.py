"""Choosing a chart's points from bucket summaries: pure numpy, no SQL (query.metrics reads the summaries).

The rules (README, "Sampled charts"), for each run, with M = max_results:
1. the first and the last point of the range are always included;
2. the range is cut into groups of equal step width, and every group contributes its lowest and highest
   finite point;
3. every group holding NaN, +Inf or -Inf contributes one point of each such kind (its first), never two;
4. the answer never exceeds M points: the groups are made as many as still fit (at least one);
5. then, while under M, more of the summaries' points (each bucket's first, last, lowest and highest) fill
   the answer, evenly spread over the range, so a series with at least M points answers about M points,
   as stock MLflow does.
Points are (step, timestamp, value order) rows (see schema.value_order_sql) in MLflow's order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from trackhouse.query import schema

Int64Array = npt.NDArray[np.int64]
#: Points as rows of (step, timestamp, value order).
Rows = npt.NDArray[np.int64]

#: Value orders of the special values, as metric_buckets' special columns imply them.
SPECIAL_ORDERS = {
    "nan_at": schema.NAN_LOW,
    "pinf_at": int(np.array([np.inf]).view(np.int64)[0]),
    "ninf_at": int(np.array([-np.inf]).view(np.int64)[0] ^ np.int64(2**63 - 1)),
}


@dataclass(frozen=True, slots=True)
class Summaries:
    """One run's chart buckets, ascending: `bucket` numbers them, bucket b starting at step
    origin + b * scale; `words` maps each metric_buckets column to its unpacked (n x 3) words."""

    bucket: Int64Array
    words: dict[str, Int64Array]
    origin: int
    scale: int

    def __len__(self) -> int:
        return len(self.bucket)


@dataclass(frozen=True, slots=True)
class Chart:
    #: (step, timestamp, value order) rows in MLflow's order.
    rows: Rows
    #: The first step of each group (each group runs to the next one's start), for checking the rules.
    group_starts: Int64Array


def choose(summaries: Summaries, max_points: int) -> Chart:
    """The chart's points for one run, by the module's rules."""
    if not len(summaries) or max_points <= 0:
        return Chart(np.empty((0, 3), np.int64), np.empty(0, np.int64))
    ends = np.stack((summaries.words["first"][0], summaries.words["last"][-1]))
    if max_points <= 2:  # stock MLflow's answer for one point: the last
        return Chart(_unique(ends[-max_points:]), _group_starts(summaries, 1))
    groups = max(1, min(len(summaries), (max_points - 2) // 2))
    while True:
        chosen = _unique(np.concatenate((ends, _required(summaries, groups, ends[1]))))
        if len(chosen) <= max_points or groups == 1:
            break
        groups = max(1, min(groups - 1, groups * (max_points - 2) // len(chosen)))
    if len(chosen) > max_points:  # a tiny max_points and several special values: the ends first
        rest = _missing_from(_unique(ends), chosen)
        chosen = _unique(np.concatenate((ends, rest[: max_points - 2])))
    return Chart(_fill(chosen, _pool(summaries), max_points), _group_starts(summaries, groups))


def _group_of(summaries: Summaries, groups: int) -> Int64Array:
    span = int(summaries.bucket[-1] - summaries.bucket[0]) + 1
    group: Int64Array = (summaries.bucket - summaries.bucket[0]) * groups // span
    return group


def _group_starts(summaries: Summaries, groups: int) -> Int64Array:
    span = int(summaries.bucket[-1] - summaries.bucket[0]) + 1
    first_bucket = summaries.bucket[0] + (np.arange(groups) * span + groups - 1) // groups
    starts: Int64Array = summaries.origin + first_bucket * summaries.scale
    return starts


def _required(summaries: Summaries, groups: int, last: Int64Array) -> Rows:
    """Per group: its lowest and highest finite point and the first point of each special kind it holds
    (in the last group, none of the kind of the range's last point, which represents it)."""
    group = _group_of(summaries, groups)
    words = summaries.words
    low = _pick(group, words["low"], lowest=True)
    high = _pick(group, words["high"], lowest=False)
    parts = [
        _as_points(low[low[:, 0] != schema.NAN_LOW], value_first=True),
        _as_points(high[high[:, 0] != schema.NAN_HIGH], value_first=True),
    ]
    for name, order in SPECIAL_ORDERS.items():
        first = _pick(group, words[name], lowest=True)
        present = first[:, 0] == 0
        if last[2] == order:
            present[-1] = False
        found = first[present]
        parts.append(np.column_stack((found[:, 1], found[:, 2], np.full(len(found), order, np.int64))))
    return np.concatenate(parts)


def _pick(group: Int64Array, words: Int64Array, lowest: bool) -> Int64Array:
    """Each group's lexicographically lowest (or highest) row of words."""
    order = np.lexsort((words[:, 2], words[:, 1], words[:, 0], group))
    ordered = group[order]
    if lowest:
        take = np.flatnonzero(np.diff(ordered, prepend=ordered[0] - 1))  # each group's first
    else:
        take = np.flatnonzero(np.diff(ordered, append=ordered[-1] + 1))  # each group's last
    picked: Int64Array = words[order[take]]
    return picked


def _as_points(words: Int64Array, value_first: bool) -> Rows:
    """(value order, step, timestamp) words as (step, timestamp, value order) rows."""
    return words[:, [1, 2, 0]] if value_first else words


def _pool(summaries: Summaries) -> Rows:
    """The finite points the summaries name, for filling: buckets' ends, lows and highs. Special values
    never fill, so each stays once per group."""
    words = summaries.words
    low, high = words["low"], words["high"]
    ends = np.concatenate((words["first"], words["last"]))
    return _unique(
        np.concatenate(
            (
                ends[~np.isin(ends[:, 2], list(SPECIAL_ORDERS.values()))],
                _as_points(low[low[:, 0] != schema.NAN_LOW], value_first=True),
                _as_points(high[high[:, 0] != schema.NAN_HIGH], value_first=True),
            )
        )
    )


def _fill(chosen: Rows, pool: Rows, max_points: int) -> Rows:
    """`chosen` plus pool points not in it, evenly spread, up to max_points."""
    need = max_points - len(chosen)
    if need <= 0:
        return chosen
    fresh = _missing_from(chosen, pool)
    if len(fresh) > need:
        fresh = fresh[(np.arange(need) * len(fresh)) // need]
    return _unique(np.concatenate((chosen, fresh)))


def _missing_from(chosen: Rows, pool: Rows) -> Rows:
    """The rows of `pool` that are not in `chosen` (both unique), in order."""
    rows, first, counts = np.unique(np.concatenate((chosen, pool)), axis=0, return_index=True, return_counts=True)
    fresh: Rows = rows[(counts == 1) & (first >= len(chosen))]
    return fresh


def _unique(rows: Rows) -> Rows:
    """Distinct rows in (step, timestamp, value order) order."""
    if not len(rows):
        return rows.reshape(0, 3)
    unique: Rows = np.unique(rows, axis=0)
    return unique
