"""Is a store safe to serve? Damage is found and named before anything is served or created.

chDB, like ClickHouse, moves a part it cannot load into the table's `detached/` folder at start
(`broken-on-start_<part>`) and then serves what is left: rows vanish without an error. And with its
`metadata/` folder gone, a data directory looks empty, so a migration would create a fresh schema next to
the old data. trackhouse refuses both: `inspect_directory` looks at an embedded directory's files before
chDB opens it, `inspect_store` asks the opened store (embedded or server) by SQL, and `verify` raises
with every finding and what to do about it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from trackhouse.query.connection import Client
from trackhouse.query.errors import QueryError
from trackhouse.query.schema import MIGRATIONS_TABLE, applied_versions

#: Tables each applied migration guarantees; a store that applied it and lacks one lost it.
REQUIRED_TABLES: dict[int, tuple[str, ...]] = {
    1: ("metrics", "experiments", "runs", "params", "tags"),
    2: ("experiment_tags",),
    5: ("metric_latest",),  # and metric_extremes, until migration 8 replaced it
    6: ("logged_models", "logged_model_tags", "logged_model_params", "run_models"),
    7: ("datasets", "dataset_inputs"),
    8: ("metric_buckets",),
    15: ("metric_latest_by_key",),
    16: ("params_by_key", "tags_by_key"),
}
#: Detached for a harmless reason: ClickHouse keeps parts that a merged part already covers as `ignored_`.
_HARMLESS_DETACH_REASONS = frozenset({"ignored"})


class DamagedStoreError(QueryError):
    """The store holds data that would not be served, or lost its schema. Never retryable."""


@dataclass(frozen=True, slots=True)
class Finding:
    #: What is wrong, naming the table, part or folder.
    damage: str
    #: How to recover.
    remedy: str

    def __str__(self) -> str:
        return f"{self.damage}\n    to recover: {self.remedy}"


#: Folders of a MergeTree table folder that are not parts: parts it set aside, and the insert deduplication log
#: (non_replicated_deduplication_window, schema migration 12).
NOT_PARTS = frozenset({"detached", "deduplication_logs"})


def _has_parts(folder: Path) -> bool:
    """A MergeTree table folder holding at least one part (a folder other than NOT_PARTS)."""
    try:
        return any(entry.is_dir() and entry.name not in NOT_PARTS for entry in folder.iterdir())
    except OSError:
        return False


def inspect_directory(root: Path) -> list[Finding]:
    """An embedded (chDB) data directory's files, without opening it. A missing or empty directory is fresh."""
    if not root.is_dir():
        return []
    metadata, data = root / "metadata", root / "data"
    table_folders = [t for db in _subdirs(data) for t in _subdirs(db)] if data.is_dir() else []
    findings: list[Finding] = []
    if not metadata.is_dir():
        if any(_has_parts(t) for t in table_folders) or any(_has_parts(t) for t in _store_tables(root)):
            findings.append(
                Finding(
                    f"the metadata folder {metadata} is missing, but the directory holds table data",
                    f"restore {metadata} from a backup of this directory (trackhouse will not create a fresh"
                    " schema over existing data); or start on a new --data-dir",
                )
            )
        return findings
    for sql in sorted(metadata.glob("*.sql")):
        folder = metadata / sql.stem
        if sql.stem not in ("system", "default") and not folder.is_dir():
            findings.append(
                Finding(
                    f"database {sql.stem} is declared in {sql} but its metadata folder {folder} is missing",
                    f"restore {folder} (a link into {root / 'store'}) from a backup of this directory",
                )
            )
    for table in table_folders:
        database, name = table.parent.name, table.name
        if not table.exists():  # a link whose target is gone
            findings.append(
                Finding(
                    f"the data folder of table {database}.{name} is missing ({table} points nowhere)",
                    f"restore {root / 'store'} from a backup of this directory",
                )
            )
            continue
        if (metadata / database).is_dir() and not (metadata / database / f"{name}.sql").exists():
            findings.append(
                Finding(
                    f"table {database}.{name} has data in {table} but no definition"
                    f" ({metadata / database / (name + '.sql')} is missing)",
                    f"restore {metadata / database} from a backup of this directory",
                )
            )
        findings += _detached_in(table, f"{database}.{name}")
    return findings


def _subdirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() or p.is_symlink())
    except OSError:
        return []


def _store_tables(root: Path) -> list[Path]:
    """Atomic databases keep each table's files in store/<3 hex>/<uuid>/."""
    return [t for prefix in _subdirs(root / "store") for t in _subdirs(prefix)]


def _detached_in(table: Path, qualified: str) -> list[Finding]:
    detached = table / "detached"
    parts = sorted(p.name for p in _subdirs(detached)) if detached.is_dir() else []
    damaged = [p for p in parts if p.split("_", 1)[0] not in _HARMLESS_DETACH_REASONS]
    if not damaged:
        return []
    return [_detached_finding(qualified, damaged, str(detached.resolve()))]


def _detached_finding(qualified: str, parts: list[str], where: str) -> Finding:
    return Finding(
        f"table {qualified} has {len(parts)} detached part(s) whose rows are not served: {', '.join(parts)}",
        f"restore the data directory from a backup; or, to serve what is left, move the parts out of {where}"
        " (keep them: they hold the rows) and start again",
    )


def _tables(client: Client, database: str) -> set[str]:
    query = "SELECT name FROM system.tables WHERE database = {db:String}"
    return {row[0] for row in client.query(query, parameters={"db": database}).result_rows}


def inspect_store(client: Client, database: str) -> list[Finding]:
    """The opened store, by SQL: detached parts, and tables that applied migrations created but are gone."""
    exists = client.query("SELECT count() FROM system.databases WHERE name = {db:String}", parameters={"db": database})
    if not exists.result_rows[0][0]:
        return []
    tables = _tables(client, database)
    findings: list[Finding] = []
    if MIGRATIONS_TABLE not in tables:
        if tables:
            findings.append(
                Finding(
                    f"database {database} has tables ({', '.join(sorted(tables))}) but no {MIGRATIONS_TABLE} table",
                    f"restore {database}.{MIGRATIONS_TABLE} from a backup; trackhouse cannot tell which schema"
                    " version the tables have",
                )
            )
    else:
        required = {t for version in applied_versions(client, database) for t in REQUIRED_TABLES.get(version, ())}
        # Listed again after reading what is recorded: another node may be migrating the same store right now,
        # and a migration records itself only after creating its tables, so this order never reports a table
        # that was created between the two reads as missing.
        tables = _tables(client, database)
        missing = sorted(required - tables)
        if missing:
            findings.append(
                Finding(
                    f"tables {', '.join(f'{database}.{t}' for t in missing)} are missing, though the schema"
                    " migrations that created them are recorded",
                    "restore the store from a backup (a table's definition or data folder was lost)",
                )
            )
    detached = client.query(
        "SELECT table, name, ifNull(reason, ''), path FROM system.detached_parts WHERE database = {db:String}"
        " ORDER BY table, name",
        parameters={"db": database},
    ).result_rows
    by_table: dict[str, list[str]] = {}
    folders: dict[str, str] = {}
    for table, name, reason, path in detached:
        if reason in _HARMLESS_DETACH_REASONS:
            continue
        by_table.setdefault(table, []).append(name)
        folders[table] = os.path.dirname(str(path).rstrip("/"))
    for table, parts in sorted(by_table.items()):
        findings.append(_detached_finding(f"{database}.{table}", parts, folders[table]))
    return findings


def inspect_checksums(client: Client, database: str) -> list[Finding]:
    """Every part of every MergeTree table read back against its checksums (`CHECK TABLE`): finds flipped bits
    that start-up does not see (it checks only that files exist and have their sizes). Reads all the data."""
    tables = client.query(
        "SELECT name FROM system.tables WHERE database = {db:String} AND engine LIKE '%MergeTree' ORDER BY name",
        parameters={"db": database},
    ).result_rows
    findings = []
    for (table,) in tables:
        raw = client.raw_query(
            f"CHECK TABLE {database}.`{table}` SETTINGS check_query_single_value_result = 0 FORMAT JSONEachRow"
        )
        for line in raw.decode().splitlines():
            part = json.loads(line)
            if not int(part["is_passed"]):
                folder = client.query(
                    "SELECT path FROM system.parts WHERE database = {db:String} AND table = {t:String}"
                    " AND name = {p:String}",
                    parameters={"db": database, "t": table, "p": part["part_path"]},
                ).result_rows
                where = folder[0][0] if folder else part["part_path"]
                findings.append(
                    Finding(
                        f"part {part['part_path']} of table {database}.{table} is corrupt: {part['message'][:300]}",
                        f"restore the data directory from a backup; or, to serve what is left, stop trackhouse and"
                        f" move {where} out of the directory (keep it: it holds the rows)",
                    )
                )
    return findings


def report(findings: list[Finding], where: str) -> str:
    return "\n".join([f"the store at {where} is damaged:", *(f"  - {finding}" for finding in findings)])


def verify(findings: list[Finding], where: str) -> None:
    if findings:
        text = report(findings, where)
        raise DamagedStoreError(f"{text}\n  trackhouse will not serve it; `trackhouse check` reports the same")
