"""MLflow's limits (mlflow/utils/validation.py), enforced exactly.

Shared by the server's decoder and the client, so a bad key fails in the
training loop that logged it rather than later on the server.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from functools import lru_cache

from trackhouse.ingest.errors import InvalidArgumentError

MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_EXPERIMENT_NAME_LENGTH = 500
#: MLflow keeps a run's name also as its `mlflow.runName` tag, so the name has the tag's limit and rule.
MAX_RUN_NAME_LENGTH = MAX_TAG_VALUE_LENGTH
#: MLflow's `runs.user_id` column (String(256)).
MAX_USER_LENGTH = 256

# MLflow's own switch: when true (its default), over-long param and tag values
# are cut to the limit instead of rejected.
ENV_TRUNCATE_LONG_VALUES = "MLFLOW_TRUNCATE_LONG_VALUES"

# The same expressions MLflow uses, with re.match semantics (so `$` also
# matches before a trailing newline, exactly as in MLflow).
_KEY_RE = re.compile(r"^[/\w.\- :]*$")
_RUN_ID_RE = re.compile(r"^[a-zA-Z0-9][\w\-]{0,255}$")
_EXPERIMENT_ID_RE = re.compile(r"^[a-zA-Z0-9][\w\-]{0,63}$")


#: Stock's words (mlflow.utils.validation.bad_character_message and bad_path_message); a test holds them equal.
_BAD_CHARACTERS = (
    "Names may only contain alphanumerics, underscores (_), dashes (-), periods (.), spaces ( ), colon(:)"
    " and slashes (/)."
)
_BAD_PATH = (
    "Names may be treated as files in certain cases, and must not resolve to other names when treated as such."
    " This name would resolve to {!r}"
)
_TOO_LONG = "too long"
#: How stock names a key in its errors: the request field, and the entity in its length message.
_KEY_NAMES = {"metric": ("name", "Metric name"), "param": ("key", "Param key"), "tag": ("key", "key")}


@lru_cache(maxsize=65536)
def key_problem(key: str) -> str | None:
    """Why `key` is not a valid metric, param or tag key, or None when it is. Cached: keys repeat."""
    if _KEY_RE.match(key) is None:
        return _BAD_CHARACTERS
    norm = posixpath.normpath(key)
    if norm != key or norm == "." or norm.startswith("..") or norm.startswith("/"):
        return _BAD_PATH.format(norm)
    if len(key) > MAX_KEY_LENGTH:
        return _TOO_LONG
    return None


def check_key(key: str, what: str = "metric", path: str | None = None) -> None:
    """Raise stock's error for a bad key; `path` is the request field MLflow would name (default: its own)."""
    problem = key_problem(key)
    if problem is None:
        return
    field, entity = _KEY_NAMES[what]
    if problem is _TOO_LONG:
        # Stock checks the length last, in words of its own (mlflow.utils.validation.exceeds_maximum_length).
        length_entity = path if what == "tag" and path else entity
        raise InvalidArgumentError(f"'{length_entity}' exceeds the maximum length of {MAX_KEY_LENGTH} characters")
    shown = json.dumps(key, sort_keys=True, separators=(",", ":"))
    raise InvalidArgumentError(f"Invalid value {shown} for parameter '{path or field}' supplied: {problem}")


def check_run_id(run_id: str) -> None:
    if _RUN_ID_RE.match(run_id) is None:
        raise InvalidArgumentError(f"invalid run_id {run_id[:300]!r}")


def check_experiment_id(experiment_id: str) -> None:
    if _EXPERIMENT_ID_RE.match(experiment_id) is None:
        raise InvalidArgumentError(f"invalid experiment_id {experiment_id[:100]!r}")


def check_experiment_name(name: str) -> None:
    if not name:
        raise InvalidArgumentError("experiment name must not be empty")
    if len(name) > MAX_EXPERIMENT_NAME_LENGTH:
        raise InvalidArgumentError(
            f"experiment name is {len(name)} characters, over the limit of {MAX_EXPERIMENT_NAME_LENGTH}"
        )


def fit_run_name(name: str) -> str:
    """The run name as stored: cut (or refused) exactly as its `mlflow.runName` tag is, so the two stay equal."""
    return fit_value("tag", "mlflow.runName", name, MAX_RUN_NAME_LENGTH)


#: A node is a host name (at most 253 characters) or an operator's label.
MAX_NODE_LENGTH = 253


def check_node(node: str) -> None:
    """A point's node names a machine: short, printable, no whitespace."""
    if len(node) > MAX_NODE_LENGTH:
        raise InvalidArgumentError(f"node is {len(node)} characters, over the limit of {MAX_NODE_LENGTH}")
    if node and not (node.isprintable() and not any(c.isspace() for c in node)):
        raise InvalidArgumentError(f"node {node!r} must be printable and hold no whitespace")


def check_user(user: str) -> None:
    if len(user) > MAX_USER_LENGTH:
        raise InvalidArgumentError(f"run user is {len(user)} characters, over the limit of {MAX_USER_LENGTH}")


def truncate_long_values() -> bool:
    return os.environ.get(ENV_TRUNCATE_LONG_VALUES, "true").strip().lower() not in ("false", "0", "no")


def fit_value(what: str, key: str, value: str, limit: int) -> str:
    """MLflow's rule for param and tag values: truncate when allowed, otherwise reject."""
    if len(value) <= limit:
        return value
    if truncate_long_values():
        return value[:limit]
    raise InvalidArgumentError(f"{what} {key!r} value is {len(value)} characters, over the limit of {limit}")
