"""Resume and fork over HTTP: trackhouse's own endpoints below /api/2.0/trackhouse/, and the attempts that
MLflow's own resume (`mlflow.start_run(run_id=...)`, a runs/update to RUNNING) opens.

- POST runs/resume {"run_id"}: a new attempt of the run (the server numbers it); answers {"attempt", "run"}.
- POST runs/fork {"parent_run_id", "fork_step", "run_name"?}: a child run in the parent's experiment that reads
  the parent's points up to fork_step (inclusive); answers {"run"} (the child, attempt 0).
- GET metrics/history?run_id=&metric_key=[&all_attempts=true][&max_results=][&page_token=]: a series with each
  point's attempt and run; all_attempts adds the superseded points. Values are exact ("NaN", "Infinity").

REST writes carry no attempt, so their points are stamped with the run's current attempt, which this node caches
for CURRENT_TTL_S (a resume on this node updates it at once; one on another node is seen within the TTL).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import time
import uuid
from collections import OrderedDict
from dataclasses import replace
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from trackhouse.compat import wire
from trackhouse.compat.backend import Backend, next_version, now_ms
from trackhouse.compat.errors import invalid, not_found
from trackhouse.compat.routing import Endpoint
from trackhouse.compat.runs import RunsApi, run_row
from trackhouse.ingest import validation
from trackhouse.ingest.batch import ACTIVE, Batch, RunRow, TagRow
from trackhouse.ingest.client.runs import ATTEMPT_TAG
from trackhouse.ingest.errors import PermanentError
from trackhouse.query import attempts, runs
from trackhouse.query.runs import RUN_NAME_TAG, RunInfo

#: How long a node trusts its cached current attempt of a run (for stamping REST points).
CURRENT_TTL_S = 1.0
_CACHE_ENTRIES = 100_000
DEFAULT_POINTS = 25_000
MAX_POINTS = 100_000
_MAX_TOKEN_CHARS = 512


class AttemptsApi:
    """Resumes and forks for this node: REST (here) and gRPC (trackhouse.runs_service) share one instance."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._runs: RunsApi | None = None
        #: One resume at a time on this node, so two never get the same number here.
        self._lock = asyncio.Lock()
        self._current: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def endpoints(self, runs: RunsApi) -> list[Endpoint]:
        """The HTTP endpoints; `runs` answers with whole runs, and has its resumes and REST points numbered here."""
        self._runs = runs
        runs.resume_attempt, runs.current_attempt = self.resume, self.current
        return [
            ("runs/resume", "POST", self.resume_endpoint),
            ("runs/fork", "POST", self.fork_endpoint),
            ("metrics/history", "GET", self.history),
        ]

    async def resume(self, run_id: str) -> int:
        """Open the run's next attempt (and show it in the tag trackhouse.attempt); the caller then writes the run's
        RUNNING row."""
        info = await self._info(run_id)
        if info.lifecycle_stage != ACTIVE:
            raise invalid(f"Cannot resume run with ID {run_id} because it is in the deleted state.")
        if not self._backend.stores:
            raise PermanentError("this node is read-only (--role reader); send writes to a node that stores")
        async with self._lock:
            attempt = await self._backend.read(attempts.start_attempt, run_id, now_ms())
            self._remember(run_id, attempt)
        tag = TagRow(run_id, ATTEMPT_TAG, str(attempt), next_version())
        await self._backend.write(Batch(tags=(tag,)))
        return attempt

    async def current(self, run_id: str) -> int:
        """The attempt REST points of the run are stamped with: its latest, as this node last saw it."""
        cached = self._current.get(run_id)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        attempt = (await self._backend.read(attempts.known_attempts, [run_id])).get(run_id, 0)
        self._remember(run_id, attempt)
        return attempt

    def _remember(self, run_id: str, attempt: int) -> None:
        self._current[run_id] = (attempt, time.monotonic() + CURRENT_TTL_S)
        self._current.move_to_end(run_id)
        while len(self._current) > _CACHE_ENTRIES:
            self._current.popitem(last=False)

    async def resume_running(self, run_id: str) -> tuple[int, RunRow]:
        """trackhouse's own resume: the next attempt, and the run RUNNING again (without an end time)."""
        attempt = await self.resume(run_id)
        running = replace(run_row(await self._info(run_id)), status="RUNNING", end_time_ms=0)
        await self._backend.write(Batch(runs=(running,)))
        return attempt, running

    async def _info(self, run_id: str) -> RunInfo:
        info = (await self._backend.read(runs.infos, [run_id])).get(run_id)
        if info is None:
            raise not_found(f"Run with id={run_id} not found")
        return info

    async def _whole_run(self, run_id: str) -> dict[str, Any]:
        assert self._runs is not None, "endpoints() connects the runs API"
        return wire.run(await self._runs.run(run_id))

    async def resume_endpoint(self, request: Request) -> Response:
        body = await wire.body(request)
        run_id = _string(body, "run_id")
        attempt, _ = await self.resume_running(run_id)
        return wire.ok({"attempt": attempt, "run": await self._whole_run(run_id)})

    async def fork_endpoint(self, request: Request) -> Response:
        body = await wire.body(request)
        parent_id = _string(body, "parent_run_id")
        step = body.get("fork_step")
        if isinstance(step, str) and len(step) <= 20:  # protobuf's JSON spells an int64 as a string too
            try:
                step = int(step)
            except ValueError:
                step = None
        if not isinstance(step, int) or isinstance(step, bool) or not -(2**63) <= step < 2**63:
            raise invalid("Missing or invalid value for parameter 'fork_step': expected a 64-bit integer.")
        name = body.get("run_name")
        if name is not None and not isinstance(name, str):
            raise invalid("Invalid value for parameter 'run_name': expected a string.")
        run_id = (await self.fork(parent_id, step, name)).run_id
        return wire.ok({"run": await self._whole_run(run_id)})

    async def fork(self, parent_run_id: str, fork_step: int, name: str | None, run_id: str | None = None) -> RunRow:
        """Create the child run: its lineage first (reads use it), then the run and its tags."""
        parent = await self._info(parent_run_id)
        if parent.lifecycle_stage != ACTIVE:
            raise invalid(f"Cannot fork run with ID {parent_run_id} because it is in the deleted state.")
        if not self._backend.stores:
            raise PermanentError("this node is read-only (--role reader); send writes to a node that stores")
        run_id = run_id or uuid.uuid4().hex
        validation.check_run_id(run_id)
        if await self._backend.read(runs.infos, [run_id]):
            raise invalid(f"Run with id={run_id} already exists")
        now = now_ms()
        await self._backend.read(attempts.record_fork, run_id, parent_run_id, fork_step, now)
        name = validation.fit_run_name(name or f"{parent.name}-fork-{fork_step}")
        version = next_version()
        row = RunRow(run_id, parent.experiment_id, name, "RUNNING", now, 0, parent.user, version)
        tags = (
            TagRow(run_id, RUN_NAME_TAG, name, version),
            TagRow(run_id, attempts.PARENT_TAG, parent_run_id, version),
            TagRow(run_id, attempts.FORK_STEP_TAG, str(fork_step), version),
        )
        await self._backend.write(Batch(runs=(row,), tags=tags))
        return row

    async def history(self, request: Request) -> Response:
        query = request.query_params
        run_id = wire.required(query.get("run_id", ""), "run_id")
        key = wire.required(query.get("metric_key", ""), "metric_key")
        all_attempts = query.get("all_attempts", "false").lower() in ("true", "1")
        try:
            limit = int(query.get("max_results", DEFAULT_POINTS))
        except ValueError:
            raise invalid("max_results must be an integer") from None
        if not 1 <= limit <= MAX_POINTS:
            raise invalid(f"max_results must be between 1 and {MAX_POINTS}.")
        token = query.get("page_token")
        after = _decode(token) if token else None
        page, end = await self._backend.read(attempts.points, run_id, key, all_attempts, limit, after)
        payload: dict[str, Any] = {
            "metrics": [
                {"key": key, "value": _exact(v), "timestamp": t, "step": s, "attempt": a, "run_id": r}
                for s, t, v, a, r in page
            ]
        }
        if end is not None:
            payload["next_page_token"] = base64.urlsafe_b64encode(json.dumps(end).encode()).decode()
        return wire.ok(payload)


def _exact(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _decode(token: str) -> attempts.PageEnd:
    try:
        if len(token) > _MAX_TOKEN_CHARS:
            raise ValueError("too long")
        step, timestamp, order, run_id, attempt = json.loads(base64.urlsafe_b64decode(token.encode()))
        numbers = (step, timestamp, order, attempt)
        if not all(isinstance(n, int) and not isinstance(n, bool) and -(2**63) <= n < 2**63 for n in numbers):
            raise ValueError("not a page end")
        if not isinstance(run_id, str) or not 0 <= attempt < 2**32:
            raise ValueError("not a page end")
        return step, timestamp, order, run_id, attempt
    except (ValueError, TypeError, binascii.Error):
        raise invalid(f"Invalid page token {token[:100]!r}") from None


def _string(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise invalid(f"Missing value for required parameter '{name}'.")
    return value
