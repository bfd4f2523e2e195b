"""Which artifact locations this server may touch: only those under roots its operator configured.

Stock MLflow 3 validates a client's `artifact_location` (`_validate_storage_location_uri`: no fragments or
params, no `..` in a query, no host-addressed scheme naming a foreign host) and then reads and writes wherever
the location points. That still lets a client name `/etc` or any bucket the server's credentials reach. Here
stock's checks run first, unchanged, and then the location must lie under the artifacts destination, a
proxied `mlflow-artifacts:/path`, or a root in the operator's allow-list. Stored locations are checked again
before each access, so rows written before this rule (or by another tool) are never followed outside.

Containment is decided on the URI text, so the text must mean exactly one place: `?`, `#`, `;`, `%`,
backslashes and control characters are refused outright (a file URI's path is percent-decoded before use, so
`%2e%2e` would be `..`), as are `.`/`..`/empty path segments.
"""

from __future__ import annotations

import posixpath
import urllib.parse
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED
from mlflow.store.artifact.host_policy import host_addressed_uri_targets
from mlflow.utils import uri as mlflow_uri
from mlflow.utils.validation import _validate_experiment_artifact_location_length

from trackhouse.ingest.config import ConfigError


def _check_stock(location: str, field: str) -> None:
    """Stock's own check, `mlflow.server.handlers._validate_storage_location_uri`, called rather than copied.

    Imported on first use: mlflow.server loads Flask and MLflow's SQLAlchemy models, about 3 s of CPU (measured,
    doubling the server's import time) that start-up should not pay for a field few clients send. Callers run
    this in a worker thread, so that first import never stalls the event loop.
    """
    with warnings.catch_warnings():
        # MLflow's SQLAlchemy models use a loader strategy SQLAlchemy 2.1 deprecates: MLflow's to fix.
        warnings.simplefilter("ignore", DeprecationWarning)
        from mlflow.server.handlers import _validate_storage_location_uri
    _validate_storage_location_uri(location, field)


_resolve_uri_if_local: Callable[[str], str] = mlflow_uri.resolve_uri_if_local

FIELD = "artifact_location"
PROXIED_SCHEME = "mlflow-artifacts"
_AMBIGUOUS = frozenset("?#;%\\")


@dataclass(frozen=True, slots=True)
class _Root:
    scheme: str
    netloc: str
    path: str  # no trailing slash, except "/" itself

    def contains(self, other: _Root) -> bool:
        if (self.scheme, self.netloc) != (other.scheme, other.netloc):
            return False
        prefix = self.path if self.path.endswith("/") else self.path + "/"
        return other.path == self.path or other.path.startswith(prefix)


def _parse(location: str) -> _Root | None:
    """The (scheme, host, path) a location names, or None when its text could mean more than one place."""
    if not location or any(c in _AMBIGUOUS or ord(c) < 32 or ord(c) == 127 for c in location):
        return None
    parsed = urllib.parse.urlparse(location)
    scheme = parsed.scheme.lower()
    netloc = parsed.netloc.lower()
    path = parsed.path
    if scheme in ("", "file"):
        if netloc not in ("", "localhost") or not path.startswith("/"):
            return None
        scheme, netloc = "file", ""
    if scheme == PROXIED_SCHEME and netloc:
        return None  # `mlflow-artifacts://host/...` makes the server call that host
    if path and not path.startswith("/"):
        if scheme != PROXIED_SCHEME:
            return None
        path = "/" + path  # `mlflow-artifacts:a/b` is `mlflow-artifacts:/a/b`
    inner = path.rstrip("/").split("/")[1:]
    if any(s in ("", ".", "..") for s in inner) or posixpath.normpath(path or "/") != (path.rstrip("/") or "/"):
        return None
    return _Root(scheme, netloc, path.rstrip("/") or "/")


class ArtifactRoots:
    """The artifact destination plus the operator's allow-list; answers whether a location is inside them."""

    def __init__(self, destination: str | None, allowed: Iterable[str] = ()) -> None:
        self._roots: list[_Root] = []
        self._proxied = destination is not None
        for given in ([destination] if destination else []) + list(allowed):
            root = _parse(_resolve_uri_if_local(given))
            if root is None:
                raise ConfigError(
                    f"artifact root {given!r} is ambiguous: it may not contain ? # ; % \\,"
                    " control characters, or empty, '.' or '..' path segments"
                )
            self._roots.append(root)

    def contains(self, location: str) -> bool:
        parsed = _parse(location)
        if parsed is None:
            return False
        if parsed.scheme == PROXIED_SCHEME:  # a path under the destination, served by this server
            return self._proxied
        return any(root.contains(parsed) for root in self._roots)

    def validate_new(self, location: str) -> str:
        """A client's `artifact_location`, as it is to be stored: stock's checks, stock's absolute form, then ours.

        Blocking on first use (see `_check_stock`): call it in a worker thread.
        """
        absolute = _resolve_uri_if_local(location)
        inside = self.contains(absolute)
        if inside and host_addressed_uri_targets(location) is not None:
            # The operator configured this host as an artifact root, which is what stock's trusted roots are.
            _validate_experiment_artifact_location_length(location)
        else:
            _check_stock(location, FIELD)  # stock's refusal, in stock's words, for everything stock refuses
        if not inside:
            raise MlflowException.invalid_parameter_value(
                f"'{FIELD}' {location[:300]!r} is outside the artifact roots this server is configured for;"
                " use a location under --artifacts-destination or one of --artifacts-allowed-roots"
                f" (or {PROXIED_SCHEME}:/<path>), or leave it empty"
            )
        return absolute

    def check_stored(self, location: str) -> None:
        """Refuse to touch a stored location outside the roots: it was written before this rule, or elsewhere."""
        if not self.contains(location):
            raise MlflowException(
                f"The artifact location {location[:300]!r} is outside the artifact roots this server is"
                " configured for (--artifacts-destination, --artifacts-allowed-roots); it is not accessed.",
                error_code=PERMISSION_DENIED,
            )
