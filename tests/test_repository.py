"""Repository hygiene: no large files tracked, and the linter, formatter and type checker
configured in pyproject.toml pass (each skipped where the tool is not installed)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_BYTES = 1_000_000  # a model, wheel or data set belongs in a release or a cache, not in git


def _tracked_files() -> list[Path]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.decode(errors='replace').strip()}")
    return [ROOT / name for name in listed.stdout.decode().split("\0") if name]


def test_no_tracked_file_over_1_mb():
    files = _tracked_files()
    assert files, "git ls-files listed nothing"
    large = {
        f.relative_to(ROOT).as_posix(): f.stat().st_size
        for f in files
        if f.is_file() and not f.is_symlink() and f.stat().st_size > MAX_BYTES
    }
    assert not large, "tracked files over 1,000,000 bytes: " + ", ".join(
        f"{name} ({size:,} bytes)" for name, size in sorted(large.items())
    )


CHECKS = [
    pytest.param(["ruff", "check", "."], id="ruff-check"),
    pytest.param(["ruff", "format", "--check", "."], id="ruff-format"),
    pytest.param(["mypy"], id="mypy"),
]


@pytest.mark.parametrize("command", CHECKS)
def test_tool_passes(command: list[str]):
    tool = command[0]
    if importlib.util.find_spec(tool) is None:
        pytest.skip(f"{tool} is not installed (pip install -e '.[test]')")
    run = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, check=False)
    assert run.returncode == 0, f"{' '.join(command)} failed:\n{run.stdout}{run.stderr}"
