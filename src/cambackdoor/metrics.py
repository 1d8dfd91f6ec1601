"""Batched metrics on CAMs and predictions. All functions take tensors and return tensors or floats.

The success test is the reference report's: upsample the CAM bilinearly to the image size, min-max
normalise per image, keep pixels > 0.5, and count a success when that mask's IoU with the target box
is > 0.5.
"""

from __future__ import annotations

import torch

from cambackdoor.gradcam import minmax, upsample
from cambackdoor.triggers import IMAGE_HW, Box

SUCCESS_IOU = 0.5


def cam_masks(cams: torch.Tensor, image_hw: tuple[int, int] = IMAGE_HW, threshold: float = 0.5) -> torch.Tensor:
    """Thresholded masks [N, H, W]: upsample -> min-max -> pixels > threshold."""
    return minmax(upsample(cams, image_hw)) > threshold


def mask_iou(masks: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """IoU per image of boolean masks [N, H, W] with [H, W] or [N, H, W]; two empty masks give 1."""
    inter = (masks & other).flatten(1).sum(1).float()
    union = (masks | other).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def box_iou(cams: torch.Tensor, box: Box, image_hw: tuple[int, int] = IMAGE_HW) -> torch.Tensor:
    """IoU of each CAM's thresholded mask with the target box."""
    return mask_iou(cam_masks(cams, image_hw), box.mask(image_hw).to(cams.device))


def energy_share(cams: torch.Tensor, box: Box, image_hw: tuple[int, int] = IMAGE_HW) -> torch.Tensor:
    """Share of each upsampled (non-negative) map's mass inside the box; an all-zero map gives 0."""
    up = upsample(cams, image_hw).clamp_min(0)
    total = up.flatten(1).sum(1)
    inside = (up * box.mask(image_hw).to(up.device)).flatten(1).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-12), torch.zeros_like(total))


def pointing_game(cams: torch.Tensor, box: Box, image_hw: tuple[int, int] = IMAGE_HW) -> torch.Tensor:
    """Whether each upsampled map's peak lies in the box; a constant map points nowhere (False)."""
    up = upsample(cams, image_hw).flatten(1)
    peak = up.argmax(1)
    constant = up.max(1).values == up.min(1).values
    inside = box.mask(image_hw).to(up.device).flatten()[peak]
    return inside & ~constant


def attack_success(ious: torch.Tensor) -> torch.Tensor:
    return ious > SUCCESS_IOU


def bucket_counts(ious: torch.Tensor) -> dict[str, int]:
    """Counts per bucket: success (> 0.5), partial [0.2, 0.5], weak [0.1, 0.2), failure (< 0.1)."""
    success = ious > SUCCESS_IOU
    partial = (ious >= 0.2) & ~success
    weak = (ious >= 0.1) & (ious < 0.2)
    failure = ious < 0.1
    return {"success": int(success.sum()), "partial": int(partial.sum()), "weak": int(weak.sum()),
            "failure": int(failure.sum())}


def iou_summary(ious: torch.Tensor) -> dict[str, float]:
    if ious.numel() == 0:
        return {"mean": float("nan"), "median": float("nan"), "std": float("nan")}
    return {
        "mean": float(ious.mean()),
        "median": float(ious.median()),
        "std": float(ious.std(unbiased=False)),
    }


def map_cosine(cams: torch.Tensor, reference: torch.Tensor, image_hw: tuple[int, int] = IMAGE_HW) -> torch.Tensor:
    """Cosine similarity of the upsampled maps per image (two all-zero maps agree: 1)."""
    a, b = upsample(cams, image_hw).flatten(1), upsample(reference, image_hw).flatten(1)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    cos = (a * b).sum(1) / (na * nb).clamp_min(1e-12)
    both_zero = (na == 0) & (nb == 0)
    return torch.where(both_zero, torch.ones_like(cos), cos)


def map_mask_iou(cams: torch.Tensor, reference: torch.Tensor, image_hw: tuple[int, int] = IMAGE_HW) -> torch.Tensor:
    """IoU of the two maps' thresholded masks per image."""
    return mask_iou(cam_masks(cams, image_hw), cam_masks(reference, image_hw))
