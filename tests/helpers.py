"""Shared test helpers: small scene directories in the seed's layout, datasets, and running the tools.

Imported by the tests as `from helpers import ...`; tests/conftest.py keeps only fixtures."""

from __future__ import annotations

import contextlib
import importlib
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import click
import numpy as np
import pytest
from click.testing import CliRunner

from gq.shards import BuildOptions, build_shards
from gq.synth import write_scenes

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"  # the seed's checkpoints, kept in the repository
_run_process = subprocess.run  # run_tool's `subprocess` flag shadows the module there


def write_scene(root: Path, name: str, **arrays) -> Path:
    """Write `root/name/scene.npz` the way the seed does (np.savez, uncompressed)."""
    (root / name).mkdir(parents=True, exist_ok=True)
    path = root / name / "scene.npz"
    np.savez(path, **arrays)
    return path


def random_scene(rng: np.random.Generator, grid: int, num_grasps: int) -> dict:
    """A smooth SDF (a sphere at a random centre) with random grasps and scores in seed ranges."""
    axis = np.float32(-1) + np.arange(grid, dtype=np.float32) * np.float32(2 / grid)  # the seed's grid
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    c = rng.uniform(-0.3, 0.3, 3)
    sdf = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) - rng.uniform(0.3, 0.6)
    grasps = rng.uniform(-1, 1, (num_grasps, 19)).astype(np.float32)
    scores = rng.gamma(1.0, 5.0, num_grasps).astype(np.float32) - 1.0
    return {
        "sdf": sdf.astype(np.float32),
        "grasps": grasps,
        "scores": scores,
        "translation": rng.normal(size=3).astype(np.float32),
        "global_scale": np.float32(rng.uniform(0.5, 2)),
    }


def make_source(root: Path, scenes: int, grid: int = 16, grasps: tuple[int, int] = (3, 24), seed: int = 0) -> Path:
    """A processed directory with `scenes` random scenes named scene_000, scene_001, ..."""
    rng = np.random.default_rng(seed)
    for i in range(scenes):
        write_scene(root, f"scene_{i:03d}", **random_scene(rng, grid, int(rng.integers(grasps[0], grasps[1] + 1))))
    return root


def make_dataset(
    root: Path, scenes: int, *, grid: int, grasps: int | tuple[int, int], seed: int, scene_workers: int = 1, **options
) -> Path:
    """Scenes in root/scenes built into root/shards (returned); `options` go to BuildOptions. `grasps` G: generated
    scenes (gq.synth) of exactly G grasps; a pair (lo, hi): random scenes of lo to hi grasps (make_source, the
    seed's short scenes), built with max_grasps hi. Tests that only read a dataset take conftest's shared_dataset.
    """
    if isinstance(grasps, tuple):
        make_source(root / "scenes", scenes, grid=grid, grasps=grasps, seed=seed)
    else:
        write_scenes(root / "scenes", scenes, grasps_per_scene=grasps, grid=grid, seed=seed, workers=scene_workers,
                     progress=False)  # fmt: skip
    build = BuildOptions(grid=grid, max_grasps=grasps[1] if isinstance(grasps, tuple) else grasps, **options)
    build_shards(root / "scenes", root / "shards", build, workers=1, progress=False)
    return root / "shards"


def fit_command(shards: Path, out: Path, *flags) -> list[str]:
    """`train/run.py fit --shards SHARDS --out OUT FLAGS...`: a fit process's arguments after the interpreter."""
    return [str(REPO / "train" / "run.py"), "fit", "--shards", str(shards), "--out", str(out), *map(str, flags)]


def torchrun(ranks: int, *launcher: str) -> list[str]:
    """The interpreter's arguments that start `ranks` processes per node under torchrun: `launcher` options
    (multi-node rendezvous, --max-restarts), or a standalone rendezvous on a free local port by default."""
    nodes = list(launcher) if any(a.startswith("--rdzv") for a in launcher) else ["--standalone", *launcher]
    return ["-m", "torch.distributed.run", *nodes, "--nproc-per-node", str(ranks)]


def fit_process(
    shards: Path, out: Path, *flags, ranks: int = 1, launcher: tuple[str, ...] = (), timeout: float
) -> subprocess.CompletedProcess:
    """fit_command run as its own process (ranks=1) or as `ranks` processes under torchrun (with `launcher`
    options), capturing text output."""
    cmd = [
        sys.executable,
        *(torchrun(ranks, *launcher) if ranks > 1 or launcher else []),
        *fit_command(shards, out, *flags),
    ]
    return _run_process(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def script_path(script: str) -> Path:
    """Where a command's script lives: tools/ (data tools) or benchmarks/ (bench_*, the GPU check)."""
    return REPO / ("benchmarks" if script.startswith(("bench_", "gpu_check")) else "tools") / script


def load_tool(script: str) -> ModuleType:
    """The module of tools/<script> or benchmarks/<script>; its click command is `main` (or `cli`)."""
    folder = script_path(script).parent.name
    return importlib.import_module(f"gq.{folder}.{Path(script).stem}")


class _CurrentStderr(logging.Handler):
    """Log records to whatever sys.stderr is when they are emitted: CliRunner's stream during invoke.

    A handler set up earlier (logging.basicConfig) keeps the stream it was given, so without this the
    records a script prints on its stderr would not reach result.stderr in-process.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # as logging.StreamHandler: a record never breaks the command
            self.handleError(record)


def invoke(command: click.Command, *args, name: str, log_level: int = logging.WARNING) -> subprocess.CompletedProcess:
    """Run a click command in this process as its script would run: exit code, stdout and stderr apart.

    Log records at log_level and above go to the command's stderr with the scripts' "%(message)s" format
    (train/run.py configures INFO; the tools leave Python's WARNING default). torch's thread count, which
    --threads sets process-wide, is restored afterwards. An exception other than an exit is raised here,
    where a script would have printed a traceback.
    """
    root = logging.getLogger()
    handler = _CurrentStderr(log_level)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved_level = root.level
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch else None
    root.addHandler(handler)
    root.setLevel(min(saved_level, log_level))
    try:
        out = CliRunner().invoke(command, [str(a) for a in args], prog_name=name)
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)
        torch = sys.modules.get("torch")
        if torch and threads and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    if out.exception is not None and not isinstance(out.exception, SystemExit):
        raise out.exception
    return subprocess.CompletedProcess([name, *map(str, args)], out.exit_code, out.stdout, out.stderr)


def run_tool(
    script: str, *args, check: bool = False, subprocess: bool = False, **kwargs
) -> subprocess.CompletedProcess:
    """`python tools/<script> args...` (benchmarks/ for bench_*) from the repository root, capturing text output.

    By default in this process through click's CliRunner (no 2-4 s of interpreter, torch and DALI start-up
    per call); subprocess=True runs the script itself, for what depends on being a separate process (a
    spawned pool that imports the script by name, signals, a lock held by another process). kwargs go to
    subprocess.run and need subprocess=True.
    """
    if kwargs and not subprocess:
        raise TypeError(f"run_tool: {sorted(kwargs)} apply to a subprocess: pass subprocess=True")
    if subprocess:
        cmd = [sys.executable, str(script_path(script)), *map(str, args)]
        result = _run_process(cmd, cwd=REPO, capture_output=True, text=True, **kwargs)
    else:
        module = load_tool(script)
        result = invoke(getattr(module, "main", None) or module.cli, *args, name=script)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under root (relative name -> bytes), for byte-identity checks."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def tmpfs(folder: Path, options: str, *, skip: str) -> Iterator[Path]:
    """A tmpfs mounted on `folder` with `options` (e.g. "ro,size=1m") for the block; the test is skipped,
    `skip` and the reason saying so, where none can be mounted (no mount command, not root)."""
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        why = mounted.stderr.decode().strip() if mounted.returncode else None
    except OSError as err:  # no mount command at all
        why = str(err)
    if why is not None:
        pytest.skip(f"{skip} ({why})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


# Runs a module as `python -m` would, with the named packages unimportable, as on a plain install.
WITHOUT_MODULES = """
import runpy, sys
blocked = set(sys.argv[1].split(","))
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Missing())
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def without_modules(modules: tuple[str, ...], module: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m module args...` with `modules` unimportable."""
    cmd = [sys.executable, "-c", WITHOUT_MODULES, ",".join(modules), module, *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
