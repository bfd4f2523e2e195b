"""WriteRequest bytes <-> columnar batches.

Decoding validates everything a request carries against MLflow's limits, so
that what reaches the batcher can always be stored. Per-point columns move as
whole arrays in both directions: upb's repeated containers convert to numpy
natively on decode, and encoding goes through encode_view.proto.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from trackhouse.ingest import validation
from trackhouse.ingest.batch import (
    NO_SOURCE,
    Batch,
    Int32Array,
    Metrics,
    ParamRow,
    RunRow,
    Source,
    TagRow,
    union_dictionaries,
)
from trackhouse.ingest.errors import InvalidArgumentError
from trackhouse.v1 import encode_view_pb2, ingest_pb2

SCHEMA_VERSION = 1
#: How far ahead of this server's clock a client's row version may be (see `_server_version`).
MAX_VERSION_LEAD_NS = 1_000_000_000
# MLflow spells statuses as strings in its API and storage; so do our tables.
_STATUS_NAMES = {
    ingest_pb2.RUNNING: "RUNNING",
    ingest_pb2.SCHEDULED: "SCHEDULED",
    ingest_pb2.FINISHED: "FINISHED",
    ingest_pb2.FAILED: "FAILED",
    ingest_pb2.KILLED: "KILLED",
}
STATUS_VALUES = {name: value for value, name in _STATUS_NAMES.items()}


@dataclass(frozen=True, slots=True)
class DecodedRequest:
    writer_id: str
    sequence: int
    batch: Batch
    #: The bytes it was decoded from, so a gateway can forward them unchanged.
    raw: bytes = b""
    #: Where it came from when the transport names it better than writer_id and sequence (a Kafka offset).
    origin: str = ""


def decode_request(raw: bytes, max_bytes: int) -> DecodedRequest:
    """Parse and validate one WriteRequest. Raises InvalidArgumentError naming the offending field."""
    if len(raw) > max_bytes:
        raise InvalidArgumentError(f"request is {len(raw)} bytes, over the limit of {max_bytes}; split it")
    try:
        request = ingest_pb2.WriteRequest.FromString(raw)
    except DecodeError as exc:
        raise InvalidArgumentError(f"request is not a valid WriteRequest: {exc}") from None
    if request.schema_version != SCHEMA_VERSION:
        raise InvalidArgumentError(
            f"schema_version {request.schema_version} is not supported; this server speaks {SCHEMA_VERSION}"
        )
    newest = time.time_ns() + MAX_VERSION_LEAD_NS
    batch = Batch(
        metrics=_decode_metrics(request.metrics),
        runs=tuple(_decode_run(r, newest) for r in request.runs),
        params=tuple(_decode_param(p) for p in request.params),
        tags=tuple(_decode_tag(t, newest) for t in request.tags),
    )
    return DecodedRequest(writer_id=request.writer_id, sequence=request.sequence, batch=batch, raw=raw)


def _server_version(client_version: int, newest: int) -> int:
    """The row version stored for a client's upsert or tag: the client's own, capped at this server's clock
    plus MAX_VERSION_LEAD_NS (1 s).

    - The client's version is kept because it orders what the client did. A retried request, or a Kafka
      message redelivered after a crash, carries its original version, so an old upsert never overwrites a
      newer one. Stamping receipt time here would let exactly that happen.
    - The cap stops a client from pinning a row: a version of 2**64-1 would outrank every later write, REST
      included, forever. Now a row is ahead of the server's clock by at most 1 s; REST's run updates take
      max(now, previous + 1) and outrank it at once, REST tag writes (now) within that second.
    - What remains: a client whose clock runs more than 1 s ahead has its versions capped at arrival, so its
      own writes are then ordered by arrival time, and a redelivery of one of them may outrank a later write
      that was capped earlier. Hosts kept in sync by NTP are well inside 1 s.
    """
    return min(client_version, newest)


def _decode_run(run: ingest_pb2.RunUpsert, newest: int) -> RunRow:
    validation.check_run_id(run.run_id)
    validation.check_user(run.user)
    if bool(run.experiment_id) == bool(run.experiment_name):
        raise InvalidArgumentError(f"run {run.run_id}: give exactly one of experiment_id and experiment_name")
    if run.experiment_id:
        validation.check_experiment_id(run.experiment_id)
    else:
        validation.check_experiment_name(run.experiment_name)
    status = _STATUS_NAMES.get(run.status)
    if status is None:
        raise InvalidArgumentError(f"run {run.run_id}: status {run.status} is not a run status")
    return RunRow(
        run_id=run.run_id,
        experiment_id=run.experiment_id,
        experiment_name=run.experiment_name,
        name=validation.fit_run_name(run.name),
        status=status,
        start_time_ms=run.start_time_ms,
        end_time_ms=run.end_time_ms,
        user=run.user,
        version=_server_version(run.version, newest),
    )


def _decode_param(param: ingest_pb2.Param) -> ParamRow:
    validation.check_run_id(param.run_id)
    validation.check_key(param.key, "param")
    value = validation.fit_value("param", param.key, param.value, validation.MAX_PARAM_VALUE_LENGTH)
    return ParamRow(run_id=param.run_id, key=param.key, value=value)


def _decode_tag(tag: ingest_pb2.Tag, newest: int) -> TagRow:
    validation.check_run_id(tag.run_id)
    validation.check_key(tag.key, "tag")
    value = validation.fit_value("tag", tag.key, tag.value, validation.MAX_TAG_VALUE_LENGTH)
    return TagRow(run_id=tag.run_id, key=tag.key, value=value, version=_server_version(tag.version, newest))


def _decode_metrics(blocks: Sequence[ingest_pb2.MetricBlock]) -> Metrics:
    if not blocks:
        return Metrics()
    run_dicts: list[tuple[str, ...]] = []
    key_dicts: list[tuple[str, ...]] = []
    run_indices: list[Int32Array] = []
    key_indices: list[Int32Array] = []
    steps, timestamps, values = [], [], []
    sources: list[Source] = []
    for block in blocks:
        validation.check_run_id(block.run_id)
        validation.check_node(block.node)
        n = len(block.value)
        lengths = (len(block.key_index), len(block.step), n, len(block.timestamp_ms))
        if len(set(lengths)) != 1:
            raise InvalidArgumentError(
                f"run {block.run_id}: column lengths differ (key_index, step, value, timestamp_ms = {lengths})"
            )
        keys = tuple(block.keys)
        for key in keys:
            validation.check_key(key)
        key_index = np.array(block.key_index, dtype=np.uint32)
        if n and int(key_index.max()) >= len(keys):
            raise InvalidArgumentError(
                f"run {block.run_id}: key_index {int(key_index.max())} is out of range for {len(keys)} keys"
            )
        run_dicts.append((block.run_id,))
        run_indices.append(np.zeros(n, np.int32))
        key_dicts.append(keys)
        key_indices.append(key_index.astype(np.int32))
        steps.append(np.array(block.step, dtype=np.int64))
        values.append(np.array(block.value, dtype=np.float64))
        timestamps.append(np.array(block.timestamp_ms, dtype=np.int64))
        sources.append((block.rank, block.node, block.attempt))
    run_ids, run_index = union_dictionaries(run_dicts, run_indices)
    keys_all, key_index_all = union_dictionaries(key_dicts, key_indices)
    metrics = Metrics(
        run_ids=run_ids,
        keys=keys_all,
        run_index=run_index,
        key_index=key_index_all,
        step=np.concatenate(steps),
        timestamp=np.concatenate(timestamps),
        value=np.concatenate(values),
    )
    if all(source == NO_SOURCE for source in sources):
        return metrics  # one undistributed process, the common case: no source columns at all
    source_dict, source_index = union_dictionaries(
        [(source,) for source in sources], [np.zeros(len(v), np.int32) for v in values]
    )
    return dataclasses.replace(metrics, sources=source_dict, source_index=source_index)


@dataclass(frozen=True, slots=True)
class BlockColumns:
    """One run's points for encoding; arrays of equal length."""

    run_id: str
    keys: Sequence[str]
    key_index: np.ndarray
    step: np.ndarray
    value: np.ndarray
    timestamp_ms: np.ndarray
    rank: int = 0
    node: str = ""
    attempt: int = 0

    def slice(self, start: int, end: int) -> BlockColumns:
        """Points [start, end) of the block, from the same source."""
        if start == 0 and end >= len(self.value):
            return self
        return dataclasses.replace(
            self,
            key_index=self.key_index[start:end],
            step=self.step[start:end],
            value=self.value[start:end],
            timestamp_ms=self.timestamp_ms[start:end],
        )


def encode_request(head: ingest_pb2.WriteRequest, blocks: Sequence[BlockColumns]) -> bytes:
    """Serialise `head` (runs, params, tags, ids) plus metric blocks as one WriteRequest.

    Protobuf merges concatenated messages, so the metric blocks, serialised
    through the byte-identical bytes view, are appended to the head's bytes.
    """
    head.schema_version = SCHEMA_VERSION
    view = encode_view_pb2.WriteRequestMetricsView(
        metrics=[
            encode_view_pb2.MetricBlockView(
                run_id=b.run_id,
                keys=b.keys,
                key_index=np.ascontiguousarray(b.key_index, dtype="<u4").tobytes(),
                step=np.ascontiguousarray(b.step, dtype="<i8").tobytes(),
                value=np.ascontiguousarray(b.value, dtype="<f8").tobytes(),
                timestamp_ms=np.ascontiguousarray(b.timestamp_ms, dtype="<i8").tobytes(),
                rank=b.rank,
                node=b.node,
                attempt=b.attempt,
            )
            for b in blocks
        ]
    )
    return head.SerializeToString() + view.SerializeToString()


def split_by_run(request: DecodedRequest) -> list[tuple[str, bytes]]:
    """One (run_id, WriteRequest bytes) per run the request touches, in a stable order.

    Kafka keys messages by run_id so each run keeps its order in one partition.
    A request touching a single run, the common case, is passed through unchanged.
    """
    batch = request.batch
    run_ids = sorted({r.run_id for r in batch.runs} | batch.run_ids())
    if len(run_ids) <= 1:
        return [(run_ids[0] if run_ids else "", request.raw)]
    parts = []
    for run_id in run_ids:
        head = ingest_pb2.WriteRequest(writer_id=request.writer_id, sequence=request.sequence)
        head.runs.extend(_run_upsert(r) for r in batch.runs if r.run_id == run_id)
        head.params.extend(
            ingest_pb2.Param(run_id=p.run_id, key=p.key, value=p.value) for p in batch.params if p.run_id == run_id
        )
        head.tags.extend(
            ingest_pb2.Tag(run_id=t.run_id, key=t.key, value=t.value, version=t.version)
            for t in batch.tags
            if t.run_id == run_id
        )
        parts.append((run_id, encode_request(head, _blocks_of(batch.metrics, run_id))))
    return parts


def _blocks_of(m: Metrics, run_id: str) -> list[BlockColumns]:
    """The run's points as one block per source (rank, node, attempt)."""
    if run_id not in m.run_ids:
        return []
    in_run = m.run_index == m.run_ids.index(run_id)
    sources, source_index = m.source_columns()
    blocks = []
    for position, (rank, node, attempt) in enumerate(sources):
        mask = in_run & (source_index == position)
        if mask.any():
            blocks.append(
                BlockColumns(
                    run_id,
                    m.keys,
                    m.key_index[mask],
                    m.step[mask],
                    m.value[mask],
                    m.timestamp[mask],
                    rank=rank,
                    node=node,
                    attempt=attempt,
                )
            )
    return blocks


def _run_upsert(run: RunRow) -> ingest_pb2.RunUpsert:
    return ingest_pb2.RunUpsert(
        run_id=run.run_id,
        experiment_id=run.experiment_id,
        experiment_name=run.experiment_name,
        name=run.name,
        status=STATUS_VALUES[run.status],
        start_time_ms=run.start_time_ms,
        end_time_ms=run.end_time_ms,
        user=run.user,
        version=run.version,
    )
