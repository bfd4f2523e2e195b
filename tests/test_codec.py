from __future__ import annotations

import math
import re

import numpy as np
import pytest

from trackhouse.ingest.codec import BlockColumns, decode_request, encode_request, split_by_run
from trackhouse.ingest.errors import InvalidArgumentError
from trackhouse.v1 import ingest_pb2

RUN = "a" * 32
LIMIT = 64 * 1024 * 1024


def block(n: int = 5, keys: tuple[str, ...] = ("loss", "acc"), run_id: str = RUN) -> BlockColumns:
    return BlockColumns(
        run_id=run_id,
        keys=list(keys),
        key_index=np.arange(n, dtype=np.uint32) % len(keys),
        step=np.arange(n, dtype=np.int64),
        value=np.linspace(0, 1, n),
        timestamp_ms=np.full(n, 1_700_000_000_000, np.int64),
    )


def test_view_encoding_is_byte_identical_to_the_packed_message() -> None:
    b = block()
    head = ingest_pb2.WriteRequest(writer_id="w", sequence=7)
    raw = encode_request(head, [b])
    standard = ingest_pb2.WriteRequest(
        schema_version=1,
        writer_id="w",
        sequence=7,
        metrics=[
            ingest_pb2.MetricBlock(
                run_id=RUN,
                keys=b.keys,
                key_index=b.key_index.tolist(),
                step=b.step.tolist(),
                value=b.value.tolist(),
                timestamp_ms=b.timestamp_ms.tolist(),
            )
        ],
    )
    assert raw == standard.SerializeToString()


def test_round_trip_keeps_every_column_and_special_floats() -> None:
    b = block(4)
    b.value[:] = [math.nan, math.inf, -math.inf, -0.0]
    decoded = decode_request(
        encode_request(ingest_pb2.WriteRequest(sequence=3), [b, block(3, ("acc", "lr"), "b" * 32)]), LIMIT
    )
    m = decoded.batch.metrics
    assert decoded.sequence == 3
    assert len(m) == 7
    assert m.run_ids == (RUN, "b" * 32)
    assert m.keys == ("loss", "acc", "lr")  # one dictionary across blocks
    assert [m.keys[i] for i in m.key_index] == ["loss", "acc", "loss", "acc", "acc", "lr", "acc"]
    assert np.isnan(m.value[0]) and m.value[1] == math.inf and m.value[2] == -math.inf
    assert math.copysign(1, m.value[3]) == -1


def test_mismatched_columns_are_rejected_naming_the_run() -> None:
    request = ingest_pb2.WriteRequest(
        schema_version=1,
        metrics=[
            ingest_pb2.MetricBlock(
                run_id=RUN, keys=["k"], key_index=[0, 0], step=[1], value=[1.0, 2.0], timestamp_ms=[1, 2]
            )
        ],
    )
    with pytest.raises(InvalidArgumentError, match=f"run {RUN}: column lengths differ"):
        decode_request(request.SerializeToString(), LIMIT)


def test_key_index_out_of_range() -> None:
    bad = block(3)
    bad.key_index[2] = 9
    with pytest.raises(InvalidArgumentError, match="key_index 9 is out of range for 2 keys"):
        decode_request(encode_request(ingest_pb2.WriteRequest(), [bad]), LIMIT)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("bad key!", 'Invalid value "bad key!" for parameter'),
        ("../escape", 'Invalid value "../escape" for parameter'),
        ("x" * 251, "'Metric name' exceeds the maximum length of 250 characters"),  # stock's words name no key
    ],
)
def test_invalid_keys_get_stocks_message(key: str, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        decode_request(encode_request(ingest_pb2.WriteRequest(), [block(2, ("ok", key))]), LIMIT)


def test_oversized_request() -> None:
    raw = encode_request(ingest_pb2.WriteRequest(), [block(10_000)])
    with pytest.raises(InvalidArgumentError, match=f"request is {len(raw)} bytes, over the limit of 1024"):
        decode_request(raw, 1024)


def test_undecodable_bytes_and_wrong_schema_version() -> None:
    with pytest.raises(InvalidArgumentError, match="not a valid WriteRequest"):
        decode_request(b"\xff\xff\xff", LIMIT)
    with pytest.raises(InvalidArgumentError, match="schema_version 2 is not supported"):
        decode_request(ingest_pb2.WriteRequest(schema_version=2).SerializeToString(), LIMIT)


def test_run_upsert_needs_exactly_one_experiment_reference() -> None:
    both = ingest_pb2.WriteRequest(
        schema_version=1,
        runs=[ingest_pb2.RunUpsert(run_id=RUN, experiment_id="1", experiment_name="x", status=ingest_pb2.RUNNING)],
    )
    with pytest.raises(InvalidArgumentError, match="exactly one of experiment_id and experiment_name"):
        decode_request(both.SerializeToString(), LIMIT)


def test_param_values_are_truncated_like_mlflow() -> None:
    request = ingest_pb2.WriteRequest(
        schema_version=1, params=[ingest_pb2.Param(run_id=RUN, key="p", value="v" * 7000)]
    )
    (param,) = decode_request(request.SerializeToString(), LIMIT).batch.params
    assert len(param.value) == 6000


def test_split_by_run_passes_one_run_through_and_splits_many() -> None:
    one = encode_request(
        ingest_pb2.WriteRequest(
            runs=[ingest_pb2.RunUpsert(run_id=RUN, experiment_name="e", status=ingest_pb2.RUNNING)]
        ),
        [block(4)],
    )
    assert split_by_run(decode_request(one, LIMIT)) == [(RUN, one)]

    other = "b" * 32
    mixed = encode_request(
        ingest_pb2.WriteRequest(
            sequence=9,
            runs=[ingest_pb2.RunUpsert(run_id=other, experiment_name="e", status=ingest_pb2.FINISHED, version=3)],
            params=[ingest_pb2.Param(run_id=RUN, key="lr", value="0.1")],
            tags=[ingest_pb2.Tag(run_id=other, key="t", value="v", version=2)],
        ),
        [block(5), block(3, ("acc", "lr"), other)],
    )
    parts = dict(split_by_run(decode_request(mixed, LIMIT)))
    assert sorted(parts) == [RUN, other]
    mine, theirs = (decode_request(parts[r], LIMIT) for r in (RUN, other))
    assert mine.sequence == theirs.sequence == 9
    assert [p.key for p in mine.batch.params] == ["lr"] and not mine.batch.runs
    assert [r.status for r in theirs.batch.runs] == ["FINISHED"] and [t.key for t in theirs.batch.tags] == ["t"]
    assert mine.batch.metrics.run_ids == (RUN,) and len(mine.batch.metrics) == 5
    m = theirs.batch.metrics
    assert [m.keys[i] for i in m.key_index] == ["acc", "lr", "acc"]
    assert m.step.tolist() == [0, 1, 2]
