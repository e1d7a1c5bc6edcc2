"""`gq fit` as a user drives it: config files, resume from the run folder alone, logs a batch job keeps,
TensorBoard and wandb, the small things of eval and predict, and the package seen from someone else's folder."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
from helpers import REPO, invoke, write_scene

from gq.tools.cli import main
from gq.tools.training import eval_cmd
from gq.train.checkpoint import load_checkpoint, save_checkpoint
from gq.train.config import ConfigError, FitConfig
from gq.train.logs import TrainLog

TINY = ["-S", 2, "-G", 4, "--base-channels", 2, "--fc-dims", 8, "--threads", 1]


@pytest.fixture(scope="module")
def shards(shared_dataset) -> Path:
    """24 scenes on a 16^3 grid: every split has a few shards."""
    options = dict(records_per_shard=4, val_fraction=0.25, test_fraction=0.2)
    return shared_dataset(24, grid=16, grasps=32, seed=3, **options)


def gq(*args, ok: bool = True) -> subprocess.CompletedProcess:
    """`gq ARGS` in this process: exit code, stdout, and stderr with the log lines the command prints."""
    result = invoke(main, *args, name="gq", log_level=logging.INFO)
    if ok and result.returncode != 0:
        raise AssertionError(f"gq {args[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def gq_process(*args, cwd: Path = REPO, env: dict | None = None, stderr=subprocess.PIPE) -> subprocess.CompletedProcess:
    """`gq ARGS` as its own process (python -m gq.tools.cli), for what needs one: a file as stderr, wandb."""
    cmd = [sys.executable, "-m", "gq.tools.cli", *map(str, args)]
    result = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=300)
    assert result.returncode == 0, f"gq {args[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gq fit: error: "), result.stderr
    return lines[0]


# -- configs -----------------------------------------------------------------------------------------------


def test_a_runs_config_json_given_back_reproduces_it(shards: Path, tmp_path: Path) -> None:
    gq("fit", "--shards", shards, "--out", tmp_path / "a", "--max-steps", 2, "--lr", "2e-3", "--quiet", *TINY)
    gq("fit", "--config", tmp_path / "a" / "config.json", "--out", tmp_path / "b")
    a, b = (tmp_path / "a" / "config.json").read_text(), (tmp_path / "b" / "config.json").read_text()
    # the same bytes but for the run folder (and, across machines or installs, the "versions" block)
    assert b == a.replace(json.dumps(str(tmp_path / "a")), json.dumps(str(tmp_path / "b")))
    options = json.loads(b)["options"]
    assert options["lr"] == 2e-3 and options["fc_dims"] == [8] and options["progress"] is False


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_flags_override_the_config_file_and_print_config_round_trips(shards: Path, tmp_path: Path, suffix) -> None:
    settings = {"shards": str(shards), "scenes-per-batch": 3, "lr": "1e-3", "fc_dims": [16, 8], "model": "large"}
    path = tmp_path / f"c{suffix}"
    if suffix == ".yaml":  # YAML reads 1e-3 as text: a number written as text is taken as the number
        path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items()).replace('"1e-3"', "1e-3"))
    else:
        path.write_text(json.dumps(settings))
    printed = gq("fit", "--config", path, "--out", tmp_path / "r", "--lr", "5e-4", "--print-config").stdout
    resolved = json.loads(printed)
    assert resolved["scenes_per_batch"] == 3 and resolved["fc_dims"] == [16, 8] and resolved["model"] == "large"
    assert resolved["lr"] == 5e-4  # the flag given wins over the file
    assert resolved["grasps_per_sdf"] == FitConfig.grasps_per_sdf and resolved["out"] == str(tmp_path / "r")
    assert not (tmp_path / "r").exists()  # --print-config trains nothing
    (tmp_path / "printed.json").write_text(printed)
    assert gq("fit", "--config", tmp_path / "printed.json", "--print-config").stdout == printed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lr: 1e-3\nlearning_rate: 0.1\n", "c.yaml: unknown key 'learning_rate'"),
        ("lr: fast\n", "c.yaml: lr: 'fast' is not a number"),
        ("scenes_per_batch: 0\n", "c.yaml: scenes_per_batch 0: must be at least 1"),
        ("fc_dims: [64, x]\n", "c.yaml: fc_dims: [64, 'x'] is not a list of integers"),
        ("loader: disk\n", "c.yaml: loader disk: choose one of cache, dali"),
        ("compile: 1\n", "c.yaml: compile: 1 is not true or false"),
        ("epochs: null\n", "c.yaml: epochs: must be set"),
        ("lr: [1\n", "c.yaml: not valid YAML at line 2"),
        ("- lr\n", "c.yaml: holds a list, not a mapping"),
    ],
    ids=["unknown-key", "not-a-number", "zero", "list", "choice", "bool", "null", "yaml", "not-a-mapping"],
)
def test_a_bad_config_file_is_one_line_naming_the_file_and_key(shards: Path, tmp_path: Path, text, message) -> None:
    (tmp_path / "c.yaml").write_text(text)
    line = one_line_error(
        gq("fit", "--config", tmp_path / "c.yaml", "--shards", shards, "--out", tmp_path / "r", ok=False)
    )
    assert message in line, line
    assert not (tmp_path / "r").exists()


def test_shards_and_out_must_come_from_somewhere(tmp_path: Path) -> None:
    assert "--shards: missing" in one_line_error(gq("fit", "--out", tmp_path / "r", ok=False))


# -- resume with only the run folder ----------------------------------------------------------------------


def test_resume_needs_only_the_run_folder_and_names_a_flag_that_differs(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    gq("fit", "--shards", shards, "--out", run, "--max-steps", 3, "--model", "large", "--quiet", *TINY)
    refused = gq("fit", "--out", run, "--resume", "--max-steps", 6, "--lr", "0.5", "--model", "large", ok=False)
    line = one_line_error(refused)
    assert "--lr 0.5 (the run: 0.001) differs from the run in" in line and "--model" not in line, line
    gq("fit", "--out", run, "--resume", "--max-steps", 6, "--log-every", 3)  # resumable flags are fine
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["model"] == "large"
    options = json.loads((run / "config.json").read_text())["options"]
    assert options["base_channels"] == 2 and options["max_steps"] == 6 and options["log_every"] == 3
    (run / "config.json").unlink()  # lost: last.pt holds the options too
    gq("fit", "--out", run, "--resume", "--max-steps", 8)
    assert json.loads((run / "config.json").read_text())["options"] == {**options, "max_steps": 8, "resume": True}


# -- -G is grasps per SDF: --grasps-per-sdf, once --grasps-per-scene (gq scenes' count of grasps made) ----------

NOTE = "is deprecated"


def _printed(shards: Path, tmp_path: Path, *flags) -> tuple[dict, list[str]]:
    """fit's resolved options for `flags`, and the deprecation notes it logged."""
    result = gq("fit", "--shards", shards, "--out", tmp_path / "r", *flags, "--print-config")
    return json.loads(result.stdout), [line for line in result.stderr.splitlines() if NOTE in line]


def test_grasps_per_sdf_is_fits_flag_and_the_old_flag_still_works_with_one_note(shards: Path, tmp_path: Path) -> None:
    new, quiet = _printed(shards, tmp_path, "--grasps-per-sdf", 8)
    assert new["grasps_per_sdf"] == 8 and "grasps_per_scene" not in new and quiet == []
    assert _printed(shards, tmp_path, "-G", 8) == (new, [])
    old, notes = _printed(shards, tmp_path, "--grasps-per-scene", 8)
    assert old == new  # the same options, so the same batches
    assert notes == ["--grasps-per-scene is deprecated: give --grasps-per-sdf, its new name"]
    both = gq("fit", "--shards", shards, "--out", tmp_path / "r", "-G", 8, "--grasps-per-scene", 4, ok=False)
    assert "--grasps-per-scene and --grasps-per-sdf: one option by two names" in one_line_error(both)
    helps = {cmd: gq(cmd, "--help").stdout for cmd in ("fit", "compare")}
    assert all("-G, --grasps-per-sdf" in h and "--grasps-per-scene" not in h for h in helps.values()), helps
    refused = gq("compare", "--shards", shards, "--out", tmp_path / "c", "-G", 8, "--grasps-per-scene", 4, ok=False)
    assert refused.returncode == 2 and "one option by two names" in refused.stderr and not (tmp_path / "c").exists()


@pytest.mark.parametrize("key", ["grasps_per_scene", "grasps-per-scene"])
def test_a_config_file_with_the_old_key_is_read_with_one_note(shards: Path, tmp_path: Path, key: str) -> None:
    (tmp_path / "c.yaml").write_text(f"{key}: 8\n")
    resolved, notes = _printed(shards, tmp_path, "--config", tmp_path / "c.yaml")
    assert resolved["grasps_per_sdf"] == 8 and "grasps_per_scene" not in resolved
    assert notes == [
        f"--config {tmp_path / 'c.yaml'}: key {key!r} {NOTE}: write grasps_per_sdf, its new name (read as it)"
    ]
    (tmp_path / "c.yaml").write_text(f"{key}: 8\ngrasps_per_sdf: 4\n")
    line = one_line_error(
        gq("fit", "--config", tmp_path / "c.yaml", "--shards", shards, "--out", tmp_path / "r", ok=False)
    )
    assert "'grasps_per_sdf' sets grasps_per_sdf a second time; keep one" in line


def test_fit_config_takes_the_old_keyword_with_a_deprecation_warning() -> None:
    with pytest.warns(DeprecationWarning, match=r"FitConfig\(grasps_per_scene=...\) is deprecated") as caught:
        old = FitConfig(shards="s", out="o", grasps_per_scene=8)
    assert len(caught) == 1 and caught[0].filename == __file__  # one warning, pointing at the caller's line
    assert old.to_dict() == FitConfig(shards="s", out="o", grasps_per_sdf=8).to_dict()
    with pytest.raises(ConfigError, match="one option by two names"):
        FitConfig(shards="s", out="o", grasps_per_sdf=4, grasps_per_scene=8)


def test_a_run_recorded_under_the_old_name_resumes_with_its_own_g(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    gq("fit", "--shards", shards, "--out", run, "--max-steps", 2, "--quiet", *TINY)  # TINY: -G 4, not the default
    # As an older gq wrote it: config.json and last.pt's copy of the options say grasps_per_scene.
    config = json.loads((run / "config.json").read_text())
    config["options"] = {k.replace("grasps_per_sdf", "grasps_per_scene"): v for k, v in config["options"].items()}
    (run / "config.json").write_text(json.dumps(config, indent=2))
    last = load_checkpoint(run / "last.pt")
    last["config"] = {k.replace("grasps_per_sdf", "grasps_per_scene"): v for k, v in last["config"].items()}
    save_checkpoint(run / "last.pt", last)
    resumed = gq("fit", "--out", run, "--resume", "--max-steps", 4)
    note = f"key 'grasps_per_scene' {NOTE}: write grasps_per_sdf, its new name (read as it)"
    assert [line for line in resumed.stderr.splitlines() if NOTE in line] == [f"--config {run / 'config.json'}: {note}"]
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    options = json.loads((run / "config.json").read_text())["options"]  # rewritten under the new name
    assert options["grasps_per_sdf"] == 4 and "grasps_per_scene" not in options
    again = gq("fit", "--out", run, "--resume", "--max-steps", 5)
    assert NOTE not in again.stderr


# -- logs a batch job can read ----------------------------------------------------------------------------


def test_a_fit_whose_stderr_is_a_file_shows_step_and_validation_lines(shards: Path, tmp_path: Path) -> None:
    with open(tmp_path / "stderr.txt", "w") as stderr:
        args = ["--max-steps", 7, "--log-every", 2, "--val-every", 3, *TINY]
        gq_process("fit", "--shards", shards, "--out", tmp_path / "run", *args, stderr=stderr)
    text = (tmp_path / "stderr.txt").read_text()
    assert "\r" not in text  # no progress bar
    steps = [line for line in text.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["2/7", "4/7", "6/7", "7/7"], text
    assert all(" epoch " in line and "train MSE" in line and "samples/s" in line and " lr " in line for line in steps)
    validations = [line for line in text.splitlines() if line.startswith("validation at step")]
    assert [line.split()[3] for line in validations] == ["3", "6", "7"], text
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last_val = [r for r in rows if "val_mse" in r][-1]
    assert f"MSE {last_val['val_mse']:.4f}" in validations[-1] and "Spearman" in validations[-1]
    # each step line's train MSE is in score units: the metrics row's train_mse over the same steps
    train_rows = [r for r in rows if "train_mse" in r]
    assert [f"step {r['step']}/7" for r in train_rows] == [" ".join(line.split()[:2]) for line in steps]
    assert all(f"train MSE {r['train_mse']:.4f} " in line for r, line in zip(train_rows, steps))


def _train_log(stream: io.StringIO, **kwargs) -> TrainLog:
    options = dict(total=100, initial=0, steps_per_epoch=10, log_every=5, score_std=2.0, enabled=True)
    return TrainLog(stream=stream, **{**options, **kwargs})


def test_progress_lines_come_every_log_every_steps_or_interval_whichever_first(caplog) -> None:
    caplog.set_level(logging.INFO, logger="gq.train.logs")
    with _train_log(io.StringIO(), interval_s=3600) as report:
        for step in range(1, 12):
            report.step(step, loss=0.5, samples=8, elapsed=0.01, lr=1e-3)
    assert [r.getMessage().split()[1] for r in caplog.records] == ["5/100", "10/100"]
    assert "train MSE 2.0000" in caplog.records[0].getMessage()  # 0.5 standardised x std 2.0 squared
    caplog.clear()
    with _train_log(io.StringIO(), interval_s=0) as report:  # the interval passed at every step
        for step in range(1, 4):
            report.step(step, loss=0.5, samples=8, elapsed=0.01, lr=1e-3)
    assert [r.getMessage().split()[1] for r in caplog.records] == ["1/100", "2/100", "3/100"]


def test_on_a_terminal_the_bar_shows_train_mse_in_score_units() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    with _train_log(stream) as report:
        report.step(1, loss=0.25, samples=8, elapsed=0.01, lr=1e-3)
        report.log({"step": 1, "loss": 0.25, "train_mse": 1.0, "samples_per_s": 800.0})
    assert "train MSE 1.0000" in stream.getvalue() and "800 samples/s" in stream.getvalue()
    assert "loss 0.25" not in stream.getvalue()


# -- TensorBoard, wandb ------------------------------------------------------------------------------------


def test_tensorboard_events_hold_grouped_tags_and_the_options_as_hparams(shards: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (make install installs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    run = tmp_path / "run"
    gq("fit", "--shards", shards, "--out", run, "--max-steps", 4, "--log-every", 2, "--tensorboard", "--quiet", *TINY)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/mse", "train/lr", "perf/samples_per_s", "perf/data_wait", "val/mse", "val/spearman"} <= tags
    assert all(tag.split("/")[0] in ("train", "val", "perf") for tag in tags), tags
    assert not tags & {"val/grasps", "val/scenes", "time_s", "val_grasps", "loss"}
    assert [e.step for e in events.Scalars("train/mse")] == [2, 4]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert events.Scalars("val/mse")[-1].value == pytest.approx(rows[-1]["val_mse"], rel=1e-6)
    # the hparams plugin's three summaries: the experiment, the run's start (with the values) and its end
    starts = [v for k, v in events.PluginTagToContent("hparams").items() if k.endswith("_start_info")]
    data = HParamsPluginData.FromString(starts[0])
    hparams = getattr(data, data.WhichOneof("data")).hparams
    assert hparams["lr"].number_value == pytest.approx(1e-3) and hparams["fc_dims"].string_value == "8"
    assert hparams["shards"].string_value == str(shards) and hparams["base_channels"].number_value == 2


@pytest.mark.parametrize("extra", ["tensorboard", "wandb"])
def test_a_missing_extra_is_one_line_naming_it(shards: Path, tmp_path: Path, monkeypatch, extra: str) -> None:
    monkeypatch.setitem(sys.modules, extra, None)  # how Python sees a package that is not installed
    flag = ["--tensorboard"] if extra == "tensorboard" else ["--wandb", "proj"]
    line = one_line_error(gq("fit", "--shards", shards, "--out", tmp_path / "r", *flag, ok=False))
    assert f"pip install 'gq-pipeline[{extra}]'" in line
    assert not (tmp_path / "r").exists()


def _wandb_runs(run: Path) -> list[tuple[str, bytes]]:
    """(run id, the .wandb file's bytes) of each offline run folder in RUN/wandb, oldest first."""
    folders = sorted((run / "wandb").glob("offline-run-*"))
    return [(f.name.rsplit("-", 1)[1], next(f.glob("run-*.wandb")).read_bytes()) for f in folders]


@pytest.mark.slow  # two processes that each start wandb's service: ~25 s
def test_wandb_offline_run_writes_its_files_and_resume_continues_the_same_run(shards: Path, tmp_path: Path) -> None:
    pytest.importorskip("wandb", reason="the wandb extra is not installed (make install installs it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # the default mode: offline
    run = tmp_path / "run"
    first = gq_process("fit", "--shards", shards, "--out", run, "--max-steps", 3, "--wandb", "gq-test", *TINY, env=env)
    [(run_id, data)] = _wandb_runs(run)
    assert load_checkpoint(run / "last.pt")["trackers"] == {"wandb_id": run_id}
    assert b"gq-test" in data and b"train/mse" in data and b"val/spearman" in data and b"scenes_per_batch" in data
    assert f"wandb: offline run {run_id}" in first.stderr and "wandb sync" in first.stderr
    gq_process("fit", "--out", run, "--resume", "--max-steps", 6, env=env)
    runs = _wandb_runs(run)
    assert [r[0] for r in runs] == [run_id, run_id] and b"train/mse" in runs[1][1]
    assert load_checkpoint(run / "last.pt")["trackers"] == {"wandb_id": run_id}


# -- eval and predict --------------------------------------------------------------------------------------


def test_every_eval_option_has_help_and_eval_defaults_to_the_test_split() -> None:
    options = [p for p in eval_cmd.params if isinstance(p, click.Option) and p.name not in ("help", "version")]
    assert options and all(p.help for p in options), [p.name for p in options if not p.help]
    assert next(p for p in options if p.name == "split").default == "test"


def test_predict_counts_objects_in_english_and_shows_unknown_scores_as_a_dash(shards: Path, tmp_path: Path) -> None:
    gq("fit", "--shards", shards, "--out", tmp_path / "run", "--max-steps", 2, "--quiet", *TINY)
    rng = np.random.default_rng(0)
    sdf = rng.uniform(-1, 1, (16, 16, 16)).astype(np.float32)
    grasps = rng.uniform(-1, 1, (5, 19)).astype(np.float32)
    write_scene(tmp_path / "one", "mug", sdf=sdf, grasps=grasps)  # no scores
    ckpt = tmp_path / "run" / "last.pt"
    one = gq("predict", ckpt, "--scenes", tmp_path / "one", "--out", tmp_path / "one.parquet", "--top-k", 2).stdout
    assert one.splitlines()[0].split() == ["scene", "rank", "grasp", "prediction"]  # no score column at all
    assert "wrote 5 predictions of 1 object to" in one and "nan" not in one
    write_scene(tmp_path / "two", "mug", sdf=sdf, grasps=grasps)
    write_scene(tmp_path / "two", "box", sdf=sdf, grasps=grasps, scores=np.arange(5, dtype=np.float32))
    two = gq("predict", ckpt, "--scenes", tmp_path / "two", "--out", tmp_path / "two.parquet", "--top-k", 2).stdout
    mug = [line.split() for line in two.splitlines() if line.startswith("mug")]
    assert len(mug) == 2 and all(row[-1] == "-" for row in mug) and "nan" not in two
    assert "(1 object)" in two and "of 2 objects to" in two


# -- the package from someone else's folder ----------------------------------------------------------------


def _foreign_folder(path: Path) -> Path:
    """A folder of the seed's kind: its own train.py and models/ package, which must never be what gq imports."""
    (path / "models").mkdir(parents=True)
    (path / "train.py").write_text("raise SystemExit('imported the folder\\'s own train.py')\n")
    (path / "models" / "__init__.py").write_text("raise SystemExit('imported the folder\\'s own models/')\n")
    return path


# Every subpackage, then a checkpoint loaded: the folder's own train.py or models/ would end the process.
API_LOAD = (
    "import sys, gq.common, gq.shards, gq.synth, gq.pipeline, gq.models, gq.train\n"
    "from gq.train.predict import Estimator\n"
    "est = Estimator.load(sys.argv[1], 'cpu'); print(gq.train.__file__, est.model.config['base_channels'])\n"
)


def test_api_and_gq_work_from_a_folder_with_its_own_train_and_models(shards: Path, tmp_path: Path) -> None:
    folder = _foreign_folder(tmp_path / "user")
    gq("fit", "--shards", shards, "--out", tmp_path / "run", "--max-steps", 2, "--quiet", *TINY)
    cmd = [sys.executable, "-c", API_LOAD, str(tmp_path / "run" / "last.pt")]
    loaded = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    where, channels = loaded.stdout.split()
    assert Path(where).is_relative_to(REPO) and channels == "2"
    help_ = subprocess.run([Path(sys.executable).parent / "gq", "--help"], cwd=folder, capture_output=True, text=True)
    assert help_.returncode == 0 and "shards" in help_.stdout and "fit" in help_.stdout


@pytest.mark.slow  # builds and installs a wheel, then a dataset and a fit through it: ~40 s
def test_a_wheel_installed_elsewhere_builds_shards_and_fits_from_a_foreign_folder(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the repository
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "demo*"))
    wheels, target = tmp_path / "wheels", tmp_path / "target"
    pip = [sys.executable, "-m", "pip", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, "."]
    subprocess.run(build, cwd=source, check=True, capture_output=True)
    [wheel] = wheels.glob("gq_pipeline-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", target, wheel], check=True, capture_output=True)
    packages = {p.parent.name for p in (target / "gq").glob("*/__init__.py")}
    assert packages == {"common", "shards", "synth", "meshes", "models", "pipeline", "train", "tools", "benchmarks"}
    assert not any((target / name).exists() for name in ("train", "models", "pipeline", "shards", "tools"))
    folder = _foreign_folder(tmp_path / "user")
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    help_ = subprocess.run([target / "bin" / "gq", "--help"], cwd=folder, env=env, capture_output=True, text=True)
    assert help_.returncode == 0 and "import-meshes" in help_.stdout, help_.stderr
    scenes = ["--scenes", 12, "--out", "scenes", "--grid", 16, "--grasps-per-scene", 16, "--workers", 1]
    gq_process("scenes", *scenes, cwd=folder, env=env)
    build = ["--out", "shards", "--grid", 16, "--max-grasps", 16, "--records-per-shard", 2, "--val-fraction", 0.25]
    gq_process("shards", "build", "scenes", *build, "--test-fraction", 0.2, cwd=folder, env=env)
    gq_process("fit", "--shards", "shards", "--out", "run", "--max-steps", 3, *TINY, cwd=folder, env=env)
    cmd = [sys.executable, "-c", API_LOAD, "run/last.pt"]
    loaded = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    assert Path(loaded.stdout.split()[0]).is_relative_to(target)  # the wheel's gq, not the checkout's
    assert load_checkpoint(folder / "run" / "last.pt")["state"]["step"] == 3
