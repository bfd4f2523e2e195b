"""MLflow's tracking-URI plugin: `mlflow.set_tracking_uri("trackhouse://host:50051")` puts metrics on the fast path.

Registered through MLflow's entry points (pyproject.toml), never by patching:
`mlflow.tracking_store` builds `TrackhouseStore`, and `mlflow.model_registry_store`
gives MLflow's own REST registry store on the same server, because MLflow derives
the registry URI from the tracking URI.

    trackhouse://host:50051[?http_port=5000&tls=true]

`TrackhouseStore` is MLflow's RestStore (the compat REST API, on `http_port`,
else TRACKHOUSE_HTTP_PORT, else 5000) with one difference: the metrics of
`log_metric` and `log_batch` are appended to trackhouse's columnar Client, which
streams them over gRPC and returns at once. Params and tags keep the REST path,
so their semantics (a changed param is an error at once) stay exactly MLflow's;
so do metrics that name a model or dataset, which the gRPC contract does not carry.
A run's end (a terminal status) waits until every point is acknowledged, and
raises MlflowException when any failed; reads of a run flush first, so a script
reads back what it logged. Credentials and the CA bundle come from MLflow's own
variables (MLFLOW_TRACKING_TOKEN, _USERNAME/_PASSWORD, _SERVER_CERT_PATH) for both paths.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from functools import partial
from typing import Any
from urllib.parse import parse_qs, urlsplit

from mlflow.entities import Metric, Param, Run, RunInfo, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository
from mlflow.store.model_registry.rest_store import RestStore as RegistryRestStore
from mlflow.store.tracking.rest_store import RestStore
from mlflow.utils.credentials import get_default_host_creds

from trackhouse import Client, IngestError
from trackhouse import Run as ClientRun
from trackhouse.ingest import validation
from trackhouse.ingest.client.runs import ATTEMPT_TAG

SCHEME = "trackhouse"
HTTP_PORT_ENV = "TRACKHOUSE_HTTP_PORT"
DEFAULT_HTTP_PORT = 5000
#: How long a run's end waits for its points to be acknowledged.
FLUSH_TIMEOUT_S = 120.0

_clients: dict[str, Client] = {}
_clients_lock = threading.Lock()


def parse_uri(uri: str) -> tuple[str, str]:
    """trackhouse://host:port[?http_port=N&tls=true] -> (gRPC target, REST base URL)."""
    parts = urlsplit(uri)
    if parts.scheme != SCHEME or not parts.hostname or not parts.port or parts.path.strip("/"):
        raise MlflowException(
            f"tracking URI {uri!r} must be {SCHEME}://host:grpc_port[?http_port=N&tls=true]",
            INVALID_PARAMETER_VALUE,
        )
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = set(query) - {"http_port", "tls"}
    if unknown:
        raise MlflowException(f"unknown option(s) in {uri!r}: {', '.join(sorted(unknown))}", INVALID_PARAMETER_VALUE)
    http_port = query.get("http_port") or os.environ.get(HTTP_PORT_ENV) or str(DEFAULT_HTTP_PORT)
    if not http_port.isdigit():
        raise MlflowException(f"http_port must be a port number, not {http_port!r}", INVALID_PARAMETER_VALUE)
    tls = query.get("tls", "false").lower() in ("1", "true", "yes")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    grpc_target = f"{'grpcs' if tls else 'grpc'}://{host}:{parts.port}"
    return grpc_target, f"{'https' if tls else 'http'}://{host}:{http_port}"


def tracking_store(store_uri: str, artifact_uri: str | None = None) -> TrackhouseStore:
    """The `mlflow.tracking_store` entry point."""
    return TrackhouseStore(store_uri)


def registry_store(store_uri: str, tracking_uri: str | None = None) -> RegistryRestStore:
    """The `mlflow.model_registry_store` entry point: MLflow's REST registry store on the same server."""
    _, http_url = parse_uri(store_uri)
    return RegistryRestStore(partial(get_default_host_creds, http_url))


def _client(target: str) -> Client:
    """One Client (one sender thread, one stream) per target per process, shared by every store."""
    with _clients_lock:
        client = _clients.get(target)
        if client is None:
            client = _clients[target] = Client(target)
        return client


class TrackhouseStore(RestStore):
    def __init__(self, store_uri: str) -> None:
        self._grpc_target, self.http_url = parse_uri(store_uri)
        super().__init__(partial(get_default_host_creds, self.http_url))
        self._runs: dict[str, ClientRun] = {}
        self._runs_lock = threading.Lock()

    # ----- the fast path -----

    def log_metric(self, run_id: str, metric: Metric) -> None:
        self.log_batch(run_id, [metric], [], [])

    def log_batch(
        self, run_id: str, metrics: Sequence[Metric], params: Sequence[Param], tags: Sequence[RunTag]
    ) -> None:
        fast: list[Metric] = []
        slow: list[Metric] = []
        for metric in metrics:
            (slow if metric.model_id or metric.dataset_name or metric.dataset_digest else fast).append(metric)
        if slow or params or tags:
            super().log_batch(run_id, slow, params, tags)
        if fast:
            _check_metrics(fast)
            run = self._run(run_id)
            try:
                for (step, timestamp), values in _group(fast):
                    run.log_metrics(values, step=step, timestamp_ms=timestamp)
            except IngestError as exc:
                raise _mlflow_error(exc) from exc

    def update_run_info(self, run_id: str, run_status: Any, end_time: int | None, run_name: str | None) -> RunInfo:
        """A terminal status waits for every point logged so far, then records the end."""
        failure = None
        if RunStatus.is_terminated(_status_value(run_status)):
            try:
                self.flush()
            except MlflowException as exc:
                failure = exc
        info: RunInfo = super().update_run_info(run_id, run_status, end_time, run_name)
        if _status_value(run_status) == RunStatus.RUNNING:  # perhaps a resume: a new attempt for later points
            with self._runs_lock:
                self._runs.pop(run_id, None)
        if failure is not None:
            raise failure
        return info

    def flush(self, timeout: float = FLUSH_TIMEOUT_S) -> None:
        """Wait until every point logged through this URI is acknowledged; MlflowException says what failed."""
        try:
            _client(self._grpc_target).flush(timeout)
        except (IngestError, TimeoutError) as exc:
            raise _mlflow_error(exc) from exc

    def _run(self, run_id: str) -> ClientRun:
        """The Client's handle for a run; the first use checks, over REST, that the run exists and is active."""
        with self._runs_lock:
            run = self._runs.get(run_id)
        if run is None:
            stored = super().get_run(run_id)  # raises MLflow's own error for a missing run
            info = stored.info
            if info.lifecycle_stage != "active":
                raise MlflowException(
                    f"The run {run_id} must be in the 'active' state. Current state is {info.lifecycle_stage}.",
                    INVALID_PARAMETER_VALUE,
                )
            # A resumed run's points belong to its current attempt, which the server shows in a tag.
            shown = stored.data.tags.get(ATTEMPT_TAG, "0")
            attempt = int(shown) if shown.isdigit() else 0
            run = _client(self._grpc_target).attach_run(run_id, attempt=attempt)
            with self._runs_lock:
                self._runs[run_id] = run
        return run

    # ----- reads see what was logged; artifacts go to the REST server -----

    def _flush_pending(self) -> None:
        with _clients_lock:
            client = _clients.get(self._grpc_target)
        if client is not None:
            stats = client.stats()
            if stats.buffered_points or stats.unacknowledged_points:
                self.flush()

    def get_run(self, run_id: str) -> Run:
        self._flush_pending()
        return self._with_http_artifacts(super().get_run(run_id))

    def create_run(self, *args: Any, **kwargs: Any) -> Run:
        return self._with_http_artifacts(super().create_run(*args, **kwargs))

    def get_metric_history(self, *args: Any, **kwargs: Any) -> Any:
        self._flush_pending()
        return super().get_metric_history(*args, **kwargs)

    def _search_runs(self, *args: Any, **kwargs: Any) -> Any:
        self._flush_pending()
        runs, token = super()._search_runs(*args, **kwargs)
        return [self._with_http_artifacts(r) for r in runs], token

    def _with_http_artifacts(self, run: Run) -> Run:
        """mlflow-artifacts: URIs resolve against the tracking URI, which MLflow accepts only as http(s);
        resolve them here, with MLflow's own function, against the REST server."""
        uri = run.info.artifact_uri
        if not uri or not uri.startswith("mlflow-artifacts:"):
            return run
        proto = run.info.to_proto()
        proto.artifact_uri = MlflowArtifactsRepository.resolve_uri(uri, self.http_url)
        return Run(RunInfo.from_proto(proto), run.data, run.inputs, run.outputs)


def _check_metrics(metrics: Sequence[Metric]) -> None:
    """All or nothing, as MLflow's log_batch: every key and value is checked before any point is buffered."""
    try:
        for metric in metrics:
            validation.check_key(metric.key)
            if metric.value.__class__ is bool or not isinstance(metric.value, int | float):
                raise IngestError(f"Got invalid value {metric.value!r} for metric {metric.key!r}")
    except IngestError as exc:
        raise MlflowException(str(exc), INVALID_PARAMETER_VALUE) from exc


def _group(metrics: Sequence[Metric]) -> list[tuple[tuple[int, int], dict[str, float]]]:
    """Consecutive metrics sharing a step and timestamp, as one dict each (a repeated key starts a new one)."""
    groups: list[tuple[tuple[int, int], dict[str, float]]] = []
    for metric in metrics:
        at = (int(metric.step or 0), int(metric.timestamp))
        if not groups or groups[-1][0] != at or metric.key in groups[-1][1]:
            groups.append((at, {}))
        groups[-1][1][metric.key] = float(metric.value)
    return groups


def _status_value(status: Any) -> int:
    return RunStatus.from_string(status) if isinstance(status, str) else int(status)


def _mlflow_error(exc: Exception) -> MlflowException:
    code = INVALID_PARAMETER_VALUE if isinstance(exc, ValueError) else INTERNAL_ERROR
    return MlflowException(f"trackhouse: {exc}", code)
