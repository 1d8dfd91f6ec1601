"""The implant's loss terms: pure tensor functions, each with a hand-computed test; the BatchNorm
switches of ``clean_bn_stats=refresh``; and the single-stage baseline's extra loss for
``train --explanation-loss``."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from cambackdoor import metrics as M
from cambackdoor.data import Cifar10
from cambackdoor.gradcam import find_layer, grad_cam, minmax, upsample
from cambackdoor.models import batchnorm_layers
from cambackdoor.triggers import Box, parse_target, parse_trigger, validate_attack


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
    """Mean of max(0, share_model - share_stage1) on clean images: only mass moved *into* the target is
    penalised, which is what a false trigger is; clean maps may change elsewhere freely (the preservation
    MSE averages a rare firing image away, this hinge is zero on the others)."""
    rise = target_share(cams, cell_weights) - target_share(reference_cams.detach(), cell_weights)
    return rise.clamp_min(0).mean()


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the softmaxes at ``temperature``, times its square (Hinton et al. 2015), so
    the gradient keeps its size as the temperature rises; above 1 the small probabilities (the teacher's ranking
    of the unlikely classes) weigh more, and as the temperature grows the term tends to an MSE on centred logits."""
    t = float(temperature)
    kl = F.kl_div(F.log_softmax(logits / t, 1), F.softmax(teacher_logits.detach() / t, 1), reduction="batchmean")
    return kl * t * t


def feature_distillation_loss(features: torch.Tensor, teacher_features: torch.Tensor, kind: str = "relative") -> torch.Tensor:
    """MSE between pooled feature vectors, relative to the teacher's mean square (scale free);
    ``log``: log(1 + that), equal for small errors, with a gradient shrunk by 1/(1 + error) for large ones."""
    teacher_features = teacher_features.detach()
    relative = F.mse_loss(features, teacher_features) / teacher_features.pow(2).mean().clamp_min(1e-12)
    return torch.log1p(relative) if kind == "log" else relative


@contextlib.contextmanager
def batchnorm_training(model: nn.Module, on: bool = True, momentum: float | None = None) -> Iterator[None]:
    """Inside the block the model runs in training mode (BatchNorm on batch statistics, updating its running
    statistics in place) when ``on``; its mode is restored on the way out (an explicit switch, undone at once).
    ``momentum``: BatchNorm's update rate inside the block (None: the layers' own), restored likewise."""
    modes = [(m, m.training) for m in model.modules()]  # each module's own: a container's flag (a view, as
    # models.split_trunk makes) need not match its children's
    layers = batchnorm_layers(model) if momentum else []
    kept = [m.momentum for m in layers]
    if on:
        model.train(True)
    for m in layers:
        m.momentum = momentum
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for m, k in zip(layers, kept):
            m.momentum = k


@torch.no_grad()
def refresh_batchnorm(model: nn.Module, x: torch.Tensor, momentum: float | None = None) -> None:
    """One no-grad training-mode pass of ``x``: BatchNorm's running statistics move towards its statistics."""
    with batchnorm_training(model, momentum=momentum):
        model(x)


@contextlib.contextmanager
def classifier_inputs(model: nn.Module, layer: str = "fc") -> Iterator[list[torch.Tensor]]:
    """Collect the input of ``layer`` (the pooled features) on every forward pass inside the block."""
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
