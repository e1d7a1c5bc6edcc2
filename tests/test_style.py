"""The tree keeps one style: ruff's lint rules and formatter (configured in pyproject.toml) pass."""

from __future__ import annotations

import ast
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


# The packages (not benchmarks, whose sizes are the experiment's own): each grasp count has one definition.
PACKAGES = ("common", "shards", "synth", "meshes", "models", "pipeline", "train", "tools")


def grasp_counts(root: Path) -> list[str]:
    """'file:line' of each definition of GRASP_DIM and each literal 480 (the seed's grasps per scene) under root."""
    found = []
    for path in sorted(p for folder in PACKAGES for p in (root / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            defines = any(isinstance(t, ast.Name) and t.id == "GRASP_DIM" for t in targets)
            if defines or (isinstance(node, ast.Constant) and type(node.value) is int and node.value == 480):
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_each_grasp_count_has_one_definition() -> None:
    assert [where.split(":")[0] for where in grasp_counts(REPO)] == ["common/grasps.py"] * 2  # GRASP_DIM, 480


BUILDERS = {"make_dataset", "make_source", "write_scenes", "build_shards"}


def _shared_fixtures_that_build(path: Path) -> list[str]:
    """Module- or session-scoped fixtures of a test file that build scenes or datasets themselves."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.FunctionDef):
            continue
        decorators = [d for d in node.decorator_list if isinstance(d, ast.Call)]
        scopes = [getattr(k.value, "value", None) for d in decorators for k in d.keywords if k.arg == "scope"]
        calls = {
            getattr(c.func, "id", getattr(c.func, "attr", None)) for c in ast.walk(node) if isinstance(c, ast.Call)
        }
        if {"module", "session"} & set(scopes) and calls & BUILDERS:
            found.append(f"{path.name}::{node.name}")
    return found


def test_tests_share_one_dataset_factory_and_one_tmpfs_helper() -> None:
    tests = sorted((REPO / "tests").glob("test_*.py"))
    building = [f for path in tests for f in _shared_fixtures_that_build(path)]
    # conftest's shared_dataset builds the shared ones; predict's own has scenes cut shorter than the others, and
    # look's has defects put into its scenes (a copied object, an empty SDF, shuffled scores)
    assert building == ["test_look.py::defects", "test_predict.py::trained"], building
    others = [p for p in tests if p.name != "test_style.py"]  # this file names the commands it looks for
    mounting = [p.name for p in others if '"mount"' in p.read_text() or '"umount"' in p.read_text()]
    assert mounting == [], f"mount through helpers.tmpfs: {mounting}"


# Every folder that installs as a gq package (setup.cfg's package_dir).
GQ_FOLDERS = (*PACKAGES, "benchmarks")


def _imports(path: Path, module: str) -> set[str]:
    """The gq modules `module` (at `path`) imports anywhere in its code, function bodies included; imports
    for type checkers only (`if TYPE_CHECKING:`) and of its own package's __init__ are left out."""
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(p for p in (base, node.module) if p)
            found |= {f"{target}.{alias.name}" for alias in node.names} | {target}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name.startswith("gq.") and name != package}


def test_train_is_a_library_and_no_gq_modules_import_each_other_in_a_cycle() -> None:
    """click lives in tools/ (and the benchmarks' commands): train/ is a library, and train/run.py a thin
    entry point. Module imports form no cycle (config -> checkpoint -> rundir -> config was one)."""
    modules = {
        f"gq.{folder}" + ("" if path.stem == "__init__" else f".{path.stem}"): path
        for folder in GQ_FOLDERS
        for path in (REPO / folder).glob("*.py")
    }
    clicky = [p.name for p in (REPO / "train").glob("*.py") if "click" in _imports_of_anything(p)]
    assert clicky == [], f"click in train/: {clicky}"
    graph = {name: _imports(path, name) & modules.keys() for name, path in modules.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and not seen.add(n) and reaches(n, goal, seen)) for n in graph[start])

    cycles = sorted(name for name in graph if reaches(name, name, set()))
    assert cycles == [], f"modules in an import cycle: {cycles}"


def _imports_of_anything(path: Path) -> set[str]:
    """Top-level names of every module `path` imports."""
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    return {name.partition(".")[0] for name in names}
