"""The training recipe as a library: cleanup on failure, Progress in last.pt, the schedule, and options
derived from FitConfig (one source of truth for flags, defaults and choices)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from gq.common.options import flag
from gq.common.ownership import lock_path
from gq.tools.training import cli
from gq.train import FitConfig, FitRecipe, Progress, Standardiser, TrainError, fit
from gq.train.checkpoint import load_checkpoint
from gq.train.config import ConfigError

GRID, GRASPS = 32, 48
TINY = dict(base_channels=2, fc_dims=(8,), threads=1, progress=False, scenes_per_batch=2, grasps_per_sdf=4)


@pytest.fixture(scope="module")
def shards(shared_dataset) -> Path:
    options = dict(records_per_shard=8, val_fraction=0.2, test_fraction=0.1)
    return shared_dataset(40, grid=GRID, grasps=GRASPS, seed=3, **options)


def test_a_failing_run_called_as_a_library_closes_what_it_opened(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = FitRecipe(FitConfig(shards=str(shards), out=str(out), lr=1e30, max_steps=50, **TINY))
    with pytest.raises(TrainError, match="non-finite loss"), recipe:
        recipe.setup()
        recipe.train()
    # cleanup ran on the error: loaders released, the run folder's lock gone, so the folder is usable again
    assert recipe.train_loader.sdf is None and recipe.val_loader.sdf is None
    assert not lock_path(out).exists()
    summary = fit(FitConfig(shards=str(shards), out=str(out), overwrite=True, max_steps=2, **TINY))
    assert summary["steps"] == 2


def test_progress_is_what_last_pt_holds_and_the_linear_schedule_ends_at_its_factor(
    shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    schedule = dict(lr=1e-3, lr_schedule="linear", lr_end_factor=0.1)
    cfg = FitConfig(shards=str(shards), out=str(out), max_steps=6, log_every=1, **schedule, **TINY)
    summary = fit(cfg)
    progress = Progress.from_dict(load_checkpoint(out / "last.pt")["state"])
    assert progress.step == summary["steps"] == 6 and progress.best_step == 6
    assert progress.window.steps == 0  # the last row was logged: an empty log window
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"lr"' in line]
    # LinearLR: the lr used by step k is lr * (1 - (1 - end) * (k - 1) / steps); logged after the step
    assert rows[0]["lr"] == pytest.approx(1e-3 * (1 - 0.9 / 6))
    assert rows[-1]["lr"] == pytest.approx(1e-3 * 0.1)


def test_every_option_field_is_a_flag_of_fit_with_its_default_and_choices() -> None:
    text = CliRunner().invoke(cli, ["fit", "--help"], terminal_width=200).output
    for field in dataclasses.fields(FitConfig):
        if "help" in field.metadata:
            assert flag(FitConfig, field.name) in text, field.name
        if field.metadata.get("choices"):
            assert "|".join(field.metadata["choices"]) in text, field.name
    assert "--lr FLOAT" in text and "[default: 0.001]" in text
    compare = CliRunner().invoke(cli, ["compare", "--help"], terminal_width=200).output
    assert "--loader" not in compare and "--resume" not in compare and "[default: 100]" in compare


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("lr_schedule", "cosine", "--lr-schedule cosine: choose one of plateau, linear"),
        ("plateau_factor", 1.5, "--plateau-factor 1.5: must be in (0, 1)"),
        ("lr_end_factor", 0.0, "--lr-end-factor 0.0: must be in (0, 1]"),
        ("val_every", 0, "--val-every 0: must be at least 1"),
    ],
    ids=["schedule", "plateau-factor", "end-factor", "val-every"],
)
def test_config_errors_name_the_flag_the_command_line_has(option: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        FitConfig(shards="-", out="-", **{option: value}).check()
    assert message in str(err.value)
    assert CliRunner().invoke(cli, ["fit", "--help"]).output.count(flag(FitConfig, option)) >= 1


def test_standardiser_round_trips_and_refuses_unusable_statistics() -> None:
    units = Standardiser(4.0, 2.0)
    scores = torch.tensor([1.0, 4.0, 9.5])
    assert torch.equal(units.decode(units.encode(scores)), scores)
    assert Standardiser.from_stats({"mean": 4.0, "std": 2.0}, "m") == units
    with pytest.raises(ValueError, match="m: train score statistics mean 1.0, std 0.0"):
        Standardiser.from_stats({"mean": 1.0, "std": 0.0}, "m")
