"""Operator commands beside `serve`: `trackhouse auth ...` manages the users-and-tokens file, so nobody writes
a hash by hand; `trackhouse check` reports whether a store is safe to serve, without serving it; `trackhouse repair`
fills the copies a node of an older version did not write during a rolling upgrade; `trackhouse rebuild` gives a
store's run tables query.layout's fine layout, with every writer stopped."""

from __future__ import annotations

import argparse
import fcntl
import getpass
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.exceptions import ProgrammingError

from trackhouse.ingest import auth
from trackhouse.query import integrity, layout, schema
from trackhouse.query.cluster_ddl import NAME, ClusterDdlError
from trackhouse.query.connection import DEFAULT_DATABASE, Client, StoreConfig, connect
from trackhouse.query.redaction import Redactor, url_secrets
from trackhouse.ranks_cli import add_ranks_command, run_ranks_command
from trackhouse.replay import add_replay_command, run_replay

AUTH_FILE_ENV = "TRACKHOUSE_AUTH_FILE"


def add_admin_commands(commands: Any) -> None:
    auth_parser = commands.add_parser("auth", help="manage the users-and-tokens file (--auth-file of serve)")
    auth_parser.add_argument(
        "--auth-file",
        type=Path,
        default=os.environ.get(AUTH_FILE_ENV),
        required=not os.environ.get(AUTH_FILE_ENV),
        help=f"the file [env {AUTH_FILE_ENV}]",
    )
    actions = auth_parser.add_subparsers(dest="action", required=True)
    user = actions.add_parser("add-user", help="add or replace a user (Basic: MLFLOW_TRACKING_USERNAME/PASSWORD)")
    user.add_argument("name")
    user.add_argument("--role", choices=auth.ROLES, required=True)
    user.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input, not a prompt"
    )
    token = actions.add_parser("add-token", help="create a token (Bearer: MLFLOW_TRACKING_TOKEN); printed once")
    token.add_argument("name")
    token.add_argument("--role", choices=auth.ROLES, required=True)
    remove = actions.add_parser("remove", help="remove a user and every token with this name")
    remove.add_argument("name")
    actions.add_parser("list", help="names and roles (never secrets)")
    check = commands.add_parser(
        "check", help="report whether a data directory or ClickHouse database is safe to serve (exit 1 if not)"
    )
    _add_store_arguments(check)
    check.add_argument(
        "--deep", action="store_true", help="also read every part back against its checksums (reads all the data)"
    )
    repair = commands.add_parser(
        "repair",
        help="after a rolling upgrade, once every node runs this version: copy what older nodes wrote to tables"
        " they did not know (idempotent)",
    )
    _add_store_arguments(repair)
    repair.add_argument(
        "--cluster",
        default=os.environ.get("TRACKHOUSE_CLUSTER", ""),
        help="the cluster the schema was created ON (as serve's --cluster) [env TRACKHOUSE_CLUSTER]",
    )
    rebuild = commands.add_parser(
        "rebuild",
        help=f"copy the tables a runs page reads into {layout.FINE_LAYOUT_TEXT} (serve does this itself for a data"
        " directory); needs every writer stopped",
    )
    _add_store_arguments(rebuild)
    rebuild.add_argument(
        "--writers-stopped",
        action="store_true",
        help="confirm that no node writes to the ClickHouse server's store meanwhile (needed with --clickhouse-url:"
        " a write during a table's exchange would be lost)",
    )
    _add_schema_command(commands)
    add_replay_command(commands)
    add_ranks_command(commands)


def run_admin_command(args: argparse.Namespace) -> int:
    try:
        if args.command == "auth":
            return _auth(args)
        if args.command == "check":
            return _check(args)
        if args.command == "schema":
            return _schema(args)
        if args.command == "repair":
            return _repair(args)
        if args.command == "rebuild":
            return _rebuild(args)
        if args.command == "replay":
            return run_replay(args)
        if args.command == "ranks":
            return run_ranks_command(args)
    except (auth.AuthFileError, _BadStoreFlags) as exc:
        print(f"trackhouse: {exc}", file=sys.stderr)
        return 2
    except _StoreInUse as exc:
        print(f"trackhouse: {exc}", file=sys.stderr)
        return 1
    raise AssertionError(args.command)


def _auth(args: argparse.Namespace) -> int:
    path: Path = args.auth_file
    if args.action == "add-user":
        auth.add_user(path, args.name, _password(args.password_stdin), args.role)
        print(f"user {args.name!r} ({args.role}) saved in {path}")
    elif args.action == "add-token":
        token = auth.add_token(path, args.name, args.role)
        print(f"token for {args.name!r} ({args.role}), shown only now; clients set MLFLOW_TRACKING_TOKEN to it:")
        print(token)
    elif args.action == "remove":
        removed = auth.remove(path, args.name)
        print(f"removed {removed} entr{'y' if removed == 1 else 'ies'} named {args.name!r}")
        return 0 if removed else 1
    else:
        credentials = auth.Credentials.load(path)
        for name, entry in sorted(credentials.users.items()):
            print(f"user  {name}  {entry.role}")
        for token_id, entry in sorted(credentials.tokens.items()):
            print(f"token {entry.name}  {entry.role}  id={token_id}")
    return 0


def _add_store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("TRACKHOUSE_DATA_DIR", "data")), help="chDB directory"
    )
    parser.add_argument(
        "--clickhouse-url", default=os.environ.get("TRACKHOUSE_CLICKHOUSE_URL"), help="overrides --data-dir"
    )


class _BadStoreFlags(Exception):
    """The store flags name no store trackhouse can open (a bad URL or cluster name): one line, exit 2, as serve."""


def _store(args: argparse.Namespace, cluster: str = "") -> StoreConfig:
    try:
        return StoreConfig.from_flags(args.clickhouse_url, args.data_dir, cluster)
    except ValueError as exc:  # StoreConfig's messages redact the URL's password
        raise _BadStoreFlags(str(exc)) from None


class _StoreInUse(Exception):
    """An embedded store another process has open (chDB opens a directory in one process at a time)."""


def _open(store: StoreConfig) -> Client:
    try:
        return connect(store)
    except ProgrammingError:
        if store.embedded and _locked(store.directory):
            raise _StoreInUse(
                f"{store.display_url} cannot be opened: another process has it open (a running trackhouse serve?)"
            ) from None
        raise


def _locked(directory: Path) -> bool:
    """Whether a process holds the directory's status file, as chDB (ClickHouse's StatusFile) does while open."""
    try:
        with (directory / "status").open("rb") as status:  # read-only: a check must not create the file
            fcntl.flock(status, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(status, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def _rebuild(args: argparse.Namespace) -> int:
    """query.layout.rebuild on the store: exit 1 if it cannot run or found a writer, 2 without --writers-stopped."""
    store = _store(args)
    if not store.embedded and not args.writers_stopped:
        print(
            f"trackhouse: {store.display_url} is a ClickHouse server's store: stop every node that writes to it, then"
            " run this again with --writers-stopped (a write during a table's exchange would be lost)",
            file=sys.stderr,
        )
        return 2
    if store.embedded and not store.directory.is_dir():
        print(f"{store.display_url}: no data yet (serve creates the fine layout itself)")
        return 0
    client = _open(store)
    try:
        rebuilt = layout.rebuild(client, store.resolved_database)
    except layout.RebuildError as exc:
        print(f"trackhouse: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if rebuilt:
        print(f"{store.display_url}: rebuilt {', '.join(rebuilt)} with {layout.FINE_LAYOUT_TEXT}")
    else:
        print(f"{store.display_url}: nothing to rebuild")
    return 0


def _repair(args: argparse.Namespace) -> int:
    """schema.repair on the store; a store whose schema is behind this version is refused (exit 1)."""
    store = _store(args, args.cluster)
    if store.embedded and not store.directory.is_dir():
        print(f"{store.display_url}: no data yet, nothing to repair")
        return 0
    client = _open(store)
    try:
        repaired = schema.repair(client, store.resolved_database, store.cluster)
    except schema.OutdatedSchemaError as exc:
        print(f"trackhouse: {store.display_url}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(f"{store.display_url}: copied again into {', '.join(repaired)}")
    return 0


def _check(args: argparse.Namespace) -> int:
    """Files first (an embedded directory), then SQL; as `serve` does before it migrates or serves anything.

    Opening a chDB directory is chDB's own start-up: it moves parts it cannot load to `detached/`,
    which is how they are found. Nothing else is written, and no schema is created."""
    store = _store(args)
    redact = Redactor(url_secrets(store.url))
    where = store.display_url
    if store.embedded and not store.directory.is_dir():
        print(f"{where}: no data yet (a fresh schema is created on first start)")
        return 0
    findings = integrity.inspect_directory(store.directory) if store.embedded else []
    if not findings:
        client = _open(store)
        try:
            findings = integrity.inspect_store(client, store.resolved_database)
            if args.deep and not findings:
                findings = integrity.inspect_checksums(client, store.resolved_database)
            summary = _summary(client, store.resolved_database)
        finally:
            client.close()
    if findings:
        print(redact(integrity.report(findings, where)), file=sys.stderr)
        return 1
    print(f"{where}: healthy; {summary}")
    return 0


def _add_schema_command(commands: Any) -> None:
    printer = commands.add_parser(
        "schema", help="print the schema's DDL, every table and migration, for review before applying it (no server)"
    )
    printer.add_argument(
        "--cluster",
        default=os.environ.get("TRACKHOUSE_CLUSTER", ""),
        help="render it ON CLUSTER NAME, with Replicated and Distributed tables [env TRACKHOUSE_CLUSTER]",
    )
    printer.add_argument("--database", default=DEFAULT_DATABASE, help=f"database name (default {DEFAULT_DATABASE})")


def _schema(args: argparse.Namespace) -> int:
    """Every statement `serve` would run on a fresh store, in order, each migration followed by the row that records
    it, so that applying the output by hand leaves the store as `serve` would."""
    try:
        if not NAME.fullmatch(args.database):
            raise ClusterDdlError(f"database name {args.database!r} must be letters, digits and _")
        migrations = schema.schema_statements(args.database, args.cluster)
    except ClusterDdlError as exc:
        print(f"trackhouse: {exc}", file=sys.stderr)
        return 2
    for version, statements in migrations:
        print(f"-- {'database and migrations table' if version == 0 else f'migration {version}'}")
        for statement in [*statements, *([schema.record_sql(args.database, version)] if version else [])]:
            print(f"{_tidy(statement)};\n")
    return 0


def _tidy(statement: str) -> str:
    """A statement as written in schema.py, without the source's indentation."""
    first, _, rest = statement.strip().partition("\n")
    return first + ("\n" + textwrap.indent(textwrap.dedent(rest), "    ") if rest else "")


def _summary(client: Any, database: str) -> str:
    rows = client.query(
        "SELECT table, sum(rows) FROM system.parts WHERE database = {db:String} AND active GROUP BY table"
        " ORDER BY table",
        parameters={"db": database},
    ).result_rows
    return ", ".join(f"{table} {count} rows" for table, count in rows) or "no data yet"


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise auth.AuthFileError("the two passwords differ")
    return first
