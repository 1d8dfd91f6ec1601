"""Differentiable class-activation maps: Grad-CAM, Grad-CAM++ and LayerCAM.

Activations come from a forward hook on the named layer; gradients from
``torch.autograd.grad(sum of each image's selected logit, activations, create_graph=...)`` and never
from ``.backward()``, so parameters' ``.grad`` are never touched (the reference report's CAM called
``.backward(create_graph=True)`` and so mixed the class score's gradient into every update).

Each method differs only in its weight rule (as in pytorch-grad-cam). The functions never change the
model's train/eval mode: evaluation expects ``model.eval()``; a training loss may use either mode.
No hook is left behind, even when the forward pass raises.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cambackdoor.errors import CamBackdoorError

RECTIFIERS = ("relu", "softplus", "none")


# ----------------------------------------------------------------------------------------------
# Weight rules: weights broadcastable to the activations [N, K, h, w]


def gradcam_weights(activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM: spatial mean of the gradients, one weight per channel."""
    return grads.mean(dim=(2, 3), keepdim=True)


def gradcam_plus_plus_weights(activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhyay et al., eq. 19 with the exp/ReLU head), as pytorch-grad-cam computes it."""
    g2 = grads.pow(2)
    g3 = g2 * grads
    sum_a = activations.sum(dim=(2, 3), keepdim=True)
    alpha = g2 / (2 * g2 + sum_a * g3 + 1e-6)
    alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
    return (F.relu(grads) * alpha).sum(dim=(2, 3), keepdim=True)


def layercam_weights(activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """LayerCAM: each location weighted by its own positive gradient."""
    return F.relu(grads)


WEIGHT_RULES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "gradcam": gradcam_weights,
    "gradcam++": gradcam_plus_plus_weights,
    "layercam": layercam_weights,
}


# ----------------------------------------------------------------------------------------------


def find_layer(model: nn.Module, layer: str) -> nn.Module:
    modules = dict(model.named_modules())
    for name in (layer, f"module.{layer}", f"_orig_mod.{layer}", f"_orig_mod.module.{layer}"):
        if name in modules:
            return modules[name]
    top = [n for n, _ in model.named_children()]
    raise CamBackdoorError(f"model has no layer '{layer}'; top-level layers are {', '.join(top)}")


def rectify(cams: torch.Tensor, relu: str = "relu") -> torch.Tensor:
    """ReLU (Grad-CAM's own), a smooth softplus for training losses, or nothing.

    The softplus is taken relative to each map's own scale (temperature 0.1 x max |value|, treated
    as a constant), so the map keeps its shape and the share-based losses stay scale invariant,
    while an all-zero map is no longer a flat minimum and the second derivative is not zero.
    """
    if relu == "relu":
        return F.relu(cams)
    if relu == "softplus":
        scale = cams.detach().abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12) * 0.1
        return F.softplus(cams / scale) * scale
    if relu == "none":
        return cams
    raise CamBackdoorError(f"unknown rectifier '{relu}'; choose one of {', '.join(RECTIFIERS)}")


def class_activation_map(
    model: nn.Module,
    images: torch.Tensor,
    layer: str = "layer4",
    targets: torch.Tensor | None = None,
    create_graph: bool = False,
    relu: str = "relu",
    method: str = "gradcam",
) -> tuple[torch.Tensor, torch.Tensor]:
    """CAMs [N, h, w] and logits [N, C] for one explained class per image (predicted if ``targets`` is None).

    With ``create_graph=True`` the maps (and logits) are differentiable w.r.t. the parameters, for
    training losses. With ``create_graph=False`` both come back detached.
    """
    if method not in WEIGHT_RULES:
        raise CamBackdoorError(f"unknown CAM method '{method}'; choose one of {', '.join(WEIGHT_RULES)}")
    if relu not in RECTIFIERS:
        raise CamBackdoorError(f"unknown rectifier '{relu}'; choose one of {', '.join(RECTIFIERS)}")
    module = find_layer(model, layer)
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor | None:
        if create_graph and output.requires_grad:
            captured.append(output)
            return None
        # Only d(score)/d(activations) is needed: cut the graph here (also works with frozen weights).
        output = output.detach().requires_grad_(True)
        captured.append(output)
        return output

    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(images)
            if len(captured) != 1:
                raise CamBackdoorError(f"layer '{layer}' ran {len(captured)} times in one forward pass; pick a layer used once")
            activations = captured[0]
            if targets is None:
                targets = logits.detach().argmax(dim=1)
            targets = torch.as_tensor(targets, device=logits.device).long().reshape(-1)
            if targets.shape[0] != logits.shape[0]:
                raise CamBackdoorError(f"got {targets.shape[0]} targets for {logits.shape[0]} images; give one per image")
            score = logits.gather(1, targets[:, None]).sum()
            (grads,) = torch.autograd.grad(score, activations, create_graph=create_graph, retain_graph=create_graph)
            weights = WEIGHT_RULES[method](activations, grads)
            cams = rectify((weights * activations).sum(dim=1), relu)
    finally:
        handle.remove()
    if not create_graph:
        return cams.detach(), logits.detach()
    return cams, logits


def class_activation_maps(
    model: nn.Module,
    images: torch.Tensor,
    layers: tuple[str, ...] | list[str],
    methods: tuple[str, ...] | list[str] = ("gradcam",),
    targets: torch.Tensor | None = None,
    saliency: bool = False,
) -> tuple[dict[tuple[str, str], torch.Tensor], torch.Tensor]:
    """Every (method, layer) CAM [N, h, w] from one forward and one backward pass, for measurement
    (ReLU, detached); the logits [N, C] too. Same maps as :func:`class_activation_map` one at a time:
    the methods share the activations and gradients and differ only in their weight rule.
    ``saliency``: also the input gradient's |value| summed over colours [N, H, W] (Captum's Saliency,
    ``explainers.pixel_attribution``), under the key ("saliency", "input"), from the same backward pass."""
    for method in methods:
        if method not in WEIGHT_RULES:
            raise CamBackdoorError(f"unknown CAM method '{method}'; choose one of {', '.join(WEIGHT_RULES)}")
    layers = list(dict.fromkeys(layers))
    captured: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}

    def make_hook(layer: str) -> Callable[..., torch.Tensor | None]:
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor | None:
            if not saliency and not any(captured.values()) and not output.requires_grad:
                # the first hooked layer cuts the graph below it (only d(score)/d(activations) is needed)
                output = output.detach().requires_grad_(True)
                captured[layer].append(output)
                return output
            captured[layer].append(output)
            return None
        return hook

    handles = [find_layer(model, layer).register_forward_hook(make_hook(layer)) for layer in layers]
    try:
        with torch.enable_grad():
            if saliency:
                images = images.detach().clone().requires_grad_(True)
            logits = model(images)
            for layer in layers:
                if len(captured[layer]) != 1:
                    raise CamBackdoorError(f"layer '{layer}' ran {len(captured[layer])} times in one forward pass; "
                                           "pick a layer used once")
            if targets is None:
                targets = logits.detach().argmax(dim=1)
            targets = torch.as_tensor(targets, device=logits.device).long().reshape(-1)
            score = logits.gather(1, targets[:, None]).sum()
            activations = [captured[layer][0] for layer in layers]
            grads = torch.autograd.grad(score, activations + ([images] if saliency else []))
    finally:
        for handle in handles:
            handle.remove()
    cams = {("saliency", "input"): grads[-1].abs().sum(1)} if saliency else {}
    for layer, a, g in zip(layers, activations, grads):
        a = a.detach()
        for method in methods:
            cams[(method, layer)] = F.relu((WEIGHT_RULES[method](a, g) * a).sum(dim=1))
    return cams, logits.detach()


def _cam_function(method: str, name: str, doc: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """A public CAM function: :func:`class_activation_map` with its weight rule fixed."""

    def cam_function(
        model: nn.Module,
        images: torch.Tensor,
        layer: str = "layer4",
        targets: torch.Tensor | None = None,
        create_graph: bool = False,
        relu: str = "relu",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return class_activation_map(model, images, layer, targets, create_graph, relu, method)

    cam_function.__name__ = cam_function.__qualname__ = name
    cam_function.__doc__ = doc
    return cam_function


grad_cam = _cam_function(
    "gradcam", "grad_cam",
    "Grad-CAM: cam = rectify(sum_k mean(dScore/dA_k) A_k). Returns (cams [N, h, w], logits [N, C]).\n\n"
    "One explained class per image (the predicted one when ``targets`` is None); ``create_graph=True`` makes\n"
    "the maps differentiable for training losses. Never changes train/eval mode; leaves no hook behind.",
)
grad_cam_plus_plus = _cam_function("gradcam++", "grad_cam_plus_plus", "Grad-CAM++ with the same signature as grad_cam.")
layer_cam = _cam_function("layercam", "layer_cam", "LayerCAM with the same signature as grad_cam.")


def upsample(cams: torch.Tensor, size: tuple[int, int] | int) -> torch.Tensor:
    """Bilinear upsampling (align_corners=False) of [N, h, w] maps to ``size``; maps already that size come
    back as they are (what the interpolation gives them too), so a caller may upsample once and share."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(cams.shape[-2:]) == size:
        return cams
    return F.interpolate(cams[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def minmax(cams: torch.Tensor) -> torch.Tensor:
    """Per-image min-max normalisation to [0, 1]; a constant map becomes all zeros."""
    flat = cams.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(1e-12), torch.zeros_like(flat))
    return out.view_as(cams)
