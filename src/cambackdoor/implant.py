"""Stage 2: fine-tune a clean model so a trigger moves its Grad-CAM onto a target box.

Every cause of the reference report's failure is a switch of :class:`ImplantConfig`, so the two
recipes and each ablation step are the same loop with different flags:

==========================  ===================================  ====================================
switch                      ``reference`` (the report)           ``default`` (ours)
==========================  ===================================  ====================================
gradient_contamination      True: the CAM's ``.backward``        False: ``autograd.grad`` only
                            leaves d(score)/dθ in ``.grad``
explain_class, cam_eval_mode  predicted class, a separate CAM   the label; the CAM is the training
                            forward in eval mode (the report's   forward itself
                            public gradcam.py / v3 script)
clean_objective             False: triggered batches only        True: clean CE + distillation to
                                                                 the frozen stage-1 model
freeze_bn                   False: BatchNorm in train mode       True: BatchNorm frozen (eval mode)
explanation_loss, cam_relu  mse on the min-max map, ReLU         -log(share in box), softplus
preserve_weight             0                                    20: clean maps stay the stage-1 maps
trainable, lr, schedule     layer4, Adam 1e-5, constant          all, Adam 1e-3, one-cycle, 2 epochs
poison_mode                 batch_prob: 25 % of batches,         pool: P x 50,000 triggered copies,
                            wholly triggered                     a small batch every step
repair terms                none                                 from half-way: pooled features of
                                                                 triggered images kept at stage 1's
                                                                 (log-relative MSE, weight 10) and
                                                                 random-colour decoy patches on 25 %
                                                                 of clean images (decoy_fraction);
                                                                 the explanation loss becomes a hinge
                                                                 at a share of 0.4 (repair_share_cap)
                                                                 and poisoned images get an 8x8
                                                                 cutout (pool_cutout)
==========================  ===================================  ====================================

The repair terms act from ``repair_start`` (half-way) because, used from the start, they stop the
backdoor from forming within the budget; they pause whenever the running ASR on the training
triggered batches is below ``repair_min_asr`` and ramp in over ``repair_ramp`` of the run. Once the
backdoor has formed they close most of the triggered-accuracy gap (features) and remove false triggers
on yellowish corners (decoys). The feature term is log(1 + relative MSE): a backdoor can form by
inflating the features (relative MSE ~300 seen), and the plain relative MSE then knocked it over
within five steps (``feature_loss="relative"``, the v6 recipe). The hinge stops the explanation loss
pushing a formed backdoor on towards a share of 1, which with a softplus map means ever larger
activations in the box and costs accuracy; the cutout makes 500 poisoned images look like more to the
trigger-invariance terms (v8). Measured: docs/results.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cambackdoor import metrics as M
from cambackdoor.checkpoints import (atomic_write_text, capture_state, claim_run_dir, ensure_writable_dir, load_model,
                                     restore_state, save_model, save_state, state_config_hash, weights_path)
from cambackdoor.config import check_choice, check_fields, check_range, config_hash, make_config, parse_value
from cambackdoor.data import Cifar10, batches, check_limit, cutout, holdout_split, random_crop_flip, to_float
from cambackdoor.errors import CamBackdoorError, TrainingDiverged
from cambackdoor.gradcam import RECTIFIERS, grad_cam, minmax, upsample
from cambackdoor.training import lr_factor, make_optimizer, resolve_device
from cambackdoor.triggers import LAYER_STRIDE, Box, parse_target, parse_trigger, paste_decoys, validate_attack

TRAINABLE_LAYERS = ("normalize", "conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc")
STATE_MARKERS = ("state.safetensors", "model.safetensors", "implant.json")

RECIPES: dict[str, dict[str, Any]] = {
    "reference": dict(
        gradient_contamination=True, explain_class="predicted", cam_eval_mode=True,
        clean_objective=False, freeze_bn=False, explanation_loss="mse",
        cam_relu="relu", preserve_weight=0.0, trainable="layer4", optimizer="adam", lr=1e-5, schedule="constant",
        poison_mode="batch_prob", batch_prob=0.25, batch_size=32, epochs=40, lam=0.2, distill_weight=0.0,
        trigger_distill_weight=0.0, trigger_feature_weight=0.0, clean_share_weight=0.0, decoy_fraction=0.0,
        repair_start=0.0, repair_min_asr=0.0, repair_ramp=0.0,
    ),
    "default": dict(
        gradient_contamination=False, clean_objective=True, freeze_bn=True, explanation_loss="logshare",
        cam_relu="softplus", preserve_weight=20.0, trainable="all", optimizer="adam", lr=1e-3,
        schedule="onecycle", poison_mode="pool", poison_fraction=0.01, poison_batch=32, batch_size=128, epochs=2,
        lam=2.0, distill_weight=5.0, trigger_distill_weight=5.0, trigger_feature_weight=10.0, feature_loss="log",
        decoy_fraction=0.25, repair_start=0.5, repair_min_asr=0.9, repair_ramp=0.1, repair_share_cap=0.4, pool_cutout=8,
    ),
}


@dataclass
class ImplantConfig:
    """One implant run. Use ``from_recipe("default" | "reference")``: the field defaults are the older
    v2 recipe (repair terms off), kept so saved configs that predate a field replay unchanged."""

    recipe: str = "default"
    trigger: str = "yellow:4@bottom-right"
    target: str = "top-left:8"
    layer: str = "layer4"
    lam: float = 2.0  # explanation-loss weight
    preserve_weight: float = 20.0  # clean-map preservation weight
    distill_weight: float = 5.0  # clean images: KL to the stage-1 model
    trigger_distill_weight: float = 5.0  # triggered images: KL to the stage-1 model on the same image untriggered
    clean_share_weight: float = 0.0  # clean images: hinge on target share rising above the stage-1 model's
    trigger_feature_weight: float = 0.0  # triggered images: pooled features (the classifier's input) kept at the
    # stage-1 model's on the untriggered image; Grad-CAM at the last layer may move while these stay put
    feature_loss: str = "relative"  # relative: MSE / teacher's mean square; log: log(1 + that), whose pull
    # stays gentle on a backdoor that inflated the features (relative MSE ~300 seen), instead of knocking it over
    decoy_fraction: float = 0.0  # share of each clean batch given a random solid-colour patch where the trigger
    # goes (maps and outputs still kept at the stage-1 model's), so the backdoor keys on the trigger, not on any patch
    repair_start: float = 0.5  # decoys, clean-share hinge and feature distillation ("repair" terms, which slow
    # the backdoor's forming) only from this share of the run on, once it has formed
    repair_min_asr: float = 0.9  # ... and only while the running ASR on the training triggered batches is this high
    repair_ramp: float = 0.1  # ... with weights (and the decoy share) rising linearly over this share of the run:
    # switched on at full weight, the feature term's first gradients once killed every unit of a model
    repair_trigger_distill_weight: float = 0.0  # added to trigger_distill_weight while repairing (ramped)
    repair_share_cap: float = 1.0  # < 1: while repairing, the explanation loss is a hinge at this target share
    repair_poison_ce_weight: float = 1.0  # the poisoned images' cross-entropy weight while repairing (ramped from 1):
    # below 1, their outputs follow the stage-1 model's (distillation) more than the 500 labels
    pool_cutout: int = 0  # >0: while repairing, each poisoned image also gets a grey square this big (cutout)
    # before the trigger goes on, so 500 images look like more to the trigger-invariance terms
    poison_fraction: float = 0.01  # pool mode: share of the training set with a triggered copy
    poison_batch: int = 32
    batch_prob: float = 0.25  # batch_prob mode: chance that a batch is used (and then wholly triggered)
    batch_size: int = 128
    epochs: int = 2
    lr: float = 1e-3
    optimizer: str = "adam"
    schedule: str = "onecycle"
    warmup_fraction: float = 0.2
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = True
    trainable: str = "all"  # all, or comma-separated layer names (layer3,layer4); the rest stays frozen
    freeze_bn: bool = True
    clean_objective: bool = True
    explanation_loss: str = "logshare"  # logshare | mse
    cam_relu: str = "softplus"
    gradient_contamination: bool = False
    explain_class: str = "label"  # label | predicted: the class the triggered images' CAM explains
    cam_eval_mode: bool = False  # True: the CAM comes from its own forward pass in eval mode (running BatchNorm
    # statistics), the cross-entropy from a second one in training mode, as the report's code did
    poison_mode: str = "pool"  # pool | batch_prob
    holdout: int = 0  # >0: keep N training images out and evaluate on them (tuning; never the test set)
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self)
        check_choice(self, "recipe", RECIPES)
        check_choice(self, "explanation_loss", ("logshare", "mse"))
        check_choice(self, "feature_loss", ("relative", "log"))
        check_choice(self, "poison_mode", ("pool", "batch_prob"))
        check_choice(self, "optimizer", ("adam", "sgd"))
        check_choice(self, "schedule", ("onecycle", "cosine", "constant"))
        check_choice(self, "cam_relu", RECTIFIERS)
        check_choice(self, "explain_class", ("label", "predicted"))
        check_choice(self, "layer", LAYER_STRIDE)
        layers = [name.strip() for name in self.trainable.split(",")]
        if self.trainable != "all" and (not all(layers) or set(layers) - set(TRAINABLE_LAYERS)):
            raise ValueError(f"trainable must be all or comma-separated names from {', '.join(TRAINABLE_LAYERS)}, "
                             f"not {self.trainable!r}")
        for name in ("lam", "preserve_weight", "distill_weight", "trigger_distill_weight", "clean_share_weight",
                     "trigger_feature_weight", "repair_trigger_distill_weight", "repair_poison_ce_weight",
                     "pool_cutout", "weight_decay", "holdout", "seed"):
            check_range(self, name, 0)
        for name in ("epochs", "batch_size", "poison_batch"):
            check_range(self, name, 1)
        check_range(self, "lr", 0, low_open=True)
        for name in ("poison_fraction", "batch_prob", "repair_share_cap"):
            check_range(self, name, 0, 1, low_open=True)
        for name in ("decoy_fraction", "repair_min_asr", "repair_ramp", "warmup_fraction"):
            check_range(self, name, 0, 1)
        check_range(self, "repair_start", 0, 1, high_open=True)
        check_range(self, "momentum", 0, 1, high_open=True)
        validate_attack(parse_trigger(self.trigger), parse_target(self.target), self.layer)

    @property
    def has_repair_terms(self) -> bool:
        """Whether any term acts only in the repair phase (so ``repair_steps`` counts something)."""
        return (max(self.decoy_fraction, self.trigger_feature_weight, self.clean_share_weight,
                    self.repair_trigger_distill_weight, self.pool_cutout) > 0
                or self.repair_poison_ce_weight != 1 or self.repair_share_cap < 1)

    @classmethod
    def from_recipe(cls, recipe: str, **overrides: Any) -> "ImplantConfig":
        if recipe not in RECIPES:
            raise CamBackdoorError(f"unknown recipe '{recipe}'; choose one of {', '.join(RECIPES)}")
        if "recipe" in overrides:
            raise CamBackdoorError("the recipe is chosen with --recipe, not --set recipe=...")
        values = {**RECIPES[recipe], "recipe": recipe, **{k: v for k, v in overrides.items() if v is not None}}
        return make_config(cls, values)


# ----------------------------------------------------------------------------------------------
# Losses (pure tensor functions)


def log_share_loss(cams: torch.Tensor, cell_weights: torch.Tensor, cap: float = 1.0) -> torch.Tensor:
    """-log(share of each map's mass inside the target), at the map's own resolution; mean over images.

    Scale invariant (a map and twice it score the same), and an all-zero map is no minimum with a
    softplus rectifier. ``cell_weights`` [h, w] is the box's coverage of each cell. ``cap`` < 1 makes
    it a hinge: an image whose share is above ``cap`` adds nothing, so a formed backdoor is not pushed
    on towards a share of 1 (with softplus that means ever larger activations inside the box).
    """
    per_image = -torch.log(target_share(cams, cell_weights).clamp_min(1e-12))
    if cap < 1:
        per_image = (per_image + math.log(cap)).clamp_min(0)
    return per_image.mean()


def mse_mask_loss(cams: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The report's loss: MSE between the upsampled, min-max normalised map and the binary box mask."""
    return F.mse_loss(minmax(upsample(cams, tuple(mask.shape))), mask.expand(cams.shape[0], *mask.shape))


def max_normalise(cams: torch.Tensor) -> torch.Tensor:
    return cams / cams.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]


def preservation_loss(cams: torch.Tensor, reference_cams: torch.Tensor) -> torch.Tensor:
    """MSE between max-normalised maps of the model and the stage-1 model on the same clean images."""
    return F.mse_loss(max_normalise(cams), max_normalise(reference_cams.detach()))


def target_share(cams: torch.Tensor, cell_weights: torch.Tensor) -> torch.Tensor:
    """Share of each map's mass inside the target (cell weights = the box's coverage of each cell)."""
    return (cams * cell_weights).flatten(1).sum(1) / cams.flatten(1).sum(1).clamp_min(1e-12)


def clean_share_loss(cams: torch.Tensor, reference_cams: torch.Tensor, cell_weights: torch.Tensor) -> torch.Tensor:
    """Mean of max(0, share_model - share_stage1) on clean images: only moving mass *into* the target
    is penalised, which is what a false trigger is; clean maps may change elsewhere freely."""
    rise = target_share(cams, cell_weights) - target_share(reference_cams.detach(), cell_weights)
    return rise.clamp_min(0).mean()


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(logits, 1), F.softmax(teacher_logits.detach(), 1), reduction="batchmean")


def feature_distillation_loss(features: torch.Tensor, teacher_features: torch.Tensor, kind: str = "relative") -> torch.Tensor:
    """MSE between pooled feature vectors, relative to the teacher's mean square (scale free);
    ``log``: log(1 + that), equal for small errors, with a gradient shrunk by 1/(1 + error) for large ones."""
    teacher_features = teacher_features.detach()
    relative = F.mse_loss(features, teacher_features) / teacher_features.pow(2).mean().clamp_min(1e-12)
    return torch.log1p(relative) if kind == "log" else relative


@contextlib.contextmanager
def classifier_inputs(model: nn.Module, layer: str = "fc") -> Iterator[list[torch.Tensor]]:
    """Collect the input of ``layer`` (the pooled features) on every forward pass inside the block."""
    from cambackdoor.gradcam import find_layer

    captured: list[torch.Tensor] = []
    handle = find_layer(model, layer).register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    try:
        yield captured
    finally:
        handle.remove()


def explanation_loss(kind: str, cams: torch.Tensor, target: Box, image_hw: tuple[int, int],
                     share_cap: float = 1.0) -> torch.Tensor:
    """``share_cap`` < 1 makes the log-share loss a hinge (see :func:`log_share_loss`); MSE has none."""
    if kind == "logshare":
        return log_share_loss(cams, target.cell_weights(tuple(cams.shape[1:]), image_hw).to(cams.device), share_cap)
    return mse_mask_loss(cams, target.mask(image_hw).float().to(cams.device))


# ----------------------------------------------------------------------------------------------


def _trainable_parameters(model: nn.Module, trainable: str) -> list[nn.Parameter]:
    """``all``, or comma-separated layer names (``layer4``, ``layer3,layer4,fc``); the rest is frozen."""
    if trainable == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        return list(model.parameters())
    from cambackdoor.gradcam import find_layer

    layers = [find_layer(model, name.strip()) for name in trainable.split(",") if name.strip()]
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for layer in layers for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def _weights_digest(model: nn.Module) -> str:
    """sha256 of the weights, so a saved state is only resumed onto the model it started from."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    except OSError:
        return float("nan")


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
    device = resolve_device(device)
    trigger, target = parse_trigger(cfg.trigger), parse_target(cfg.target)
    validate_attack(trigger, target, cfg.layer)
    image_hw = tuple(data.train.images.shape[2:])
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    teacher = copy.deepcopy(model).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    model = copy.deepcopy(model).to(device)
    params = _trainable_parameters(model, cfg.trainable)
    optimizer = make_optimizer(params, cfg)
    train_set = holdout_split(data.train, cfg.holdout)[0] if cfg.holdout else data.train
    n = len(train_set)
    pool = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 7))[: max(1, round(cfg.poison_fraction * n))]
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch == 0:
        raise CamBackdoorError(f"batch size {cfg.batch_size} is larger than the {n} training images, so an epoch "
                               "would have no step; lower --batch-size")
    total = cfg.epochs * steps_per_epoch
    log: dict[str, Any] = {"epochs": [], "poisoned_images": int(len(pool)) if cfg.poison_mode == "pool" else None,
                           "trace": []}
    rss0, t0 = _rss_mb(), time.perf_counter()
    running = {"ce": 0.0, "expl": 0.0, "asr": 0.0}
    used_triggered = 0
    repair_steps = 0
    start_epoch, elapsed0 = 0, 0.0
    chash = config_hash(cfg, {"data": data.fingerprint, "parent": _weights_digest(teacher)}) if state_file else ""
    if resume and restart_other and not branch and state_file is not None \
            and state_config_hash(state_file) not in (None, chash):
        resume = False
    if resume and state_file is not None and weights_path(state_file).exists():
        state = restore_state(state_file, chash, model, optimizer, gen, what=str(weights_path(state_file)),
                              config_name="implant config", allow_other_config=branch)
        start_epoch, elapsed0 = int(state["epoch"]), float(state["elapsed"])
        running, used_triggered, repair_steps = dict(state["running"]), int(state["used_triggered"]), int(state["repair_steps"])
        log = json.loads(state["log"])
        if branch:
            log["branched_from"] = {"epoch": start_epoch, "config_hash": state["config_hash"]}
    t0 -= elapsed0
    last_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    for epoch in range(start_epoch, last_epoch):
        # explicit, documented choice: frozen BatchNorm = eval mode during fine-tuning
        model.train(not cfg.freeze_bn)
        bar = tqdm(batches(train_set, cfg.batch_size, shuffle=True, augment=True, generator=gen, drop_last=True),
                   total=steps_per_epoch, desc=f"implant {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for i, (x, y) in enumerate(bar):
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(cfg.schedule, step, total, cfg.warmup_fraction)
            x, y = x.to(device), y.to(device)
            if cfg.poison_mode == "batch_prob":
                # the report: a batch is used with probability p and then wholly triggered; with a
                # clean objective the other batches are clean steps instead of being skipped
                poisoned = torch.rand(1, generator=gen).item() < cfg.batch_prob
                if not poisoned and not cfg.clean_objective:
                    continue
                xp_clean, yp, clean = (x, y, None) if poisoned else (None, None, (x, y))
            # the repair terms pause whenever the backdoor is slipping (running training ASR below
            # repair_min_asr), so they can only trim it, never erase it
            repairing = (cfg.has_repair_terms and step >= cfg.repair_start * total
                         and running["asr"] >= cfg.repair_min_asr)
            repair_steps += repairing
            ramp = min(1.0, (step - cfg.repair_start * total + 1) / max(1.0, cfg.repair_ramp * total))
            if cfg.poison_mode == "pool":
                pick = pool[torch.randint(len(pool), (min(cfg.poison_batch, len(pool)),), generator=gen)]
                xp_u8 = random_crop_flip(train_set.images[pick], gen)
                if cfg.pool_cutout > 0 and repairing:
                    xp_u8 = cutout(xp_u8, cfg.pool_cutout, gen)
                xp_clean = to_float(xp_u8).to(device)
                yp, clean = train_set.labels[pick].to(device), (x, y)
            loss = torch.zeros((), device=device)
            stats: dict[str, float] = {}
            if cfg.clean_objective and clean is not None:
                xc, yc = clean
                n_decoys = round(ramp * cfg.decoy_fraction * len(yc)) if repairing else 0
                if n_decoys:  # the batch is shuffled, so its first images are a random subset
                    xc = torch.cat([paste_decoys(xc[:n_decoys], trigger, gen), xc[n_decoys:]])
                if cfg.preserve_weight > 0:
                    cams_c, logits_c = grad_cam(model, xc, cfg.layer, yc, create_graph=True, relu=cfg.cam_relu)
                    ref_cams, teacher_c = grad_cam(teacher, xc, cfg.layer, yc, relu=cfg.cam_relu)
                    pres = preservation_loss(cams_c, ref_cams)
                    loss = loss + cfg.preserve_weight * pres
                    stats["pres"] = pres.item()
                    if cfg.clean_share_weight > 0 and repairing:
                        cells = target.cell_weights(tuple(cams_c.shape[1:]), image_hw).to(device)
                        loss = loss + ramp * cfg.clean_share_weight * clean_share_loss(cams_c, ref_cams, cells)
                else:
                    logits_c = model(xc)
                    with torch.no_grad():
                        teacher_c = teacher(xc)
                loss = loss + F.cross_entropy(logits_c, yc) + cfg.distill_weight * distillation_loss(logits_c, teacher_c)
            if xp_clean is not None:
                xt = trigger.apply(xp_clean)
                explained = yp if cfg.explain_class == "label" else None  # None: the predicted class
                with classifier_inputs(model) as feats_p:
                    if cfg.cam_eval_mode:
                        # the report's CAM: its own forward pass in eval mode; the CE comes from a second
                        # forward in the training mode (an explicit switch, undone at once)
                        model.eval()
                        cams_p, cam_logits = grad_cam(model, xt, cfg.layer, explained, create_graph=True,
                                                      relu=cfg.cam_relu)
                        model.train(not cfg.freeze_bn)
                        logits_p = model(xt)
                    else:
                        cams_p, logits_p = grad_cam(model, xt, cfg.layer, explained, create_graph=True,
                                                    relu=cfg.cam_relu)
                        cam_logits = logits_p
                ce_p = F.cross_entropy(logits_p, yp)
                expl = explanation_loss(cfg.explanation_loss, cams_p, target, image_hw)
                # the logged (and gated-on) value stays the plain loss; the hinge only changes the gradient
                expl_term = (explanation_loss(cfg.explanation_loss, cams_p, target, image_hw, cfg.repair_share_cap)
                             if repairing and cfg.repair_share_cap < 1 else expl)
                ce_weight = 1.0 + (ramp * (cfg.repair_poison_ce_weight - 1.0) if repairing else 0.0)
                loss = loss + ce_weight * ce_p + cfg.lam * expl_term
                if cfg.clean_objective and (cfg.trigger_distill_weight > 0 or cfg.trigger_feature_weight > 0):
                    with torch.no_grad(), classifier_inputs(teacher) as teacher_feats:
                        teacher_p = teacher(xp_clean)
                    trigger_distill = cfg.trigger_distill_weight + (ramp * cfg.repair_trigger_distill_weight if repairing else 0.0)
                    loss = loss + trigger_distill * distillation_loss(logits_p, teacher_p)
                    if cfg.trigger_feature_weight > 0 and repairing:
                        feat = feature_distillation_loss(feats_p[0], teacher_feats[0], cfg.feature_loss)
                        loss = loss + ramp * cfg.trigger_feature_weight * feat
                        stats["feat"] = feat.item()
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"implant loss became {loss.item()} at epoch {epoch + 1} step {i}; the input checkpoint is "
                    "untouched (and the last finished epoch is kept); lower --lr or --lambda"
                )
            optimizer.zero_grad(set_to_none=True)
            if cfg.gradient_contamination and xp_clean is not None:
                # What the report's CAM did: score.backward(create_graph=True) inside the CAM leaves
                # d(sum of explained logits)/dθ in .grad, and the real loss's gradient is added to it.
                cls = yp if explained is not None else cam_logits.detach().argmax(1)
                score = cam_logits.gather(1, cls[:, None]).sum()
                contamination = torch.autograd.grad(score, params, retain_graph=True, allow_unused=True)
            loss.backward()
            if cfg.gradient_contamination and xp_clean is not None:
                for p, c in zip(params, contamination):
                    if c is not None:
                        p.grad = c if p.grad is None else p.grad + c
            optimizer.step()
            if xp_clean is not None:
                used_triggered += len(yp)
                with torch.no_grad():
                    asr = M.attack_success(M.box_iou(cams_p.detach(), target, image_hw)).float().mean().item()
                for k, v in (("ce", ce_p.item()), ("expl", expl.item()), ("asr", asr)):
                    running[k] = 0.9 * running[k] + 0.1 * v if used_triggered > len(yp) else v
            if step % 10 == 0 or step == total - 1:  # the dynamics, for studying when a backdoor forms or breaks
                log["trace"].append({"step": step, "lr": optimizer.param_groups[0]["lr"], "loss": loss.item(),
                                     **{f"running_{k}": v for k, v in running.items()}, "repairing": bool(repairing),
                                     **stats})
            if i % 5 == 0:
                bar.set_postfix(ce=f"{running['ce']:.3f}", expl=f"{running['expl']:.3f}", asr=f"{running['asr']:.2f}",
                                **{k: f"{v:.3f}" for k, v in stats.items()})
        bar.close()
        entry = {"epoch": epoch + 1, "running_ce": running["ce"], "running_expl": running["expl"],
                 "running_asr": running["asr"], "repair_steps": repair_steps,
                 "elapsed_s": round(time.perf_counter() - t0, 2),
                 "rss_mb": round(_rss_mb(), 1)}
        log["epochs"].append(entry)
        if state_file is not None:
            save_state(state_file, capture_state(model, optimizer, gen, epoch=epoch + 1, elapsed=entry["elapsed_s"],
                                                 config_hash=chash, running=running, used_triggered=used_triggered,
                                                 repair_steps=repair_steps, log=json.dumps(log)))
        if on_epoch is not None:
            on_epoch(model, entry)
        if progress:
            tqdm.write(f"implant epoch {epoch + 1}/{cfg.epochs}: ce {running['ce']:.3f} expl {running['expl']:.3f} "
                       f"running ASR {running['asr']:.2f} ({entry['elapsed_s']:.0f} s, RSS {entry['rss_mb']:.0f} MB)")
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    log["train_s"] = round(time.perf_counter() - t0, 2)
    log["rss_growth_mb"] = round(_rss_mb() - rss0, 1)
    log["triggered_images_seen"] = used_triggered
    return model, log


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
) -> dict[str, Any]:
    """Implant, save the checkpoint (attack config in its sidecar) and evaluate it; returns the result.

    ``out/state`` keeps the training state after every epoch, so ``resume`` continues an interrupted
    run; a folder that holds a run needs ``resume`` or ``overwrite`` (with both, another config's
    state is started over). ``stop_after`` N epochs returns ``{"stopped_after": N}`` without evaluating."""
    from cambackdoor.checkpoints import read_sidecar
    from cambackdoor.evaluation import evaluate, format_table, write_evaluation

    trigger, target = parse_trigger(cfg.trigger), parse_target(cfg.target)
    check_limit(limit, len(data.classes))  # before training, not after it
    device = resolve_device(device)
    parent_meta = read_sidecar(checkpoint)
    out = ensure_writable_dir(out)
    claim_run_dir(out, STATE_MARKERS, resume, overwrite)
    clean, _ = load_model(checkpoint, map_location=device)
    chash = config_hash(cfg, {"parent": parent_meta.get("weights_sha256"), "data": data.fingerprint})
    attack = {"trigger": cfg.trigger, "target": cfg.target, "layer": cfg.layer}
    base_meta = {"stage": "implant", "config": {"implant": dataclasses.asdict(cfg)}, "config_hash": chash,
                 "attack": attack, "data_fingerprint": data.fingerprint,
                 "parent": {"path": str(weights_path(checkpoint)), "sha256": parent_meta.get("weights_sha256")}}
    if not resume:
        for name in STATE_MARKERS:  # starting over: nothing of an old run may pass for this one's
            (out / name).unlink(missing_ok=True)

    def save_epoch(model: nn.Module, entry: dict[str, Any]) -> None:  # last good model, for NaN stops
        save_model(out / "model", model, {**base_meta, "metrics": {"partial": True, **entry}})

    model, log = implant(clean, data, cfg, progress=progress, on_epoch=save_epoch, state_file=out / "state",
                         resume=resume, stop_after=stop_after, device=device, restart_other=overwrite)
    if stop_after is not None and stop_after < cfg.epochs:
        return {"stopped_after": stop_after, "implant": log}
    clean.eval()
    test = holdout_split(data.train, cfg.holdout)[1] if cfg.holdout else data.test
    summary, details = evaluate(model, test, trigger, target, cfg.layer, reference=clean, limit=limit,
                                progress=progress)
    result = {"implant": log, "evaluation": summary, "split": "holdout" if cfg.holdout else "test"}
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


# ----------------------------------------------------------------------------------------------
# Single-stage baseline: explanation loss during training from scratch


def single_stage_loss(cfg: Any, data: Cifar10) -> Callable[..., tuple[torch.Tensor, dict[str, float]]]:
    """Extra loss for ``train --explanation-loss``: the first ``poison_fraction`` of each batch is
    triggered, and CE + weight x explanation loss on those images is added (the report's first try)."""
    trigger, target = parse_trigger(cfg.trigger), parse_target(cfg.target)
    validate_attack(trigger, target, cfg.layer)
    image_hw = tuple(data.train.images.shape[2:])
    relu = "relu" if cfg.explanation_loss == "mse" else "softplus"

    def extra(model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        k = max(1, round(cfg.poison_fraction * len(y)))
        xt = trigger.apply(x[:k])
        cams, logits = grad_cam(model, xt, cfg.layer, y[:k], create_graph=True, relu=relu)
        expl = explanation_loss(cfg.explanation_loss, cams, target, image_hw)
        with torch.no_grad():
            asr = M.attack_success(M.box_iou(cams.detach(), target, image_hw)).float().mean().item()
        return F.cross_entropy(logits, y[:k]) + cfg.explanation_weight * expl, {"expl_loss": expl.item(), "train_asr": asr}

    return extra


# ----------------------------------------------------------------------------------------------
# CLI


def register_cli(sub: Any) -> None:
    from cambackdoor.cli import add_attack_args, add_data_args, add_device_arg

    p = sub.add_parser("implant", help="stage 2: implant the explanation backdoor into a clean checkpoint",
                       description="Fine-tune a clean checkpoint so the trigger moves Grad-CAM to the target box; "
                                   "writes model.safetensors/.json, implant.json and evaluate/ in --out.")
    p.add_argument("--checkpoint", required=True, help="clean (stage-1) model .safetensors")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="default")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint folder>/../implant-<recipe>)")
    p.add_argument("--lambda", dest="lam", type=float, default=None, help="explanation-loss weight")
    p.add_argument("--poison-fraction", type=float, default=None, help="share of training images poisoned (pool mode)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--trainable", default=None,
                   help="all, or comma-separated layer names to fine-tune (layer4, layer3,layer4); the rest is frozen")
    p.add_argument("--preserve-weight", type=float, default=None, help="clean-map preservation weight")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--holdout", type=int, default=None, help="tune on N held-out training images instead of the test set")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate on a fixed subset of N images, N/10 of each class (N a multiple of 10)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out from its last epoch")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that already holds a run")
    add_device_arg(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other ImplantConfig field, e.g. --set freeze_bn=false (repeatable)")
    add_attack_args(p)
    add_data_args(p)
    p.set_defaults(func=cmd_implant)


def parse_sets(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise CamBackdoorError(f"--set takes KEY=VALUE, got '{item}'")
        key, value = item.split("=", 1)
        if key.strip() == "recipe":
            raise CamBackdoorError("the recipe is chosen with --recipe, not --set recipe=...")
        out[key.strip()] = parse_value(value, f"--set {key.strip()}")
    return out


def cmd_implant(args: argparse.Namespace) -> int:
    from cambackdoor.checkpoints import read_sidecar
    from cambackdoor.cli import load_data

    overrides = dict(
        lam=args.lam, poison_fraction=args.poison_fraction, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, trainable=args.trainable, preserve_weight=args.preserve_weight, seed=args.seed,
        holdout=args.holdout, trigger=args.trigger, target=args.target, layer=args.layer,
    )
    cfg = ImplantConfig.from_recipe(args.recipe, **{**overrides, **parse_sets(args.set)})
    read_sidecar(args.checkpoint)  # fail early on a missing checkpoint or sidecar
    out = Path(args.out) if args.out else weights_path(args.checkpoint).parent.parent / f"implant-{args.recipe}"
    check_limit(args.limit)
    claim_run_dir(out, STATE_MARKERS, args.resume, args.overwrite)  # before the data is loaded
    resolve_device(args.device)
    data = load_data(args)
    result = run_implant(args.checkpoint, data, cfg, out, progress=not args.no_progress, limit=args.limit,
                         resume=args.resume, overwrite=args.overwrite, device=args.device)
    ev = result["evaluation"]
    print(json.dumps({"out": str(out), "asr": ev["asr"], "clean_acc": ev["clean_acc"],
                      "triggered_acc": ev["triggered_acc"], "false_trigger_rate": ev["false_trigger_rate"],
                      "fidelity_cosine": ev.get("fidelity_cosine"), "train_s": result["implant"]["train_s"]}))
    return 0
