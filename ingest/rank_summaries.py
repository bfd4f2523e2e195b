"""Per-rank summaries of a flush's points, computed column-wise with numpy before the insert (as ingest.summaries).

Three tables serve the rank API (query.ranks) without reading points:
- metric_ranks, one row per (run, key, rank, node): the series' first and latest point and two step-rate anchors;
- metric_rank_buckets, one row per (run, key, RANK_WIDTH steps, rank, node): the point at the bucket's highest step;
- metric_rank_spans, one row per (run, key, rank, node, RANK_SPAN steps): bit maps of the steps holding a point,
  a NaN or an infinity.

schema.rank_series_select, rank_buckets_select and rank_spans_select define the same columns in SQL (the
backfill), and a test holds the two to the same rows. Every column is a minimum, maximum or bitwise OR, so a
retried flush or another node's flush of the same series folds into the same answer when ClickHouse merges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from trackhouse.ingest.batch import Int32Array, Int64Array, Metrics
from trackhouse.ingest.summaries import INT64_MAX, INT64_MIN, NAN_LOW, Triple, _reduce, _starts, pack, value_order
from trackhouse.query import schema

UInt32Array = npt.NDArray[np.uint32]
#: (n, 4) uint64: one UInt256 per row, least significant word first.
UInt64Words = npt.NDArray[np.uint64]
_SPAN_SHIFT = schema.RANK_SPAN.bit_length() - 1
_BUCKET_SHIFT = schema.RANK_WIDTH.bit_length() - 1
_WINDOW_SHIFT = schema.RATE_WINDOW.bit_length() - 1
assert schema.RANK_WIDTH == 1 << _BUCKET_SHIFT <= 32 and schema.RATE_WINDOW == 1 << _WINDOW_SHIFT


@dataclass(frozen=True, slots=True)
class Members:
    """The (rank, node) pairs of a flush: point i belongs to member member_index[i]."""

    rank: npt.NDArray[np.uint32]
    node: tuple[str, ...]
    member_index: Int32Array

    @property
    def nodes(self) -> list[str]:
        """The distinct nodes; member m is on nodes[node_index[m]]."""
        return sorted(set(self.node))

    @property
    def node_index(self) -> Int32Array:
        position = {node: i for i, node in enumerate(self.nodes)}
        return np.array([position[node] for node in self.node], np.int32)


@dataclass(frozen=True, slots=True)
class RankSeries:
    """metric_ranks rows: index columns, then each summary column's three packed words."""

    run_index: Int32Array
    key_index: Int32Array
    member_index: Int32Array
    columns: dict[str, Triple]


@dataclass(frozen=True, slots=True)
class RankBuckets:
    run_index: Int32Array
    key_index: Int32Array
    member_index: Int32Array
    bucket: Int64Array
    #: (step, value order) of the point at the bucket's highest step.
    last: tuple[Int64Array, Int64Array]


@dataclass(frozen=True, slots=True)
class RankSpans:
    """metric_rank_spans rows: per RANK_SPAN steps, step maps as four little-endian uint64 words each."""

    run_index: Int32Array
    key_index: Int32Array
    member_index: Int32Array
    span: Int64Array
    steps: UInt64Words
    nan: UInt64Words
    inf: UInt64Words


@dataclass(frozen=True, slots=True)
class RankSummaries:
    members: Members
    series: RankSeries
    buckets: RankBuckets
    spans: RankSpans


def members(metrics: Metrics) -> Members:
    """The flush's distinct (rank, node) pairs; the attempt is not a member's identity (a resumed rank is the
    same rank). Points without a source are rank 0 on node '', as the metrics table stores them."""
    sources, source_index = metrics.source_columns()
    pairs: dict[tuple[int, str], int] = {}
    numbered = (pairs.setdefault((rank, node), len(pairs)) for rank, node, _ in sources)
    remap = np.fromiter(numbered, np.int32, len(sources))
    rank = np.array([r for r, _ in pairs], np.uint32)
    return Members(rank=rank, node=tuple(n for _, n in pairs), member_index=remap[source_index])


def summarize_ranks(metrics: Metrics) -> RankSummaries:
    """The flush's rank summaries: numpy passes over whole columns, no Python object per point or per group."""
    who = members(metrics)
    keys, count = max(len(metrics.keys), 1), max(len(who.node), 1)
    series = (metrics.run_index.astype(np.int64) * keys + metrics.key_index) * count + who.member_index
    bucket = metrics.step >> _BUCKET_SHIFT
    order = np.lexsort((bucket, series))
    series, bucket = series[order], bucket[order]
    step, timestamp, value = metrics.step[order], metrics.timestamp[order], metrics.value[order]
    nan_last = value_order(value, NAN_LOW)

    starts = _starts((series,))
    point = (step, timestamp, nan_last)
    columns = {
        "first": _reduce(np.minimum, INT64_MAX, point, starts),
        "last": _reduce(np.maximum, INT64_MIN, point, starts),
    }
    for name, offset in (("window_a", 0), ("window_b", schema.RATE_WINDOW // 2)):
        columns[name] = _reduce(np.maximum, INT64_MIN, ((step + offset) >> _WINDOW_SHIFT, -step, -timestamp), starts)
    run_index, key_index, member_index = _split(series[starts], keys, count)

    bucket_starts = _starts((series, bucket))
    last_step, last_order, _ = _reduce(np.maximum, INT64_MIN, (step, nan_last, nan_last), bucket_starts)
    b_run, b_key, b_member = _split(series[bucket_starts], keys, count)
    # Spans are whole buckets, so the points are grouped by span too.
    span = step >> _SPAN_SHIFT
    span_starts = _starts((series, span))
    s_run, s_key, s_member = _split(series[span_starts], keys, count)
    within = (step & (schema.RANK_SPAN - 1)).astype(np.uint64)
    return RankSummaries(
        members=who,
        series=RankSeries(run_index, key_index, member_index, columns),
        buckets=RankBuckets(
            run_index=b_run,
            key_index=b_key,
            member_index=b_member,
            bucket=bucket[bucket_starts],
            last=(last_step, last_order),
        ),
        spans=RankSpans(
            run_index=s_run,
            key_index=s_key,
            member_index=s_member,
            span=span[span_starts],
            steps=_step_map(within, np.ones(len(step), bool), span_starts),
            nan=_step_map(within, np.isnan(value), span_starts),
            inf=_step_map(within, np.isinf(value), span_starts),
        ),
    )


def pack128(first: Int64Array, second: Int64Array) -> bytes:
    """Little-endian Int128s, 16 bytes each, that sort as the (first, second) pairs (schema.pack128_sql)."""
    words = np.zeros((len(first), 2), np.int64)
    words[:, 0] = second ^ INT64_MIN
    words[:, 1] = first
    return words.astype("<i8", copy=False).tobytes()


def _step_map(within: npt.NDArray[np.uint64], chosen: npt.NDArray[np.bool_], starts: Int64Array) -> UInt64Words:
    """Per group, the OR of bit `within` (0..255) of the chosen points, as four uint64 words."""
    words = np.zeros((len(starts), 4), np.uint64)
    if not len(starts):
        return words
    bit = np.left_shift(np.uint64(1), within & np.uint64(63))
    word = within >> np.uint64(6)
    for w in range(4):
        words[:, w] = np.bitwise_or.reduceat(np.where(chosen & (word == w), bit, np.uint64(0)), starts)
    return words


def _split(series: Int64Array, keys: int, count: int) -> tuple[Int32Array, Int32Array, Int32Array]:
    member = series % count
    rest = series // count
    return (rest // keys).astype(np.int32), (rest % keys).astype(np.int32), member.astype(np.int32)


def series_table(summaries: RankSummaries, run_ids: pa.Array, keys: pa.Array) -> pa.Table:
    """metric_ranks rows as Arrow; `run_ids` and `keys` are the batch's dictionaries."""
    series = summaries.series
    return pa.table(
        {
            **_identity(summaries.members, run_ids, keys, series.run_index, series.key_index, series.member_index),
            **{name: _fixed(pack(*triple), 32) for name, triple in series.columns.items()},
        }
    )


def buckets_table(summaries: RankSummaries, run_ids: pa.Array, keys: pa.Array) -> pa.Table:
    """metric_rank_buckets rows as Arrow."""
    buckets = summaries.buckets
    identity = _identity(summaries.members, run_ids, keys, buckets.run_index, buckets.key_index, buckets.member_index)
    return pa.table(
        {
            "run_id": identity["run_id"],
            "key": identity["key"],
            "bucket": buckets.bucket,
            "rank": identity["rank"],
            "node": identity["node"],
            "last": _fixed(pack128(*buckets.last), 16),
        }
    )


def spans_table(summaries: RankSummaries, run_ids: pa.Array, keys: pa.Array) -> pa.Table:
    """metric_rank_spans rows as Arrow."""
    spans = summaries.spans
    return pa.table(
        {
            **_identity(summaries.members, run_ids, keys, spans.run_index, spans.key_index, spans.member_index),
            "span": spans.span,
            **{
                name: _fixed(words.astype("<u8", copy=False).tobytes(), 32)
                for name, words in (("steps", spans.steps), ("nan_steps", spans.nan), ("inf_steps", spans.inf))
            },
        }
    )


def _identity(
    who: Members, run_ids: pa.Array, keys: pa.Array, run: Int32Array, key: Int32Array, member: Int32Array
) -> dict[str, pa.Array]:
    return {
        "run_id": pa.DictionaryArray.from_arrays(run, run_ids),
        "key": pa.DictionaryArray.from_arrays(key, keys),
        "rank": who.rank[member],
        # An Arrow dictionary must not repeat a value, and several ranks share a node.
        "node": pa.DictionaryArray.from_arrays(who.node_index[member], pa.array(who.nodes, pa.string())),
    }


def _fixed(raw: bytes, width: int) -> pa.FixedSizeBinaryArray:
    """Packed integers: ClickHouse reads fixed-size binary of their width into Int128 and Int256 columns."""
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(raw) // width, [None, pa.py_buffer(raw)])
