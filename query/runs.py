"""Reading runs: their info, params, tags and latest metrics, a page of runs at a time.

The run name lives in `runs.name`; MLflow also shows it as the `mlflow.runName`
tag, so the tag is derived from the column whenever a writer did not set it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from trackhouse.query import attempts, datasets, metrics, schema
from trackhouse.query.connection import Client
from trackhouse.query.experiments import default_artifact_location

RUN_NAME_TAG = "mlflow.runName"


@dataclass(frozen=True, slots=True)
class RunInfo:
    run_id: str
    experiment_id: str
    name: str
    status: str
    start_time: int
    end_time: int | None
    user: str
    lifecycle_stage: str
    version: int
    artifact_uri: str


@dataclass(frozen=True, slots=True)
class Run:
    info: RunInfo
    metrics: dict[str, metrics.Point] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    dataset_inputs: list[datasets.DatasetInput] = field(default_factory=list)


def infos(client: Client, database: str, run_ids: Collection[str]) -> dict[str, RunInfo]:
    """Info of the runs among `run_ids` that exist, deleted ones included."""
    if not run_ids:
        return {}
    rows = client.query(
        "SELECT r.run_id, r.experiment_id, r.name, r.status, r.start_time, r.end_time, r.user,"
        " r.lifecycle_stage, r.version, e.artifact_location"
        f" FROM (SELECT * FROM {database}.{schema.RUNS} FINAL WHERE run_id IN {{ids:Array(String)}}) AS r"
        f" LEFT JOIN (SELECT experiment_id, artifact_location FROM {database}.{schema.EXPERIMENTS} FINAL) AS e"
        " ON r.experiment_id = e.experiment_id",
        parameters={"ids": list(run_ids)},
    ).result_rows
    found = {}
    for run_id, experiment_id, name, status, start, end, user, stage, version, location in rows:
        root = location or default_artifact_location(experiment_id)
        found[run_id] = RunInfo(
            run_id, experiment_id, name, status, start, end, user, stage, version, f"{root}/{run_id}/artifacts"
        )
    return found


def runs(client: Client, database: str, run_ids: Sequence[str]) -> list[Run]:
    """Whole runs, in the order of `run_ids`, skipping ids that do not exist."""
    found = infos(client, database, run_ids)
    if not found:
        return []
    ids = list(found)
    return assemble(
        run_ids,
        found,
        params_of(client, database, ids),
        tags_of(client, database, ids),
        metrics.latest(client, database, ids),
        datasets.inputs_of(client, database, ids),
    )


def latest_metrics_json(client: Client, database: str, run_ids: Sequence[str]) -> dict[str, str]:
    """Each run's latest metrics as the JSON array MLflow's wire carries them, by key.

    One object per key, as `compat.wire.metric` shapes it (key, value, timestamp, step; NaN as "NaN", infinities
    clamped as stock sends them, numbers in their shortest exact form). A search page of runs with thousands
    of keys holds hundreds of thousands of these: ClickHouse renders them, so they cost no Python object each
    (profiled: a 50-run page of 5,000-key runs spent 4 s building and encoding per-metric dicts). A page of at most
    FEW_METRICS_ROWS is rendered here instead, where it costs less. Runs without metrics get "[]". The latest point
    is `metrics.latest`'s: the maximum packed (step, timestamp, value order).
    """
    if not run_ids:
        return {}
    few = _known_total(database, run_ids) <= FEW_METRICS_ROWS
    found = _few_metrics_json(client, database, run_ids) if few else None
    if found is None:
        rows = client.query(rendered_metrics_sql(database).statement, parameters={"runs": list(run_ids)}).result_rows
        found = {run_id: "[]" for run_id in run_ids}
        for run_id, text, keys in rows:
            found[run_id] = text
            _learn_keys(database, run_id, keys)
    found.update(_lineage_metrics_json(client, database, run_ids))
    return found


#: Up to this many stored rows, runs' latest metrics are rendered in Python from a plain read; beyond, by
#: ClickHouse. Rendering there has a fixed cost (planning the decode and render expressions) that dominates a light
#: page, and here a cost per key (about 5 us) that dominates a heavy one (benchmarks.wide_render, README "Latest
#: metrics rendered where it is cheaper").
FEW_METRICS_ROWS = 1_000
#: A lower bound on the metric keys of runs read before, by (database, run_id). A run's keys only ever grow (MLflow has
#: no call that deletes a metric), so a bound once learnt stays true. It lets a page it already puts over
#: FEW_METRICS_ROWS skip the plain read that would find so, and splits a heavy page (latest_metrics_reads). It picks
#: the path only, never the answer, so the read threads update it without a lock: a lost update weakens a bound.
_known_keys: dict[tuple[str, str], int] = {}
_KNOWN_RUNS = 100_000


#: A page known to hold more keys than this has its latest metrics read in two halves at once (latest_metrics_reads).
SPLIT_METRICS_KEYS = 50_000


def latest_metrics_reads(database: str, run_ids: Sequence[str]) -> list[Sequence[str]]:
    """A page's runs as latest_metrics_json reads that may run at once, on different clients: two halves when
    earlier reads showed the page to hold over SPLIT_METRICS_KEYS keys, else the page whole.

    ClickHouse renders a heavy page's metrics on about one core, so two halves on two clients finish sooner; each
    statement also has a fixed cost (about 8 ms), which a light page does not win back. Simulated in-process with a
    page's other part reads on the backend's two clients: the wide table of 50 runs x 5,000 keys 113 -> 100 ms, of 100
    runs 192 -> 168, and the sweep's 50 runs x 10 keys 33.5 -> 40 (so light pages stay whole). End to end, README
    "A heavy page's latest metrics in two halves at once"."""
    if _known_total(database, run_ids) <= SPLIT_METRICS_KEYS or len(run_ids) < 2:
        return [run_ids]
    middle = len(run_ids) // 2
    return [run_ids[:middle], run_ids[middle:]]


def forget_keys() -> None:
    """Forget what earlier reads learnt of runs' keys, as a fresh process has (for benchmarks and tests)."""
    _known_keys.clear()


def _known_total(database: str, run_ids: Sequence[str]) -> int:
    """The keys earlier reads showed `run_ids` to hold at least, together."""
    return sum(_known_keys.get((database, run_id), 0) for run_id in run_ids)


def _learn_keys(database: str, run_id: str, keys: int) -> None:
    if len(_known_keys) >= _KNOWN_RUNS:
        _known_keys.clear()  # a hint only: forgetting costs one plain read per page
    _known_keys[database, run_id] = max(keys, _known_keys.get((database, run_id), 0))


def _few_metrics_json(client: Client, database: str, run_ids: Sequence[str]) -> dict[str, str] | None:
    """latest_metrics_json's answer when the runs' latest metrics are at most FEW_METRICS_ROWS stored rows, else
    None. The read stops one row past the bound, so a heavy page not known as such costs one short read more."""
    parameters = {"runs": list(run_ids), "limit": FEW_METRICS_ROWS + 1}
    rows = client.query(few_metrics_sql(database), parameters=parameters).result_rows
    if len(rows) > FEW_METRICS_ROWS:
        return None  # stored rows, unmerged duplicates included: the caller's read learns the keys
    newest: dict[tuple[str, str], int] = {}
    for run_id, key, packed in rows:
        known = newest.get((run_id, key))
        if known is None or packed > known:
            newest[run_id, key] = packed
    by_run: dict[str, dict[str, metrics.Point]] = {run_id: {} for run_id in run_ids}
    for (run_id, key), point in zip(newest, metrics.unpack_latest(list(newest.values())), strict=True):
        by_run[run_id][key] = point
    for run_id, points in by_run.items():
        _learn_keys(database, run_id, len(points))
    return {run_id: _metrics_json(points) for run_id, points in by_run.items()}


def few_metrics_sql(database: str) -> str:
    """The plain read of _few_metrics_json: the runs' stored latest rows, up to `{limit:UInt64}`. Without FINAL:
    unmerged parts may hold older rows of a key, and the maximum taken in Python is the merge's answer."""
    return (
        f"SELECT run_id, key, latest FROM {database}.{schema.LATEST_METRICS} WHERE run_id IN {{runs:Array(String)}}"
        " LIMIT {limit:UInt64}"
    )


@dataclass(frozen=True, slots=True)
class RenderedMetricsSql:
    """latest_metrics_json's statement, and the stages it is built from (benchmarks.wide_render times each).
    Every stage reads the runs bound as `{runs:Array(String)}`."""

    #: run_id, key, latest: the stored rows, merged.
    stored: str
    #: run_id, key, st, ts, v: each latest point decoded.
    decoded: str
    #: run_id, key, m: each point's JSON object.
    rendered: str
    #: run_id, json, keys: each run's JSON array, and how many keys it holds.
    statement: str


def rendered_metrics_sql(database: str) -> RenderedMetricsSql:
    step, timestamp, value = schema.latest_point_sql("latest")
    # FINAL merges a key's rows as the table's own merges do (max): in sort-key order, it read 50 runs of 5,000 keys
    # in 8 ms, where GROUP BY run_id, key hashed them in 130-220 ms (measured).
    table = f"{database}.{schema.LATEST_METRICS}"
    stored = f"SELECT run_id, key, latest FROM {table} FINAL WHERE run_id IN {{runs:Array(String)}}"
    decoded = f"SELECT run_id, key, {step} AS st, {timestamp} AS ts, {value} AS v FROM ({stored})"
    rendered = (
        "SELECT run_id, key, concat('{\"key\":', toJSONString(key), ',\"value\":',"
        " multiIf(isNaN(v), '\"NaN\"', v = inf, '1.7976931348623157e308', v = -inf, '-1.7976931348623157e308',"
        " v = 0, if(reinterpretAsUInt64(v) = 0, '0.0', '-0.0'), toString(v)),"
        " ',\"timestamp\":', toString(ts), ',\"step\":', toString(st), '}') AS m"
        f" FROM ({decoded})"
    )
    # Sorted by key alone (a run's keys are distinct after FINAL): 10% faster than sorting (key, m) tuples over
    # 50 runs of 5,000 keys, 99 -> 89 ms for the whole statement (measured in-process).
    statement = (
        "SELECT run_id,"
        " concat('[', arrayStringConcat(arraySort((m, k) -> k, groupArray(m), groupArray(key)), ','), ']') AS json,"
        " count() AS keys"
        f" FROM ({rendered}) GROUP BY run_id"
    )
    return RenderedMetricsSql(stored, decoded, rendered, statement)


def _lineage_metrics_json(client: Client, database: str, run_ids: Sequence[str]) -> dict[str, str]:
    """Resumed and forked runs (query.attempts): their latest shown points, rendered in Python (such runs are few,
    and each read of them is already more than one query)."""
    special = list(attempts.lineages(client, database, run_ids))
    if not special:
        return {}
    return {run_id: _metrics_json(points) for run_id, points in metrics.latest(client, database, special).items()}


def _metrics_json(points: dict[str, metrics.Point]) -> str:
    """A run's latest points as latest_metrics_json's array: by key (str order is UTF-8 byte order, as ClickHouse
    sorts), numbers as Python writes them (the same floats as ClickHouse's text, sometimes spelled otherwise)."""
    return json.dumps(
        [
            {"key": key, "value": _wire_number(value), "timestamp": timestamp, "step": step}
            for key, (step, timestamp, value) in sorted(points.items())
        ],
        separators=(",", ":"),
    )


def _wire_number(value: float) -> float | str:
    """As latest_metrics_json renders a value: NaN as "NaN", infinities clamped as stock MLflow sends them."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return math.copysign(1.7976931348623157e308, value)
    return value


def params_of(client: Client, database: str, run_ids: Sequence[str]) -> dict[str, dict[str, str]]:
    return _by_run(
        client,
        f"SELECT run_id, key, {schema.PARAM_VALUE} FROM {database}.{schema.PARAMS}"
        " WHERE run_id IN {ids:Array(String)} GROUP BY run_id, key ORDER BY key",
        run_ids,
    )


def tags_of(client: Client, database: str, run_ids: Sequence[str]) -> dict[str, dict[str, str]]:
    return _by_run(
        client,
        f"SELECT run_id, key, value FROM {database}.{schema.TAGS} FINAL"
        " WHERE run_id IN {ids:Array(String)} AND deleted = 0 ORDER BY key",
        run_ids,
    )


def assemble(
    run_ids: Sequence[str],
    found: dict[str, RunInfo],
    params: dict[str, dict[str, str]],
    tags: dict[str, dict[str, str]],
    latest: dict[str, dict[str, metrics.Point]],
    dataset_inputs: dict[str, list[datasets.DatasetInput]] | None = None,
) -> list[Run]:
    """Runs from separately read parts, so a caller may read the parts concurrently."""
    result = []
    for run_id in run_ids:
        info = found.get(run_id)
        if info is None:
            continue
        run_tags = tags.get(run_id, {})
        if info.name:
            run_tags.setdefault(RUN_NAME_TAG, info.name)
        inputs = (dataset_inputs or {}).get(run_id, [])
        result.append(Run(info, latest.get(run_id, {}), params.get(run_id, {}), run_tags, inputs))
    return result


def _by_run(client: Client, query: str, run_ids: Sequence[str]) -> dict[str, dict[str, str]]:
    """(run_id, key, value) rows as run_id -> {key: value}, with an entry for every run."""
    found: dict[str, dict[str, str]] = {run_id: {} for run_id in run_ids}
    for run_id, key, value in client.query(query, parameters={"ids": list(run_ids)}).result_rows:
        found[run_id][key] = value
    return found
