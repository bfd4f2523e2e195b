"""The committed generated code must match proto/: regenerate and compare."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_current(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "trackhouse" / "v1").iterdir())
    committed = sorted(p.relative_to(ROOT) for p in (ROOT / "trackhouse" / "v1").glob("*_pb2*"))
    assert generated == committed, "run `make proto` and commit the result"
    for path in generated:
        assert (tmp_path / path).read_text() == (ROOT / path).read_text(), f"{path} is stale: run `make proto`"
