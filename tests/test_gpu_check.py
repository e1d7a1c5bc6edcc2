"""The GPU check's CPU run (`benchmarks/gpu_check.sh OUT --device cpu --quick`) end to end, so it cannot rot.

The run also installs staged wheel pieces the way the GPU machine does: here a small wheel built on
the spot, split into pieces, reassembled, checked and installed into a private --target folder.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def check(out: Path, *args, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), str(out), *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable, **(env or {})},
        timeout=timeout,
    )


def write_wheel(path: Path) -> None:
    """A minimal real wheel (one module, METADATA, WHEEL, RECORD) that pip installs."""
    files = {
        "gqcheckprobe/__init__.py": b"VALUE = 42\n",
        "gqcheckprobe-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: gqcheckprobe\nVersion: 1.0\n",
        "gqcheckprobe-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = [
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
        for name, data in files.items()
    ]
    record.append("gqcheckprobe-1.0.dist-info/RECORD,,")
    files["gqcheckprobe-1.0.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)


def staged_pieces(root: Path, piece_bytes: int = 4096) -> Path:
    """A real wheel tarred, split and summed the way benchmarks/stage_wheels.sh does."""
    (root / "wheels").mkdir(parents=True)
    write_wheel(root / "wheels" / "gqcheckprobe-1.0-py3-none-any.whl")
    tar = root / "dali-wheels.tar"
    subprocess.run(["tar", "-cf", str(tar), "-C", str(root / "wheels"), "."], check=True)
    pieces = root / "pieces"
    pieces.mkdir()
    data = tar.read_bytes()
    lines = []
    for i in range(0, len(data), piece_bytes):
        name = f"dali-wheels.tar.{i // piece_bytes:02d}"
        (pieces / name).write_bytes(data[i : i + piece_bytes])
        lines.append(f"{hashlib.sha256(data[i : i + piece_bytes]).hexdigest()}  {name}")
    lines.append(f"{hashlib.sha256(data).hexdigest()}  dali-wheels.tar")
    (pieces / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return pieces


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run of the check; a GPU machine runs it with cuda")
@pytest.mark.slow  # the whole check on CPU: over a minute
def test_quick_cpu_run_writes_every_figure_and_skips_what_does_not_fit(tmp_path: Path) -> None:
    pieces = staged_pieces(tmp_path / "stage")
    site = tmp_path / "site"
    out = tmp_path / "check"
    # The compile steps' CPU estimates (~304 s each) exceed this budget, so the budget logic must skip them.
    result = check(
        out, "--device", "cpu", "--quick", "--budget-s", 300, "--wheels", pieces, env={"GQ_DALI_SITE": str(site)}
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (site / "gqcheckprobe" / "__init__.py").read_text() == "VALUE = 42\n"
    summary = json.loads((out / "summary.json").read_text())
    n_pieces = len(list(pieces.glob("dali-wheels.tar.*")))
    assert n_pieces >= 2 and summary["dali_install"].startswith(f"installed from {n_pieces} pieces into {site}")
    status = {s["name"]: s for s in summary["steps"]}
    compile_steps = ["bench_train_compile_large", "bench_train_compile_small"]
    assert list(status) == [
        "make_scenes",
        "make_shards",
        "verify_shards",
        "cuda_tests",
        "warp_sdf",
        "bench_loaders",
        "bench_train",
        "compare",
        *compile_steps,
    ]
    ran = [n for n in list(status)[:-2] if n != "warp_sdf"]
    assert all(status[n]["status"] == "passed" for n in ran), status
    assert status["warp_sdf"]["status"] == "skipped" and "times Warp on CUDA" in status["warp_sdf"]["reason"]
    for name in compile_steps:
        assert status[name]["status"] == "skipped" and status[name]["reason"].startswith("would need ~")
    assert all(s["estimate_s"] > 0 for s in summary["steps"])

    env, fig = summary["environment"], summary["figures"]
    assert env["device"] == "cpu" and env["versions"]["torch"] == torch.__version__ and env["dali"]["version"]
    tests = fig["cuda_tests"]
    assert len(tests) >= 7 and all(t["outcome"] == "skipped" and "CUDA" in t["reason"] for t in tests)
    assert {r["loader"] for r in fig["bench_loaders"]} == {"cache", "dali"}
    assert len(fig["bench_train"]["throughput"]) == 8 and all(
        r["samples_per_s"] > 0 for r in fig["bench_train"]["throughput"]
    )
    assert fig["compare"]["loss_curves_identical"] is True
    assert summary["train_scenes"] > 0 and not (out / "data").exists() and not list(out.rglob("*.pt"))
    targets = {t["target"]: t for t in summary["targets"]}
    assert targets["cache S=8 G=16 batches delivered"]["value"] > 0
    assert all(t["met"] is None for t in summary["targets"])  # a CPU run measures, but judges nothing

    md = (out / "summary.md").read_text()
    for heading in (
        "## Steps",
        "## CUDA tests",
        "## Loaders",
        "## Training",
        "## compare",
        "## Scale-out",
        "## Targets",
    ):
        assert heading in md
    assert "NCCL multi-GPU: not measured (no GPU on this machine)" in md
    assert "| bench_train_compile_large |" in md and "would need ~" in md
    for name in ran:
        assert (out / status[name]["log"]).stat().st_size > 0


def test_missing_pieces_non_empty_outdir_and_absent_cuda_are_refused(tmp_path: Path) -> None:
    pieces = staged_pieces(tmp_path / "stage")
    first = sorted(pieces.glob("dali-wheels.tar.*"))[0]
    first.unlink()
    out = tmp_path / "check"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = check(out, "--device", "cpu", "--quick", "--wheels", pieces, env={"GQ_DALI_SITE": str(tmp_path / "s")})
    assert result.returncode == 2 and f"{out} exists and is not empty" in result.stderr
    assert f"not installed: {len(list(pieces.glob('dali-wheels.tar.*')))} of" in result.stdout
    assert f"(missing {first.name})" in result.stdout and not (tmp_path / "s").exists()
    # --overwrite empties only a folder of earlier check outputs: someone else's file is refused, and kept
    result = check(out, "--device", "cpu", "--quick", "--overwrite", "--wheels", tmp_path / "none")
    assert result.returncode == 2 and "holds 'keep.txt' and no .gq-owned.json says gpu_check wrote it" in result.stderr
    assert (out / "keep.txt").read_text() == "x"
    if not torch.cuda.is_available():
        result = check(tmp_path / "other", "--device", "cuda", "--wheels", tmp_path / "none")
        assert result.returncode == 1 and "sees no CUDA device" in result.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "other").exists()


def test_help() -> None:
    result = subprocess.run(
        ["bash", str(SCRIPT), "--help"], capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable}
    )
    assert result.returncode == 0 and "--budget-s" in result.stdout and "--wheels" in result.stdout
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "stage_wheels.sh"), "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "--piece-mib" in result.stdout


def test_the_torchrun_step_uses_every_gpu_and_one_gpu_leaves_nccl_unmeasured(tmp_path: Path) -> None:
    from gq.benchmarks.gpu_check import QUICK, plan_steps, scale_out_line

    for gpus in (1, 4):
        (step,) = [s for s in plan_steps(tmp_path, "cuda", QUICK, True, 1, True, gpus) if s.name == "torchrun"]
        assert step.cmd[step.cmd.index("--nproc-per-node") + 1] == str(gpus) and "cuda" in step.cmd
        assert ("(NCCL)" in step.what) == (gpus > 1)
    assert not [s for s in plan_steps(tmp_path, "cpu", QUICK, True, 1, True, 0) if s.name == "torchrun"]
    run = {"world_size": 1, "samples_per_s": 1234.0}
    one = scale_out_line({"device": "cuda", "gpus": 1}, run=run)
    assert one.endswith("NCCL multi-GPU: not measured (one GPU on this machine)") and "1,234 samples/s" in one
    assert scale_out_line({"device": "cuda", "gpus": 2}, run={**run, "world_size": 2}).endswith("measured on 2 GPUs")


def test_the_warp_step_runs_on_cuda_where_warp_and_the_meshes_extra_are(tmp_path: Path) -> None:
    from gq.benchmarks.gpu_check import QUICK, WARP_STEP_MODULES, plan_steps

    def warp_step(device: str, **missing: bool):
        optional = {name: not missing.get(name) for name in WARP_STEP_MODULES}
        (step,) = [s for s in plan_steps(tmp_path, device, QUICK, True, 1, True, 1, optional) if s.name == "warp_sdf"]
        return step

    step = warp_step("cuda")
    assert step.skip is None and step.cmd[1] == "benchmarks/bench_import.py" and "warp" in step.cmd
    assert "no CUDA device" in warp_step("cpu").skip
    assert warp_step("cuda", warp=True).skip == "warp not importable here: pip install 'gq-pipeline[warp,meshes]'"
