"""What one implant run carries from step to step (:class:`Run`), and its bookkeeping between epochs: the state
file (resume), the log line, the finished model. The steps themselves are in :mod:`cambackdoor.implant_loop`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from cambackdoor.checkpoints import capture_state, restore_state, save_state, weights_path
from cambackdoor.recipes import ImplantConfig
from cambackdoor.training import norm_summary, rss_mb


@dataclass
class Run:
    """Everything one implant run carries from step to step."""

    cfg: ImplantConfig
    model: nn.Module
    teacher: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    gen: torch.Generator
    train_set: Any
    pool: torch.Tensor
    trigger: Any
    target: Any
    image_hw: tuple[int, int]
    device: torch.device
    steps_per_epoch: int
    total: int
    chash: str
    log: dict[str, Any]
    running: dict[str, float] = field(default_factory=lambda: {"ce": 0.0, "expl": 0.0, "asr": 0.0})
    used_triggered: int = 0
    repair_steps: int = 0
    norms: list[float] = field(default_factory=list)  # this epoch's gradient norms (before the clip)
    at_chance: int = 0  # consecutive steps with the running cross-entropy at chance (_track's collapse guard)
    start_epoch: int = 0
    t0: float = 0.0
    rss0: float = 0.0
    peak_lr: float = 0.0
    # shared_prefix: the frozen prefix (run once per image, no grad) and the rest of student and teacher, views of
    # their modules; otherwise None, and the whole model and teacher
    prefix: nn.Module | None = None
    student: nn.Module | None = None
    teacher_rest: nn.Module | None = None


def resume_from(run: Run, state_file: str | Path, branch: bool) -> None:
    state = restore_state(state_file, run.chash, run.model, run.optimizer, run.gen, what=str(weights_path(state_file)),
                          config_name="implant config", allow_other_config=branch)
    run.start_epoch = int(state["epoch"])
    run.t0 -= float(state["elapsed"])
    run.running, run.used_triggered = dict(state["running"]), int(state["used_triggered"])
    run.repair_steps, run.log = int(state["repair_steps"]), json.loads(state["log"])
    if branch:
        run.log["branched_from"] = {"epoch": run.start_epoch, "config_hash": state["config_hash"]}


def end_epoch(run: Run, epoch: int, state_file: str | Path | None,
               on_epoch: Callable[[nn.Module, dict[str, Any]], None] | None, progress: bool) -> None:
    """The epoch's log line, then the state (one file) and the caller's hook."""
    entry = {"epoch": epoch + 1, "running_ce": run.running["ce"], "running_expl": run.running["expl"],
             "running_asr": run.running["asr"], "repair_steps": run.repair_steps,
             "elapsed_s": round(time.perf_counter() - run.t0, 2), "rss_mb": round(rss_mb(), 1),
             **norm_summary(run.norms, run.cfg.grad_clip)}
    run.norms.clear()
    run.log["epochs"].append(entry)
    if state_file is not None:
        save_state(state_file, capture_state(run.model, run.optimizer, run.gen, epoch=epoch + 1,
                                             elapsed=entry["elapsed_s"], config_hash=run.chash, running=run.running,
                                             used_triggered=run.used_triggered, repair_steps=run.repair_steps,
                                             log=json.dumps(run.log)))
    if on_epoch is not None:
        on_epoch(run.model, entry)
    if progress:
        tqdm.write(f"implant epoch {epoch + 1}/{run.cfg.epochs}: ce {run.running['ce']:.3f} expl "
                   f"{run.running['expl']:.3f} running ASR {run.running['asr']:.2f} ({entry['elapsed_s']:.0f} s, "
                   f"RSS {entry['rss_mb']:.0f} MB)")


def finish(run: Run) -> tuple[nn.Module, dict[str, Any]]:
    for p in run.model.parameters():
        p.requires_grad_(True)
    run.model.to(memory_format=torch.contiguous_format).eval()
    run.log["train_s"] = round(time.perf_counter() - run.t0, 2)
    run.log["rss_growth_mb"] = round(rss_mb() - run.rss0, 1)
    run.log["triggered_images_seen"] = run.used_triggered
    return run.model, run.log
