"""The transfer matrix's explainers and their box metrics.

Class-activation maps (Grad-CAM, Grad-CAM++, LayerCAM at any layer) are ours (:mod:`gradcam`, checked
against pytorch-grad-cam and Captum in the tests). Pixel-level methods come from Captum as they are:
Saliency, Integrated Gradients, SmoothGrad (NoiseTunnel over Saliency) and Occlusion.

Box metrics for a pixel attribution (absolute values summed over colour channels, [N, H, W]):
  * ``share``: the share of the attribution mass inside the target box. Chance is the box's share of
    the image (64 / 1024 = 6.25 % for an 8x8 box on 32x32): a map that ignores the box scores about that.
  * ``topk_iou``: IoU with the box of the mask of the k highest pixels, k = the box's area; 1 when the
    box holds exactly the top pixels. "Success" is ``topk_iou`` > 0.5, the analogue of the CAM test.
CAM explainers are measured with the CAM success test (upsample, min-max, > 0.5, IoU with the box).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cambackdoor import metrics as M
from cambackdoor.errors import CamBackdoorError
from cambackdoor.gradcam import class_activation_map, upsample
from cambackdoor.triggers import Box

CAM_METHODS = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "layercam": "LayerCAM"}
PIXEL_METHODS = ("saliency", "integrated-gradients", "smoothgrad", "occlusion")


@dataclass(frozen=True)
class Explainer:
    name: str  # e.g. gradcam@layer4, saliency
    kind: str  # cam | pixel
    method: str
    layer: str | None = None


def parse_explainer(name: str) -> Explainer:
    """``METHOD@LAYER`` for a CAM method (gradcam, gradcam++, layercam), or a Captum pixel method."""
    if "@" in name:
        method, layer = name.split("@", 1)
        if method in CAM_METHODS and layer in ("layer1", "layer2", "layer3", "layer4"):
            return Explainer(name, "cam", method, layer)
    elif name in PIXEL_METHODS:
        return Explainer(name, "pixel", name)
    raise CamBackdoorError(f"unknown explainer '{name}'; use METHOD@LAYER with METHOD one of {', '.join(CAM_METHODS)} "
                           f"and LAYER layer1-layer4, or one of {', '.join(PIXEL_METHODS)}")


DEFAULT_EXPLAINERS = ("gradcam@layer4", "gradcam++@layer4", "layercam@layer4", "gradcam@layer3", "gradcam++@layer3",
                      "layercam@layer3", "saliency", "integrated-gradients", "smoothgrad", "occlusion")


def pixel_attribution(method: str, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """|attribution| summed over colour channels, [N, H, W], from Captum (model in the caller's mode)."""
    from captum.attr import IntegratedGradients, NoiseTunnel, Occlusion, Saliency

    images = images.detach().clone().requires_grad_(True)  # Captum differentiates w.r.t. the inputs
    with torch.enable_grad():
        if method == "saliency":
            attr = Saliency(model).attribute(images, target=targets, abs=True)
        elif method == "integrated-gradients":  # black baseline, 8 Gauss-Legendre steps (Captum's default rule)
            attr = IntegratedGradients(model).attribute(images, baselines=torch.zeros_like(images), target=targets,
                                                        n_steps=8, internal_batch_size=len(images) * 4)
        elif method == "smoothgrad":  # 8 noisy copies, noise 0.1 (on [0, 1] images)
            attr = NoiseTunnel(Saliency(model)).attribute(images, nt_type="smoothgrad", nt_samples=8,
                                                          nt_samples_batch_size=8, stdevs=0.1, target=targets,
                                                          abs=True)
        elif method == "occlusion":  # grey 8x8 patches, stride 8: the CAM's 4x4 cells, 16 forward passes
            with torch.no_grad():
                attr = Occlusion(model).attribute(images, sliding_window_shapes=(3, 8, 8), strides=(3, 8, 8),
                                                  baselines=0.5, target=targets, perturbations_per_eval=16)
        else:
            raise CamBackdoorError(f"unknown pixel explainer '{method}'; use one of {', '.join(PIXEL_METHODS)}")
    return attr.detach().abs().sum(1)


def explain(explainer: Explainer, model: nn.Module, images: torch.Tensor,
            targets: torch.Tensor | None = None) -> torch.Tensor:
    """Maps for the predicted class (or ``targets``): CAMs [N, h, w] or pixel attributions [N, H, W]."""
    if explainer.kind == "cam":
        cams, _ = class_activation_map(model, images, explainer.layer or "layer4", targets, method=explainer.method)
        return cams
    if targets is None:
        with torch.no_grad():
            targets = model(images).argmax(1)
    return pixel_attribution(explainer.method, model, images, targets)


def box_share(attributions: torch.Tensor, box: Box) -> torch.Tensor:
    """Share of each [H, W] attribution's absolute mass inside ``box`` (an all-zero map gives 0)."""
    a = attributions.abs().flatten(1)
    inside = (attributions.abs() * box.mask(tuple(attributions.shape[1:])).to(a.device)).flatten(1).sum(1)
    total = a.sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-12), torch.zeros_like(total))


def topk_iou(attributions: torch.Tensor, box: Box) -> torch.Tensor:
    """IoU with ``box`` of each map's top-k pixels, k = the box's area (ties broken by position)."""
    hw = tuple(attributions.shape[1:])
    target = box.mask(hw).to(attributions.device).flatten()
    k = int(target.sum())
    top = attributions.abs().flatten(1).topk(k, dim=1).indices
    mask = torch.zeros_like(attributions.flatten(1), dtype=torch.bool).scatter_(1, top, True)
    inter = (mask & target).sum(1).float()
    return inter / (2 * k - inter)


def box_metrics(explainer: Explainer, maps: torch.Tensor, box: Box, image_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Per-image ``iou``, ``success`` and ``share`` for either kind of map."""
    if explainer.kind == "cam":
        iou = M.box_iou(maps, box, image_hw)
        return {"iou": iou, "success": M.attack_success(iou).float(), "share": M.energy_share(maps, box, image_hw)}
    iou = topk_iou(maps, box)
    return {"iou": iou, "success": (iou > M.SUCCESS_IOU).float(), "share": box_share(maps, box)}


def to_image_size(explainer: Explainer, maps: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """Maps at image size, scaled to [0, 1] per image, for figures and comparisons."""
    up = upsample(maps, image_hw) if explainer.kind == "cam" else maps
    flat = up.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(up)


def cell_pool(maps: torch.Tensor, cam_hw: tuple[int, int]) -> torch.Tensor:
    """A pixel map summed into the CAM's cells ([N, H, W] -> [N, h, w]), to compare it with a CAM."""
    return F.adaptive_avg_pool2d(maps[:, None], cam_hw)[:, 0]
