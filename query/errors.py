"""Errors the read side raises. compat/ maps them to MLflow's error codes, once, at its edge."""

from __future__ import annotations


class QueryError(Exception):
    """Base of read-side errors."""


class InvalidQueryError(QueryError, ValueError):
    """The caller's input (filter, order-by, page token, limits) cannot be answered. Never retryable."""


class NotFoundError(QueryError, LookupError):
    """The experiment or run the caller named does not exist."""


class ContendedError(QueryError):
    """Other writers kept winning a race for the same thing (an attempt number). The same call may succeed later."""


class UnsettledError(ContendedError, TimeoutError):
    """Inserts into a claims table that began before a claim's read-back still ran after the timeout
    (query.claims.settle_inserts): the claim is stored, but who won cannot be told yet. A retry is idempotent."""
