#!/usr/bin/env python
"""The GPU check: every CUDA path of the project tested and measured in one command, within a time budget.

Run it through benchmarks/gpu_check.sh (which installs staged DALI wheels first). Steps, each a run of the
project's own tools in a subprocess: make a dataset, build and verify shards, the CUDA-marked tests,
mesh-to-SDF with Warp on CUDA (against mesh2sdf on the CPU; where warp and the meshes extra are installed),
bench_loaders, bench_train (bf16 + channels-last on CUDA; then torch.compile) and a short compare; with
CUDA, last, fit under torchrun on every GPU of the machine (NCCL from two GPUs on; one GPU allows one rank,
and the summary names NCCL multi-GPU as not measured). Every step has an estimated cost; a step that would
not fit in what is left of --budget-s is skipped, saying so, and a running step is stopped when the budget
runs out. OUTDIR gets each step's log and JSON, summary.json (every figure, the card, the versions) and
summary.md (the same as tables).
"""

from __future__ import annotations

import configparser
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import click

from gq.common.files import write_atomically
from gq.common.ownership import OwnershipError, check_replaceable, remove_owned, write_record
from gq.shards import ShardReader

REPO = Path(__file__).resolve().parents[1]
SEED_SCENES = 15_547  # the seed dataset's scene count, for the start-up target


def required_modules() -> list[str]:
    """The project's install_requires (setup.cfg) as module names, DALI aside (it is staged), plus pytest."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    names = [re.split(r"[<>=!~ ;\[]", line.strip())[0] for line in cfg["options"]["install_requires"].splitlines()]
    modules = {"pyyaml": "yaml"}  # where a distribution's import name is not its own
    return [modules.get(n, n.replace("-", "_")) for n in names if n and not n.startswith("nvidia-dali")] + ["pytest"]


@dataclass(frozen=True)
class Sizes:
    """How big each step's work is: the full check, or --quick (tiny, for CI)."""

    scenes: int
    grid: int
    grasps: int
    loader_batches: int
    steps: int
    large_steps: int
    warmup: int
    compare_steps: int
    model_args: tuple[str, ...] = ()


FULL = Sizes(
    scenes=2000, grid=48, grasps=480, loader_batches=200, steps=50, large_steps=20, warmup=5, compare_steps=300
)
QUICK = Sizes(
    scenes=40,
    grid=16,
    grasps=64,
    loader_batches=3,
    steps=2,
    large_steps=1,
    warmup=1,
    compare_steps=4,
    model_args=("--base-channels", "2", "--fc-dims", "8"),
)


TOOL = "gpu_check"
# What the check writes into OUTDIR, its ownership record: logs/ whole; data/ holds make_scenes' scenes and
# make_shards' shards and compare/ and torchrun/ fit's runs, each judged by its own record.
ENTRIES = (
    "summary.md",
    "summary.json",
    "cuda_tests.xml",
    "logs/",
    "data/scenes",
    "data/shards",
    "compare",
    "torchrun",
    "warp_sdf.json",
    "bench_loaders.json",
    "bench_train.json",
    "bench_train_compile_large.json",
    "bench_train_compile_small.json",
)


# What the warp_sdf step imports beyond the project's requirements: Warp, and the meshes extra for pybullet's
# objects and mesh2sdf, the reference it is timed against.
WARP_STEP_MODULES = ("warp", "trimesh", "mesh2sdf", "pybullet_data")


def warp_step_skip(device: str, optional: dict[str, bool]) -> str | None:
    """Why the warp_sdf step cannot run here, or None."""
    if device != "cuda":
        return "times Warp on CUDA: no CUDA device in a --device cpu run (CPU figures: gq bench import --backends warp)"
    missing = [name for name in WARP_STEP_MODULES if not optional.get(name)]
    if missing:
        return f"{', '.join(missing)} not importable here: pip install 'gq-pipeline[warp,meshes]'"
    return None


@dataclass
class Step:
    """One subprocess of the check: what it runs, what it should cost, what it needs."""

    name: str
    what: str
    cmd: list[str]
    estimate_s: float
    needs: tuple[str, ...] = ()
    needs_dali: bool = False
    json: str | None = None
    fallback: list[str] | None = None  # the cache-only command, run if this one (using DALI) fails
    skip: str | None = None  # why it cannot run here, known when planned
    result: dict = field(default_factory=dict)


def probe_environment(device: str) -> dict:
    """The card, driver and versions, read in a child process so this one never holds the GPU."""
    code = r"""
import importlib, importlib.util, json, os, sys
out = {"python": sys.version.split()[0], "missing": [], "versions": {}}
out["optional"] = {name: importlib.util.find_spec(name) is not None for name in sys.argv[2].split(",")}
for name in sys.argv[1].split(","):
    try:
        module = importlib.import_module(name)
        out["versions"][name] = str(getattr(module, "__version__", getattr(module, "VERSION", "?")))
    except Exception as err:
        out["missing"].append(f"{name} ({type(err).__name__}: {err})")
import torch
out["torch_cuda"] = torch.version.cuda
out["cuda_available"] = torch.cuda.is_available()
if out["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    out["card"] = torch.cuda.get_device_name(0)
    out["gpus"] = torch.cuda.device_count()
    out["gpu_memory_bytes"] = p.total_memory
    out["capability"] = f"{p.major}.{p.minor}"
try:
    import nvidia.dali as dali
    from nvidia.dali import backend
    out["dali"] = {"version": dali.__version__, "path": os.path.dirname(dali.__file__),
                   "cuda_devices": backend.GetCUDADeviceCount()}
except Exception as err:
    out["dali"] = {"error": f"{type(err).__name__}: {err}"}
print(json.dumps(out))
"""
    res = subprocess.run(
        [sys.executable, "-c", code, ",".join(required_modules()), ",".join(WARP_STEP_MODULES)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if res.returncode != 0:
        raise click.ClickException(
            f"probing the environment with {sys.executable} failed: "
            f"{(res.stderr.strip().splitlines() or ['no output'])[-1]}"
        )
    env = json.loads(res.stdout)
    env["device"], env["cpu_count"], env["host"] = device, os.cpu_count(), platform.node()
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        env["nvidia_smi"] = smi.stdout.strip().splitlines() if smi.returncode == 0 else [smi.stderr.strip()]
    git = shutil.which("git") and subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    env["commit"] = git.stdout.strip() if git and git.returncode == 0 else None  # the device's copy has no .git
    return env


def plan_steps(
    out: Path,
    device: str,
    sizes: Sizes,
    quick: bool,
    workers: int,
    dali: bool,
    gpus: int = 0,
    optional: dict[str, bool] | None = None,
) -> list[Step]:
    """The check's steps in order, with their estimated costs in seconds (guesses from CPU runs and the
    hardware's specifications; summary.json lists estimate and actual side by side to correct them)."""
    py, data = sys.executable, out / "data"
    scenes, shards = str(data / "scenes"), str(data / "shards")
    cuda = device == "cuda"
    start = 6.0 if cuda else 4.0  # one python + torch process start (plus CUDA context)
    n, volume = sizes.scenes, (sizes.grid / 48) ** 3 * sizes.grasps / 480
    loaders = "cache,dali" if dali else "cache"
    seed = [] if quick else ["--seed-scenes", scenes]  # the seed's DataLoader baselines: full runs only
    loader_rows = (4 if dali else 2) + 2 + (0 if quick else 2)  # ours, the cache as each of 2 ranks, the seed's
    train_rows = 2 * 2 * (2 if dali else 1)
    step_s = 0.02 if cuda else (0.05 if quick else 2.0)  # one training step of the models at these sizes
    # bf16 autocast and channels-last are how a GPU trains; on CPU both are slow (channels_last_3d convs
    # ran ~10x slower here) and torch 2.13's CPU bf16 kernels gave the large model a NaN loss now and then,
    # so the CPU run trains in plain fp32.
    amp, fast = ("bf16", ["--channels-last"]) if cuda else ("off", [])
    fast_text = f"amp {amp}" + (", channels-last" if fast else "")

    def bench_loaders(modes: str) -> list[str]:
        return [
            py,
            "benchmarks/bench_loaders.py",
            "--shards",
            shards,
            *seed,
            "--device",
            device,
            "--loaders",
            modes,
            "--batches",
            str(sizes.loader_batches),
            "--json",
            str(out / "bench_loaders.json"),
        ]

    cache_rows = bench_loaders("cache")
    # Warp's kernel compiles once (NVRTC, seconds); mesh2sdf, the reference, takes ~1 s (48^3) and ~2 s (64^3)
    # per mesh on a CPU core.
    warp_objects, warp_grids = (2, "16") if quick else (8, "48,64")
    loaders_cmd = bench_loaders(loaders)
    loaders_what = f"loaders, whole iterations ({loaders}{'' if quick else ', the seed'}), fresh process per row"
    train = [
        py,
        "benchmarks/bench_train.py",
        "--shards",
        shards,
        "--device",
        device,
        "--steps",
        str(sizes.steps),
        "--large-steps",
        str(sizes.large_steps),
        "--warmup",
        str(sizes.warmup),
        "--amp",
        amp,
        *fast,
        "--skip-quality",
        *sizes.model_args,
    ]

    def train_both(loaders: str) -> list[str]:
        return [*train, "--models", "small,large", "--loaders", loaders, "--json", str(out / "bench_train.json")]

    return [
        Step(
            "make_scenes",
            f"{n} synthetic scenes at {sizes.grid}^3, {sizes.grasps} grasps, {workers} workers",
            [
                py,
                "tools/make_scenes.py",
                "--scenes",
                str(n),
                "--out",
                scenes,
                "--grid",
                str(sizes.grid),
                "--grasps-per-scene",
                str(sizes.grasps),
                "--workers",
                str(workers),
                "--overwrite",
            ],
            start + n * volume / (40 * workers),
        ),
        Step(
            "make_shards",
            "build the shards",
            [
                py,
                "tools/make_shards.py",
                scenes,
                "--out",
                shards,
                "--grid",
                str(sizes.grid),
                "--max-grasps",
                str(sizes.grasps),
                "--workers",
                str(workers),
                "--quiet",
            ],
            start + n * volume / (300 * min(workers, 8)),
            needs=("make_scenes",),
        ),
        Step(
            "verify_shards",
            "verify every record",
            [py, "tools/verify_shards.py", shards],
            start + n * volume / 1500,
            needs=("make_shards",),
        ),
        Step(
            "cuda_tests",
            "tests/test_cuda.py (marked cuda)",
            [
                py,
                "-m",
                "pytest",
                "-m",
                "cuda",
                "-q",
                "-rs",
                "-p",
                "no:cacheprovider",
                "tests/test_cuda.py",
                "--junit-xml",
                str(out / "cuda_tests.xml"),
            ],
            150.0 if cuda else 15.0,
        ),
        Step(
            "warp_sdf",
            f"mesh to SDF: Warp on CUDA against mesh2sdf on the CPU, {warp_objects} pybullet objects at "
            f"{warp_grids}",
            [py, "benchmarks/bench_import.py", "--objects", str(warp_objects), "--sdf-only", "--backends", "warp",
             "--grids", warp_grids, "--json", str(out / "warp_sdf.json")],
            start + 30 + warp_objects * (0.1 if quick else 4.0),
            json="warp_sdf.json",
            skip=warp_step_skip(device, optional or {}),
        ),
        Step(
            "bench_loaders",
            loaders_what,
            loaders_cmd,
            loader_rows * (start + 2) + n * volume / 300,
            needs=("verify_shards",),
            json="bench_loaders.json",
            fallback=cache_rows if dali else None,
        ),
        Step(
            "bench_train",
            f"training samples/s, both models, G=1 and G=16, {fast_text}",
            train_both(loaders),
            start + train_rows * (3 + (sizes.steps + sizes.large_steps) * step_s),
            needs=("verify_shards",),
            json="bench_train.json",
            fallback=train_both("cache") if dali else None,
        ),
        Step(
            "compare",
            f"train/run.py compare, {sizes.compare_steps} steps, {fast_text}",
            [
                py,
                "train/run.py",
                "compare",
                "--shards",
                shards,
                "--out",
                str(out / "compare"),
                "--device",
                device,
                "--max-steps",
                str(sizes.compare_steps),
                "--amp",
                amp,
                *fast,
                "--lr",
                "1e-3",
                "--quiet",
                "--overwrite",
                *sizes.model_args,
            ],
            2 * (start + 5 + sizes.compare_steps * step_s),
            needs=("verify_shards",),
            needs_dali=True,
            json="compare/compare.json",
        ),
        # One step per model, the large (the targets' model) first: bench_train writes its JSON at the end,
        # so a step stopped by the budget keeps nothing, and compiling every row costs tens of seconds.
        *(
            Step(
                f"bench_train_compile_{kind}",
                f"as bench_train for the {kind} model, with torch.compile (cache)",
                [
                    *train,
                    "--models",
                    kind,
                    "--loaders",
                    "cache",
                    "--compile",
                    "--json",
                    str(out / f"bench_train_compile_{kind}.json"),
                ],
                start + 2 * (50.0 if cuda else 150.0),
                needs=("verify_shards",),
                json=f"bench_train_compile_{kind}.json",
            )
            for kind in ("large", "small")
        ),
        *(
            [
                Step(
                    "torchrun",
                    f"train/run.py fit under torchrun on {gpus} GPU rank{'s (NCCL)' if gpus > 1 else ' (no NCCL)'}, "
                    f"{sizes.compare_steps} steps",
                    [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus), "train/run.py",
                     "fit", "--shards", shards, "--out", str(out / "torchrun"), "--device", "cuda", "--max-steps",
                     str(sizes.compare_steps), "--quiet", "--overwrite", *sizes.model_args],
                    start + 10 + sizes.compare_steps * step_s,
                    needs=("verify_shards",),
                    json="torchrun/summary.json",
                )
            ]
            if cuda and gpus
            else []
        ),
    ]  # fmt: skip


def run_step(cmd: list[str], out: Path, name: str, left_s: float) -> dict:
    """Run one command with its output in OUTDIR/logs/<name>.log; stopped (whole process group) at `left_s`."""
    log = out / "logs" / f"{name}.log"
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=left_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    elapsed = time.perf_counter() - start
    if code is None:
        status, reason = "stopped", f"the budget ran out after {elapsed:.0f} s"
    elif code == 0:
        status, reason = "passed", ""
    else:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
        status, reason = "failed", f"exit {code}: {lines[-1][:200] if lines else 'no output'}"
    return {"status": status, "reason": reason, "elapsed_s": round(elapsed, 2), "log": str(log.relative_to(out))}


def read_tests(xml_path: Path) -> list[dict]:
    """Each CUDA test's outcome (passed, failed, skipped with its reason) from pytest's JUnit XML."""
    if not xml_path.exists():
        return []
    rows = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        outcome, reason = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, reason = ("skipped" if tag == "skipped" else "failed"), (node.get("message") or "")[:200]
        rows.append(
            {"test": case.get("name"), "outcome": outcome, "reason": reason, "time_s": float(case.get("time", 0))}
        )
    return rows


def _pick(rows: list[dict], **match) -> dict | None:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return found[0] if found else None


def targets(figures: dict, train_scenes: int | None, judge: bool) -> list[dict]:
    """The issue's targets for one H100, on whatever this run measured; judged (met or not) only if `judge`."""
    loaders, train = figures.get("bench_loaders") or [], (figures.get("bench_train") or {}).get("throughput", [])
    out = []

    def add(name: str, goal: str, value: float | None, text: str, met: Callable[[float], bool]) -> None:
        out.append(
            {
                "target": name,
                "goal": goal,
                "measured": text if value is not None else "not measured",
                "value": value,
                "met": None if value is None or not judge else bool(met(value)),
            }
        )

    cache = _pick(loaders, loader="cache", scenes_per_batch=8, grasps_per_scene=16)
    rate = cache["samples_per_s"] if cache else None
    add(
        "cache S=8 G=16 batches delivered",
        ">= 1,000,000 samples/s",
        rate,
        f"{rate:,.0f} samples/s" if rate else "",
        lambda v: v >= 1e6,
    )
    g16 = _pick(train, model="large", loader="cache", grasps_per_scene=16)
    g1 = _pick(train, model="large", loader="cache", grasps_per_scene=1)
    v16 = g16["samples_per_s"] if g16 else None
    amp = f" (amp {g16['amp']})" if g16 else ""
    add(
        "GQEstimatorLarge bf16 G=16 training",
        ">= 100,000 samples/s",
        v16,
        f"{v16:,.0f} samples/s{amp}" if v16 else "",
        lambda v: v >= 1e5,
    )
    ratio = v16 / g1["samples_per_s"] if g16 and g1 else None
    add("GQEstimatorLarge bf16 G=16 / G=1", ">= 10 x", ratio, f"{ratio:.1f} x{amp}" if ratio else "", lambda v: v >= 10)
    startup = cache["first_batch_s"] * SEED_SCENES / train_scenes if cache and train_scenes else None
    add(
        f"cache start-up for the seed's {SEED_SCENES:,} scenes",
        "<= 5 s",
        startup,
        f"{startup:.2f} s (first batch {cache['first_batch_s']:.2f} s for {train_scenes:,} train scenes, scaled "
        "linearly)"
        if startup
        else "",
        lambda v: v <= 5,
    )
    for s, g in ((8, 16), (128, 1)):
        c, d = (
            _pick(loaders, loader="cache", scenes_per_batch=s, grasps_per_scene=g),
            _pick(loaders, loader="dali", scenes_per_batch=s, grasps_per_scene=g),
        )
        slow = c["samples_per_s"] / d["samples_per_s"] if c and d else None
        add(
            f"dali steady state S={s} G={g}",
            "within 1.5 x of cache",
            slow,
            f"cache / dali = {slow:.2f} x" if slow else "",
            lambda v: v <= 1.5,
        )
    return out


def _fmt(v: float | None, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


def scale_out_line(env: dict, *, run: dict | None) -> str:
    """What the check measured of training on several GPUs: NCCL needs two, so one GPU leaves it unmeasured."""
    gpus = env.get("gpus", 0) if env["device"] == "cuda" else 0
    measured = (
        f"fit under torchrun on {run['world_size']} GPU rank(s): {_fmt(run['samples_per_s'])} samples/s (job). "
        if run
        else ""
    )
    if gpus >= 2:
        return measured + f"NCCL multi-GPU: measured on {gpus} GPUs" + ("" if run else " (the step did not pass)")
    return measured + f"NCCL multi-GPU: not measured ({'one GPU' if gpus == 1 else 'no GPU'} on this machine)"


def render_markdown(summary: dict) -> str:
    """summary.md: what ran where, each step, then every figure as tables."""
    env, fig = summary["environment"], summary["figures"]
    dali = env.get("dali", {})
    dali_text = (
        f"DALI {dali['version']} ({dali['cuda_devices']} CUDA devices)"
        if "version" in dali
        else f"no DALI ({dali.get('error', '?')})"
    )
    card = env.get("card") or "no GPU (CPU run)"
    lines = [
        f"# GPU check: {card}",
        "",
        f"device {env['device']}, torch {env['versions'].get('torch')} (CUDA {env.get('torch_cuda')}), "
        f"{dali_text}, Python {env['python']}, {env['cpu_count']} CPU cores"
        + (f", nvidia-smi: {'; '.join(env['nvidia_smi'])}" if env.get("nvidia_smi") else "")
        + (f", commit {env['commit']}" if env.get("commit") else ""),
        f"DALI wheels: {summary['dali_install']}",
        "",
        f"{summary['sizes']['scenes']:,} scenes at {summary['sizes']['grid']}^3 with {summary['sizes']['grasps']} "
        f"grasps; budget {summary['budget_s']:.0f} s, used {summary['elapsed_s']:.0f} s.",
        "",
        "## Steps",
        "",
        "| step | what | status | estimate | time | note |",
        "| --- | --- | --- | ---: | ---: | --- |",
    ]
    for s in summary["steps"]:
        lines.append(
            f"| {s['name']} | {s['what']} | {s['status']} | {s['estimate_s']:.0f} s | "
            f"{_fmt(s.get('elapsed_s'), '.1f')} s | {s['reason'].replace('|', '/')} |"
        )
    if fig.get("cuda_tests"):
        lines += ["", "## CUDA tests", "", "| test | outcome | time | reason |", "| --- | --- | ---: | --- |"]
        lines += [
            f"| {t['test']} | {t['outcome']} | {t['time_s']:.1f} s | {t['reason'].replace('|', '/')} |"
            for t in fig["cuda_tests"]
        ]
    if fig.get("bench_loaders"):
        lines += [
            "",
            "## Loaders (benchmarks/bench_loaders.py: whole iterations, each row a fresh process)",
            "",
            "| loader | S | G | first batch | batches/s | samples/s | resident |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {r['loader']} | {r['scenes_per_batch']} | {r['grasps_per_scene']} | {r['first_batch_s']:.3f} s | "
            f"{r['batches_per_s']:,.1f} | {r['samples_per_s']:,.0f} | {r['resident_bytes'] / 1e6:,.0f} MB |"
            for r in fig["bench_loaders"]
        ]
    if fig.get("warp_sdf"):
        lines += [
            "",
            "## Mesh to SDF (benchmarks/bench_import.py --backends warp: s per mesh, one process)",
            "",
            "| backend | device | grid | s/mesh | time / mesh2sdf's | max abs diff to mesh2sdf |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {r['backend']} | {r['device']} | {r['grid']} | {r['s_per_mesh']:.4f} | {r['ratio_to_mesh2sdf']:.3f} | "
            f"{r['max_abs_diff_to_mesh2sdf']:.2e} |"
            for r in fig["warp_sdf"]["backends"]["rows"]
        ]
    rows = [
        r
        for key in ("bench_train", "bench_train_compile_large", "bench_train_compile_small")
        for r in (fig.get(key) or {}).get("throughput", [])
    ]
    if rows:
        lines += [
            "",
            "## Training (benchmarks/bench_train.py: whole steps)",
            "",
            "| model | loader | amp | compile | S | G | samples/s | G=16 / G=1 |",
            "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for r in rows:
            g1 = _pick(rows, model=r["model"], loader=r["loader"], compile=r["compile"], grasps_per_scene=1)
            ratio = f"{r['samples_per_s'] / g1['samples_per_s']:.1f} x" if r["grasps_per_scene"] == 16 and g1 else ""
            lines.append(
                f"| {r['model']} | {r['loader']} | {r['amp']} | {'yes' if r['compile'] else 'no'} | "
                f"{r['scenes_per_batch']} | "
                f"{r['grasps_per_scene']} | {r['samples_per_s']:,.0f} | {ratio} |"
            )
    if fig.get("compare"):
        c = fig["compare"]
        lines += [
            "",
            "## compare (train/run.py compare)",
            "",
            "| loader | steps | first batch | samples/s | data wait | peak memory | val MSE |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {name} | {r['steps']} | {r['first_batch_s']:.2f} s | {_fmt(r['samples_per_s'])} | "
            f"{r['data_wait']:.1%} | {r['peak_memory_bytes'] / 1e9:.2f} GB | {r['val_mse']:.4f} |"
            for name, r in c["runs"].items()
        ]
        lines.append(f"\nloss curves identical: {c['loss_curves_identical']}")
    lines += ["", "## Scale-out", "", scale_out_line(env, run=fig.get("torchrun"))]
    lines += [
        "",
        "## Targets (set for one H100; judged on CUDA runs only)",
        "",
        "| target | goal | measured | met |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {t['target']} | {t['goal']} | {t['measured']} | "
        f"{'-' if t['met'] is None else ('yes' if t['met'] else '**no**')} |"
        for t in summary["targets"]
    ]
    return "\n".join(lines) + "\n"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("outdir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True)
@click.option("--quick", is_flag=True, help="Tiny sizes (40 scenes at 16^3, tiny models): the CI run of the check.")
@click.option(
    "--budget-s",
    type=float,
    default=540.0,
    show_default=True,
    help="Wall-clock budget for the whole check, from the start of benchmarks/gpu_check.sh.",
)
@click.option("--scenes", type=int, default=None, help="Scenes to generate [default: 2000, or 40 with --quick].")
@click.option("--workers", type=int, default=os.cpu_count(), show_default=True, help="Processes for data making.")
@click.option(
    "--keep-data",
    is_flag=True,
    help="Keep OUTDIR/data (scenes and shards) and the compare runs' checkpoints afterwards.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTDIR.")
@click.option("--dali-install", default="not attempted (run through benchmarks/gpu_check.sh)", hidden=True)
@click.option("--t0", type=float, default=None, hidden=True, help="Start time (epoch s) of benchmarks/gpu_check.sh.")
def main(
    outdir: Path,
    device: str,
    quick: bool,
    budget_s: float,
    scenes: int | None,
    workers: int,
    keep_data: bool,
    overwrite: bool,
    dali_install: str,
    t0: float | None,
) -> None:
    """Test and measure every CUDA path into OUTDIR (summary.md, summary.json, each step's JSON and log)."""
    t0 = t0 or time.time()
    outdir = outdir.resolve()  # the steps run from the repository root
    if budget_s <= 0 or (scenes is not None and scenes < 10) or workers < 1:
        raise click.UsageError(
            f"--budget-s {budget_s} --scenes {scenes} --workers {workers}: need a budget > 0, "
            "at least 10 scenes and 1 worker"
        )
    if outdir.exists() and not overwrite and any(outdir.iterdir()):
        raise click.UsageError(f"{outdir} exists and is not empty; pass --overwrite or choose another OUTDIR")
    try:  # only what an earlier check recorded is removed; a folder holding anything else is refused whole
        owned = check_replaceable(outdir, tool=TOOL, overwrite=True, flag="OUTDIR")
    except OwnershipError as err:
        raise click.UsageError(str(err)) from None
    env = probe_environment(device)
    if env["missing"]:
        raise click.ClickException(
            f"{sys.executable} lacks {', '.join(env['missing'])}; install or stage them (see docs/gpu-check.md)"
        )
    if device == "cuda" and not env["cuda_available"]:
        raise click.ClickException(
            f"--device cuda: torch {env['versions']['torch']} at {sys.executable} sees no "
            "CUDA device; run with --device cpu, or on a machine with a GPU"
        )
    sizes = QUICK if quick else FULL
    if scenes:
        sizes = replace(sizes, scenes=scenes)
    dali = "version" in env["dali"] and (device == "cpu" or env["dali"]["cuda_devices"] > 0)
    if owned is not None:
        remove_owned(outdir, owned)
    outdir.mkdir(parents=True, exist_ok=True)
    write_record(outdir, tool=TOOL, entries=ENTRIES)
    (outdir / "logs").mkdir(parents=True, exist_ok=True)
    steps = plan_steps(outdir, device, sizes, quick, workers, dali, env.get("gpus", 0), env["optional"])
    click.echo(
        f"gpu_check: {env.get('card', 'CPU')} ({device}), {sizes.scenes} scenes, budget {budget_s:.0f} s, "
        f"DALI {'yes' if dali else 'no: ' + env['dali'].get('error', 'no CUDA devices')}; logs in {outdir}/logs"
    )
    done: dict[str, str] = {}
    for step in steps:
        elapsed = time.time() - t0
        left = budget_s - elapsed
        missing = [n for n in step.needs if done.get(n) != "passed"]
        if missing:
            step.result = {"status": "skipped", "reason": f"needs {', '.join(missing)}"}
        elif step.skip:
            step.result = {"status": "skipped", "reason": step.skip}
        elif step.needs_dali and not dali:
            step.result = {"status": "skipped", "reason": "DALI is not importable here (or has no CUDA device)"}
        elif step.estimate_s > left:
            step.result = {
                "status": "skipped",
                "reason": f"would need ~{step.estimate_s:.0f} s, {max(left, 0):.0f} s of the budget left",
            }
        else:
            step.result = run_step(step.cmd, outdir, step.name, left)
            left = budget_s - (time.time() - t0)
            if step.result["status"] == "failed" and step.fallback and left >= 1:
                first = step.result
                step.result = run_step(step.fallback, outdir, f"{step.name}_cache", left)
                step.result["reason"] = (
                    f"with dali: {first['reason']}; then cache rows alone: "
                    f"{step.result['status']} {step.result['reason']}".rstrip()
                )
                step.result["status"] = "partial" if step.result["status"] == "passed" else step.result["status"]
                step.result["elapsed_s"] = round(first["elapsed_s"] + step.result["elapsed_s"], 2)
        done[step.name] = step.result["status"]
        click.echo(
            f"[{time.time() - t0:5.0f} s / {budget_s:.0f} s] {step.name}: {step.result['status']}"
            + (f" in {step.result['elapsed_s']:.1f} s" if "elapsed_s" in step.result else "")
            + (f" ({step.result['reason']})" if step.result["reason"] else "")
        )

    figures = {
        s.name: json.loads((outdir / s.json).read_text())
        for s in steps
        if s.json and s.result["status"] in ("passed", "partial")
    }
    figures["cuda_tests"] = read_tests(outdir / "cuda_tests.xml")
    train_scenes = None
    if done.get("verify_shards") == "passed":
        train_scenes = len(ShardReader(outdir / "data" / "shards").split_scenes("train"))
    summary = {
        "environment": env,
        "dali_install": dali_install,
        "sizes": sizes.__dict__,
        "budget_s": budget_s,
        "elapsed_s": round(time.time() - t0, 1),
        "train_scenes": train_scenes,
        "steps": [
            {
                "name": s.name,
                "what": s.what,
                "command": " ".join(s.cmd),
                "estimate_s": round(s.estimate_s, 1),
                **s.result,
            }
            for s in steps
        ],
        "figures": figures,
        "targets": targets(figures, train_scenes, device == "cuda"),
    }
    write_atomically(outdir / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_atomically(outdir / "summary.md", render_markdown(summary))
    if not keep_data:  # the dataset and the compare runs' checkpoints: large, and no figure is in them
        shutil.rmtree(outdir / "data", ignore_errors=True)
        for checkpoint in [*(outdir / "compare").glob("*/*.pt"), *(outdir / "torchrun").glob("*.pt")]:
            checkpoint.unlink()
    click.echo((outdir / "summary.md").read_text())
    failed = [s.name for s in steps if s.result["status"] in ("failed", "stopped", "partial")]
    if failed:
        raise click.ClickException(f"steps {', '.join(failed)} did not pass; see {outdir}/logs and {outdir}/summary.md")


if __name__ == "__main__":
    main()
