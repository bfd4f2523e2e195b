"""`trackhouse replay DIR`: send what clients left in a spool directory. Needs only `pip install trackhouse`.

The launcher runs it before it imports the server's modules, so it works in a training image without them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trackhouse.ingest.client import Client
from trackhouse.ingest.errors import IngestError

TARGET_ENV = "TRACKHOUSE_TARGET"
_HELP = "send what clients left in a spool directory (their TRACKHOUSE_SPOOL_DIR) to a server"


def add_replay_command(commands: Any) -> None:
    _arguments(commands.add_parser("replay", help=_HELP, description=_HELP))


def _arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("directory", type=Path, help="the spool directory (as given to the clients)")
    parser.add_argument(
        "--target",
        default=os.environ.get(TARGET_ENV, "127.0.0.1:50051"),
        help=f"host:port or grpcs://host:port; credentials from MLFLOW_TRACKING_TOKEN etc. [env {TARGET_ENV}]",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for acknowledgements")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_replay(_arguments(argparse.ArgumentParser(prog="trackhouse replay", description=_HELP)).parse_args(argv))


def run_replay(args: argparse.Namespace) -> int:
    directory: Path = args.directory
    if not directory.is_dir():
        print(f"trackhouse replay: {directory} is not a directory", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="trackhouse replay: %(message)s")
    client = Client(args.target, spool_dir=directory)
    found = client.stats()
    try:
        client.flush(args.timeout)
    except (TimeoutError, IngestError) as exc:
        client.close(timeout=0)
        print(f"trackhouse replay: {exc}", file=sys.stderr)
        return 1
    client.close()
    done = client.stats()
    left = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    print(
        f"replayed {found.spooled_requests} requests ({done.acknowledged_points} points) from {directory}"
        f" to {args.target}" + (f"; {len(left)} spool directories held by live clients left alone" if left else "")
    )
    return 0
