"""The training recipe: `fit(cfg)` = setup, then train_step / validate / save_checkpoint in a loop, then cleanup.

Shaped like torchtune's single-device recipes: `setup` builds the device, run folder, data, model,
optimizer and schedule (or restores them from last.pt) and registers every resource on one
ExitStack, so `cleanup` (also on an error, when `fit` is called as a library) closes the loaders,
TensorBoard, the process group and the run folder's lock. Where the run stands is `Progress`, which
last.pt holds. Scores are standardised with the train split's statistics for the loss; every
reported metric is in score units. Both loader modes drive the exact same loop.
"""

from __future__ import annotations

import logging
import math
import resource
import shlex
import signal
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from gq.models import CheckpointError, GQEstimatorBase, build_model
from gq.pipeline import Batch, keep_freed_host_memory, open_dataset, open_loader, resolve_device
from gq.shards import DatasetError

from .checkpoint import check_resumable, dataset_warning, load_checkpoint, load_model, save_checkpoint
from .config import BASE_CHANNELS, ConfigError, FitConfig
from .distributed import Distributed, env_rank, is_main_rank, job_id, resume_on_restart, world_change_note
from .logs import TrainLog
from .plots import plot_curves
from .rundir import RunDir, run_lock
from .scores import Standardiser
from .step import Forward, TrainError, evaluate, train_step

log = logging.getLogger("train")


@dataclass
class LogWindow:
    """Sums over the steps since the last metrics row (checkpointed, so rows after a resume match a whole run)."""

    loss: float = 0.0
    steps: int = 0
    samples: int = 0
    wait: float = 0.0
    time: float = 0.0

    def add(self, *, loss: float, samples: int, wait: float, elapsed: float) -> None:
        self.loss += loss
        self.steps += 1
        self.samples += samples
        self.wait += wait
        self.time += elapsed


class Stop(str, Enum):
    """Why a training run ended: summary.json's "stopped", and (but SIGNAL) last.pt's "finished"."""

    EPOCHS = "epochs"
    MAX_STEPS = "max_steps"
    MAX_TIME = "max_time"
    EARLY_STOPPING = "early_stopping"
    SIGNAL = "signal"  # SIGTERM / SIGINT on some rank: checkpointed, resumable


@dataclass
class Progress:
    """Where a run stands; last.pt holds it (as "state"), so a resumed run goes on counting."""

    step: int = 0
    best_val_mse: float = math.inf
    best_step: int = 0
    bad_validations: int = 0
    train_time: float = 0.0  # seconds of training steps, validation excluded
    window: LogWindow = field(default_factory=LogWindow)
    # Why the run ended (never SIGNAL), recorded in its last checkpoint: a resume after a kill during the
    # last outputs then rewrites them and trains nothing. None: not ended.
    finished: Stop | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "finished": self.finished.value if self.finished else None}  # plain text in last.pt

    @classmethod
    def from_dict(cls, state: dict) -> Progress:
        known = {f.name for f in fields(cls)} - {"window", "finished"}
        finished = Stop(state["finished"]) if state.get("finished") else None
        kept = {k: v for k, v in state.items() if k in known}
        return cls(**kept, window=LogWindow(**state["window"]), finished=finished)


@dataclass
class Throughput:
    """This process's steady-state totals (the first step, which carries start-up, is left out)."""

    samples: int = 0
    wait: float = 0.0
    time: float = 0.0


def build_fit_model(
    cfg: FitConfig, *, grid: int, scores: Standardiser, init: tuple[GQEstimatorBase, dict | None] | None = None
) -> GQEstimatorBase:
    """A fresh model, or `init` = load_model(--init-from) (ours or the seed's), predicting standardised scores."""
    if not cfg.init_from:
        kind = cfg.model or "small"
        channels = cfg.base_channels or BASE_CHANNELS.get(kind)
        return build_model(kind, input_size=grid, base_channels=channels, fc_dims=cfg.fc_dims)
    model, trained = init or load_model(cfg.init_from)
    have = {**model.config, "fc_dims": tuple(model.config["fc_dims"])}
    wanted = {"kind": cfg.model, "base_channels": cfg.base_channels, "fc_dims": cfg.fc_dims, "input_size": grid}
    clash = [f"{k} {v} (checkpoint: {have[k]})" for k, v in wanted.items() if v is not None and v != have[k]]
    if clash:
        raise ConfigError(f"--init-from {cfg.init_from}: the checkpoint's model does not match: {', '.join(clash)}")
    # Seed checkpoints predict raw scores; ours predict scores standardised with their own dataset's
    # statistics. Either way, fold the change of units into the last layer: same function, new units.
    scores.refold(model, Standardiser.of_checkpoint(trained))
    return model


class _StopFlag:
    """SIGTERM / SIGINT ask the loop to checkpoint and return at the next step boundary. Held while `train`
    runs: once the run has ended they are only noted, so its last outputs are never cut short. Not during
    setup: a rank waiting there for the others (a process group whose rank 0 was refused) must end at once
    when torchrun stops the job, and nothing setup writes is left half-written by a kill."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    @property
    def name(self) -> str:
        """The signal received here, or what stopped a rank that received none."""
        return signal.Signals(self.signal).name if self.signal else "a signal on another rank"

    def poll(self, dist: Distributed, device: torch.device, *, out_of_time: bool) -> tuple[bool, bool]:
        """(a signal asked to stop, the time budget is spent), as all ranks agree: either on any rank counts for
        every rank (one all-reduce), so all stop at the same step (ranks' clocks differ; a lone stop would hang
        or break the others' next collective)."""
        flags = (self.signal is not None, out_of_time)
        if dist.enabled:
            t = torch.tensor([float(f) for f in flags], device=device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flags = tuple(bool(v) for v in t.tolist())
        return flags


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "host peak RSS"


class FitRecipe:
    """One training run of `cfg`, in steps a caller can drive: setup, train_step, validate, save_checkpoint, cleanup.

    `fit` is `setup()` then `train()`; a benchmark or a custom loop calls the steps itself. Every resource
    (loaders, the run folder's lock, TensorBoard, the process group) is released by `cleanup()`, which the
    context manager calls even when a step raises.

    Args:
        cfg: The run's options (`FitConfig`, every `gq fit` option); checked on construction.

    Raises:
        ConfigError: An option value that cannot work, naming its flag.

    Example:
        ```python
        from gq.train import FitConfig, FitRecipe

        with FitRecipe(FitConfig(shards="data/shards", out="runs/a", max_steps=100)) as recipe:
            recipe.setup()  # device, run folder (locked), data, model, optimizer; restored on resume
            for batch in recipe.train_loader:
                loss = recipe.train_step(batch)
                if recipe.progress.step == 100:
                    break
            print(recipe.validate()["val_r2"])
        ```
    """

    def __init__(self, cfg: FitConfig) -> None:
        cfg = resume_on_restart(cfg)  # under torchrun --max-restarts, a restarted worker continues from last.pt
        cfg.check()
        self.cfg = cfg
        self._stack = ExitStack()
        self.progress = Progress()
        self.first_batch_s: float | None = None
        self._stop = _StopFlag()

    def __enter__(self) -> FitRecipe:
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    # -- setup ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Device and ranks, the run folder (locked), data, model, optimizer, schedule; restored on --resume."""
        cfg, stack = self.cfg, self._stack
        self.start = time.perf_counter()
        if is_main_rank():  # the rank that writes holds RUN_DIR for the whole run
            stack.enter_context(run_lock(Path(cfg.out)))
        requested = resolve_device(cfg.device)
        self.dist = dist = Distributed.from_env(requested.type)
        stack.callback(dist.shutdown)
        self.device = device = dist.device(requested)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if device.type == "cpu":
            keep_freed_host_memory()
        self.run = RunDir(Path(cfg.out), writer=dist.is_main)
        if dist.is_main:
            self.run.prepare(cfg)
        dist.barrier()  # the other ranks start once rank 0 has checked (and maybe cleared) RUN_DIR
        stack.callback(self.run.close)
        # Opened and quick-verified once: its identity is checked against last.pt, then both loaders share it.
        opening = time.perf_counter()
        self.dataset = open_dataset(cfg.shards, cache_dir=cfg.cache_dir, cache_limit=cfg.cache_limit)
        self.open_s = time.perf_counter() - opening  # part of the time to the first batch
        self.identity = self.dataset.fingerprint
        resumed = self._resumable_checkpoint() if cfg.resume else None
        init = load_model(cfg.init_from) if cfg.init_from else None  # a bad file fails before any data is loaded
        if init is not None and dist.is_main and (warning := dataset_warning(cfg.init_from, init[1], self.identity)):
            log.warning(warning)
        torch.manual_seed(cfg.seed)

        self._setup_data()
        self.model = build_fit_model(cfg, grid=self.train_loader.grid, scores=self.scores, init=init).to(device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        self.forward = Forward.build(device.type, amp=cfg.amp, channels_last=cfg.channels_last, zero_sdf=cfg.zero_sdf)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.total_steps = cfg.max_steps or cfg.epochs * len(self.train_loader)
        self.scheduler = self._scheduler()
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        if resumed is not None:
            self._restore(resumed)
        self.run.track(cfg, start_step=self.progress.step, state=(resumed or {}).get("trackers"))
        self.run.write_config(
            cfg,
            {
                "job": job_id(),  # a torchrun restart resumes only a run its own job holds
                "device": str(device),
                "world_size": dist.world_size,
                "model": self.model.config,
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "score_mean": self.scores.mean,
                "score_std": self.scores.std,
                "steps_per_epoch": len(self.train_loader),
            },
        )
        net: torch.nn.Module = torch.compile(self.model) if cfg.compile else self.model
        if dist.enabled:
            net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        self.net = net

    def _resumable_checkpoint(self) -> dict:
        """last.pt, checked to continue this very run: same options (but RESUMABLE ones), same dataset."""
        last = self.run.path / "last.pt"
        resumed = load_checkpoint(last)
        check_resumable(last, resumed)
        diff = self.cfg.differences(FitConfig.from_dict(resumed["config"]))
        if diff:
            raise ConfigError(f"--resume: {', '.join(diff)} differ from the run in {self.run.path}")
        old = resumed.get("dataset", {}).get("fingerprint")
        if old != self.identity:
            was = f"dataset {old[:16]}" if old else "a dataset it does not record (an older checkpoint)"
            raise ConfigError(
                f"--resume: {last} was trained on {was}, but --shards {self.cfg.shards} is dataset "
                f"{self.identity[:16]} (rebuilt, or another one); resume on the run's own dataset, or "
                f"start a new run from these weights: --init-from {last} --out NEW_DIR"
            )
        return resumed

    def _setup_data(self) -> None:
        """The train and val loaders of this rank, and the train split's score units."""
        cfg, dist = self.cfg, self.dist
        progress = cfg.progress and dist.is_main
        dataset = self.dataset
        opening = time.perf_counter()
        common = dict(mode=cfg.loader, device=self.device, rank=dist.rank, world_size=dist.world_size,
                      shuffle_window=cfg.window, progress=progress)  # fmt: skip
        self.train_loader = self._stack.enter_context(
            open_loader(dataset, split="train", scenes_per_batch=cfg.scenes_per_batch,
                        grasps_per_sdf=cfg.grasps_per_sdf, seed=cfg.seed, drop_last=dist.enabled, **common)
        )  # fmt: skip
        self.open_s += time.perf_counter() - opening  # with the first next(): the loader's time to first batch
        self.val_loader = self._stack.enter_context(
            open_loader(dataset, split="val", scenes_per_batch=cfg.val_scenes_per_batch,
                        grasps_per_sdf=self.train_loader.max_grasps, seed=0, **common)
        )  # fmt: skip
        try:
            self.scores = Standardiser.from_stats(self.train_loader.score_stats, str(dataset.root / "manifest.json"))
        except ValueError as err:
            raise DatasetError(f"{err}; run gq shards verify on the dataset") from None

    def _scheduler(self) -> torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau:
        cfg = self.cfg
        if cfg.lr_schedule == "linear":  # the seed's train_gq.py: stepped every training step, over the planned steps
            return torch.optim.lr_scheduler.LinearLR(
                self.optimizer, 1.0, cfg.lr_end_factor, total_iters=self.total_steps
            )
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, "min", factor=cfg.plateau_factor, patience=cfg.plateau_patience
        )

    def _restore(self, resumed: dict) -> None:
        self.model.load_state_dict(resumed["model"])
        self.optimizer.load_state_dict(resumed["optimizer"])
        self.scheduler.load_state_dict(resumed["scheduler"])
        self.scaler.load_state_dict(resumed["scaler"])
        self.train_loader.load_state_dict(resumed["loader"])
        torch.set_rng_state(resumed["rng"]["torch"])
        if self.device.type == "cuda" and resumed["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(resumed["rng"]["cuda"], self.device)
        try:
            self.progress = Progress.from_dict(resumed["state"])
        except (KeyError, TypeError, ValueError) as err:  # an edited state: one line, as for every checkpoint key
            raise CheckpointError(
                f"{self.run.path / 'last.pt'}: no valid state ({type(err).__name__}: {err}); put the run's own "
                "last.pt back, or start a new run from its weights with --init-from and another --out"
            ) from None
        self.run.truncate_metrics(self.progress.step, resumed.get("metrics"))
        if self.dist.is_main:
            log.info("resuming the run in %s from step %d (last.pt)", self.run.path, self.progress.step)
        if not self.cfg.max_steps:  # epochs on another number of ranks have another number of steps
            self.total_steps = self.progress.step + self.train_loader.batches_left(self.cfg.epochs)
        rest = len(self.train_loader.plan()) - self.train_loader.position
        note = world_change_note(resumed["loader"], cfg=self.cfg, world_size=self.dist.world_size, rest=rest)
        if note and self.dist.is_main:
            log.warning(note)

    # -- one step, one validation, one checkpoint ---------------------------------------------------
    def train_step(self, batch: Batch) -> float:
        """One optimisation step (and the linear schedule's step); returns the loss."""
        loss = train_step(
            self.net, batch, forward=self.forward, optimizer=self.optimizer, scaler=self.scaler, scores=self.scores,
            step=self.progress.step + 1,
        )  # fmt: skip
        self.progress.step += 1
        if self.cfg.lr_schedule == "linear":
            self.scheduler.step()
        return loss

    def validate(self) -> dict:
        """Val metrics now: logged, best.pt kept when they improve, the plateau schedule told."""
        p = self.progress
        result = {
            "step": p.step,
            "epoch": round(p.step / len(self.train_loader), 4),
            "time_s": round(p.train_time, 3),
            **evaluate(self.model, self.val_loader, scores=self.scores, forward=self.forward),
        }
        self.run.log(result)
        if result["val_mse"] < p.best_val_mse:
            p.best_val_mse, p.best_step, p.bad_validations = result["val_mse"], p.step, 0
            self.save_checkpoint(self.run.path / "best.pt", full=False)
        else:
            p.bad_validations += 1
        if self.cfg.lr_schedule == "plateau":
            self.scheduler.step(result["val_mse"])
        return result

    def save_checkpoint(self, path: Path, *, full: bool = True) -> None:
        """Weights, score units and dataset identity; `full` adds all that --resume needs. Main rank only."""
        if not self.dist.is_main:
            return
        payload = {
            "model": self.model.state_dict(),
            "model_config": {**self.model.config, "fc_dims": list(self.model.fc_dims)},
            "score_stats": self.scores.to_dict(),
            "dataset": {"fingerprint": self.identity},
            "state": self.progress.to_dict(),
            "config": self.cfg.to_dict(),
        }
        if full:
            cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
            payload.update(
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                scaler=self.scaler.state_dict(),
                loader=self.train_loader.state_dict(),
                rng={"torch": torch.get_rng_state(), "cuda": cuda},
                trackers=self.run.tracker_state(),
                metrics=self.run.metrics_record(),  # the history so far, checked at --resume
            )
        save_checkpoint(path, payload)

    def _log_row(self) -> dict:
        """The metrics row of the steps since the last one (training loss in standardised and score units)."""
        w, p = self.progress.window, self.progress
        row = {
            "step": p.step,
            "epoch": round(p.step / len(self.train_loader), 4),
            "time_s": round(p.train_time, 3),
            "loss": w.loss / w.steps,
            "train_mse": w.loss / w.steps * self.scores.std**2,
            "lr": self.optimizer.param_groups[0]["lr"],
            "samples_per_s": w.samples / w.time,
            "data_wait": w.wait / w.time,
        }
        self.run.log(row)
        p.window = LogWindow()
        return row

    # -- the loop ------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Train until --epochs / --max-steps / --max-time / early stopping / a signal; returns the summary."""
        with self._stop:  # from here a signal stops the run at a step boundary, checkpointed
            return self._train()

    def _train(self) -> dict:
        cfg, p, stop = self.cfg, self.progress, self._stop
        last_val = self._validation_at(p.step)  # a resumed run's validation of its last step is not repeated
        if p.finished and not self._more_to_train():  # resumed after it ended: its outputs only
            return self._finish(p.finished, last_val, Throughput(), 0)
        p.finished = None
        total = self.total_steps
        val_every = cfg.val_every or len(self.train_loader)
        steps_at_start = p.step
        totals = Throughput()
        stopped = Stop.MAX_STEPS if cfg.max_steps else Stop.EPOCHS
        progress = cfg.progress and self.dist.is_main
        with TrainLog(
            total=total,
            initial=p.step,
            steps_per_epoch=len(self.train_loader),
            log_every=cfg.log_every,
            score_std=self.scores.std,
            enabled=progress,
        ) as report:
            self.run.sinks.append(report)  # rows reach it as they are logged: its bar, its validation lines
            batches = iter(self.train_loader)
            while p.step < total:
                t0 = time.perf_counter()
                batch = next(batches, None)
                if batch is None:  # end of epoch: the loader has moved on to the plan's next epoch
                    batches = iter(self.train_loader)
                    continue
                wait = time.perf_counter() - t0
                first = self.first_batch_s is None
                if first:  # opening the loader (cache load, DALI build) plus waiting for the first batch
                    self.first_batch_s = self.open_s + wait
                loss = self.train_step(batch)
                elapsed = time.perf_counter() - t0
                p.train_time += elapsed
                if not first:  # the first step carries start-up (first-call kernels, compile): kept out of the rates
                    totals.samples += batch.num_grasps
                    totals.wait += wait
                    totals.time += elapsed
                p.window.add(loss=loss, samples=batch.num_grasps, wait=wait, elapsed=elapsed)
                report.step(
                    step=p.step,
                    loss=loss,
                    samples=batch.num_grasps,
                    elapsed=elapsed,
                    lr=self.optimizer.param_groups[0]["lr"],
                )
                step = p.step
                asked, out_of_time = stop.poll(self.dist, self.device, out_of_time=self._out_of_time())
                if out_of_time:
                    stopped, total = Stop.MAX_TIME, step  # the last step: log, validate and checkpoint it
                if step % cfg.log_every == 0 or step == total:
                    self._log_row()
                if step % val_every == 0 or step == total:
                    last_val = self.validate()
                    if cfg.early_stopping and p.bad_validations >= cfg.early_stopping:
                        stopped = Stop.EARLY_STOPPING
                if step == total or stopped is Stop.EARLY_STOPPING:
                    p.finished = stopped  # the checkpoint below is the run's last
                if step % cfg.ckpt_every == 0 or last_val and last_val["step"] == step:
                    self.save_checkpoint(self.run.path / "last.pt")
                if stopped in (Stop.EARLY_STOPPING, Stop.MAX_TIME):
                    break
                if p.finished is None and asked:  # an ended run just ends
                    stopped = Stop.SIGNAL
                    self.save_checkpoint(self.run.path / "last.pt")
                    break
        if stopped is Stop.SIGNAL:
            if self.dist.is_main:
                log.warning(
                    "stopped by %s at step %d; last.pt saved. Resume with: %s",
                    stop.name, p.step, shlex.join(["gq", "fit", "--out", str(self.run.path), "--resume"]),
                )  # fmt: skip
        elif p.finished is None:  # the budget was spent before this process trained (resumed with fewer steps)
            p.finished = stopped
            if last_val is None or last_val["step"] != p.step:
                last_val = self.validate()
            self.save_checkpoint(self.run.path / "last.pt")
        return self._finish(stopped, last_val, self._job_throughput(totals), p.step - steps_at_start)

    def _validation_at(self, step: int) -> dict | None:
        """The logged validation of `step`, if any (after a resume: so it is neither repeated nor counted twice)."""
        rows = [row for row in self.run.rows() if "val_mse" in row and row["step"] == step]
        return rows[-1] if rows else None

    def _out_of_time(self) -> bool:
        """Whether the run has spent its --max-time (training steps only): the one place that decides it."""
        return self.cfg.max_time is not None and self.progress.train_time >= self.cfg.max_time

    def _more_to_train(self) -> bool:
        """Whether a run that ended is given more by the resumed options (a larger --max-steps, --epochs or
        --max-time); an early-stopped run has ended for good."""
        p = self.progress
        return p.finished is not Stop.EARLY_STOPPING and p.step < self.total_steps and not self._out_of_time()

    def _job_throughput(self, totals: Throughput) -> Throughput:
        """Throughput of the whole job: all ranks' samples over the slowest rank's time."""
        if not self.dist.enabled:
            return totals
        sums = torch.tensor([totals.samples, totals.wait], dtype=torch.float64, device=self.device)
        slowest = torch.tensor([totals.time], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
        return Throughput(sums[0].item(), sums[1].item() / self.dist.world_size, slowest.item())

    def _finish(self, stopped: Stop, last_val: dict | None, totals: Throughput, steps_here: int) -> dict:
        """summary.json (returned) and curves.png."""
        cfg, p, model = self.cfg, self.progress, self.model
        peak, peak_kind = _peak_memory(self.device)
        summary = {
            "steps": p.step,
            "epochs": round(p.step / len(self.train_loader), 4),
            "stopped": stopped.value,
            "signal": self._stop.name if stopped is Stop.SIGNAL else None,
            "train_time_s": p.train_time,
            "samples_per_s": totals.samples / totals.time if totals.time else None,
            "data_wait": totals.wait / totals.time if totals.time else None,
            "first_batch_s": self.first_batch_s,
            "steps_this_process": steps_here,
            **{k: v for k, v in (last_val or {}).items() if k.startswith("val_")},
            "best_val_mse": p.best_val_mse,
            "best_step": p.best_step,
            "peak_memory_bytes": peak,
            "peak_memory_kind": peak_kind,
            "wall_s": time.perf_counter() - self.start,
            "device": str(self.device),
            "loader": cfg.loader,
            "world_size": self.dist.world_size,
            "model": model.config["kind"],
            "parameters": sum(x.numel() for x in model.parameters()),
            "scenes_per_batch": cfg.scenes_per_batch,
            "grasps_per_sdf": cfg.grasps_per_sdf,
            "shuffle_window": cfg.shuffle_window,
            "resident_bytes": self.train_loader.resident_bytes,
        }
        self.run.write_summary(summary)
        if self.dist.is_main:
            title = (
                f"{model.config['kind']} model, {cfg.loader} loader, S={cfg.scenes_per_batch} G={cfg.grasps_per_sdf}"
            )
            plot_curves(self.run.rows(), self.run.path / "curves.png", title)
            self.run.seal()
        # Ranks leave together: none tears its process group down while rank 0 still writes and plots.
        self.dist.barrier()
        return summary

    # -- cleanup -------------------------------------------------------------------------------------
    def cleanup(self) -> None:
        """Close what setup and train opened (loaders, TensorBoard, process group, RUN_DIR's lock), newest first."""
        self._stack.close()


# How gloo and NCCL say that a collective's peer is gone (gloo's errors reach Python as plain RuntimeErrors).
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted")


def lost_peer(err: RuntimeError) -> bool:
    """Whether `err` is a collective that failed because another rank of the job is gone."""
    return isinstance(err, torch.distributed.DistError) or any(text in str(err) for text in _LOST_PEER)


def lost_ranks(err: BaseException) -> str:
    """What a rank says, in one line, when a collective failed under it (gloo's or NCCL's error, often a page)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"the job's other ranks stopped answering ({first[:160]}); the rank that failed says why in its own line"


def fit(cfg: FitConfig) -> dict:
    """Train a model as configured; returns the summary (also written to RUN_DIR/summary.json).

    What `gq fit` runs: the run folder `cfg.out` gets config.json, metrics.jsonl, last.pt, best.pt,
    summary.json and curves.png. It stops at `epochs`, `max_steps`, `max_time`, early stopping or
    SIGTERM/SIGINT (after saving last.pt); `resume=True` continues from last.pt with the same batches.

    Args:
        cfg: The run's options (`FitConfig`, one field per `gq fit` option, with the same defaults).

    Returns:
        The summary: steps, why it stopped, train time, samples/s, data-wait fraction, the last
        validation's metrics (`val_mse`, `val_r2`, `val_spearman`, `val_mse_mean_baseline`, ranking
        metrics), the best val MSE and its step, peak memory, device, model and parameters.

    Raises:
        ConfigError: An option value that cannot work, or a run folder that cannot be used (another
            run holds it, it is not a run, resumed options differ).
        DatasetError: `cfg.shards` is not a usable dataset, or resumes on another dataset.
        LoaderError: Settings that give no batches.
        TrainError: A non-finite loss (naming the step and the batch's scenes).
        WriteError: A run file could not be written (a full disk); last.pt stays as it was.

    Example:
        ```python
        from gq.train import FitConfig, fit

        summary = fit(FitConfig(shards="data/shards", out="runs/a", grasps_per_sdf=64, max_time=600))
        print(summary["val_r2"], summary["val_spearman"])
        ```
    """
    with FitRecipe(cfg) as recipe:
        try:
            recipe.setup()
            return recipe.train()
        except RuntimeError as err:
            if not lost_peer(err):
                raise
            raise TrainError(f"rank {env_rank()}: {lost_ranks(err)}") from None
