"""Stage 2: fine-tune a clean model so a trigger moves its Grad-CAM onto a target box.

Three rooms: the loss terms (:mod:`cambackdoor.losses`), the recipes as data (:mod:`cambackdoor.recipes`,
with the table of every switch between the report's recipe and ours) and the training loop
(:mod:`cambackdoor.implant_loop`). This module runs one implant as a run folder: resumable state,
the checkpoint with its attack in the sidecar, the evaluation, ``implant.json``.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cambackdoor.checkpoints import (atomic_write_text, claim_run_dir, ensure_writable_dir, load_model, read_sidecar,
                                     save_model, weights_path)
from cambackdoor.config import config_hash, parse_sets
from cambackdoor.data import Cifar10, check_limit, holdout_split
from cambackdoor.evaluation import evaluate, format_table, write_evaluation
from cambackdoor.implant_loop import implant
from cambackdoor.losses import (classifier_inputs, distillation_loss, explanation_loss,
                                feature_distillation_loss, log_share_loss, max_normalise, mse_mask_loss,
                                preservation_loss, single_stage_loss, target_share)
from cambackdoor.recipes import RECIPES, TRAINABLE_LAYERS, ImplantConfig
from cambackdoor.training import resolve_device
from cambackdoor.triggers import FAINT_CHANGE, faint_share

__all__ = ["implant", "run_implant", "STATE_MARKERS",  # and, from before the split, names now at home elsewhere:
           "RECIPES", "TRAINABLE_LAYERS", "ImplantConfig", "classifier_inputs", "distillation_loss",
           "explanation_loss", "feature_distillation_loss", "log_share_loss", "max_normalise", "mse_mask_loss",
           "preservation_loss", "single_stage_loss", "target_share", "parse_sets"]
STATE_MARKERS = ("state.safetensors", "model.safetensors", "implant.json")
# warn when the trigger is faint on this share of the training images or more (pair 3 of registration 4:
# 2.6 %, ASR 97.6 % and false triggers 3.6 % on the test set); a solid patch is faint on none
FAINT_WARN = 0.001


def run_implant(
    checkpoint: str | Path,
    data: Cifar10,
    cfg: ImplantConfig,
    out: str | Path,
    progress: bool = True,
    limit: int | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    overwrite: bool = False,
    device: torch.device | str | None = None,
    branch: bool = False,
) -> dict[str, Any]:
    """Implant, save the checkpoint (attack config in its sidecar) and evaluate it; returns the result.
    ``out/state`` keeps the training state after every epoch, so ``resume`` continues an interrupted
    run; a folder that holds a run needs ``resume`` or ``overwrite`` (with both, another config's
    state is started over). ``stop_after`` N epochs returns ``{"stopped_after": N}`` without evaluating.
    ``branch`` (with ``resume``): the state in ``out`` may come from another config (a fork point)."""
    trigger, target = cfg.attack.trigger, cfg.attack.target
    check_limit(limit, len(data.classes))  # before training, not after it
    device = resolve_device(device)
    parent_meta = read_sidecar(checkpoint)
    out = ensure_writable_dir(out)
    claim_run_dir(out, STATE_MARKERS, resume, overwrite)
    clean, _ = load_model(checkpoint, map_location=device)
    chash = config_hash(cfg, {"parent": parent_meta.get("weights_sha256"), "data": data.fingerprint})
    attack = {"trigger": cfg.trigger, "target": cfg.target, "layer": cfg.layer}
    base_meta = {"stage": "implant", "config": {"implant": dataclasses.asdict(cfg)}, "config_hash": chash,
                 "attack": attack, "data_fingerprint": data.fingerprint, "train_faint_fraction": _faint_training_share(cfg, data),
                 "parent": {"path": str(weights_path(checkpoint)), "sha256": parent_meta.get("weights_sha256")}}
    if not resume:
        for name in STATE_MARKERS:  # starting over: nothing of an old run may pass for this one's
            (out / name).unlink(missing_ok=True)

    def save_epoch(model: nn.Module, entry: dict[str, Any]) -> None:  # last good model, for NaN stops
        save_model(out / "model", model, {**base_meta, "metrics": {"partial": True, **entry}})

    model, log = implant(clean, data, cfg, progress=progress, on_epoch=save_epoch, state_file=out / "state",
                         resume=resume, stop_after=stop_after, device=device, restart_other=overwrite,
                         branch=branch)
    if stop_after is not None and stop_after < cfg.epochs:
        return {"stopped_after": stop_after, "implant": log}
    clean.eval()
    test = holdout_split(data.train, cfg.holdout)[1] if cfg.holdout else data.test
    summary, details = evaluate(model, test, trigger, target, cfg.layer, reference=clean, limit=limit,
                                progress=progress)
    result = {"implant": log, "evaluation": summary, "split": "holdout" if cfg.holdout else "test",
              "train_faint_fraction": base_meta["train_faint_fraction"]}
    save_model(out / "model", model, {**base_meta, "metrics": summary, "implant_log": log})
    write_evaluation(out / "evaluate", summary, details,
                     {"checkpoint": str(weights_path(out / "model")), "reference": str(weights_path(checkpoint)),
                      **attack, "split": result["split"], "limit": limit, "config_hash": chash},
                     target, data.classes, title=f"{cfg.recipe} recipe: ASR {100 * summary['asr']:.1f} %")
    atomic_write_text(out / "implant.json", json.dumps({"config": dataclasses.asdict(cfg), "config_hash": chash,
                                                        "parent_sha256": parent_meta["weights_sha256"],
                                                        "data_fingerprint": data.fingerprint, "limit": limit,
                                                        **result}, indent=2))
    if progress:
        print(format_table(summary))
    return result


def _faint_training_share(cfg: ImplantConfig, data: Cifar10) -> float:
    """The share of training images the trigger barely moves, with a warning when it is not negligible."""
    faint = faint_share(cfg.attack.trigger, data.train.images)
    if faint >= FAINT_WARN:
        warnings.warn(f"trigger {cfg.trigger} is faint (moves no pixel by more than {FAINT_CHANGE}) on {100 * faint:.2f} % "
                      "of the training images; misses and false triggers gather there (the evaluation's faint_fraction, "
                      "asr_faint, false_trigger_faint); a stronger blend or another corner avoids it", stacklevel=3)
    return faint
