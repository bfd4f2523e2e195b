"""Resolves what a write refers to before it is queued: experiments, runs, params.

- A run upsert naming its experiment gets the experiment's id; an unknown name
  creates the experiment, with an id derived from the name so that nodes agree.
- Points, params and tags must belong to a run that exists, or is upserted in
  the same request.
- A param may be logged again with the same value, never with another.
- The run name and its `mlflow.runName` tag stay in step whatever the transport:
  a tag without a run upsert renames the stored run, and a named upsert without
  the tag writes it, so gRPC, Kafka and REST writes all behave as MLflow does.

Answers are cached in bounded LRUs, so a steady stream of points costs no
storage lookup. The lookups use a client of their own, so they never wait
behind an insert.

On several nodes (one store, many writers), each cache is either safe or bounded in staleness:

- Param values: only winners are cached, and a winner is final. A param no node has logged
  before is a claim: it is stored, then read back (`confirm`), and the request fails if another
  node's claim won (schema.PARAM_VALUE decides, the same everywhere).
- Which runs and experiments exist and are live, and which experiment a name denotes: another
  node's delete, restore or rename changes them, so entries expire after `cache_seconds`.
- The newest run row this node accepted: always merged with the stored row by version.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import Generic, TypeVar

from clickhouse_connect.driver import exceptions as ch_errors

from trackhouse.ingest.batch import ACTIVE, Batch, ExperimentRow, ParamRow, RunRow, TagRow
from trackhouse.ingest.config import DEFAULT_CATALOG_CACHE_SECONDS
from trackhouse.ingest.errors import InvalidArgumentError, RetryableError, UnavailableError, UnknownRunError
from trackhouse.query import catalog, schema
from trackhouse.query.claims import settle_inserts
from trackhouse.query.connection import Client
from trackhouse.query.runs import RUN_NAME_TAG

K = TypeVar("K")
V = TypeVar("V")

_FOREVER = float("inf")


class _Lru(Generic[K, V]):
    """Bounded in entries; with `ttl_s`, also in age, for answers another node's write can change."""

    def __init__(self, capacity: int, ttl_s: float | None = None) -> None:
        self._capacity = capacity
        self._ttl_s = ttl_s
        self._items: OrderedDict[K, V] = OrderedDict()
        self._expiry: dict[K, float] = {}

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None and self._expiry.get(key, _FOREVER) < time.monotonic():
            self.discard(key)
            return None
        if value is not None:
            self._items.move_to_end(key)
        return value

    def __contains__(self, key: K) -> bool:
        return self.get(key) is not None

    def discard(self, key: K) -> None:
        self._items.pop(key, None)
        self._expiry.pop(key, None)

    def unpin(self, key: K) -> None:
        """Start `key`'s time to live now, if it is held."""
        if key in self._items and self._ttl_s is not None:
            self._expiry[key] = time.monotonic() + self._ttl_s

    def discard_value(self, value: V) -> None:
        """Drop every key mapping to `value`. Linear, so only for rare changes such as renames."""
        for key in [k for k, v in self._items.items() if v == value]:
            self.discard(key)

    def put(self, key: K, value: V, pinned: bool = False) -> None:
        """`pinned`: never expires until `unpin`, for what this node has accepted but not yet stored (the
        store cannot confirm it yet)."""
        self._items[key] = value
        self._items.move_to_end(key)
        if self._ttl_s is not None:
            self._expiry[key] = _FOREVER if pinned else time.monotonic() + self._ttl_s
        if len(self._items) > self._capacity:
            oldest, _ = self._items.popitem(last=False)
            self._expiry.pop(oldest, None)


@dataclasses.dataclass(slots=True)
class _Claim:
    """A param value this node has queued but not yet confirmed, and how many accepted requests carry it."""

    value: str
    holders: int = 0


class Catalog:
    def __init__(
        self, client: Client, database: str, cache_entries: int, cache_seconds: float = DEFAULT_CATALOG_CACHE_SECONDS
    ) -> None:
        self._client = client
        self._database = database
        #: Held by whoever checks that an experiment name is free and then takes it: the REST API's create,
        #: rename and restore (until the write is durable), and `resolve` when it creates experiments by name.
        #: One node never lets two live experiments share a name (multi-node: see the README).
        self.names_lock = asyncio.Lock()
        self._experiment_ids = _Lru[str, str](cache_entries, cache_seconds)  # name -> id
        self._known_experiments = _Lru[str, bool](cache_entries, cache_seconds)
        self._known_runs = _Lru[str, bool](cache_entries, cache_seconds)
        #: Winning values only (see `confirm`): final, so they never expire.
        self._params = _Lru[tuple[str, str], str](cache_entries)
        #: Claims this node has accepted and not yet confirmed.
        self._claims: dict[tuple[str, str], _Claim] = {}
        #: The newest run row this node accepted, for renames of runs whose row is still queued.
        self._run_rows = _Lru[str, RunRow](cache_entries)

    def cached_experiment_id(self, name: str) -> str | None:
        """The id of the live experiment called `name` that this node has created or seen, written or not."""
        return self._experiment_ids.get(name)

    async def resolve(self, batch: Batch) -> Batch:
        """Return `batch` with experiment ids filled in and new experiments added; raise on bad references.

        Creating experiments by name happens under `names_lock`. `remember` runs right after, with no await
        in between (see WritePipeline.accept), so the cache knows a new name before the lock can change hands.
        """
        try:
            if any(r.experiment_name and r.experiment_name not in self._experiment_ids for r in batch.runs):
                async with self.names_lock:
                    return await self._resolve(batch)
            return await self._resolve(batch)
        except (ch_errors.ClickHouseError, OSError) as exc:
            # A lookup reads the store, not the batch: whatever failed is the store's state, so the writer retries
            # (a Kafka worker backs off) rather than having valid data refused or dead-lettered.
            raise UnavailableError(f"storage unavailable during the catalog's lookup: {exc}") from exc

    async def _resolve(self, batch: Batch) -> Batch:
        runs, experiments = await self._resolve_experiments(batch.runs)
        await self._check_runs(batch.run_ids() - {r.run_id for r in runs})
        await self._check_params(batch)
        runs, tags = await self._sync_run_names(runs, batch.tags)
        if not experiments and runs == batch.runs and tags == batch.tags:
            return batch
        return dataclasses.replace(batch, runs=runs, experiments=experiments, tags=tags)

    def remember(self, batch: Batch) -> None:
        """Record what an accepted batch creates, renames or deletes, so later requests need no lookup.

        What it creates stays known until the batch is stored (`stored`), however long it waits in the
        queue: until then the store cannot confirm it. Only this node's cache learns of a delete at once;
        another node learns of it when its entry expires.
        """
        for run in batch.runs:
            newest = self._run_rows.get(run.run_id)
            if newest is None or newest.version <= run.version:
                self._run_rows.put(run.run_id, run)
            if run.lifecycle_stage == ACTIVE:
                self._known_runs.put(run.run_id, True, pinned=True)
            else:
                self._known_runs.discard(run.run_id)
        for experiment in batch.experiments:
            self._experiment_ids.discard_value(experiment.experiment_id)  # a rename frees the old name
            if experiment.lifecycle_stage == ACTIVE:
                self._experiment_ids.put(experiment.name, experiment.experiment_id, pinned=True)
                self._known_experiments.put(experiment.experiment_id, True, pinned=True)
            else:
                self._known_experiments.discard(experiment.experiment_id)
        for param in self.claims(batch):
            self._claims.setdefault((param.run_id, param.key), _Claim(param.value)).holders += 1

    def stored(self, batch: Batch) -> None:
        """`batch` is stored (or failed): what `remember` pinned for it now expires as any lookup does."""
        for run in batch.runs:
            self._known_runs.unpin(run.run_id)
        for experiment in batch.experiments:
            self._experiment_ids.unpin(experiment.name)
            self._known_experiments.unpin(experiment.experiment_id)

    def claims(self, batch: Batch) -> list[ParamRow]:
        """The params of `batch` that are not known winners: they must be confirmed once stored."""
        return [p for p in batch.params if (p.run_id, p.key) not in self._params]

    async def confirm(self, durable: Awaitable[None], claims: list[ParamRow]) -> None:
        """Wait until the batch holding `claims` is stored, then read back each claim's winner; raise
        ParamChangedError if another node's claim won. Every claim is stored, and every reader picks
        the same winner (schema.PARAM_VALUE), so exactly one of the racing writers is told it succeeded."""
        try:
            await durable
            # Until the rival inserts that began before ours have ended, an earlier-stamped claim may still land.
            await asyncio.to_thread(settle_inserts, self._client, self._database, schema.PARAMS)
            runs, keys = {p.run_id for p in claims}, {p.key for p in claims}
            winners = await asyncio.to_thread(catalog.param_values, self._client, self._database, runs, keys)
        except (ch_errors.ClickHouseError, OSError) as exc:  # stored, not confirmed: a retry is idempotent
            raise RetryableError(f"params stored but not confirmed against other nodes: {exc}") from exc
        finally:
            for param in claims:
                claim = self._claims[(param.run_id, param.key)]
                claim.holders -= 1
                if not claim.holders:
                    del self._claims[(param.run_id, param.key)]
        changes: dict[str, list[tuple[str, str, str]]] = {}
        for param in claims:
            winner = winners.get((param.run_id, param.key), param.value)  # stored: `durable` completed
            self._params.put((param.run_id, param.key), winner)
            if winner != param.value:
                changes.setdefault(param.run_id, []).append((param.key, winner, param.value))
        for run_id in sorted(changes):
            raise ParamChangedError(run_id, changes[run_id])

    async def _resolve_experiments(
        self, runs: tuple[RunRow, ...]
    ) -> tuple[tuple[RunRow, ...], tuple[ExperimentRow, ...]]:
        names = {r.experiment_name for r in runs if r.experiment_name}
        found_ids = await self._lookup(
            (n for n in names if n not in self._experiment_ids),
            lambda missing: catalog.experiment_ids_by_name(self._client, self._database, missing),
            self._experiment_ids.put,
        )
        ids = {r.experiment_id for r in runs if r.experiment_id}
        found_experiments = await self._lookup(
            (i for i in ids if i not in self._known_experiments),
            lambda missing: {i: True for i in catalog.existing_experiments(self._client, self._database, missing)},
            self._known_experiments.put,
        )
        for experiment_id in ids:
            if experiment_id not in found_experiments and experiment_id not in self._known_experiments:
                raise InvalidArgumentError(f"experiment {experiment_id!r} does not exist")
        created: dict[str, ExperimentRow] = {}
        resolved = []
        for run in runs:
            if run.experiment_name:
                name = run.experiment_name
                experiment_id = found_ids.get(name) or self._experiment_ids.get(name) or ""
                if not experiment_id and run.experiment_name not in created:
                    experiment_id = await asyncio.to_thread(
                        catalog.allocate_experiment_id, self._client, self._database, run.experiment_name
                    )
                    created[run.experiment_name] = ExperimentRow(experiment_id, run.experiment_name, _now_ms())
                experiment_id = experiment_id or created[run.experiment_name].experiment_id
                run = dataclasses.replace(run, experiment_id=experiment_id, experiment_name="")
            resolved.append(run)
        return tuple(resolved), tuple(created.values())

    async def _check_runs(self, run_ids: set[str]) -> None:
        found = await self._lookup(
            (r for r in run_ids if r not in self._known_runs),
            lambda missing: {r: True for r in catalog.active_runs(self._client, self._database, missing)},
            self._known_runs.put,
        )
        for run_id in sorted(run_ids):
            if run_id not in found and run_id not in self._known_runs:
                raise UnknownRunError(
                    f"run {run_id!r} does not exist or is deleted;"
                    " send its run upsert first (in this or an earlier request)",
                    run_id,
                )

    async def _sync_run_names(
        self, runs: tuple[RunRow, ...], tags: tuple[TagRow, ...]
    ) -> tuple[tuple[RunRow, ...], tuple[TagRow, ...]]:
        """Keep `runs.name` and the `mlflow.runName` tag in step, as MLflow does, whatever the transport.

        A rename by tag rewrites the run's whole row (runs is a whole-row upsert), from the newer of the
        stored row and the last row this node accepted, which may still be queued.
        """
        renames = {t.run_id: t for t in tags if t.key == RUN_NAME_TAG and not t.deleted}
        upserted = {r.run_id for r in runs}
        named = [r for r in runs if r.name and r.run_id not in renames]
        runs = tuple(dataclasses.replace(r, name=renames[r.run_id].value) if r.run_id in renames else r for r in runs)
        missing = sorted(set(renames) - upserted)
        if missing:
            stored = await asyncio.to_thread(catalog.run_rows, self._client, self._database, missing)
            renamed = []
            for run_id in missing:
                current = _newer(_run_row(stored.get(run_id)), self._run_rows.get(run_id))
                if current is not None:  # _check_runs has already refused runs that do not exist
                    tag = renames[run_id]
                    version = max(tag.version, current.version + 1)
                    renamed.append(dataclasses.replace(current, name=tag.value, version=version))
            runs += tuple(renamed)
        if named:
            tags += tuple(TagRow(r.run_id, RUN_NAME_TAG, r.name, r.version) for r in named)
        return runs, tags

    async def _check_params(self, batch: Batch) -> None:
        if not batch.params:
            return
        seen: dict[tuple[str, str], str] = {}
        for param in batch.params:
            previous = seen.setdefault((param.run_id, param.key), param.value)
            if previous != param.value:
                raise ParamChangedError(param.run_id, [(param.key, previous, param.value)])
        unknown = [k for k in seen if k not in self._params]
        await self._lookup(
            unknown,
            lambda missing: catalog.param_values(
                self._client, self._database, {r for r, _ in missing}, {k for _, k in missing}
            ),
            self._params.put,
        )
        changes: dict[str, list[tuple[str, str, str]]] = {}
        for (run_id, key), value in seen.items():
            stored = self._params.get((run_id, key))
            claim = self._claims.get((run_id, key))
            if stored is None and claim is not None:  # this node's own race is refused before storing
                stored = claim.value
            if stored is not None and stored != value:
                changes.setdefault(run_id, []).append((key, stored, value))
        for run_id in sorted(changes):
            raise ParamChangedError(run_id, changes[run_id])

    async def _lookup(
        self, keys: Iterable[K], fetch: Callable[[list[K]], dict[K, V]], store: Callable[[K, V], None]
    ) -> dict[K, V]:
        """Fetch the keys missing from a cache and store them; return what was found, which the caller uses
        for this request even if the entries have expired meanwhile (a slow lookup, a short time to live)."""
        missing = list(dict.fromkeys(keys))
        if not missing:
            return {}
        found = await asyncio.to_thread(fetch, missing)
        for key, value in found.items():
            store(key, value)
        return found


class ParamChangedError(InvalidArgumentError):
    """Params logged again with other values, in stock's words: its log-batch message, and `single` for
    log-parameter's (both from MLflow's SQL store, which has no function of its own for them)."""

    def __init__(self, run_id: str, changes: list[tuple[str, str, str]]) -> None:
        self.run_id = run_id
        #: (key, stored value, new value)
        self.changes = changes
        listed = [{"key": key, "old_value": old, "new_value": new} for key, old, new in changes]
        super().__init__(
            f"Changing param values is not allowed. Params were already logged='{listed}' for run ID='{run_id}'."
        )

    def single(self) -> str:
        key, old, new = self.changes[0]
        return (
            f"Changing param values is not allowed. Param with key='{key}' was already logged with value='{old}'"
            f" for run ID='{self.run_id}'. Attempted logging new value '{new}'."
        )


def _run_row(stored: tuple[object, ...] | None) -> RunRow | None:
    if stored is None:
        return None
    values = dict(zip(schema.RUN_COLUMNS, stored, strict=True))
    return RunRow(
        run_id=str(values["run_id"]),
        experiment_id=str(values["experiment_id"]),
        name=str(values["name"]),
        status=str(values["status"]),
        start_time_ms=int(str(values["start_time"])),
        end_time_ms=int(str(values["end_time"] or 0)),
        user=str(values["user"]),
        version=int(str(values["version"])),
        lifecycle_stage=str(values["lifecycle_stage"]),
    )


def _newer(a: RunRow | None, b: RunRow | None) -> RunRow | None:
    if a is None or b is None:
        return a or b
    return a if a.version >= b.version else b


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
