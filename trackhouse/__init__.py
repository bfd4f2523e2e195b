"""trackhouse: a high-throughput metric store for ML with MLflow's API and UI.

The public client API is importable from here: ``from trackhouse import Client``.
The source folders stay at the repository's top (``ingest/``, ``query/``, ``compat/``)
and are installed as ``trackhouse.ingest``, ``trackhouse.query`` and ``trackhouse.compat``,
so no generic top-level name (``ingest``, ``query``) is ever put on a user's ``sys.path``.
"""

from trackhouse.ingest.client import BufferFullError, Client, ClientConfig, ClientStats, Run
from trackhouse.ingest.errors import IngestError, InvalidArgumentError, PermanentError, RetryableError

__all__ = [
    "BufferFullError",
    "Client",
    "ClientConfig",
    "ClientStats",
    "IngestError",
    "InvalidArgumentError",
    "PermanentError",
    "RetryableError",
    "Run",
]
