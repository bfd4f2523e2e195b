"""trackhouse's own read API for distributed runs, under /api/2.0/trackhouse/: per-rank progress, the band
across ranks, and stragglers (query.ranks defines each figure). GET only, so readers may call it.

Every parameter is hostile: each must appear at most once, and is checked before any query runs; errors are
MLflow's JSON. Values are exact: NaN and ±Inf travel as the bare tokens NaN, Infinity and -Infinity (which
Python's json and MLflow's own client read), not clamped as on MLflow's wire.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from trackhouse.compat.backend import Backend
from trackhouse.compat.errors import invalid, not_found
from trackhouse.compat.routing import Endpoint
from trackhouse.ingest import validation
from trackhouse.ingest.errors import InvalidArgumentError
from trackhouse.query import ranks

#: The band's default and largest number of buckets (MLflow's chart call allows 2,500 points per run).
DEFAULT_BUCKETS = 320
MAX_BUCKETS = 2_500
#: Most ranks whose own curves one band request may ask for.
MAX_CURVES = 16
_KNOWN = frozenset({"run_id", "metric_key", "max_results"})


class RanksApi:
    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def endpoints(self) -> list[Endpoint]:
        return [
            ("runs/ranks", "GET", self.ranks),
            ("metrics/aggregate", "GET", self.aggregate),
            ("runs/stragglers", "GET", self.stragglers),
        ]

    async def ranks(self, request: Request) -> Response:
        run_id, key = await self._run(request), _key(request, required=True)
        assert key is not None
        keys = await self._backend.read(ranks.series_keys, run_id, key)
        series = await self._backend.read(ranks.rank_series, run_id, keys)
        return _json({"run_id": run_id, "metric_key": key, "ranks": [asdict(s) for s in series]})

    async def aggregate(self, request: Request) -> Response:
        run_id, key = await self._run(request), _key(request, required=True)
        assert key is not None
        buckets = _max_results(request)
        chosen = _ranks(request)
        bands = await self._backend.read(ranks.aggregate, run_id, key, buckets)
        payload: dict[str, Any] = {"run_id": run_id, "metric_key": key, "buckets": [asdict(b) for b in bands]}
        if chosen:
            curves = await self._backend.read(ranks.rank_curves, run_id, key, chosen, buckets)
            payload["curves"] = [
                {"rank": rank, "node": node, "steps": steps, "values": values}
                for (rank, node), (steps, values) in curves.items()
            ]
        return _json(payload)

    async def stragglers(self, request: Request) -> Response:
        run_id, key = await self._run(request), _key(request, required=False)
        found = await self._backend.read(ranks.stragglers, run_id, key)
        return _json({"run_id": run_id, **({"metric_key": key} if key else {}), **asdict(found)})

    async def _run(self, request: Request) -> str:
        _check_repeats(request)
        run_id = _single(request, "run_id")
        if run_id is None or run_id == "":
            raise invalid("Missing value for required parameter 'run_id'.")
        try:
            validation.check_run_id(run_id)
        except InvalidArgumentError as exc:
            raise invalid(str(exc)) from None
        if not await self._backend.read(ranks.run_exists, run_id):
            raise not_found(f"Run '{run_id}' not found.")
        return run_id


def _check_repeats(request: Request) -> None:
    for name in _KNOWN:
        if len(request.query_params.getlist(name)) > 1:
            raise invalid(f"Parameter '{name}' must be given at most once.")


def _single(request: Request, name: str) -> str | None:
    return request.query_params.get(name)


def _key(request: Request, required: bool) -> str | None:
    key = _single(request, "metric_key")
    if key is None or key == "":
        if required:
            raise invalid("Missing value for required parameter 'metric_key'.")
        return None
    try:
        validation.check_key(key, path="metric_key")
    except InvalidArgumentError as exc:
        raise invalid(str(exc)) from None
    return key


def _max_results(request: Request) -> int:
    raw = _single(request, "max_results")
    if raw is None:
        return DEFAULT_BUCKETS
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 6):
        raise invalid(f"max_results must be an integer from 1 to {MAX_BUCKETS}, not {raw[:50]!r}.")
    value = int(raw)
    if not 1 <= value <= MAX_BUCKETS:
        raise invalid(f"max_results must be an integer from 1 to {MAX_BUCKETS}, not {value}.")
    return value


def _ranks(request: Request) -> list[int]:
    """`rank=R`, repeated for up to MAX_CURVES ranks whose own curves come with the band."""
    raw = request.query_params.getlist("rank")
    if len(raw) > MAX_CURVES:
        raise invalid(f"At most {MAX_CURVES} 'rank' parameters may be given, not {len(raw)}.")
    chosen = []
    for value in raw:
        if not (value.isascii() and value.isdigit() and len(value) <= 10 and int(value) < 2**32):
            raise invalid(f"rank must be an integer from 0 to {2**32 - 1}, not {value[:50]!r}.")
        chosen.append(int(value))
    return sorted(set(chosen))


def _json(payload: dict[str, Any]) -> Response:
    # Python's json writes NaN and ±Inf as bare tokens, exactly; orjson would write null. Answers are small
    # (ranks x keys, or at most MAX_BUCKETS buckets), so its speed is not needed here.
    return Response(json.dumps(payload, allow_nan=True), media_type="application/json")
