"""One URL names the storage: `chdb:///dir` (embedded) or `http(s)://user:pass@host:8123/db` (server).

Both go through clickhouse-connect and run the same code. There is no second storage implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import clickhouse_connect

from trackhouse.query.cluster_ddl import NAME
from trackhouse.query.redaction import redact_url

DEFAULT_DATABASE = "trackhouse"

Client = Any  # clickhouse_connect's client classes ship without type information

#: Every query on a cluster's Distributed tables:
#: - an insert returns once every shard holds its rows, so an acknowledgement means stored, and the
#:   insert's deduplication token reaches the replicated tables (queued background sends would not retry under it);
#: - an IN or JOIN over a second Distributed table is computed once and sent to the shards (GLOBAL), which is
#:   right whatever the second table is sharded by (ClickHouse refuses such queries by default).
CLUSTER_SETTINGS = {"insert_distributed_sync": 1, "distributed_product_mode": "global"}


@dataclass(frozen=True, slots=True)
class StoreConfig:
    #: chdb:///absolute/dir, or http(s)://user:password@host:port[/database]
    url: str
    #: The database holding trackhouse's tables. For server URLs, a path in the URL overrides it.
    database: str = DEFAULT_DATABASE
    #: A ClickHouse cluster (remote_servers) to create the schema on: Replicated and Distributed tables.
    cluster: str = ""

    def __post_init__(self) -> None:
        scheme = urlsplit(self.url).scheme
        if scheme not in ("chdb", "http", "https"):
            raise ValueError(f"storage URL {redact_url(self.url)!r} must start with chdb://, http:// or https://")
        if self.cluster and not NAME.fullmatch(self.cluster):
            raise ValueError(f"cluster name {self.cluster!r} must be letters, digits and _, not starting with a digit")
        if self.cluster and scheme == "chdb":
            raise ValueError("--cluster needs a ClickHouse server (--clickhouse-url http://...), not embedded chDB")

    def __repr__(self) -> str:  # a logged config never shows the password
        return f"StoreConfig(url={self.display_url!r}, database={self.database!r}, cluster={self.cluster!r})"

    @property
    def display_url(self) -> str:
        """The URL as it may be printed: without its password."""
        return redact_url(self.url)

    @property
    def directory(self) -> Path:
        """An embedded store's data directory."""
        return Path(urlsplit(self.url).path)

    @property
    def embedded(self) -> bool:
        return self.url.startswith("chdb:")

    @property
    def resolved_database(self) -> str:
        parts = urlsplit(self.url)
        path = parts.path.strip("/")
        return path if (not self.embedded and path) else self.database

    @staticmethod
    def for_data_dir(data_dir: Path) -> StoreConfig:
        return StoreConfig(url=f"chdb://{data_dir.resolve()}")

    @staticmethod
    def from_flags(clickhouse_url: str | None, data_dir: Path, cluster: str = "") -> StoreConfig:
        """The store the command line names: the ClickHouse server's URL when given, else the embedded directory."""
        return StoreConfig(url=clickhouse_url or StoreConfig.for_data_dir(data_dir).url, cluster=cluster)


def connect(config: StoreConfig) -> Client:
    """A new client. Embedded clients on one directory share one chDB engine in this process."""
    if config.embedded:
        path = urlsplit(config.url).path
        Path(path).mkdir(parents=True, exist_ok=True)
        return clickhouse_connect.get_client(dsn=config.url)
    # The database may not exist yet; the schema creates it, then statements qualify table names.
    parts = urlsplit(config.url)
    return clickhouse_connect.get_client(
        settings=CLUSTER_SETTINGS if config.cluster else None,
        host=parts.hostname or "localhost",
        port=parts.port or (8443 if parts.scheme == "https" else 8123),
        username=parts.username or "default",
        password=parts.password or "",
        secure=parts.scheme == "https",
    )
