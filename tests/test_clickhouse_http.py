"""tests/clickhouse_http.py, the test-only ClickHouse HTTP endpoint, against clickhouse-connect itself: what the
topology tests rely on, one HTTP feature at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import clickhouse_connect
import pyarrow as pa
import pytest
import urllib3
from clickhouse_connect.driver.exceptions import DatabaseError

from tests.clickhouse_http import ClickHouseHttp


def _client(clickhouse_endpoint: ClickHouseHttp, **options: Any) -> Any:
    return clickhouse_connect.get_client(host="127.0.0.1", port=clickhouse_endpoint.port, **options)


@pytest.mark.parametrize("compress", [True, "zstd", "gzip", False], ids=["lz4", "zstd", "gzip", "none"])
def test_inserts_and_queries_round_trip_with_each_compression(
    clickhouse_endpoint: ClickHouseHttp, compress: object
) -> None:
    client = _client(clickhouse_endpoint, compress=compress)
    table = f"t_{str(compress).lower()}"
    client.command(
        f"CREATE TABLE IF NOT EXISTS default.{table} (k LowCardinality(String), n Int64, x Float64)"
        " ENGINE = MergeTree ORDER BY n"
    )
    rows = [["a", i, i / 3] for i in range(5_000)]
    client.insert(table, rows, column_names=["k", "n", "x"], database="default")  # Native, compressed per block
    client.insert_arrow(table, pa.table({"k": ["b"], "n": [5_000], "x": [float("nan")]}), database="default")
    result = client.query(
        f"SELECT k, n, x FROM default.{table} WHERE n < {{top:Int64}} ORDER BY n", parameters={"top": 5_000}
    )
    assert [list(r) for r in result.result_rows] == rows
    assert client.query(f"SELECT count(), countIf(isNaN(x)) FROM default.{table}").result_rows == [(5_001, 1)]
    client.close()


def test_responses_are_compressed_only_when_asked_and_offered(
    clickhouse_endpoint: ClickHouseHttp, tmp_path: Path
) -> None:
    def encoding(url: str, params: str, accept: str) -> str | None:
        headers = {"Accept-Encoding": accept}
        response = urllib3.request("POST", f"{url}/?{params}", body=b"SELECT 1", headers=headers, decode_content=False)
        assert response.status == 200
        return response.headers.get("Content-Encoding")

    assert encoding(clickhouse_endpoint.url, "enable_http_compression=1", "lz4,zstd") == "lz4"
    assert encoding(clickhouse_endpoint.url, "enable_http_compression=1", "br, zstd") == "zstd"
    assert encoding(clickhouse_endpoint.url, "", "lz4") is None  # not asked: as a server, identity
    declining = ClickHouseHttp(tmp_path / "data", tmp_path / "log", compress=False)
    declining.start()
    try:
        assert encoding(declining.url, "enable_http_compression=1", "lz4,zstd") is None
        client = _client(declining)  # negotiates lz4, gets identity, reads it
        assert client.query("SELECT 'plain'").result_rows == [("plain",)]
        client.close()
    finally:
        declining.stop()


def test_settings_apply_to_their_query_only_and_sessions_keep_state(clickhouse_endpoint: ClickHouseHttp) -> None:
    client = _client(clickhouse_endpoint)
    assert client.query("SELECT getSetting('max_threads')", settings={"max_threads": 1}).result_rows == [(1,)]
    assert client.query("SELECT getSetting('max_threads')").result_rows != [(1,)]
    client.command("CREATE TEMPORARY TABLE scratch (a Int8)")  # lives in the client's session
    client.command("INSERT INTO scratch VALUES (7)")
    assert client.query("SELECT a FROM scratch").result_rows == [(7,)]
    other = _client(clickhouse_endpoint)
    with pytest.raises(DatabaseError, match="UNKNOWN_TABLE"):
        other.query("SELECT a FROM scratch")
    other.close()
    client.close()


def test_errors_carry_the_exception_code_header_status_and_text(clickhouse_endpoint: ClickHouseHttp) -> None:
    response = urllib3.request("POST", f"{clickhouse_endpoint.url}/", body=b"SELECT * FROM nowhere.nothing")
    assert response.status == 404
    assert response.headers["X-ClickHouse-Exception-Code"] == "81"
    assert response.data.decode().startswith("Code: 81. DB::Exception:")
    response = urllib3.request("POST", f"{clickhouse_endpoint.url}/", body=b"SELEC 1")
    assert (response.status, response.headers["X-ClickHouse-Exception-Code"]) == (400, "62")
    assert urllib3.request("GET", f"{clickhouse_endpoint.url}/ping").data == b"Ok.\n"
