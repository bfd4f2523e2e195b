"""The `trackhouse` command. `pip install trackhouse` is the client alone, so the server's own modules may be
missing: that gets one line naming the extra to install, never an ImportError traceback."""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:2] == ["replay"]:  # the client's own command: runs without the server's modules
        from trackhouse.replay import main as replay

        sys.exit(replay(sys.argv[2:]))
    try:
        from trackhouse.cli import main as cli_main
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] == "trackhouse":
            raise  # our own module missing is a bug, not an install choice
        sys.exit(f"trackhouse: the server needs its extra: pip install 'trackhouse[server]' (missing: {exc.name})")
    cli_main()
