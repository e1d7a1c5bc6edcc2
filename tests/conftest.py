"""Fixtures shared by the tests; helper functions live in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_source


@pytest.fixture
def small_source(tmp_path: Path) -> Path:
    return make_source(tmp_path / "src", scenes=11)
