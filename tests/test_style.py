"""The tree keeps one style: ruff's lint rules and formatter (configured in pyproject.toml) pass."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO


def _ruff() -> str:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if exe is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    return exe


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff_is_clean(args: list[str]) -> None:
    result = subprocess.run([_ruff(), *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f"ruff {' '.join(args)} (fix: ruff check --fix . && ruff format .):\n{result.stdout}"
