"""The client's columnar buffers, and how one drain of them is shaped into requests that fit the server."""

from __future__ import annotations

import array
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from trackhouse.ingest import validation
from trackhouse.ingest.batch import NO_SOURCE, Source
from trackhouse.ingest.codec import BlockColumns, encode_request
from trackhouse.v1 import ingest_pb2

_COMPACT_KEYS_ABOVE = 1024  # a run with more keys than this sends only the keys each block uses


class RunBuffer:
    """One run's unsent points from one source (rank, node, attempt). log_metrics points share a step and
    timestamp per call, stored once."""

    __slots__ = (
        "counts",
        "key_index",
        "key_list",
        "keys",
        "run_id",
        "series",
        "source",
        "steps",
        "timestamps",
        "values",
    )

    def __init__(self, run_id: str, source: Source = NO_SOURCE) -> None:
        self.run_id = run_id
        self.source = source
        self.keys: dict[str, int] = {}
        self.key_list: list[str] = []
        self._reset()

    def _reset(self) -> None:
        self.key_index = array.array("I")
        self.values = array.array("d")
        self.steps = array.array("q")
        self.timestamps = array.array("q")
        self.counts = array.array("I")
        self.series: list[tuple[int, npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.int64]]] = []

    def key_id(self, key: str) -> int:
        index = self.keys.get(key)
        if index is None:
            validation.check_key(key)
            index = self.keys[key] = len(self.key_list)
            self.key_list.append(key)
        return index

    def take(self) -> BlockColumns | None:
        """Hand the buffered points over as columns and start empty."""
        if not self.values and not self.series:
            return None
        counts = np.frombuffer(self.counts, np.uint32)
        parts = [
            (
                np.frombuffer(self.key_index, np.uint32),
                np.repeat(np.frombuffer(self.steps, np.int64), counts),
                np.frombuffer(self.values, np.float64),
                np.repeat(np.frombuffer(self.timestamps, np.int64), counts),
            )
        ]
        parts += [(np.full(len(v), k, np.uint32), s, v, t) for k, s, v, t in self.series]
        keys: list[str] = list(self.key_list)
        columns = [np.concatenate(c) for c in zip(*parts, strict=True)]
        self._reset()
        if len(keys) > _COMPACT_KEYS_ABOVE:
            used, columns[0] = np.unique(columns[0], return_inverse=True)
            keys = [keys[i] for i in used]
        rank, node, attempt = self.source
        return BlockColumns(
            self.run_id, keys, columns[0], columns[1], columns[2], columns[3], rank=rank, node=node, attempt=attempt
        )


def by_run(
    head: ingest_pb2.WriteRequest, blocks: list[BlockColumns]
) -> list[tuple[ingest_pb2.WriteRequest, list[BlockColumns]]]:
    """Regroup one drain's metadata and blocks into one (head, blocks) per run."""
    groups: dict[str, tuple[ingest_pb2.WriteRequest, list[BlockColumns]]] = {}

    def group(run_id: str) -> tuple[ingest_pb2.WriteRequest, list[BlockColumns]]:
        return groups.setdefault(run_id, (ingest_pb2.WriteRequest(), []))

    for upsert in head.runs:
        group(upsert.run_id)[0].runs.append(upsert)
    for param in head.params:
        group(param.run_id)[0].params.append(param)
    for tag in head.tags:
        group(tag.run_id)[0].tags.append(tag)
    for block in blocks:
        group(block.run_id)[1].append(block)
    return list(groups.values())


def only_run(head: ingest_pb2.WriteRequest, blocks: list[BlockColumns]) -> str:
    run_ids = {r.run_id for r in head.runs} | {p.run_id for p in head.params} | {t.run_id for t in head.tags}
    run_ids.update(b.run_id for b in blocks)
    return run_ids.pop() if len(run_ids) == 1 else ""


@dataclass(frozen=True, slots=True)
class Encoded:
    """One request's bytes and how much it carries."""

    raw: bytes
    #: Metric points plus run, param and tag rows: what the client's bound and its reports count.
    size: int
    #: The one run it carries ("" for several): a Kafka message key.
    run_id: str


def shape(
    head: ingest_pb2.WriteRequest,
    blocks: list[BlockColumns],
    max_points: int,
    max_bytes: int,
    writer_id: str,
    first_sequence: int,
) -> list[Encoded]:
    """Encode one drain as requests of at most `max_points` points and `max_bytes` bytes, in order.

    Metadata goes first, ahead of the points that need it. Sequences run on from
    `first_sequence`. A single row too large on its own is still encoded, so the
    server's refusal reports it rather than the client dropping it.
    """
    out: list[Encoded] = []

    def emit(head: ingest_pb2.WriteRequest, blocks: list[BlockColumns]) -> None:
        head.writer_id, head.sequence = writer_id, first_sequence + len(out)
        raw = encode_request(head, blocks)
        halves = _halve(head, blocks) if len(raw) > max_bytes else None
        if halves is None:
            out.append(Encoded(raw, _meta(head) + sum(len(b.value) for b in blocks), only_run(head, blocks)))
            return
        for half in halves:  # depth first, so the order is kept
            emit(*half)

    current: list[BlockColumns] = []
    current_points = 0
    for block in blocks:
        for start in range(0, len(block.value), max_points):
            piece = block.slice(start, start + max_points)
            if current_points + len(piece.value) > max_points:
                emit(head, current)
                head, current, current_points = ingest_pb2.WriteRequest(), [], 0
            current.append(piece)
            current_points += len(piece.value)
    if current or _meta(head):
        emit(head, current)
    return out


Piece = tuple[ingest_pb2.WriteRequest, list[BlockColumns]]


def _halve(head: ingest_pb2.WriteRequest, blocks: list[BlockColumns]) -> tuple[Piece, Piece] | None:
    """Two requests that carry what one did, in order; None when it holds a single row."""
    rows: list[tuple[str, object]] = [
        *(("runs", r) for r in head.runs),
        *(("params", p) for p in head.params),
        *(("tags", t) for t in head.tags),
    ]
    if len(rows) > 1:
        first, second = ingest_pb2.WriteRequest(), ingest_pb2.WriteRequest()
        for i, (field, row) in enumerate(rows):
            getattr(first if i < len(rows) // 2 else second, field).append(row)
        return (first, []), (second, blocks)
    points = sum(len(b.value) for b in blocks)
    if points < 2 and not (rows and points):
        return None
    if rows and points:
        return (head, []), (ingest_pb2.WriteRequest(), blocks)
    left: list[BlockColumns] = []
    right: list[BlockColumns] = []
    seen, middle = 0, points // 2
    for block in blocks:
        n = len(block.value)
        cut = min(max(middle - seen, 0), n)
        if cut:
            left.append(block.slice(0, cut))
        if cut < n:
            right.append(block.slice(cut, n))
        seen += n
    return (head, left), (ingest_pb2.WriteRequest(), right)


def _meta(head: ingest_pb2.WriteRequest) -> int:
    return len(head.runs) + len(head.params) + len(head.tags)
