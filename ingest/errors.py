"""Errors split by what the caller should do: fix the input, or retry later.

Each edge maps them once: gRPC status codes in receiver_grpc, acks in the client.
"""

from __future__ import annotations


class IngestError(Exception):
    """Base of every error the write path raises on purpose."""


class PermanentError(IngestError):
    """Retrying the same data can never succeed (bad input, schema mismatch)."""


class InvalidArgumentError(PermanentError, ValueError):
    """The input breaks a documented limit; the message names the key or field."""


class UnknownRunError(InvalidArgumentError):
    """A write names a run that does not exist or is deleted."""

    def __init__(self, message: str, run_id: str) -> None:
        super().__init__(message)
        self.run_id = run_id


class RetryableError(IngestError):
    """A transient condition: the same data may succeed later."""

    def __init__(self, message: str, retry_after_ms: int = 100) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class QueueFullError(RetryableError):
    """The batcher holds its configured maximum of points; back off and resend."""


class UnavailableError(RetryableError):
    """The server is shutting down or storage is unreachable."""
