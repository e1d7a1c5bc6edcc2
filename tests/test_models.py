"""Tests for models/: seed layouts and sizes, seed checkpoint parity, grouped forward, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import FIXTURES

from gq.models import (
    MAX_PARAMETERS,
    CheckpointError,
    GQEstimator,
    GQEstimatorLarge,
    ModelSizeError,
    build_model,
    from_seed_checkpoint,
    infer_config,
    parameter_count,
    strip_compile_prefix,
)

SEED_C4 = FIXTURES / "seed_gqestimator_c4_fc32-16.pth"
SEED_C8_COMPILED = FIXTURES / "seed_gqestimator_c8_fc256-128-64_compiled.pth"


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_inputs(num_sdfs: int, num_grasps: int, size: int = 48, seed: int = 0):
    """Deterministic SDFs in [-1,1] and grasps within the seed data's ranges."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=gen)

    sdf = uniform(-1.0, 1.0, num_sdfs, size, size, size)
    position = torch.cat([uniform(-2.0, 2.0, num_grasps, 2), uniform(-0.3, 2.0, num_grasps, 1)], 1)
    quaternion = F.normalize(torch.randn(num_grasps, 4, generator=gen), dim=1)
    # 4 fingers x (abduction, proximal flexion, distal flexion)
    joints = torch.cat(
        [
            torch.stack(
                [uniform(-0.52, 0.52, num_grasps), uniform(-0.35, 1.50, num_grasps), uniform(-0.20, 1.83, num_grasps)],
                dim=1,
            )
            for _finger in range(4)
        ],
        dim=1,
    )
    return sdf, torch.cat([position, quaternion, joints], dim=1)


def seed_reference(state_dict: dict, sdf: torch.Tensor, grasps: torch.Tensor) -> torch.Tensor:
    """The seed GQEstimator written out with torch.nn.functional from the raw tensors.

    conv_block = 4 x [Conv3d(k3,p1), ReLU, MaxPool3d(2)] -> Conv3d at 0,3,6,9;
    gq_head = [Linear, ReLU] per fc dim then Linear(->1) -> Linear at 0,2,4,...
    """
    x = sdf.unsqueeze(1)
    for i in (0, 3, 6, 9):
        weight, bias = state_dict[f"conv_block.{i}.weight"], state_dict[f"conv_block.{i}.bias"]
        x = F.max_pool3d(F.relu(F.conv3d(x, weight, bias, padding=1)), 2)
    x = torch.cat([x.flatten(1), grasps], dim=1)
    n_linear = sum(1 for k in state_dict if k.startswith("gq_head.") and k.endswith(".weight"))
    for j in range(n_linear):
        x = F.linear(x, state_dict[f"gq_head.{2 * j}.weight"], state_dict[f"gq_head.{2 * j}.bias"])
        if j < n_linear - 1:
            x = F.relu(x)
    return x[:, 0]


def test_parameter_counts_at_defaults():
    assert n_params(GQEstimator()) == 1_222_049
    assert n_params(GQEstimatorLarge()) == 7_230_369


def test_state_dict_keys_follow_the_seed_layout():
    small = GQEstimator(base_channels=4, fc_dims=(32, 16)).state_dict()
    assert [k for k in small if k.endswith(".weight")] == [
        "conv_block.0.weight",
        "conv_block.3.weight",
        "conv_block.6.weight",
        "conv_block.9.weight",
        "gq_head.0.weight",
        "gq_head.2.weight",
        "gq_head.4.weight",
    ]
    large = GQEstimatorLarge(base_channels=4, fc_dims=(8,)).state_dict()
    # stage = conv, bn, relu, conv, bn, relu, pool (7 modules); head = linear, bn, relu, dropout
    assert "conv_block.21.weight" in large and "conv_block.25.running_var" in large
    assert large["gq_head.0.weight"].shape == (8, 32 * 27 + 19)
    assert "gq_head.1.running_mean" in large and "gq_head.4.weight" in large


@pytest.mark.parametrize(
    ("path", "base_channels", "fc_dims"),
    [(SEED_C4, 4, (32, 16)), (SEED_C8_COMPILED, 8, (256, 128, 64))],
    ids=["c4", "c8-compiled"],
)
def test_seed_checkpoint_parity(path, base_channels, fc_dims, capsys):
    model = from_seed_checkpoint(path).eval()
    assert type(model) is GQEstimator
    assert model.config == {
        "kind": "small",
        "input_size": 48,
        "base_channels": base_channels,
        "fc_dims": fc_dims,
    }
    raw = strip_compile_prefix(torch.load(path, map_location="cpu", weights_only=True))
    sdf, grasps = make_inputs(num_sdfs=4, num_grasps=4)
    with torch.no_grad():
        expected = seed_reference(raw, sdf, grasps)
        got = model.forward_with_sdf(sdf, grasps)
        grouped = model(sdf.unsqueeze(1), grasps, torch.arange(4))
    assert got.shape == (4,) and got.dtype == torch.float32
    assert (got - expected).abs().max().item() < 1e-5
    assert (grouped - expected).abs().max().item() < 1e-5
    assert capsys.readouterr() == ("", "")  # loading and running print nothing


def make_eval_model(kind: str, input_size: int) -> torch.nn.Module:
    """A small model of `kind` in eval mode, with non-trivial BatchNorm statistics for "large"."""
    torch.manual_seed(0)
    model = build_model(kind, input_size=input_size, base_channels=4, fc_dims=(16, 8))
    with torch.no_grad():  # one train-mode pass moves running stats away from (0, 1)
        sdf, grasps = make_inputs(2, 4, size=input_size, seed=1)
        model(sdf, grasps, torch.tensor([0, 0, 1, 1]))
    return model.eval()


@pytest.mark.parametrize(("kind", "input_size"), [("small", 48), ("large", 32)])
def test_grouped_forward_equals_per_sample(kind, input_size):
    model = make_eval_model(kind, input_size)
    scene_of_grasp = torch.tensor([0, 0, 1, 2, 2, 2, 1, 0, 2])
    sdf, grasps = make_inputs(3, len(scene_of_grasp), size=input_size)
    with torch.no_grad():
        grouped = model(sdf.unsqueeze(1), grasps, scene_of_grasp)
        per_sample = model.forward_with_sdf(sdf[scene_of_grasp], grasps)
        unsqueezed_ok = model(sdf, grasps, scene_of_grasp)  # [S,D,D,D] is accepted too
    assert grouped.shape == (len(scene_of_grasp),)
    assert (grouped - per_sample).abs().max().item() < 1e-5
    assert torch.equal(grouped, unsqueezed_ok)


@pytest.mark.parametrize("kind", ["small", "large"])
def test_autocast_and_channels_last_3d(kind):
    model = make_eval_model(kind, 32).to(memory_format=torch.channels_last_3d)
    scene_of_grasp = torch.tensor([0, 1, 1, 0])
    sdf, grasps = make_inputs(2, 4, size=32)
    sdf = sdf.unsqueeze(1).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        reference = model(sdf, grasps, scene_of_grasp)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prediction = model(sdf, grasps, scene_of_grasp)
    prediction.float().sum().backward()
    assert prediction.shape == (4,) and torch.isfinite(prediction).all()
    assert all(p.grad is not None for p in model.parameters())
    if kind == "small":  # no BatchNorm/dropout: train and eval agree up to bf16 rounding
        assert torch.allclose(prediction.float(), reference, atol=0.05, rtol=0.05)


def test_checkpoint_round_trip_infers_large_config(tmp_path):
    model = make_eval_model("large", 32)
    path = tmp_path / "large.pth"
    # saved as torch.compile would: every key prefixed
    torch.save({f"_orig_mod.{k}": v for k, v in model.state_dict().items()}, path)
    loaded = from_seed_checkpoint(path).eval()
    assert type(loaded) is GQEstimatorLarge
    assert loaded.config == {
        "kind": "large",
        "input_size": 32,
        "base_channels": 4,
        "fc_dims": (16, 8),
    }
    assert infer_config(model.state_dict()) == loaded.config
    sdf, grasps = make_inputs(2, 3, size=32)
    with torch.no_grad():
        assert torch.equal(
            loaded.forward_with_sdf(sdf[:1].expand(3, -1, -1, -1), grasps),
            model.forward_with_sdf(sdf[:1].expand(3, -1, -1, -1), grasps),
        )


def test_build_model_defaults_and_config():
    small, large = build_model("small"), build_model("large", fc_dims=[64])
    assert small.config == {
        "kind": "small",
        "input_size": 48,
        "base_channels": 16,
        "fc_dims": (256, 128, 64),
    }
    assert large.config == {
        "kind": "large",
        "input_size": 48,
        "base_channels": 32,
        "fc_dims": (64,),
    }
    assert build_model(**small.config).config == small.config
    with pytest.raises(ValueError, match="unknown model kind"):
        build_model("medium")


@pytest.mark.parametrize("input_size", [40, 50, 8, 0])
def test_input_size_must_be_a_multiple_of_16(input_size):
    for kind in ("small", "large"):
        with pytest.raises(ValueError, match="multiple of 16"):
            build_model(kind, input_size=input_size)


def test_wrong_sdf_or_grasp_shape_is_refused():
    model = GQEstimator(input_size=32, base_channels=2, fc_dims=(4,))
    sdf, grasps = make_inputs(2, 2, size=32)
    with pytest.raises(ValueError, match=r"\[S,1,32,32,32\]"):
        model(sdf[:, :16, :16, :16], grasps, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="grasps must have shape"):
        model(sdf, grasps[:, :18], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="scene_of_grasp"):
        model(sdf, grasps, torch.tensor([0, 1, 1]))


def assert_one_line_naming(exc: pytest.ExceptionInfo, path: Path) -> None:
    message = str(exc.value)
    assert str(path) in message and "\n" not in message


def test_missing_checkpoint(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="not found") as exc:
        from_seed_checkpoint(path)
    assert_one_line_naming(exc, path)


def test_corrupt_checkpoint(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes()
    )
    with pytest.raises(CheckpointError, match="cannot be read") as exc:
        from_seed_checkpoint(path)
    assert_one_line_naming(exc, path)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda sd: {k.replace("conv_block", "encoder"): v for k, v in sd.items()},  # other names
        lambda sd: {**sd, "gq_head.9.weight": torch.zeros(3, 3)},  # head ends in 3 outputs
        lambda sd: {**sd, "conv_block.3.extra": torch.zeros(1)},  # unexpected key
        lambda sd: {k: v for k, v in sd.items() if k != "conv_block.6.bias"},  # missing key
        lambda sd: {**sd, "gq_head.0.weight": torch.zeros(32, 900)},  # no grid size fits
        lambda sd: [1, 2, 3],  # not a state_dict at all
    ],
    ids=["other-names", "head-3-outputs", "unexpected-key", "missing-key", "no-grid-fits", "not-a-state-dict"],
)
def test_wrong_layout_checkpoint(tmp_path, mutate):
    path = tmp_path / "wrong.pth"
    torch.save(mutate(GQEstimator(base_channels=4, fc_dims=(32, 16)).state_dict()), path)
    with pytest.raises(CheckpointError) as exc:
        from_seed_checkpoint(path)
    assert_one_line_naming(exc, path)


@pytest.mark.parametrize("kind", ["small", "large"])
@pytest.mark.parametrize("sizes", [(48, None, None), (16, 3, (7, 5)), (32, 5, (9,)), (16, 2, ())])
def test_parameter_count_is_the_models(kind: str, sizes: tuple) -> None:
    input_size, base_channels, fc_dims = sizes
    model = build_model(kind, input_size=input_size, base_channels=base_channels, fc_dims=fc_dims)
    assert parameter_count(kind, input_size, model.base_channels, model.fc_dims) == n_params(model)


@pytest.mark.parametrize(
    "sizes,option",
    [({"base_channels": 100000}, "base_channels"), ({"fc_dims": (100000000000,)}, "fc_dims")],
    ids=["base-channels", "fc-dims"],
)
def test_a_model_too_large_is_refused_by_its_size_before_allocating(sizes: dict, option: str) -> None:
    with pytest.raises(ModelSizeError, match=r"would have [\d,]+ parameters \([\d,.]+ GiB of float32") as err:
        build_model("small", **sizes)  # the allocator would fail (or take the machine's memory) first
    assert err.value.option == option and f"above the limit of {MAX_PARAMETERS:,}" in str(err.value)
