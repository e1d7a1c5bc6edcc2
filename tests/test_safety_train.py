"""The trainer loses nothing and uses no wrong data (issue 9): a locked run folder, atomic writes that
survive a full disk, one-line refusals of bad values and files, and datasets compared by identity.

Most cases run `train/run.py` in-process (click's CliRunner); only the concurrency case starts a
second process, because a lock is only proven by another process holding it.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from helpers import REPO, fit_command, tmpfs

from gq.common.ownership import lock_path
from gq.models import build_model
from gq.pipeline import Batch
from gq.shards import read_manifest
from gq.tools.training import cli
from gq.train import Forward, Standardiser, TrainError, train_step
from gq.train.checkpoint import load_checkpoint, save_checkpoint

GRID, GRASPS = 16, 32
TINY = ["--base-channels", "2", "--fc-dims", "8", "--threads", "1", "--quiet", "-S", "2", "-G", "4"]


OPTIONS = dict(records_per_shard=8, val_fraction=0.2, test_fraction=0.1)


@pytest.fixture(scope="module")
def data_a(shared_dataset) -> Path:
    return shared_dataset(40, grid=GRID, grasps=GRASPS, seed=1, **OPTIONS)


@pytest.fixture(scope="module")
def data_b(shared_dataset) -> Path:
    """Same layout as data_a, other scenes: another dataset."""
    return shared_dataset(40, grid=GRID, grasps=GRASPS, seed=2, **OPTIONS)


def invoke(*args) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="run.py")


def fit(shards: Path, out: Path, *args, ok: bool = True) -> Result:
    result = invoke("fit", "--shards", shards, "--out", out, *TINY, *args)
    if ok:
        assert result.exit_code == 0, (result.stderr, result.exception)
    return result


def one_line(result: Result, code: int) -> str:
    """The single stderr line of a refused command (no traceback: an exception would fail here)."""
    assert result.exit_code == code, (result.exit_code, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def fingerprint(shards: Path) -> str:
    return read_manifest(shards).fingerprint


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# -- 1. two fits into one --out: a lock, and temporaries no two writers share ---------------------------


def test_a_second_fit_into_a_busy_run_folder_is_refused_naming_the_holder(data_a: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    flags = ["--max-steps", 1000000, "--ckpt-every", 5, "--log-every", 2, *TINY]
    cmd = [sys.executable, *fit_command(data_a, out, *flags)]
    holder = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "last.pt").exists():
            time.sleep(0.05)
        assert (out / "last.pt").exists(), "the first run should be training by now"
        for flags in ([], ["--overwrite"], ["--resume"]):  # --overwrite would have deleted the live run's files
            line = one_line(fit(data_a, out, "--max-steps", 2, *flags, ok=False), 2)
            assert f"--out {out}: in use by another fit (pid {holder.pid} on {socket.gethostname()}" in line
            assert "train/run.py fit" in line and "choose another --out" in line
            assert (out / "last.pt").exists() and (out / "config.json").exists()
    finally:
        holder.send_signal(signal.SIGTERM)  # checkpoints and exits 0
        _, stderr = holder.communicate(timeout=60)
    assert holder.returncode == 0, stderr
    rows = [(row["step"], "loss" in row) for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert rows == sorted(rows, key=lambda r: r[0]) and len(rows) == len(set(rows)), "one run's rows only"
    assert load_checkpoint(out / "last.pt")["state"]["step"] >= 5
    assert not lock_path(out).exists() and temporaries(out) == []


def test_a_checkpoint_write_never_touches_another_writers_temporary(tmp_path: Path) -> None:
    theirs = tmp_path / ".last.pt.tmp"  # the name every writer used to share
    theirs.write_bytes(b"another process's half-written checkpoint")
    save_checkpoint(tmp_path / "last.pt", {"state": {"step": 7}})
    assert theirs.read_bytes() == b"another process's half-written checkpoint"
    assert load_checkpoint(tmp_path / "last.pt")["state"] == {"step": 7}
    assert temporaries(tmp_path) == [theirs.name]


def test_fit_removes_the_temporaries_a_killed_run_left(data_a: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    fit(data_a, out, "--max-steps", 2)
    for name in (".last.pt.tmp", ".last.pt.k9x_2ab.tmp", ".metrics.jsonl.q1w2e3.tmp"):  # kill -9 mid-write
        (out / name).write_bytes(b"torn")
    fit(data_a, out, "--max-steps", 4, "--resume")
    assert temporaries(out) == [] and not lock_path(out).exists()


# -- 2. full disk during fit -----------------------------------------------------------------------------


@contextmanager
def _tmpfs_full(folder: Path):
    """Fill the tmpfs at `folder` but for 3 pages: room for the small text rewrites, not a checkpoint."""
    stat = os.statvfs(folder)
    filler = folder / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, stat.f_bavail * stat.f_frsize - 3 * 4096)
    try:
        yield
    finally:
        filler.unlink()


@contextmanager
def _file_size_limit(folder: Path):
    """Where no tmpfs can be mounted: the kernel fails every write past 12 KiB (RLIMIT_FSIZE, EFBIG)."""
    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (3 * 4096, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


@pytest.fixture(params=["tmpfs", "rlimit"])
def small_disk(request, tmp_path: Path):
    """(folder, full): `with full(folder):` makes writes there fail as on a full disk."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if request.param == "rlimit":
        yield folder, _file_size_limit
        return
    with tmpfs(folder, "size=2m", skip="cannot mount a tmpfs here; the rlimit case stands in"):
        yield folder, _tmpfs_full


def test_a_full_disk_during_fit_keeps_the_last_checkpoint_and_says_so(data_a: Path, small_disk) -> None:
    folder, full = small_disk
    out = folder / "run"
    fit(data_a, out, "--max-steps", 4)
    before = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt")}
    with full(folder):
        line = one_line(fit(data_a, out, "--max-steps", 8, "--resume", ok=False), 1)
    assert line.startswith(f"run.py fit: error: {out}/") and "could not be written" in line
    assert "is kept" in line and "Free disk space" in line and "--resume" in line
    assert {name: (out / name).read_bytes() for name in before} == before
    assert temporaries(out) == [] and not lock_path(out).exists()
    fit(data_a, out, "--max-steps", 8, "--resume")  # space freed: the run goes on from step 4
    assert load_checkpoint(out / "last.pt")["state"]["step"] == 8


# -- 3, 4, 7. values and files that cannot work: one line, exit 2, nothing written ------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (["--lr", "nan"], "--lr nan: must be a finite number"),
        (["--lr", "inf"], "--lr inf: must be a finite number"),
        (["--weight-decay", "nan"], "--weight-decay nan: must be a finite number"),
        (["--weight-decay", "inf"], "--weight-decay inf: must be a finite number"),
        (["--max-time", "nan"], "--max-time nan: must be a finite number"),
        (["--max-time", "inf"], "--max-time inf: must be a finite number (leave --max-time out for no limit)"),
        (["--init-from", "{text}"], "{text}: unreadable checkpoint: not a PyTorch checkpoint file"),
    ],
    ids=["lr-nan", "lr-inf", "wd-nan", "wd-inf", "max-time-nan", "max-time-inf", "init-from-text-file"],
)
def test_bad_values_are_refused_in_one_line(data_a: Path, tmp_path: Path, args: list, message: str) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello\nthis is not a checkpoint\n")
    args = [a.format(text=text) for a in args]
    line = one_line(fit(data_a, tmp_path / "run", "--max-steps", 2, *args, ok=False), 2)
    assert message.format(text=text) in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["fit", "compare"])
def test_out_naming_a_file_is_refused_in_one_line(data_a: Path, tmp_path: Path, command: str) -> None:
    out = tmp_path / "results.csv"
    out.write_text("a,b\n1,2\n")
    line = one_line(invoke(command, "--shards", data_a, "--out", out, "--max-steps", 2, *TINY), 2)
    assert f"--out {out}: is a file, not a directory" in line
    assert out.read_text() == "a,b\n1,2\n"


# -- 5, 6. resume from what a copy or a kill left -----------------------------------------------------------


def test_best_pt_copied_over_last_pt_is_not_resumable(data_a: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    fit(data_a, out, "--max-steps", 2)
    shutil.copy(out / "best.pt", out / "last.pt")
    line = one_line(fit(data_a, out, "--max-steps", 4, "--resume", ok=False), 2)
    assert f"{out}/last.pt: not a resumable checkpoint" in line and f"--init-from {out}/last.pt" in line


@pytest.mark.parametrize(
    "damage,refused",
    [
        ("torn-last-line", False),  # what kill -9 during a write leaves: dropped, logged
        ("corrupt-line-2", True),  # damage anywhere else: an error naming the line
    ],
    ids=["torn-last-line", "corrupt-line-2"],
)
def test_resume_reads_metrics_jsonl_as_a_kill_leaves_it(
    data_a: Path, tmp_path: Path, caplog, damage: str, refused: bool
) -> None:
    out = tmp_path / "run"
    fit(data_a, out, "--max-steps", 4, "--log-every", 1)
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    if damage == "torn-last-line":
        metrics.write_text("".join(lines) + '{"step": 5, "epoch": 0.25, "lo')
    else:
        metrics.write_text("".join(lines[:1] + ['{"step": 2, "loss": 0.\n'] + lines[2:]))
    result = fit(data_a, out, "--max-steps", 6, "--log-every", 1, "--resume", ok=not refused)
    if refused:
        assert f"{metrics}: line 2 is not a metrics row" in one_line(result, 2)
        return
    assert "dropped a torn last line" in caplog.text
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert [s for s in steps if s > 4] == [5, 6, 6]  # train rows 5, 6 and the final validation


# -- 8. a non-finite loss from non-finite data blames the data ------------------------------------------------


@pytest.mark.parametrize(
    "field,where",
    [
        ("sdf", "SDF of scenes [31]"),
        ("grasps", "grasps or scores of scenes [31]"),
        ("scores", "grasps or scores of scenes [31]"),
    ],
    ids=["sdf", "grasps", "scores"],
)
def test_a_non_finite_loss_from_non_finite_data_names_the_data(field: str, where: str) -> None:
    torch.manual_seed(0)
    model = build_model("small", input_size=GRID, base_channels=2, fc_dims=(8,))
    batch = Batch(
        sdf=torch.rand(2, 1, GRID, GRID, GRID),
        grasps=torch.rand(6, 19),
        scores=torch.rand(6),
        scene_of_grasp=torch.tensor([0, 0, 0, 1, 1, 1]),
        scene_ids=torch.tensor([12, 31]),
    )
    tensor = getattr(batch, field)
    tensor[1 if field == "sdf" else 4].view(-1)[0] = float("nan")
    optimizer = torch.optim.Adam(model.parameters())
    with pytest.raises(TrainError) as err:
        train_step(
            model, batch, forward=Forward(), optimizer=optimizer, scaler=torch.amp.GradScaler("cpu", enabled=False),
            scores=Standardiser(0.0, 1.0), step=3,
        )  # fmt: skip
    assert f"non-finite loss at step 3: non-finite input data ({where} hold NaN or inf)" in str(err.value)
    assert "gq shards verify" in str(err.value) and "--lr" not in str(err.value)


# -- 9. datasets compared by identity, not by path ---------------------------------------------------------


def test_resume_refuses_a_dataset_rebuilt_in_place(data_a: Path, data_b: Path, tmp_path: Path) -> None:
    shards, out = tmp_path / "shards", tmp_path / "run"
    shutil.copytree(data_a, shards)
    fit(shards, out, "--max-steps", 2)
    shutil.rmtree(shards)
    shutil.copytree(data_b, shards)  # same path, other scenes
    line = one_line(fit(shards, out, "--max-steps", 4, "--resume", ok=False), 2)
    assert (
        f"was trained on dataset {fingerprint(data_a)[:16]}, but --shards {shards} is dataset "
        f"{fingerprint(data_b)[:16]}" in line
    )
    assert f"--init-from {out}/last.pt" in line
    assert load_checkpoint(out / "last.pt")["state"]["step"] == 2


@pytest.mark.parametrize("spelling", ["dotdot", "symlink", "relative", "moved-run"])
def test_resume_follows_the_dataset_not_how_its_path_is_spelled(
    data_a: Path, tmp_path: Path, monkeypatch, spelling: str
) -> None:
    out = tmp_path / "run"
    fit(data_a, out, "--max-steps", 2)
    shards = data_a
    if spelling == "dotdot":
        shards = data_a / ".." / data_a.name
    elif spelling == "symlink":
        shards = tmp_path / "link"
        shards.symlink_to(data_a)
    elif spelling == "relative":
        monkeypatch.chdir(data_a.parent)
        shards = Path(data_a.name)
    else:
        out = out.rename(tmp_path / "moved")
    fit(shards, out, "--max-steps", 4, "--resume")
    assert load_checkpoint(out / "last.pt")["state"]["step"] == 4


def test_eval_and_init_from_warn_when_the_checkpoint_was_trained_on_other_data(
    data_a: Path, data_b: Path, tmp_path: Path, caplog
) -> None:
    out = tmp_path / "run"
    fit(data_a, out, "--max-steps", 2)
    same = invoke("eval", out / "last.pt", "--shards", data_a)
    assert same.exit_code == 0 and same.stderr == ""
    other = invoke("eval", out / "last.pt", "--shards", data_b, "--split", "val")
    assert other.exit_code == 0 and json.loads(other.stdout)["val_grasps"] > 0
    warning = (
        f"warning: {out}/last.pt was trained on dataset {fingerprint(data_a)[:16]}, not on --shards' "
        f"dataset {fingerprint(data_b)[:16]}"
    )
    assert other.stderr.strip().splitlines() == [warning + " (another dataset, or this one rebuilt since)"]
    caplog.clear()
    fit(data_b, tmp_path / "from_a", "--max-steps", 2, "--init-from", out / "last.pt")
    assert warning in caplog.text


# -- 10. eval's own checks: one line, exit 2 ---------------------------------------------------------------


@pytest.mark.parametrize(
    "case,message",
    [
        ("text-checkpoint", "{ckpt}: unreadable checkpoint: not a PyTorch checkpoint file"),
        ("other-grid", "{ckpt}: model input size 32 != the dataset's grid 16"),
        ("manifest-without-grid", "{shards}/manifest.json: no valid grid (missing)"),
        ("not-a-dataset", "{shards}/manifest.json: missing"),
    ],
    ids=["text-checkpoint", "other-grid", "manifest-without-grid", "not-a-dataset"],
)
def test_eval_refuses_what_does_not_fit_in_one_line(data_a: Path, tmp_path: Path, case: str, message: str) -> None:
    ckpt, shards = tmp_path / "model.pt", tmp_path / "shards"
    shutil.copytree(data_a, shards)
    torch.save(build_model("small", input_size=GRID, base_channels=2, fc_dims=(8,)).state_dict(), ckpt)
    if case == "text-checkpoint":
        ckpt.write_text("epoch,loss\n1,0.5\n")
    elif case == "other-grid":
        torch.save(build_model("small", input_size=32, base_channels=2, fc_dims=(8,)).state_dict(), ckpt)
    elif case == "manifest-without-grid":
        manifest = json.loads((shards / "manifest.json").read_text())
        del manifest["grid"]
        (shards / "manifest.json").write_text(json.dumps(manifest))
    else:
        (shards / "manifest.json").unlink()
    line = one_line(invoke("eval", ckpt, "--shards", shards), 2)
    assert message.format(ckpt=ckpt, shards=shards) in line


@pytest.mark.parametrize("std", [0.0, -1.0], ids=["zero", "negative"])
def test_an_unusable_score_std_is_refused_not_replaced(data_a: Path, tmp_path: Path, std: float) -> None:
    """std 0 in the manifest used to become 1 silently; now fit stops with one line (verify's, or fit's own)."""
    import shutil

    from gq.shards.manifest import write_manifest

    copy = tmp_path / "copy"
    shutil.copytree(data_a, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["score_stats"]["std"] = std
    write_manifest(copy, {k: v for k, v in manifest.items() if k != "fingerprint"})
    line = one_line(fit(copy, tmp_path / "run", ok=False), 2)
    assert "manifest.json" in line and f"std {'is ' if std == 0 else ''}{std}" in line


def test_compare_and_predict_never_replace_someone_elses_files(data_a: Path, tmp_path: Path) -> None:
    """compare into a folder of someone else's, predict onto an existing non-Parquet file: refused, kept."""
    folder = tmp_path / "theirs"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    line = one_line(invoke("compare", "--shards", data_a, "--out", folder, "--overwrite", "--max-steps", 1), 2)
    assert "holds 'notes.txt' and no .gq-owned.json says compare wrote it" in line
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    line = one_line(
        invoke(
            "predict",
            tmp_path / "any.pt",
            "--shards",
            data_a,
            "--split",
            "val",
            "--out",
            folder / "notes.txt",
            "--overwrite",
        ),
        2,
    )
    assert "notes.txt: exists and is not a Parquet file" in line
    assert (folder / "notes.txt").read_text() == "mine"


# -- issue 22: a run's history and trackers checked at resume; compare checks before it changes -------------------


@pytest.mark.parametrize("damage", ["deleted", "head-trimmed", "tail-trimmed", "edited"])
def test_resume_refuses_a_metrics_history_other_than_last_pt_recorded(
    data_a: Path, tmp_path: Path, damage: str
) -> None:
    out = tmp_path / "run"
    fit(data_a, out, "--max-steps", 4, "--log-every", 1)
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    if damage == "deleted":
        metrics.unlink()
    else:
        kept = {
            "head-trimmed": lines[2:],
            "tail-trimmed": lines[:-2],
            "edited": [lines[0].replace('"step": 1', '"step": 1, "note": 0'), *lines[1:]],
        }[damage]
        metrics.write_text("".join(kept))
    before = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt")}
    line = one_line(fit(data_a, out, "--max-steps", 6, "--log-every", 1, "--resume", ok=False), 2)
    assert f"{metrics}: " in line and "last.pt (step 4) recorded" in line and "--init-from" in line
    assert {name: (out / name).read_bytes() for name in before} == before


def test_resume_with_metrics_jsonl_a_directory_is_one_line(data_a: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    fit(data_a, out, "--max-steps", 2)
    metrics = out / "metrics.jsonl"
    metrics.unlink()
    metrics.mkdir()
    line = one_line(fit(data_a, out, "--max-steps", 4, "--resume", ok=False), 2)
    assert f"{metrics}: is not a file" in line


@pytest.mark.parametrize("case", ["a-file", "read-only"])
def test_a_tensorboard_folder_that_cannot_be_written_at_resume_says_what_to_fix(
    data_a: Path, tmp_path: Path, case: str
) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (make install installs it)")
    out = tmp_path / "run"
    fit(data_a, out, "--max-steps", 2, "--tensorboard")
    board = out / "tensorboard"
    shutil.rmtree(board)
    before = {name: (out / name).read_bytes() for name in ("last.pt", "metrics.jsonl")}
    if case == "a-file":
        board.write_text("mine")
        line = one_line(fit(data_a, out, "--max-steps", 4, "--tensorboard", "--resume", ok=False), 1)
        board.unlink()
    else:
        board.mkdir()
        with tmpfs(board, "ro,size=1m", skip="cannot mount a read-only file system here"):
            line = one_line(fit(data_a, out, "--max-steps", 4, "--tensorboard", "--resume", ok=False), 1)
    assert f"{board}: TensorBoard's events cannot be written" in line and "--resume" in line
    assert {name: (out / name).read_bytes() for name in before} == before
    fit(data_a, out, "--max-steps", 4, "--tensorboard", "--resume")  # fixed: the run goes on
    assert load_checkpoint(out / "last.pt")["state"]["step"] == 4


def test_compare_overwrite_checks_both_run_folders_before_it_changes_either(data_a: Path, tmp_path: Path) -> None:
    from gq.common.ownership import write_record
    from gq.train.compare import OUTPUTS

    out = tmp_path / "cmp"
    fit(data_a, out / "cache", "--max-steps", 2, "--loader", "cache")  # an earlier comparison's cache run
    write_record(out, tool="compare", entries=OUTPUTS)
    (out / "dali").mkdir()
    (out / "dali" / "notes.txt").write_text("mine")  # since then, a folder another command owns
    write_record(out / "dali", tool="scenes", entries=["notes.txt"])
    before = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    line = one_line(invoke("compare", "--shards", data_a, "--out", out, "--overwrite", "--max-steps", 1, *TINY), 2)
    assert f"--out {out / 'dali'}: written by scenes, not fit" in line
    assert {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_resume_with_overwrite_is_refused_in_one_line(data_a: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    fit(data_a, out, "--max-steps", 2)
    before = (out / "last.pt").read_bytes()
    line = one_line(fit(data_a, out, "--max-steps", 4, "--resume", "--overwrite", ok=False), 2)
    assert "--resume and --overwrite" in line
    assert (out / "last.pt").read_bytes() == before


def test_a_resume_says_from_which_step(data_a: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "run"
    fit(data_a, out, "--max-steps", 3)
    caplog.set_level("INFO")
    fit(data_a, out, "--max-steps", 5, "--resume")
    assert f"resuming the run in {out} from step 3 (last.pt)" in caplog.text


def test_ctrl_c_before_the_first_validation_says_none_ran_and_how_to_resume(data_a: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    flags = ["--max-steps", 1000000, "--val-every", 1000000, "--ckpt-every", 1000000, *TINY]
    proc = subprocess.Popen([sys.executable, *fit_command(data_a, out, *flags)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "no validation ran" in stdout and "best val MSE" not in stdout
    assert f"Resume with: gq fit --out {out} --resume" in stderr
