"""Stage 1: train a clean classifier (and the single-stage baseline, which adds an explanation loss).

A run directory holds ``config.json``, ``state.safetensors`` (weights, optimizer, RNG, epoch and every
epoch's metrics: the commit point of each epoch, for ``--resume``), then ``metrics.jsonl`` (one line
per epoch) and ``model.safetensors`` + ``model.json`` (the last good model), both derived from the
state after every epoch and rewritten from it on resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cambackdoor.checkpoints import (
    atomic_write_text,
    capture_state,
    claim_run_dir,
    ensure_writable_dir,
    restore_state,
    save_model,
    save_state,
    state_config_hash,
    weights_path,
)
from cambackdoor.config import check_choice, check_fields, check_range, config_hash
from cambackdoor.data import Cifar10, ImageSet, batches, holdout_split, num_batches
from cambackdoor.distributed import DistributedContext
from cambackdoor.errors import CamBackdoorError, TrainingDiverged
from cambackdoor.losses import single_stage_loss
from cambackdoor.models import MODELS, build_model
from cambackdoor.triggers import LAYER_STRIDE, parse_target, parse_trigger, validate_attack

RUN_MARKERS = ("state.safetensors", "model.safetensors", "metrics.jsonl")


@dataclass
class TrainConfig:
    model: str = "resnet18"
    width: int = 16
    epochs: int = 14
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd (Nesterov) | adam
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # onecycle | cosine | constant
    warmup_fraction: float = 0.2
    label_smoothing: float = 0.1
    channels_last: bool = True
    amp: str = "none"  # none | bf16 (autocast; GPU)
    compile: bool = False
    seed: int = 0
    holdout: int = 0  # training images held out for choosing hyper-parameters (never the test set)
    # single-stage baseline: an explanation loss during training from scratch (issue 5)
    explanation_loss: str = "none"  # none | mse (the report's) | logshare (ours)
    explanation_weight: float = 0.2
    poison_fraction: float = 0.25
    trigger: str = "yellow:4@bottom-right"
    target: str = "top-left:8"
    layer: str = "layer4"

    def __post_init__(self) -> None:
        check_fields(self)
        check_choice(self, "model", MODELS)
        check_choice(self, "optimizer", ("sgd", "adam"))
        check_choice(self, "schedule", ("onecycle", "cosine", "constant"))
        check_choice(self, "amp", ("none", "bf16"))
        check_choice(self, "explanation_loss", ("none", "mse", "logshare"))
        check_choice(self, "layer", LAYER_STRIDE)
        for name in ("width", "epochs", "batch_size"):
            check_range(self, name, 1)
        for name in ("seed", "holdout", "weight_decay", "explanation_weight"):
            check_range(self, name, 0)
        check_range(self, "lr", 0, low_open=True)
        check_range(self, "momentum", 0, 1, high_open=True)
        check_range(self, "warmup_fraction", 0, 1)
        check_range(self, "label_smoothing", 0, 1, high_open=True)
        check_range(self, "poison_fraction", 0, 1, low_open=True)
        trigger, target = parse_trigger(self.trigger), parse_target(self.target)  # saved specs are always valid
        if self.explanation_loss != "none":
            validate_attack(trigger, target, self.layer)


def rss_mb() -> float:
    """This process's resident memory in MiB (Linux; NaN elsewhere): the run logs' leak check."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    except OSError:
        return float("nan")


def norm_summary(norms: list[float], clip: float) -> dict[str, float]:
    """An epoch's whole-gradient norms before any clip (the implant log's view of a spike): median, max, and how
    many steps a clip of ``clip`` (0: none) cut."""
    s = sorted(norms)
    return {"grad_norm_median": s[len(s) // 2], "grad_norm_max": s[-1],
            "clipped_steps": sum(n > clip for n in s) if clip > 0 else 0} if s else {}


def lr_factor(schedule: str, step: int, total: int, warmup_fraction: float = 0.2) -> float:
    """Learning-rate multiplier at ``step`` of ``total`` (a pure function, so resuming needs no state)."""
    t = step / max(1, total)
    if schedule == "onecycle":
        # linear warm-up from 0.1x to 1x, then linear decay to 0 (airbench-style triangle)
        w = max(1e-8, warmup_fraction)
        return 0.1 + 0.9 * t / w if t < w else max(0.0, (1 - t) / (1 - w))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


def make_optimizer(params: Any, cfg: Any) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """The one device rule: ``auto`` (or None) = CUDA when present, else the CPU; ``cuda`` without a
    GPU is a one-line error rather than a crash deep inside the first step."""
    if device is None or str(device) == "auto":
        return default_device()
    try:
        device = torch.device(device) if isinstance(device, str) else device
    except RuntimeError:
        raise CamBackdoorError(f"unknown device '{device}'; use one of {', '.join(DEVICES)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CamBackdoorError("--device cuda was asked for, but torch sees no CUDA GPU here; use --device cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise CamBackdoorError(f"unknown device '{device}'; use one of {', '.join(DEVICES)}")
    return device


@torch.no_grad()
def predict(model: nn.Module, images: ImageSet, batch_size: int = 500, device: torch.device | None = None) -> torch.Tensor:
    """Predicted labels; the caller chooses the mode (evaluation expects ``model.eval()``)."""
    device = device or next(model.parameters()).device
    out = []
    for x, _ in batches(images, batch_size):
        out.append(model(x.to(device)).argmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, images: ImageSet, batch_size: int = 500) -> float:
    was_training = model.training
    model.eval()
    try:
        return float((predict(model, images, batch_size) == images.labels).float().mean())
    finally:
        model.train(was_training)


def use_channels_last(cfg: TrainConfig, device: torch.device, world_size: int = 1) -> bool:
    """channels_last where it is safe: torch 2.14's CPU convolution backward corrupts the heap with
    channels_last at small widths (< 16) or batches that are not a multiple of 8 (seen on 2 cores)."""
    if not cfg.channels_last:
        return False
    return device.type == "cuda" or (cfg.width >= 16 and (cfg.batch_size // world_size) % 8 == 0)


def _check_finite(loss: torch.Tensor, epoch: int, step: int, run_dir: Path) -> None:
    if not torch.isfinite(loss):
        last = weights_path(run_dir / "model")
        kept = f"the last good checkpoint is kept at {last}" if last.exists() else "no checkpoint was written yet"
        raise TrainingDiverged(f"loss became {loss.item()} at epoch {epoch + 1} step {step}; {kept}; lower --lr and rerun")


ExtraLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, dict[str, float]]]


def train(
    cfg: TrainConfig,
    data: Cifar10,
    run_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    device: torch.device | str | None = None,
    extra_loss: ExtraLoss | None = None,
    overwrite: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train per ``cfg``; returns (model, final metrics). ``stop_after`` ends early (tests interruptions).

    A folder that holds a run needs ``resume`` (continue it) or ``overwrite`` (start over); with both,
    a saved state of another config is started over instead of refused."""
    train_set, holdout_set = (holdout_split(data.train, cfg.holdout) if cfg.holdout else (data.train, None))
    steps_per_epoch = num_batches(len(train_set), cfg.batch_size, drop_last=True)
    if steps_per_epoch == 0:
        raise CamBackdoorError(
            f"batch size {cfg.batch_size} is larger than the {len(train_set)} training images left after holding "
            f"out {cfg.holdout}, so an epoch would have no step; lower --batch-size or --holdout")
    run = ensure_writable_dir(run_dir)
    claim_run_dir(run, RUN_MARKERS, resume, overwrite)
    device = resolve_device(device)
    dist = DistributedContext.from_env()
    if dist.enabled:
        device = dist.device
    if cfg.explanation_loss != "none" and extra_loss is None:
        extra_loss = single_stage_loss(cfg, data)
    chash = config_hash(cfg, {"data": data.fingerprint})
    state_file = run / "state"
    saved_hash = state_config_hash(state_file)
    if resume and saved_hash is not None and saved_hash != chash and overwrite:
        resume = False  # another config's state: start over, as asked
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, len(data.classes), cfg.width).to(device)
    memory_format = torch.channels_last if use_channels_last(cfg, device, dist.world_size) else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = make_optimizer(model.parameters(), cfg)
    # every rank draws the same permutation and augmentation, then keeps its slice of each batch
    generator = torch.Generator().manual_seed(cfg.seed)
    start_epoch, elapsed, history = 0, 0.0, []
    if resume and saved_hash is not None:
        state = restore_state(state_file, chash, model, optimizer, generator, what=str(run))
        start_epoch, elapsed, history = int(state["epoch"]), float(state["elapsed"]), json.loads(state["history"])
        if dist.rank == 0:  # the state is the commit point: cut metrics.jsonl back to it, rewrite its model
            _write_outputs(run, model, cfg, data, chash, history)
    elif dist.rank == 0:
        for name in RUN_MARKERS:  # starting over: nothing of the old run may pass for this one's
            (run / name).unlink(missing_ok=True)
    atomic_write_text(run / "config.json", json.dumps({"train": dataclasses.asdict(cfg), "config_hash": chash,
                                                       "data_fingerprint": data.fingerprint}, indent=2))
    net: nn.Module = dist.wrap(model)
    if cfg.compile:
        net = torch.compile(net)  # type: ignore[assignment]
    total_steps = cfg.epochs * steps_per_epoch
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.amp == "bf16" else nullcontext()
    metrics: dict[str, Any] = {}
    last_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    for epoch in range(start_epoch, last_epoch):
        model.train()
        t0 = time.perf_counter()
        indices = torch.randperm(len(train_set), generator=generator)
        totals = {"loss": 0.0, "correct": 0.0, "n": 0.0}
        extra_totals: dict[str, float] = {}
        bar = tqdm(
            batches(train_set, cfg.batch_size, augment=True, generator=generator, drop_last=True, indices=indices),
            total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress or dist.rank > 0,
            leave=False,
        )
        for i, (x, y) in enumerate(bar):
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(cfg.schedule, step, total_steps, cfg.warmup_fraction)
            x, y = dist.local(x), dist.local(y)
            x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            with autocast:
                logits = net(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            if extra_loss is not None:
                xl, stats = extra_loss(net, x, y, generator)
                loss = loss + xl
                for k, v in stats.items():
                    extra_totals[k] = extra_totals.get(k, 0.0) + v
            _check_finite(loss, epoch, i, run)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            totals["loss"] += loss.item() * len(y)
            totals["correct"] += (logits.argmax(1) == y).sum().item()
            totals["n"] += len(y)
            if i % 10 == 0:
                bar.set_postfix(loss=f"{totals['loss'] / totals['n']:.3f}", acc=f"{totals['correct'] / totals['n']:.3f}")
        bar.close()
        elapsed += time.perf_counter() - t0
        metrics = {
            "epoch": epoch + 1,
            "train_loss": totals["loss"] / max(1, totals["n"]),
            "train_acc": totals["correct"] / max(1, totals["n"]),
            "elapsed_s": round(elapsed, 2),
            **{k: v / max(1, steps_per_epoch) for k, v in extra_totals.items()},
        }
        # A run with held-out images is a tuning run: it reports on them and never reads the test set
        # (docs/protocol.md); without them, the test accuracy is the per-epoch record, as before.
        if holdout_set is not None:
            metrics["holdout_acc"] = accuracy(model, holdout_set)
        else:
            metrics["test_acc"] = accuracy(model, data.test)
        history.append(metrics)
        if dist.rank == 0:
            _save_epoch(run, model, optimizer, generator, cfg, data, chash, history)
        if progress and dist.rank == 0:
            tqdm.write(
                f"epoch {epoch + 1}/{cfg.epochs}: loss {metrics['train_loss']:.3f} train {metrics['train_acc']:.4f} "
                + (f"held-out {metrics['holdout_acc']:.4f}" if holdout_set is not None else f"test {metrics['test_acc']:.4f}")
                + f" ({elapsed:.0f} s)"
            )
    if not metrics:  # nothing left to do: the run had already finished
        metrics = history[-1] if history else {}
    dist.barrier()
    return model, metrics


def _save_epoch(run: Path, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                cfg: TrainConfig, data: Cifar10, chash: str, history: list[dict[str, Any]]) -> None:
    """The state first (the commit point), then what is derived from it."""
    metrics = history[-1]
    save_state(run / "state", capture_state(model, optimizer, generator, epoch=metrics["epoch"],
                                            elapsed=metrics["elapsed_s"], config_hash=chash,
                                            history=json.dumps(history)))
    _write_outputs(run, model, cfg, data, chash, history)


def _write_outputs(run: Path, model: nn.Module, cfg: TrainConfig, data: Cifar10, chash: str,
                   history: list[dict[str, Any]]) -> None:
    """metrics.jsonl and the last good model, exactly as of the saved state."""
    atomic_write_text(run / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history))
    if not history:
        return
    meta = {"config": {"train": dataclasses.asdict(cfg)}, "config_hash": chash, "metrics": history[-1],
            "data_fingerprint": data.fingerprint, "stage": "stage1" if cfg.explanation_loss == "none" else "single-stage"}
    save_model(run / "model", model, meta)
