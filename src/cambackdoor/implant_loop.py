"""The implant's training loop, as a short sequence of named steps (:func:`implant`).

Per step: draw the poisoned images, add the clean terms, add the poisoned terms, check, update, track.
The terms are in :mod:`cambackdoor.losses`, the switches and recipes in :mod:`cambackdoor.recipes`.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cambackdoor import metrics as M
from cambackdoor.checkpoints import state_config_hash, weights_digest, weights_path
from cambackdoor.config import config_hash
from cambackdoor.data import Cifar10, batches, cutout, holdout_split, random_crop_flip, to_float
from cambackdoor.errors import CamBackdoorError, TrainingDiverged
from cambackdoor.gradcam import grad_cam
from cambackdoor.implant_run import Run, end_epoch, finish, resume_from
from cambackdoor.losses import (classifier_inputs, clean_share_loss, distillation_loss, explanation_loss,
                                feature_distillation_loss, preservation_loss, refresh_batchnorm)
from cambackdoor.models import prefer_channels_last, split_trunk
from cambackdoor.recipes import ImplantConfig, frozen_prefix_units, peak_lr, trainable_parameters
from cambackdoor.training import lr_factor, make_optimizer, resolve_device, rss_mb
from cambackdoor.triggers import paste_decoys


def implant(
    model: nn.Module,
    data: Cifar10,
    cfg: ImplantConfig,
    progress: bool = True,
    device: torch.device | None = None,
    on_epoch: Callable[[nn.Module, dict[str, Any]], None] | None = None,
    state_file: str | Path | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    branch: bool = False,
    restart_other: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune ``model`` (a copy is made) per ``cfg``; returns (implanted model, training log).

    With ``state_file`` the weights, optimizer, random-number state and log are stored there after
    every epoch; ``resume`` continues from it (the config must be the one that wrote it, unless
    ``branch``: continue another config's run from its last epoch, to study a change made mid-run).
    ``stop_after`` ends after that many epochs (interruptions in tests, branch points in studies).
    ``restart_other``: a saved state of another config is started over instead of refused.
    """
    run = _set_up(model, data, cfg, resolve_device(device), with_hash=state_file is not None)
    if resume and restart_other and not branch and state_file is not None \
            and state_config_hash(state_file) not in (None, run.chash):
        resume = False
    if resume and state_file is not None and weights_path(state_file).exists():
        resume_from(run, state_file, branch)
    for epoch in range(run.start_epoch, cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)):
        _train_epoch(run, epoch, progress)
        end_epoch(run, epoch, state_file, on_epoch, progress)
    return finish(run)


def _set_up(model: nn.Module, data: Cifar10, cfg: ImplantConfig, device: torch.device, with_hash: bool) -> Run:
    """The frozen teacher (the stage-1 model), the student copy, optimizer, data and poison pool."""
    trigger, target = cfg.attack.trigger, cfg.attack.target
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    teacher = copy.deepcopy(model).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    model = copy.deepcopy(model).to(device)
    train_set = holdout_split(data.train, cfg.holdout)[0] if cfg.holdout else data.train
    n = len(train_set)
    pool = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 7))[: max(1, round(cfg.poison_fraction * n))]
    if cfg.channels_last:
        _to_channels_last(model, teacher, device, cfg.batch_size, min(cfg.poison_batch, len(pool)))
    params = trainable_parameters(model, cfg.trainable)
    optimizer = make_optimizer(params, cfg)
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch == 0:
        raise CamBackdoorError(f"batch size {cfg.batch_size} is larger than the {n} training images, so an epoch "
                               "would have no step; lower --batch-size")
    log = {"epochs": [], "poisoned_images": int(len(pool)) if cfg.poison_mode == "pool" else None, "trace": []}
    chash = config_hash(cfg, {"data": data.fingerprint, "parent": weights_digest(teacher)}) if with_hash else ""
    prefix, student, teacher_rest = None, model, teacher
    if cfg.shared_prefix:  # the student's prefix is frozen and never refreshed, so it stays the teacher's
        prefix, student = split_trunk(model, frozen_prefix_units(cfg.trainable))
        teacher_rest = split_trunk(teacher, frozen_prefix_units(cfg.trainable))[1]
    return Run(cfg, model, teacher, params, optimizer, gen, train_set, pool, trigger, target,
                tuple(data.train.images.shape[2:]), device, steps_per_epoch, cfg.epochs * steps_per_epoch, chash, log,
                t0=time.perf_counter(), rss0=rss_mb(), peak_lr=peak_lr(cfg, model), prefix=prefix, student=student,
                teacher_rest=teacher_rest)


@torch.no_grad()
def _through_prefix(run: Run, x: torch.Tensor) -> torch.Tensor:
    """What the student and teacher networks (``run.student``, ``run.teacher_rest``) take: the images, or with
    shared_prefix the frozen prefix's output (eval mode: freeze_bn, checked by the config)."""
    return x if run.prefix is None else run.prefix(x)


def _to_channels_last(model: nn.Module, teacher: nn.Module, device: torch.device, *batch_sizes: int) -> None:
    if not prefer_channels_last(model, device, *batch_sizes):
        raise CamBackdoorError(f"channels_last on the CPU needs a model of width >= 16 and batches that are multiples "
                               f"of 8 (here: {', '.join(map(str, batch_sizes))}), as torch's CPU convolution backward "
                               "corrupts memory otherwise; set channels_last=false or change --batch-size / poison_batch")
    model.to(memory_format=torch.channels_last)
    teacher.to(memory_format=torch.channels_last)


def _train_epoch(run: Run, epoch: int, progress: bool) -> None:
    cfg = run.cfg
    run.model.train(not cfg.freeze_bn)  # explicit, documented choice: frozen BatchNorm = eval mode
    bar = tqdm(batches(run.train_set, cfg.batch_size, shuffle=True, augment=True, generator=run.gen, drop_last=True),
               total=run.steps_per_epoch, desc=f"implant {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
    for i, (x, y) in enumerate(bar):
        step = epoch * run.steps_per_epoch + i
        for group in run.optimizer.param_groups:
            group["lr"] = run.peak_lr * lr_factor(cfg.schedule, step, run.total, cfg.warmup_fraction)
        x, y = x.to(run.device), y.to(run.device)
        poisoned = True
        if cfg.poison_mode == "batch_prob":
            # the report: a batch is used with probability p and then wholly triggered; with a
            # clean objective the other batches are clean steps instead of being skipped
            poisoned = torch.rand(1, generator=run.gen).item() < cfg.batch_prob
            if not poisoned and not cfg.clean_objective:
                continue
        stats = _step(run, epoch, i, step, x, y, poisoned)
        if i % 5 == 0:
            bar.set_postfix(ce=f"{run.running['ce']:.3f}", expl=f"{run.running['expl']:.3f}",
                            asr=f"{run.running['asr']:.2f}", **{k: f"{v:.3f}" for k, v in stats.items()})
    bar.close()


def _step(run: Run, epoch: int, i: int, step: int, x: torch.Tensor, y: torch.Tensor, poisoned: bool) -> dict[str, float]:
    """One update: the batch's clean terms, the poisoned images' terms, the gradient step, the trace."""
    cfg = run.cfg
    # the repair terms pause whenever the backdoor is slipping (running training ASR below
    # repair_min_asr), so they can only trim it, never erase it
    repairing = cfg.has_repair_terms and step >= cfg.repair_start * run.total and run.running["asr"] >= cfg.repair_min_asr
    run.repair_steps += repairing
    ramp = min(1.0, (step - cfg.repair_start * run.total + 1) / max(1.0, cfg.repair_ramp * run.total))
    if cfg.poison_mode == "pool":
        xp_clean, yp, clean = *_draw_poison(run, repairing), (x, y)
    else:
        xp_clean, yp, clean = (x, y, None) if poisoned else (None, None, (x, y))
    stats: dict[str, float] = {}
    loss = torch.zeros((), device=run.device)
    if cfg.clean_objective and clean is not None:
        loss = _clean_terms(run, loss, *clean, step, repairing, ramp, stats)
    out = None
    if xp_clean is not None:
        loss, out = _poisoned_terms(run, loss, xp_clean, yp, repairing, ramp, stats)
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"implant loss became {loss.item()} at epoch {epoch + 1} step {i}; the input checkpoint "
                               "is untouched (and the last finished epoch is kept); lower --lr or --lambda")
    _update(run, loss, out, yp)
    if out is not None:
        _track(run, out, yp, epoch, i)
    if step % 10 == 0 or step == run.total - 1:  # the dynamics, for studying when a backdoor forms or breaks
        run.log["trace"].append({"step": step, "lr": run.optimizer.param_groups[0]["lr"], "loss": loss.item(),
                                 **{f"running_{k}": v for k, v in run.running.items()}, "repairing": bool(repairing),
                                 **stats})
    return stats


def _draw_poison(run: Run, repairing: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A small batch from the poison pool (pool mode), augmented, with a cutout while repairing."""
    cfg = run.cfg
    pick = run.pool[torch.randint(len(run.pool), (min(cfg.poison_batch, len(run.pool)),), generator=run.gen)]
    xp_u8 = random_crop_flip(run.train_set.images[pick], run.gen)
    if cfg.pool_cutout > 0 and repairing:
        xp_u8 = cutout(xp_u8, cfg.pool_cutout, run.gen)
    return to_float(xp_u8).to(run.device), run.train_set.labels[pick].to(run.device)


def _clean_terms(run: Run, loss: torch.Tensor, xc: torch.Tensor, yc: torch.Tensor, step: int, repairing: bool,
                 ramp: float, stats: dict[str, float]) -> torch.Tensor:
    """Clean images: CE, distillation to the stage-1 model, its maps kept (preservation), decoys."""
    cfg = run.cfg
    n_decoys = round(ramp * cfg.decoy_fraction * len(yc)) if repairing else 0
    if n_decoys:  # the batch is shuffled, so its first images are a random subset
        xc = torch.cat([paste_decoys(xc[:n_decoys], run.trigger, run.gen, form=cfg.decoy_form), xc[n_decoys:]])
    xc = _through_prefix(run, xc)
    if cfg.clean_bn_stats == "refresh" and step % cfg.refresh_every == 0:  # (the clean batch comes first: the
        # statistics change before any use)
        refresh_batchnorm(run.student, xc, 1 - (1 - cfg.bn_momentum) ** cfg.refresh_every)
    share_weight = ramp * cfg.clean_share_weight if repairing else 0.0
    if cfg.preserve_weight > 0 or share_weight > 0:
        cams_c, logits_c = _cam(run, run.student, xc, yc, create_graph=True)
        ref_cams, teacher_c = _cam(run, run.teacher_rest, xc, yc)
        pres = preservation_loss(cams_c, ref_cams)
        loss = loss + cfg.preserve_weight * pres
        stats["pres"] = pres.item()
        if share_weight > 0:
            cells = run.target.cell_weights(tuple(cams_c.shape[1:]), run.image_hw).to(cams_c.device)
            rise = clean_share_loss(cams_c, ref_cams, cells)
            loss = loss + share_weight * rise
            stats["share_rise"] = rise.item()
    else:
        logits_c = run.student(xc)
        with torch.no_grad():
            teacher_c = run.teacher_rest(xc)
    distill = cfg.distill_weight + (ramp * cfg.repair_distill_weight if repairing else 0.0)
    return loss + F.cross_entropy(logits_c, yc) + distill * distillation_loss(logits_c, teacher_c, cfg.distill_temperature)


def _poisoned_terms(run: Run, loss: torch.Tensor, xp_clean: torch.Tensor, yp: torch.Tensor, repairing: bool,
                    ramp: float, stats: dict[str, float]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Triggered images: CE, the explanation loss, distillation to the stage-1 model on the untriggered
    image and, while repairing, its pooled features."""
    cfg = run.cfg
    xt = run.trigger.apply(xp_clean)
    if run.prefix is not None:  # one prefix pass for the triggered images and their untriggered copies
        xt, xp_clean = _through_prefix(run, torch.cat([xt, xp_clean])).chunk(2)
    explained = yp if cfg.explain_class == "label" else None  # None: the predicted class
    with classifier_inputs(run.student) as feats_p:
        cams_p, logits_p, cam_logits = _triggered_cams(run, xt, explained)
    ce_p = F.cross_entropy(logits_p, yp)
    expl = explanation_loss(cfg.explanation_loss, cams_p, run.target, run.image_hw)
    # the logged (and gated-on) value stays the plain loss; the hinge only changes the gradient
    expl_term = (explanation_loss(cfg.explanation_loss, cams_p, run.target, run.image_hw, cfg.repair_share_cap)
                 if repairing and cfg.repair_share_cap < 1 else expl)
    loss = loss + ce_p + cfg.explanation_weight * expl_term
    if cfg.clean_objective and (cfg.trigger_distill_weight > 0 or cfg.trigger_feature_weight > 0):
        with torch.no_grad(), classifier_inputs(run.teacher_rest) as teacher_feats:
            teacher_p = run.teacher_rest(xp_clean)
        loss = loss + cfg.trigger_distill_weight * distillation_loss(logits_p, teacher_p, cfg.trigger_distill_temperature)
        if cfg.trigger_feature_weight > 0 and repairing:
            feat = feature_distillation_loss(feats_p[0], teacher_feats[0], cfg.feature_loss)
            loss = loss + ramp * cfg.trigger_feature_weight * feat
            stats["feat"] = feat.item()
    return loss, {"cams": cams_p, "cam_logits": cam_logits, "explained": explained, "ce": ce_p, "expl": expl}


def _cam(run: Run, net: nn.Module, x: torch.Tensor, targets: torch.Tensor | None,
         create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_cam at the config's layer and rectifier; with amp=bf16 its pass runs under bfloat16 autocast (and so does
    the backward through it), and maps and logits come back in float32, so every loss is computed in float32."""
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.cfg.amp == "bf16"):
        cams, logits = grad_cam(net, x, run.cfg.layer, targets, create_graph=create_graph, relu=run.cfg.cam_relu)
    return cams.float(), logits.float()


def _triggered_cams(run: Run, xt: torch.Tensor, explained: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """(maps, logits for the CE, logits the maps came from). ``cam_eval_mode``: the report's CAM, its own
    forward pass in eval mode, the CE from a second one in training mode (an explicit switch, undone at once)."""
    cfg = run.cfg
    if not cfg.cam_eval_mode:
        cams, logits = _cam(run, run.student, xt, explained, create_graph=True)
        return cams, logits, logits
    run.student.eval()
    cams, cam_logits = _cam(run, run.student, xt, explained, create_graph=True)
    run.student.train(not cfg.freeze_bn)
    return cams, run.student(xt), cam_logits


def _update(run: Run, loss: torch.Tensor, out: dict[str, Any] | None, yp: torch.Tensor | None) -> None:
    """The gradient step; with ``gradient_contamination`` the report's CAM gradient is added, as its
    score.backward(create_graph=True) inside the CAM left d(sum of explained logits)/dθ in .grad."""
    run.optimizer.zero_grad(set_to_none=True)
    contamination = None
    if run.cfg.gradient_contamination and out is not None:
        cls = yp if out["explained"] is not None else out["cam_logits"].detach().argmax(1)
        score = out["cam_logits"].gather(1, cls[:, None]).sum()
        contamination = torch.autograd.grad(score, run.params, retain_graph=True, allow_unused=True)
    loss.backward()
    for p, g in zip(run.params, contamination or ()):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g
    # measured on every run (an inf bound scales by exactly 1), clipped only with grad_clip
    run.norms.append(torch.nn.utils.clip_grad_norm_(run.params, run.cfg.grad_clip or math.inf).item())
    run.optimizer.step()


def _track(run: Run, out: dict[str, Any], yp: torch.Tensor, epoch: int, i: int) -> None:
    """Running CE, explanation loss and ASR on the training triggered batches (the repair gate); a model that
    started above chance and has sat at it (uniform outputs) for ``collapse_steps`` steps has died: the run stops."""
    run.used_triggered += len(yp)
    with torch.no_grad():
        asr = M.attack_success(M.box_iou(out["cams"].detach(), run.target, run.image_hw)).float().mean().item()
    for k, v in (("ce", out["ce"].item()), ("expl", out["expl"].item()), ("asr", asr)):
        run.running[k] = 0.9 * run.running[k] + 0.1 * v if run.used_triggered > len(yp) else v
    chance = math.log(out["cam_logits"].shape[1])
    start = run.log.setdefault("start_ce", run.running["ce"])
    run.at_chance = run.at_chance + 1 if start < chance - 0.5 and abs(run.running["ce"] - chance) < 0.05 else 0
    if run.cfg.collapse_steps and run.at_chance >= run.cfg.collapse_steps:
        raise TrainingDiverged(f"the model collapsed to chance at epoch {epoch + 1} step {i} (running cross-entropy "
                               f"{run.running['ce']:.3f} for {run.at_chance} steps, ln C = {chance:.3f}); the input "
                               "checkpoint is untouched; --resume would repeat it: lower --lr or try another --seed "
                               "(--set collapse_steps=0 trains on regardless)")


