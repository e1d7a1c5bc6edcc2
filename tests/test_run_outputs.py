"""A run's end and its outputs (issue 17, items 5, 9, 10, 11): a kill or a signal while the last outputs are
written loses nothing and changes nothing, a read-only --out is one line before any work, a refused dataset
ends the process cleanly, and a comparison of one step reports what it has.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from helpers import REPO, fit_command, run_tool, tmpfs

from gq.models import build_model
from gq.tools.training import cli
from gq.train.checkpoint import load_checkpoint

GRID, GRASPS = 16, 32
TINY = ["--base-channels", "2", "--fc-dims", "8", "--threads", "1", "--quiet", "-S", "2", "-G", "4"]


def invoke(*args) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="run.py")


def fit(shards: Path, out: Path, *args) -> Result:
    result = invoke("fit", "--shards", shards, "--out", out, *TINY, *args)
    assert result.exit_code == 0, (result.stderr, result.exception)
    return result


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def data(shared_dataset) -> Path:
    return shared_dataset(40, grid=GRID, grasps=GRASPS, seed=1, records_per_shard=8, val_fraction=0.2)


# -- item 5: a run is finished when its last checkpoint says so ---------------------------------------------------


@pytest.mark.parametrize(
    "flags,stopped",
    [
        (["--max-steps", 4], "max_steps"),
        (["--max-steps", 50, "--val-every", 1, "--early-stopping", 2, "--lr", 1], "early_stopping"),
    ],
    ids=["max-steps", "early-stopping"],
)
def test_a_kill_while_the_last_outputs_are_written_resumes_to_the_same_run(
    data: Path, tmp_path: Path, flags: list, stopped: str
) -> None:
    out = tmp_path / "run"
    fit(data, out, *flags)
    kept = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.jsonl")}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == stopped and load_checkpoint(out / "last.pt")["state"]["finished"] == stopped
    # kill -9 while summary.json and curves.png are written: neither is there (their writes are atomic)
    (out / "summary.json").unlink()
    (out / "curves.png").unlink()
    fit(data, out, *flags, "--resume")
    assert {name: (out / name).read_bytes() for name in kept} == kept, "nothing trained, validated or logged again"
    again = json.loads((out / "summary.json").read_text())
    assert again["steps_this_process"] == 0 and (out / "curves.png").exists()
    same = ("steps", "stopped", "best_val_mse", "best_step", "val_mse", "val_spearman")
    assert {k: again[k] for k in same} == {k: summary[k] for k in same}


def test_a_signal_while_the_last_outputs_are_written_waits_for_them(data: Path, tmp_path: Path) -> None:
    """SIGTERM sent to the process itself as curves.png is plotted: the run still ends whole, exit 0."""
    out = tmp_path / "run"
    script = (
        "import os, signal, sys, runpy\n"
        "import gq.train.recipe as recipe\n"
        "plot = recipe.plot_curves\n"
        "def plot_after_a_signal(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    plot(*args, **kwargs)\n"
        "recipe.plot_curves = plot_after_a_signal\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    cmd = [sys.executable, "-c", script, *fit_command(data, out, "--max-steps", 3, *TINY)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 3 and (out / "curves.png").exists()
    assert load_checkpoint(out / "last.pt")["state"]["finished"] == "max_steps"


# -- item 9: a refused dataset ends the process with its line, never an abort ----------------------------------------


@pytest.mark.slow  # 8 processes one after another, each importing torch
@pytest.mark.parametrize("command", ["eval", "predict"])
def test_a_dataset_failing_its_quick_verify_exits_with_one_line(data: Path, tmp_path: Path, command: str) -> None:
    """A Parquet reader thread used to release a Python buffer during interpreter shutdown: exit 134, "terminate
    called without an active exception", in about half the runs. Eight runs all end with the one line."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in data.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    with open(bad / "sdf-00000.npy", "r+b") as f:
        f.truncate(f.seek(0, 2) - 100)
    ckpt = tmp_path / "seed.pth"
    torch.save(build_model("small", input_size=GRID, base_channels=2, fc_dims=(8,)).state_dict(), ckpt)
    extra = ["--out", tmp_path / "p.parquet"] if command == "predict" else []
    cmd = [sys.executable, str(REPO / "train" / "run.py"), command, str(ckpt), "--shards", str(bad), *map(str, extra)]

    for _ in range(8):  # one after another: side by side, on a busy machine, the race is rarely lost
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr[-500:]
        assert "not a usable dataset: sdf-00000.npy" in one_line(result.stderr)


# -- item 10: a read-only --out is one line, exit 1, before any work ----------------------------------------------


@pytest.fixture
def read_only(tmp_path: Path):
    """A folder on a read-only file system (a tmpfs mounted read-only; root can write through chmod)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    with tmpfs(folder, "ro,size=1m", skip="cannot mount a read-only file system here"):
        yield folder


@pytest.mark.parametrize("command", ["fit", "compare", "predict", "import_meshes"])
def test_out_on_a_read_only_file_system_is_one_line(data: Path, tmp_path: Path, read_only: Path, command: str) -> None:
    target = read_only / ("p.parquet" if command == "predict" else "out")
    if command == "import_meshes":
        trimesh = pytest.importorskip("trimesh")  # the meshes extra
        (tmp_path / "raw" / "box").mkdir(parents=True)  # a good mesh: only the place to write is wrong
        trimesh.creation.box(extents=(1.0, 0.6, 0.8)).export(tmp_path / "raw" / "box" / "mesh.obj")
        result = run_tool("import_meshes.py", tmp_path / "raw", "--out", target, "--label", "synth")
        code, stderr = result.returncode, result.stderr
    else:
        ckpt = tmp_path / "seed.pth"
        torch.save(build_model("small", input_size=GRID, base_channels=2, fc_dims=(8,)).state_dict(), ckpt)
        args = {
            "fit": ["fit", "--shards", data, *TINY],
            "compare": ["compare", "--shards", data, "--max-steps", 1, *TINY],
            "predict": ["predict", ckpt, "--shards", data, "--split", "val"],
        }[command]
        result = invoke(*args, "--out", target)
        code, stderr = result.exit_code, result.stderr
    assert code == 1, stderr
    line = one_line(stderr)
    assert f"error: --out {target}: nothing can be written in {read_only} (Read-only file system)" in line


# -- item 11: compare of one step ---------------------------------------------------------------------------------


@pytest.mark.slow  # two fits, each in a spawned process
def test_compare_of_one_step_reports_no_rate_instead_of_crashing(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    result = invoke("compare", "--shards", data, "--out", out, "--max-steps", 1, *TINY)
    assert result.exit_code == 0, (result.stderr, result.exception)
    runs = json.loads((out / "compare.json").read_text())["runs"]
    assert [runs[name]["samples_per_s"] for name in ("cache", "dali")] == [None, None]
    assert (out / "compare.png").stat().st_size > 0
    assert [line.split()[2:4] for line in result.stdout.splitlines()[1:3]] == [["-", "-"], ["-", "-"]]
