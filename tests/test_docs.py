"""The documentation site builds strictly (a broken link, anchor or API reference fails), and its generated
pages cover every `gq` command and the public API."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from gq.tools.cli import COMMANDS

needs_mkdocs = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None,
    reason="mkdocs is not installed (the docs extra: pip install -e .[docs])",
)
API = ("gq.pipeline.open_dataset", "gq.pipeline.open_loader", "gq.pipeline.open_mixture",
       "gq.shards.build_shards", "gq.shards.ShardWriter", "gq.shards.merge_parts", "gq.shards.part_of",
       "gq.shards.ShardReader", "gq.train.fit", "gq.train.FitRecipe", "gq.train.predict.Estimator")  # fmt: skip


def command_anchors(specs: dict, prefix: str = "gq") -> list[str]:
    """The reference page's heading ids of every command under `specs`: gq-shards-build, gq-fit, ..."""
    anchors = []
    for name, spec in specs.items():
        if name.startswith("_"):
            continue
        anchors.append(f"{prefix}-{name}")
        if isinstance(spec, dict):
            anchors += command_anchors(spec, f"{prefix}-{name}")
    return anchors


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow  # imports every command and renders the theme: ~20 s
@needs_mkdocs
def test_the_reference_shows_every_command_with_its_options(site: Path) -> None:
    page = (site / "reference" / "index.html").read_text()
    missing = [a for a in command_anchors(COMMANDS) if f'id="{a}"' not in page]
    assert not missing, f"commands missing from the reference: {missing}"
    assert "--max-time" in page and "--grasps-per-scene" in page and "--records-per-shard" in page


@pytest.mark.slow
@needs_mkdocs
def test_the_api_page_shows_each_public_function_with_its_sections(site: Path) -> None:
    page = (site / "api" / "index.html").read_text()
    for name in API:
        assert f'id="{name}"' in page, name
    for section in ("Parameters:", "Returns:", "Raises:", "Example"):
        assert page.count(section) >= 4, section


# A script run as a command (`python train/run.py`, `torchrun ... tools/x.py`); naming a module's file is not one.
SCRIPT_RUN = re.compile(r"(python3?|torchrun\b.*) (train|tools)/\w+\.py")


def test_the_docs_name_gq_commands_and_the_scripts_only_where_they_are_the_point() -> None:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    runs = [
        f"{p.name}: {line.strip()}" for p in pages for line in p.read_text().splitlines() if SCRIPT_RUN.search(line)
    ]
    # the reference's one sentence that the seed's scripts remain entry points; torchrun, which takes a script path
    assert [r.split(":")[0] for r in runs] == ["reference.md", "scale-out.md"], runs


def test_the_readme_says_how_to_install_from_a_clone_and_into_an_existing_cuda_environment() -> None:
    install = (REPO / "README.md").read_text().split("## Install")[1].split("\n## ")[0]
    assert "not on a package index" in install and "git clone" in install
    assert "pip install -e '.[meshes]'" in install and "torch must not be in that list" in install


def test_the_simulator_loop_of_the_writing_page_runs_and_writes_a_dataset(tmp_path: Path) -> None:
    """docs/writing.md's first example, as printed but for fewer objects, in a folder of its own."""
    text = (REPO / "docs" / "writing.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "range(1000)" in code
    run = subprocess.run(
        [sys.executable, "-c", code.replace("range(1000)", "range(12)")], cwd=tmp_path, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[:3] == ["12", "scenes", "in"]
    verify = subprocess.run(
        [sys.executable, "-m", "gq.tools.cli", "shards", "verify", "data/shards"], cwd=tmp_path, capture_output=True
    )
    assert verify.returncode == 0, verify.stderr[-2000:]
