"""CUDA paths: the cache and DALI loaders on the GPU (rotation augmentation and mixtures too), bf16 +
channels-last, torch.compile, NCCL.

Every test here is marked `cuda` and skips with a reason where torch sees no CUDA device; the GPU
check (benchmarks/gpu_check.sh) runs them with `-m cuda` on a GPU machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import fit_process

from gq.pipeline import Batch, open_loader
from gq.train import fit
from gq.train.config import FitConfig

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)"),
]

GRID, GRASPS = 32, 96
TINY = ["--base-channels", "4", "--fc-dims", "32,16", "--quiet"]


@pytest.fixture(scope="module")
def shards(shared_dataset) -> Path:
    options = dict(records_per_shard=16, val_fraction=0.2, test_fraction=0.1)
    return shared_dataset(80, grid=GRID, grasps=GRASPS, seed=3, scene_workers=2, **options)


def _epochs(loader, epochs: int = 2) -> list[Batch]:
    """Every batch of the first `epochs` epochs, moved to the CPU."""
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            assert batch.sdf.device == loader.device and batch.grasps.device == loader.device
            out.append(Batch(**{k: v.cpu() for k, v in vars(batch).items()}))
    return out


def _assert_same(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b) > 0
    for i, (x, y) in enumerate(zip(a, b)):
        for name, value in vars(x).items():
            other = getattr(y, name)
            assert value.dtype == other.dtype and torch.equal(value, other), f"batch {i}: {name} differs"


@pytest.mark.parametrize("s,g", [(3, 5), (8, 16), (32, 1)])
def test_cache_on_cuda_equals_cache_on_cpu(shards: Path, s: int, g: int) -> None:
    kwargs = dict(split="train", scenes_per_batch=s, grasps_per_sdf=g, seed=7, progress=False)
    with (
        open_loader(shards, mode="cache", device="cpu", **kwargs) as cpu,
        open_loader(shards, mode="cache", device="cuda", **kwargs) as gpu,
    ):
        assert gpu.device.type == "cuda"
        _assert_same(_epochs(cpu), _epochs(gpu))


def _needs_dali_on_cuda() -> None:
    pytest.importorskip("nvidia.dali", reason="DALI is not installed (benchmarks/stage_wheels.sh stages it)")
    from nvidia.dali import backend

    if backend.GetCUDADeviceCount() < 1:
        pytest.skip("this DALI build sees no CUDA device")


@pytest.mark.parametrize("s,g,augment", [(3, 5, "off"), (8, 16, "off"), (8, 16, "rot24")])
def test_dali_on_cuda_equals_cache_on_cuda(shards: Path, s: int, g: int, augment: str) -> None:
    _needs_dali_on_cuda()
    kwargs = dict(split="train", scenes_per_batch=s, grasps_per_sdf=g, seed=7, device="cuda", progress=False)
    with (
        open_loader(shards, mode="cache", augment=augment, **kwargs) as cache,
        open_loader(shards, mode="dali", augment=augment, **kwargs) as dali,
    ):
        _assert_same(_epochs(cache), _epochs(dali))


def test_rot24_on_cuda_turns_as_on_cpu(shards: Path) -> None:
    """The rotation on the device: SDFs (permute, flip: moves only) and everything but the grasps are equal bit
    for bit; the turned grasps to float32 rounding, as CUDA may fuse the quaternion product's multiply-adds."""
    kwargs = dict(split="train", scenes_per_batch=8, grasps_per_sdf=16, seed=7, progress=False, augment="rot24")
    with (
        open_loader(shards, mode="cache", device="cpu", **kwargs) as cpu,
        open_loader(shards, mode="cache", device="cuda", **kwargs) as gpu,
    ):
        a, b = _epochs(cpu), _epochs(gpu)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for name in ("sdf", "scores", "scene_of_grasp", "scene_ids"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        torch.testing.assert_close(x.grasps, y.grasps, rtol=0, atol=1e-6)


def test_a_mixture_on_cuda_equals_it_on_cpu(shards: Path, shared_dataset) -> None:
    other = shared_dataset(40, grid=GRID, grasps=GRASPS, seed=4, records_per_shard=16, val_fraction=0.2)
    kwargs = dict(split="train", scenes_per_batch=8, grasps_per_sdf=16, seed=7, progress=False, weights=[0.7, 0.3])
    with (
        open_loader([shards, other], mode="cache", device="cpu", **kwargs) as cpu,
        open_loader([shards, other], mode="cache", device="cuda", **kwargs) as gpu,
    ):
        _assert_same(_epochs(cpu), _epochs(gpu))


def _fit_cli(shards: Path, out: Path, *flags: str, steps: int = 12) -> dict:
    result = fit_process(
        shards, out, "--device", "cuda", "--max-steps", steps, "--log-every", 1, "--lr", "1e-3", *flags, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_fit_bf16_channels_last_on_cuda_tracks_fp32(shards: Path, tmp_path: Path) -> None:
    fast = _fit_cli(shards, tmp_path / "bf16", "--model", "large", "--amp", "bf16", "--channels-last", *TINY)
    ref = _fit_cli(shards, tmp_path / "fp32", "--model", "large", *TINY)
    assert fast["device"].startswith("cuda") and fast["steps"] == ref["steps"] == 12
    assert fast["peak_memory_kind"] == "cuda max allocated"
    a, b = _losses(tmp_path / "bf16"), _losses(tmp_path / "fp32")
    assert all(map(torch.isfinite, torch.tensor(a))) and torch.isfinite(torch.tensor(fast["val_mse"]))
    # The same initial weights and first batch: bf16 autocast may change the first loss only by rounding.
    assert a[0] == pytest.approx(b[0], rel=0.05)
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["options"]["amp"] == "bf16" and config["options"]["channels_last"] is True


def test_compile_on_cuda_gives_the_eager_losses(shards: Path, tmp_path: Path) -> None:
    common = dict(
        shards=str(shards),
        device="cuda",
        base_channels=4,
        fc_dims=(32, 16),
        max_steps=8,
        log_every=1,
        lr=1e-3,
        progress=False,
    )
    compiled = fit(FitConfig(out=str(tmp_path / "compiled"), compile=True, **common))
    eager = fit(FitConfig(out=str(tmp_path / "eager"), **common))
    assert compiled["steps"] == eager["steps"] == 8
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), rel=1e-2)
    assert compiled["val_mse"] == pytest.approx(eager["val_mse"], rel=1e-2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices for a 2-process NCCL run")
def test_torchrun_two_gpus_with_nccl(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    flags = ["--device", "cuda", "--max-steps", 6, "-S", 2, "-G", 8, *TINY]
    result = fit_process(shards, out, *flags, ranks=2, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6 and summary["device"].startswith("cuda")
    assert torch.isfinite(torch.tensor(summary["val_mse"]))
