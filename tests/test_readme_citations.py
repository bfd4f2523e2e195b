"""Every file the README cites, result files above all, is in the repository: a figure must trace to its source."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
#: Backticked repository paths with a file extension, e.g. `benchmarks/reports/ingest-...json`, `query/search.py`;
#: templates such as `compat-<time>-<commit>.json` name no file and are skipped.
CITED = sorted(
    {m for m in re.findall(r"`([\w.\-]+(?:/[\w.\-]+)+\.[a-z]+)`", README) if not m.startswith(("http", "/"))}
)
REPORTS = [path for path in CITED if path.startswith("benchmarks/")]


def test_the_readme_cites_result_files() -> None:
    """Guards the pattern below: if it stopped matching, every other check would pass on nothing."""
    assert any(p.startswith("benchmarks/reports/") and p.endswith(".json") for p in CITED), CITED
    assert "benchmarks/reports/2026-11-23-full-2.md" in CITED


@pytest.mark.parametrize("path", CITED)
def test_every_file_the_readme_cites_exists(path: str) -> None:
    assert (ROOT / path).is_file(), f"README cites {path}, which is not in the repository"


@pytest.mark.parametrize("path", REPORTS)
def test_cited_results_are_committed_not_ignored(path: str) -> None:
    assert not path.startswith("benchmarks/results/"), f"{path}: benchmarks/results/ is not committed"
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False)
    assert ignored.returncode == 1, f"{path} is ignored by git, so it cannot be committed"
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", path], cwd=ROOT, capture_output=True, check=False)
    assert tracked.returncode == 0, f"{path} is cited by the README but not committed"
