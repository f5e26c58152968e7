"""mypy over the package with the checkout's [tool.mypy] settings (pyproject.toml): no errors, so a change that
breaks the annotations users' type checkers read (regrad ships py.typed) fails here, not in their CI."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]  # the checkout: tests/test_mypy.py


def _mypy_version() -> str:
    return subprocess.run([sys.executable, "-m", "mypy", "--version"], capture_output=True, text=True).stdout.strip()


@pytest.mark.slow  # 30-40 s with a cold cache (mypy reads torch's and numpy's annotations), 1-2 s warm
def test_mypy_reports_no_errors() -> None:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (requirements/dev.txt pins it)")
    if not (ROOT / "pyproject.toml").is_file() or not (ROOT / "src" / "python" / "regrad").is_dir():
        pytest.skip("not run from a checkout (no pyproject.toml / src/python/regrad)")
    # the files and options come from pyproject.toml; the cache (.mypy_cache/, git-ignored) keeps reruns fast
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(ROOT / ".mypy_cache"), "--no-color-output"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, f"{_mypy_version()} found errors:\n{out.stdout}{out.stderr}"
