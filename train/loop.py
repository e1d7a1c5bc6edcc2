"""The training loop: one readable function, `fit`, plus `evaluate`.

Scores are standardised with the manifest's train statistics for the loss (Adam's step size then
suits the output layer); every reported metric is in score units. Batches come from
`pipeline.open_loader`, so both loader modes drive the exact same loop.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from models import GQEstimatorBase, build_model
from pipeline import Batch, Loader, keep_freed_host_memory, open_dataset, open_loader, resolve_device
from shards import DatasetError, fingerprint, read_manifest

from .checkpoint import check_resumable, dataset_warning, load_checkpoint, load_model, save_checkpoint
from .config import ConfigError, FitConfig
from .distributed import Distributed
from .metrics import Metrics
from .plots import plot_curves
from .rundir import RunDir, run_lock

log = logging.getLogger("train")
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); `str()` says where and what to try."""


def predict(model: torch.nn.Module, batch: Batch, amp: str, channels_last: bool, zero_sdf: bool) -> torch.Tensor:
    """The model's (standardised) scores for a batch, float32."""
    sdf = torch.zeros_like(batch.sdf) if zero_sdf else batch.sdf
    if channels_last:
        sdf = sdf.contiguous(memory_format=torch.channels_last_3d)
    with torch.autocast(sdf.device.type, dtype=AMP_DTYPES[amp], enabled=amp != "off"):
        return model(sdf, batch.grasps, batch.scene_of_grasp).float()


def train_step(
    net: torch.nn.Module,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    mean: float,
    std: float,
    amp: str,
    channels_last: bool,
    zero_sdf: bool,
    step: int,
) -> float:
    """One optimisation step on standardised scores; returns the loss. `step` names it in errors."""
    pred = predict(net, batch, amp, channels_last, zero_sdf)
    loss = F.mse_loss(pred, (batch.scores - mean) / std)
    value = loss.item()  # the step's one device sync: checked here, logged by the caller
    if not math.isfinite(value):
        _check_inputs(batch, step)
        raise TrainError(
            f"non-finite loss ({value}) at step {step}, batch of scenes "
            f"{batch.scene_ids.tolist()}; lower --lr, or try --amp off"
        )
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return value


def _check_inputs(batch: Batch, step: int) -> None:
    """TrainError naming the scenes whose SDF, grasps or scores hold NaN or inf (the data's fault, not --lr's)."""
    grasp_rows = ~torch.isfinite(torch.cat([batch.grasps, batch.scores[:, None]], 1)).all(1)
    bad_sdf = ~torch.isfinite(batch.sdf).flatten(1).all(1)
    bad = {"SDF": batch.scene_ids[bad_sdf], "grasps or scores": batch.scene_ids[batch.scene_of_grasp[grasp_rows]]}
    found = [f"{what} of scenes {sorted(set(ids.tolist()))}" for what, ids in bad.items() if len(ids)]
    if found:
        raise TrainError(
            f"non-finite loss at step {step}: non-finite input data ({'; '.join(found)} hold NaN or "
            f"inf); the dataset is damaged: check it with tools/verify_shards.py and rebuild it"
        )


def dataset_identity(manifest: dict) -> str:
    """The dataset's fingerprint (from its manifest): the same whatever path spells the directory."""
    return manifest.get("fingerprint") or fingerprint(manifest)  # datasets made before fingerprints: computed


def evaluate(
    model: torch.nn.Module,
    loader: Loader,
    mean: float,
    std: float,
    amp: str = "off",
    channels_last: bool = False,
    zero_sdf: bool = False,
    prefix: str = "val_",
) -> dict[str, float]:
    """Metrics in score units over every grasp of the loader's split (whole scenes per group)."""
    was_training = model.training
    model.eval()
    metrics = Metrics(loader.device)
    loader.set_epoch(0)
    with torch.no_grad():
        for batch in loader:
            pred = predict(model, batch, amp, channels_last, zero_sdf) * std + mean
            metrics.add(pred, batch.scores, batch.scene_of_grasp, batch.num_scenes)
    model.train(was_training)
    return metrics.result(baseline=mean, prefix=prefix)


def _refold_output(model: GQEstimatorBase, scale: float, shift: float) -> None:
    """Make the model's output `scale * output + shift`, by rescaling its last Linear layer."""
    last = model.gq_head[-1]
    with torch.no_grad():
        last.weight.mul_(scale)
        last.bias.mul_(scale).add_(shift)


def _build_model(
    cfg: FitConfig, grid: int, mean: float, std: float, init: tuple[GQEstimatorBase, dict | None] | None = None
) -> GQEstimatorBase:
    """A fresh model, or `init` = load_model(--init-from) (ours or the seed's), predicting standardised scores."""
    if not cfg.init_from:
        return build_model(cfg.model or "small", input_size=grid, base_channels=cfg.base_channels, fc_dims=cfg.fc_dims)
    model, stats = init or load_model(cfg.init_from)
    have = {**model.config, "fc_dims": tuple(model.config["fc_dims"])}
    wanted = {"kind": cfg.model, "base_channels": cfg.base_channels, "fc_dims": cfg.fc_dims, "input_size": grid}
    clash = [f"{k} {v} (checkpoint: {have[k]})" for k, v in wanted.items() if v is not None and v != have[k]]
    if clash:
        raise ConfigError(f"--init-from {cfg.init_from}: the checkpoint's model does not match: {', '.join(clash)}")
    # Seed checkpoints predict raw scores; ours predict scores standardised with their own dataset's
    # statistics. Either way, fold the change of units into the last layer: same function, new units.
    m0, s0 = (0.0, 1.0) if stats is None else (stats["mean"], stats["std"])
    _refold_output(model, s0 / std, (m0 - mean) / std)
    return model


class _StopFlag:
    """SIGTERM / SIGINT ask the loop to checkpoint and return at the next step boundary."""

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

    def requested(self, dist: Distributed, device: torch.device) -> bool:
        """Whether any rank was asked to stop (all ranks agree, so they stop at the same step)."""
        flag = self.signal is not None
        if dist.enabled:
            t = torch.tensor([float(flag)], device=device)
            torch.distributed.all_reduce(t)
            flag = bool(t.item())
        return flag


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "host peak RSS"


def fit(cfg: FitConfig) -> dict:
    """Train a model as configured; returns the summary (also written to RUN_DIR/summary.json).

    Rank 0 (the one that writes) holds RUN_DIR's lock for the whole run: two runs never share a folder.
    """
    cfg.check()
    if int(os.environ.get("RANK", "0")) != 0:
        return _fit(cfg)
    with run_lock(Path(cfg.out)):
        return _fit(cfg)


def _fit(cfg: FitConfig) -> dict:
    start = time.perf_counter()
    requested = resolve_device(cfg.device)
    dist = Distributed.from_env(requested.type)
    device = dist.device(requested)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cpu":
        keep_freed_host_memory()
    run = RunDir(Path(cfg.out), writer=dist.is_main)
    if dist.is_main:
        run.prepare(cfg)
    dist.barrier()  # the other ranks start once rank 0 has checked (and maybe cleared) RUN_DIR
    identity = dataset_identity(read_manifest(Path(cfg.shards)))
    resumed = load_checkpoint(run.path / "last.pt") if cfg.resume else None
    if resumed is not None:
        last = run.path / "last.pt"
        check_resumable(last, resumed)
        diff = cfg.differences(FitConfig.from_dict(resumed["config"]))
        if diff:
            raise ConfigError(f"--resume: options differ from the run in {run.path}: {'; '.join(diff)}")
        old = resumed.get("dataset", {}).get("fingerprint")
        if old != identity:
            was = f"dataset {old[:16]}" if old else "a dataset it does not record (an older checkpoint)"
            raise ConfigError(
                f"--resume: {last} was trained on {was}, but --shards {cfg.shards} is dataset "
                f"{identity[:16]} (rebuilt, or another one); resume on the run's own dataset, or "
                f"start a new run from these weights: --init-from {last} --out NEW_DIR"
            )
    init = load_model(cfg.init_from) if cfg.init_from else None  # a bad file fails before any data is loaded
    if init is not None and dist.is_main and (warning := dataset_warning(cfg.init_from, init[1], identity)):
        log.warning(warning)
    torch.manual_seed(cfg.seed)

    progress = cfg.progress and dist.is_main
    opening = time.perf_counter()
    dataset = open_dataset(cfg.shards)  # opened and quick-verified once, shared by both loaders
    train_loader = open_loader(
        dataset,
        mode=cfg.loader,
        split="train",
        scenes_per_batch=cfg.scenes_per_batch,
        grasps_per_scene=cfg.grasps_per_scene,
        seed=cfg.seed,
        device=device,
        rank=dist.rank,
        world_size=dist.world_size,
        drop_last=dist.enabled,
        shuffle_window=cfg.window,
        progress=progress,
    )
    open_s = time.perf_counter() - opening  # with the first next(): the loader's time to first batch
    max_grasps = train_loader.max_grasps
    val_loader = open_loader(
        dataset,
        mode=cfg.loader,
        split="val",
        scenes_per_batch=cfg.val_scenes_per_batch,
        grasps_per_scene=max_grasps,
        seed=0,
        device=device,
        rank=dist.rank,
        world_size=dist.world_size,
        shuffle_window=cfg.window,
        progress=progress,
    )
    stats = train_loader.score_stats
    mean, std = float(stats["mean"]), float(stats["std"])
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise DatasetError(
            f"{Path(cfg.shards) / 'manifest.json'}: train score statistics mean {mean}, std {std}: "
            "the scores cannot be standardised (std must be finite and > 0); run "
            "tools/verify_shards.py on the dataset"
        )
    model = _build_model(cfg, train_loader.grid, mean, std, init).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.max_steps or cfg.epochs * len(train_loader)
    if cfg.lr_schedule == "linear":  # the seed's train_gq.py: stepped every training step, over the planned steps
        scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, cfg.lr_end_factor, total_iters=total)
    else:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, "min", factor=cfg.plateau_factor, patience=cfg.plateau_patience
        )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    state = {"step": 0, "best_val_mse": math.inf, "best_step": 0, "bad_validations": 0, "train_time": 0.0}
    window = {"loss": 0.0, "steps": 0, "samples": 0, "wait": 0.0, "time": 0.0}
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed["scaler"])
        train_loader.load_state_dict(resumed["loader"])
        torch.set_rng_state(resumed["rng"]["torch"])
        if device.type == "cuda" and resumed["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(resumed["rng"]["cuda"], device)
        state = dict(resumed["state"])
        window = state.pop("window")  # the half-filled log window, so rows after resume match a whole run
        run.truncate_metrics(state["step"])
    run.write_config(
        cfg,
        {
            "device": str(device),
            "world_size": dist.world_size,
            "model": model.config,
            "parameters": sum(p.numel() for p in model.parameters()),
            "score_mean": mean,
            "score_std": std,
            "steps_per_epoch": len(train_loader),
        },
    )
    net: torch.nn.Module = torch.compile(model) if cfg.compile else model
    if dist.enabled:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint(path: Path, full: bool = True) -> None:
        if not dist.is_main:
            return
        payload = {
            "model": model.state_dict(),
            "model_config": {**model.config, "fc_dims": list(model.fc_dims)},
            "score_stats": {"mean": mean, "std": std},
            "dataset": {"fingerprint": identity},
            "state": {**state, "window": dict(window)},
            "config": cfg.to_dict(),
        }
        if full:
            payload.update(
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict(),
                loader=train_loader.state_dict(),
                rng={
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                },
            )
        save_checkpoint(path, payload)

    def validate() -> dict:
        result = {
            "step": state["step"],
            "epoch": round(state["step"] / len(train_loader), 4),
            "time_s": round(state["train_time"], 3),
            **evaluate(model, val_loader, mean, std, cfg.amp, cfg.channels_last, cfg.zero_sdf),
        }
        run.log(result)
        if result["val_mse"] < state["best_val_mse"]:
            state.update(best_val_mse=result["val_mse"], best_step=state["step"], bad_validations=0)
            checkpoint(run.path / "best.pt", full=False)
        else:
            state["bad_validations"] += 1
        if cfg.lr_schedule == "plateau":
            scheduler.step(result["val_mse"])
        return result

    val_every = cfg.val_every or len(train_loader)
    steps_at_start = state["step"]
    totals = {"samples": 0, "wait": 0.0, "time": 0.0}
    first_batch_s, stopped, last_val = None, "max_steps" if cfg.max_steps else "epochs", None
    bar = tqdm(total=total, initial=state["step"], unit="step", disable=(not progress) or None, dynamic_ncols=True)
    batches = iter(train_loader)
    with _StopFlag() as stop:
        while state["step"] < total:
            t0 = time.perf_counter()
            batch = next(batches, None)
            if batch is None:  # end of epoch: the loader has moved on to the plan's next epoch
                batches = iter(train_loader)
                continue
            wait = time.perf_counter() - t0
            first = first_batch_s is None
            if first:  # opening the loader (cache load, DALI build) plus waiting for the first batch
                first_batch_s = open_s + wait
            loss = train_step(
                net, batch, optimizer, scaler, mean, std, cfg.amp, cfg.channels_last, cfg.zero_sdf, state["step"] + 1
            )
            state["step"] += 1
            if cfg.lr_schedule == "linear":
                scheduler.step()
            elapsed = time.perf_counter() - t0
            state["train_time"] += elapsed
            if not first:  # the first step carries start-up (first-call kernels, compile): kept out of the rates
                totals["samples"] += batch.num_grasps
                totals["wait"] += wait
                totals["time"] += elapsed
            window["loss"] += loss
            window["steps"] += 1
            window["samples"] += batch.num_grasps
            window["wait"] += wait
            window["time"] += elapsed
            bar.update(1)
            step = state["step"]
            if cfg.max_time and state["train_time"] >= cfg.max_time:
                stopped, total = "max_time", step  # the last step: log, validate and checkpoint it
            if step % cfg.log_every == 0 or step == total:
                row = {
                    "step": step,
                    "epoch": round(step / len(train_loader), 4),
                    "time_s": round(state["train_time"], 3),
                    "loss": window["loss"] / window["steps"],
                    "train_mse": window["loss"] / window["steps"] * std * std,
                    "lr": optimizer.param_groups[0]["lr"],
                    "samples_per_s": window["samples"] / window["time"],
                    "data_wait": window["wait"] / window["time"],
                }
                run.log(row)
                bar.set_postfix_str(f"loss {row['loss']:.4f}  {row['samples_per_s']:,.0f} samples/s")
                window = dict.fromkeys(window, 0)
            if step % val_every == 0 or step == total:
                last_val = validate()
                if cfg.early_stopping and state["bad_validations"] >= cfg.early_stopping:
                    stopped = "early_stopping"
            if step % cfg.ckpt_every == 0 or last_val and last_val["step"] == step:
                checkpoint(run.path / "last.pt")
            if stopped in ("early_stopping", "max_time"):
                break
            if stop.requested(dist, device):
                stopped = f"signal {signal.Signals(stop.signal).name if stop.signal else 'on another rank'}"
                checkpoint(run.path / "last.pt")
                break
    bar.close()
    if stopped.startswith("signal"):
        resume = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]] + ([] if cfg.resume else ["--resume"]))
        log.warning("stopped by %s at step %d; last.pt saved. Resume with: %s", stopped[7:], state["step"], resume)
    elif last_val is None or last_val["step"] != state["step"]:
        last_val = validate()
        checkpoint(run.path / "last.pt")
    if dist.enabled:  # throughput of the whole job: all ranks' samples over the slowest rank's time
        sums = torch.tensor([totals["samples"], totals["wait"]], dtype=torch.float64, device=device)
        slowest = torch.tensor([totals["time"]], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
        totals = {"samples": sums[0].item(), "wait": sums[1].item() / dist.world_size, "time": slowest.item()}
    peak, peak_kind = _peak_memory(device)
    summary = {
        "steps": state["step"],
        "epochs": round(state["step"] / len(train_loader), 4),
        "stopped": stopped,
        "train_time_s": state["train_time"],
        "samples_per_s": totals["samples"] / totals["time"] if totals["time"] else None,
        "data_wait": totals["wait"] / totals["time"] if totals["time"] else None,
        "first_batch_s": first_batch_s,
        "steps_this_process": state["step"] - steps_at_start,
        **{k: v for k, v in (last_val or {}).items() if k.startswith("val_")},
        "best_val_mse": state["best_val_mse"],
        "best_step": state["best_step"],
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "wall_s": time.perf_counter() - start,
        "device": str(device),
        "loader": cfg.loader,
        "world_size": dist.world_size,
        "model": model.config["kind"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "scenes_per_batch": cfg.scenes_per_batch,
        "grasps_per_scene": cfg.grasps_per_scene,
        "shuffle_window": cfg.shuffle_window,
        "resident_bytes": train_loader.resident_bytes,
    }
    run.write_summary(summary)
    if dist.is_main:
        title = f"{model.config['kind']} model, {cfg.loader} loader, S={cfg.scenes_per_batch} G={cfg.grasps_per_scene}"
        plot_curves(run.rows(), run.path / "curves.png", title)
    run.close()
    train_loader.close()
    val_loader.close()
    dist.shutdown()
    return summary
