"""The last stage: one insert per table per batch, through clickhouse-connect.

Metrics go as an Arrow table whose run and key columns are dictionary arrays,
so ClickHouse receives LowCardinality data without a Python object per point.
Their summaries (ingest.summaries: latest points, chart buckets) are computed
here and inserted after the points, before the batch is acknowledged, so a
retried batch rewrites both and no summary is ever missing its points.

Every insert carries a deduplication token, so that ClickHouse itself drops an insert it already stored (a
retry after a timeout whose insert had in fact succeeded, or a batch retried after only some of its tables were
written). The token names what the batch holds, never its content (see `flush_token`).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections import Counter
from collections.abc import Iterable
from typing import Protocol

import numpy as np
import pyarrow as pa
from clickhouse_connect.driver import exceptions as ch_errors

from trackhouse.ingest import rank_summaries
from trackhouse.ingest.batch import Batch, Int32Array, Int64Array, Metrics
from trackhouse.ingest.errors import PermanentError, RetryableError
from trackhouse.ingest.summaries import AttemptSummaries, Buckets, Summaries, pack, summarize, summarize_attempts
from trackhouse.query import schema
from trackhouse.query.connection import Client

# ClickHouse error codes that describe the server's state, not the data: the same insert may succeed later.
# 159 TIMEOUT_EXCEEDED, 202 TOO_MANY_SIMULTANEOUS_QUERIES, 209 SOCKET_TIMEOUT, 210 NETWORK_ERROR,
# 241 MEMORY_LIMIT_EXCEEDED, 242 TABLE_IS_READ_ONLY, 243 NOT_ENOUGH_SPACE, 252 TOO_MANY_PARTS,
# 319 UNKNOWN_STATUS_OF_INSERT, 999 KEEPER_EXCEPTION.
RETRYABLE_CODES = frozenset({159, 202, 209, 210, 241, 242, 243, 252, 319, 999})
_CODE_RE = re.compile(r"Code: (\d+)")

# Reads deduplicate, so ClickHouse need not collapse duplicates inside each inserted block. (Its effect on insert
# speed was last measured when a materialized view existed, so no figure is given here.)
INSERT_SETTINGS = {"optimize_on_insert": 0}


def flush_token(origins: Iterable[str]) -> str:
    """The deduplication token of a batch made of the requests named by `origins` (Batch.origins).

    The set of origins decides it, not their order or repeats, so the same flush retried gets the same token, and
    so does a Kafka redelivery or a gRPC retry that happens to be batched with exactly the same requests. Batched
    differently (a request retried alone, or with other requests), it gets another token and is stored again:
    then the duplicate rows are identical to the first ones, and every read and every merge is insensitive to
    them (DESIGN.md, "Duplicates"). So the token makes the common retries free, and correctness never rests on it.
    """
    canonical = json.dumps(sorted(set(origins)), separators=(",", ":"))  # no two sets share one text
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class _Tokens:
    """Each insert's settings for one batch: one token per table, with a part number per insert into that table
    (a token marks one insert; two inserts into one table under one token would drop the second)."""

    def __init__(self, origins: tuple[str, ...]) -> None:
        # A batch from no request (tests, tools) is never deduplicated: a token of its own, as ClickHouse would
        # otherwise deduplicate it by content (and which setting turns that off differs between versions).
        self._flush = flush_token(origins) if origins else uuid.uuid4().hex
        self._parts: Counter[str] = Counter()

    def settings(self, table: str) -> dict[str, object]:
        part = self._parts[table]
        self._parts[table] += 1
        return {"insert_deduplication_token": f"{self._flush}-{table}-{part}"}


class Sink(Protocol):
    def write(self, batch: Batch) -> None:
        """Store `batch` durably, or raise PermanentError or RetryableError. Blocking; runs in a worker thread."""

    def close(self) -> None: ...


def classify(exc: Exception) -> PermanentError | RetryableError:
    """Split driver errors into retryable (server state) and permanent (the data itself)."""
    if isinstance(exc, ch_errors.OperationalError | ch_errors.InterfaceError | OSError):
        return RetryableError(f"storage unavailable: {exc}")
    match = _CODE_RE.search(str(exc))
    if match and int(match.group(1)) in RETRYABLE_CODES:
        return RetryableError(f"storage busy: {exc}")
    return PermanentError(f"storage rejected the batch: {exc}")


class _Dictionaries:
    """The batch's run and key dictionaries as Arrow arrays, built once and shared by its three tables."""

    def __init__(self, metrics: Metrics) -> None:
        self._runs = pa.array(metrics.run_ids, pa.string())
        self._keys = pa.array(metrics.keys, pa.string())

    @property
    def arrays(self) -> tuple[pa.Array, pa.Array]:
        return self._runs, self._keys

    def columns(self, run_index: Int32Array, key_index: Int32Array) -> dict[str, pa.Array]:
        return {
            "run_id": pa.DictionaryArray.from_arrays(run_index, self._runs),
            "key": pa.DictionaryArray.from_arrays(key_index, self._keys),
        }


def metrics_table(metrics: Metrics, dictionaries: _Dictionaries) -> pa.Table:
    columns = {
        **dictionaries.columns(metrics.run_index, metrics.key_index),
        "step": metrics.step,
        "timestamp": metrics.timestamp,
        "value": metrics.value,
    }
    if metrics.linked:  # otherwise the columns take their default, ''
        for position, name in enumerate(LINK_COLUMNS):
            # Links share parts (one model, several datasets); an Arrow dictionary must not repeat a value.
            values, inverse = np.unique([link[position] for link in metrics.links], return_inverse=True)
            index = inverse.astype(np.int32)[metrics.link_index]
            columns[name] = pa.DictionaryArray.from_arrays(index, pa.array(values.tolist(), pa.string()))
    if metrics.sourced:  # otherwise rank 0, node '' and attempt 0 by default
        ranks, nodes, attempts = zip(*metrics.sources, strict=True)
        columns["rank"] = np.array(ranks, np.uint32)[metrics.source_index]
        node_values, node_inverse = np.unique(nodes, return_inverse=True)
        columns["node"] = pa.DictionaryArray.from_arrays(
            node_inverse.astype(np.int32)[metrics.source_index], pa.array(node_values.tolist(), pa.string())
        )
        columns["attempt"] = np.array(attempts, np.uint32)[metrics.source_index]
    return pa.table(columns)


#: The metrics columns holding a point's Link, in its order.
LINK_COLUMNS = ("model_id", "dataset_name", "dataset_digest")


def latest_table(summaries: Summaries, dictionaries: _Dictionaries) -> pa.Table:
    latest = summaries.latest
    return pa.table(
        {
            **dictionaries.columns(latest.run_index, latest.key_index),
            "latest": _int256((latest.step, latest.timestamp, latest.order)),
        }
    )


def attempts_table(summaries: AttemptSummaries, dictionaries: _Dictionaries) -> pa.Table:
    return pa.table(
        {
            **dictionaries.columns(summaries.run_index, summaries.key_index),
            "attempt": summaries.attempt,
            "first_step": summaries.first_step,
            "latest": _int256(summaries.latest),
        }
    )


def buckets_table(summaries: Summaries, dictionaries: _Dictionaries) -> pa.Table:
    return pa.concat_tables([_buckets(level, dictionaries) for level in summaries.buckets])


def _buckets(level: Buckets, dictionaries: _Dictionaries) -> pa.Table:
    return pa.table(
        {
            **dictionaries.columns(level.run_index, level.key_index),
            "width": np.full(len(level), level.width, np.uint16),
            "bucket": level.bucket,
            **{name: _int256(column) for name, column in level.columns.items()},
        }
    )


def _int256(triple: tuple[Int64Array, Int64Array, Int64Array]) -> pa.FixedSizeBinaryArray:
    """Packed points (ingest.summaries.pack): ClickHouse reads 32-byte fixed-size binary into Int256 columns."""
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), len(triple[0]), [None, pa.py_buffer(pack(*triple))])


class ClickHouseSink:
    def __init__(self, client: Client, database: str) -> None:
        self._client = client
        self._database = database
        self._tokens = _Tokens(())  # the batch being written's; one write runs at a time

    def write(self, batch: Batch) -> None:
        self._tokens = _Tokens(batch.origins)
        try:
            self._write(batch)
        except (ch_errors.ClickHouseError, OSError) as exc:
            raise classify(exc) from exc

    def _write(self, batch: Batch) -> None:
        # Metadata first, so a reader never sees points of a run it cannot find.
        if batch.experiments:
            self._insert_rows(
                schema.EXPERIMENTS,
                [
                    "experiment_id",
                    "name",
                    "artifact_location",
                    "lifecycle_stage",
                    "creation_time",
                    "last_update_time",
                    "version",
                ],
                [
                    [
                        e.experiment_id,
                        e.name,
                        e.artifact_location,
                        e.lifecycle_stage,
                        e.creation_time_ms,
                        e.last_update_time_ms or e.creation_time_ms,
                        e.version,
                    ]
                    for e in batch.experiments
                ],
            )
        if batch.runs:
            self._insert_rows(
                schema.RUNS,
                list(schema.RUN_COLUMNS),
                [
                    [
                        r.run_id,
                        r.experiment_id,
                        r.name,
                        r.status,
                        r.start_time_ms,
                        r.end_time_ms or None,
                        r.user,
                        r.lifecycle_stage,
                        r.version,
                    ]
                    for r in batch.runs
                ],
            )
        if batch.params:
            self._insert_rows(
                schema.PARAMS, ["run_id", "key", "value"], [[p.run_id, p.key, p.value] for p in batch.params]
            )
        if batch.tags:
            self._insert_rows(
                schema.TAGS,
                ["run_id", "key", "value", "deleted", "version"],
                [[t.run_id, t.key, t.value, int(t.deleted), t.version] for t in batch.tags],
            )
        if batch.experiment_tags:
            self._insert_rows(
                schema.EXPERIMENT_TAGS,
                ["experiment_id", "key", "value", "deleted", "version"],
                [[t.experiment_id, t.key, t.value, int(t.deleted), t.version] for t in batch.experiment_tags],
            )
        if batch.datasets or batch.dataset_inputs:
            self._write_datasets(batch)
        self._write_logged_models(batch)
        if batch.points:
            dictionaries = _Dictionaries(batch.metrics)
            summaries = summarize(batch.metrics)
            self._insert_arrow(schema.METRICS, metrics_table(batch.metrics, dictionaries))
            latest = latest_table(summaries, dictionaries)
            self._insert_arrow(schema.LATEST_METRICS, latest)
            self._insert_arrow(schema.LATEST_BY_KEY, latest)  # the same rows, ordered by key (migration 15)
            self._insert_arrow(schema.METRIC_BUCKETS, buckets_table(summaries, dictionaries))
            by_attempt = summarize_attempts(batch.metrics)
            if by_attempt is not None:  # only points of resumed runs' later attempts
                self._insert_arrow(schema.METRIC_ATTEMPTS, attempts_table(by_attempt, dictionaries))
            self._write_rank_summaries(batch.metrics, dictionaries)

    def _write_rank_summaries(self, metrics: Metrics, dictionaries: _Dictionaries) -> None:
        """The rank API's summaries (ingest.rank_summaries), like the others after the points."""
        ranks = rank_summaries.summarize_ranks(metrics)
        runs, keys = dictionaries.arrays
        self._insert_arrow(schema.RANK_SERIES, rank_summaries.series_table(ranks, runs, keys))
        self._insert_arrow(schema.RANK_BUCKETS, rank_summaries.buckets_table(ranks, runs, keys))
        self._insert_arrow(schema.RANK_SPANS, rank_summaries.spans_table(ranks, runs, keys))

    def _write_datasets(self, batch: Batch) -> None:
        # Datasets before the inputs that point at them.
        if batch.datasets:
            self._insert_rows(
                schema.DATASETS,
                ["experiment_id", "name", "digest", "source_type", "source", "schema", "profile", "version"],
                [
                    [d.experiment_id, d.name, d.digest, d.source_type, d.source, d.schema, d.profile, d.version]
                    for d in batch.datasets
                ],
            )
        if batch.dataset_inputs:
            self._insert_rows(
                schema.DATASET_INPUTS,
                ["run_id", "experiment_id", "name", "digest", "tags", "context", "logged_at", "version"],
                [
                    [
                        i.run_id,
                        i.experiment_id,
                        i.name,
                        i.digest,
                        list(i.tags),
                        dict(i.tags).get(schema.DATASET_CONTEXT_TAG),
                        i.logged_at_ms,
                        i.version,
                    ]
                    for i in batch.dataset_inputs
                ],
            )

    def _write_logged_models(self, batch: Batch) -> None:
        if batch.logged_models:
            self._insert_rows(
                schema.LOGGED_MODELS,
                [
                    "model_id",
                    "experiment_id",
                    "name",
                    "artifact_location",
                    "creation_timestamp",
                    "last_updated_timestamp",
                    "status",
                    "lifecycle_stage",
                    "model_type",
                    "source_run_id",
                    "status_message",
                    "version",
                ],
                [
                    [
                        m.model_id,
                        m.experiment_id,
                        m.name,
                        m.artifact_location,
                        m.creation_time_ms,
                        m.last_updated_time_ms,
                        m.status,
                        m.lifecycle_stage,
                        m.model_type,
                        m.source_run_id,
                        m.status_message,
                        m.version,
                    ]
                    for m in batch.logged_models
                ],
            )
        if batch.logged_model_tags:
            self._insert_rows(
                schema.LOGGED_MODEL_TAGS,
                ["model_id", "key", "value", "deleted", "version"],
                [[t.model_id, t.key, t.value, int(t.deleted), t.version] for t in batch.logged_model_tags],
            )
        if batch.logged_model_params:
            self._insert_rows(
                schema.LOGGED_MODEL_PARAMS,
                ["model_id", "key", "value", "version"],
                [[p.model_id, p.key, p.value, p.version] for p in batch.logged_model_params],
            )
        if batch.run_models:
            self._insert_rows(
                schema.RUN_MODELS,
                ["run_id", "direction", "model_id", "step"],
                [[r.run_id, r.direction, r.model_id, r.step] for r in batch.run_models],
            )

    def _insert_arrow(self, table: str, data: pa.Table) -> None:
        settings = {**INSERT_SETTINGS, **self._tokens.settings(table)}
        self._client.insert_arrow(table, data, database=self._database, settings=settings)

    def _insert_rows(self, table: str, columns: list[str], rows: list[list[object]]) -> None:
        settings = self._tokens.settings(table)
        self._client.insert(table, rows, column_names=columns, database=self._database, settings=settings)

    def close(self) -> None:
        self._client.close()
