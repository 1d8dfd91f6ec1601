"""Cheap checks an owner who suspects a model can run on any input, knowing neither trigger nor target.
Each gives a score per image, higher = more suspicious; the audit scores each by AUROC over clean
test images against their triggered copies, on the implanted model and on the stage-1 control.

* ``layer-disagreement``: 1 - cosine between the layer4 and layer3 Grad-CAMs (both at image size).
  A backdoor planted at layer4 need not move layer3's map.
* ``pixel-disagreement``: 1 - cosine between the layer4 Grad-CAM and input-gradient saliency pooled
  into the same 4x4 cells. A pixel method sees the object the classifier still uses.
* ``deletion``: greying out the CAM's top cell should hurt the explained class at least as much as
  greying out saliency's top cell; the score is drop(saliency cell) - drop(CAM cell).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cambackdoor.explainers import cell_pool
from cambackdoor.gradcam import class_activation_maps, upsample

DETECTORS = ("layer-disagreement", "pixel-disagreement", "deletion")


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1), b.flatten(1)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def _grey_cell(images: torch.Tensor, cells: torch.Tensor, cam_hw: tuple[int, int]) -> torch.Tensor:
    """Copies with the given cell (flat index into cam_hw) of each image set to grey (0.5)."""
    n, _, h, w = images.shape
    ch, cw = h // cam_hw[0], w // cam_hw[1]
    r, c = (cells // cam_hw[1]) * ch, (cells % cam_hw[1]) * cw
    rows = torch.arange(h, device=images.device)[None, :, None]
    cols = torch.arange(w, device=images.device)[None, None, :]
    hole = (rows >= r[:, None, None]) & (rows < r[:, None, None] + ch) & (cols >= c[:, None, None]) & \
        (cols < c[:, None, None] + cw)
    return images.masked_fill(hole[:, None], 0.5)


def detector_scores(model: nn.Module, images: torch.Tensor, layer: str = "layer4",
                    other_layer: str = "layer3") -> dict[str, torch.Tensor]:
    """Every detector's score for each image of a batch (the explained class is the predicted one)."""
    image_hw = tuple(images.shape[2:])
    # both layers' Grad-CAMs and the input-gradient saliency from one forward and one backward pass
    maps, logits = class_activation_maps(model, images, (layer, other_layer), saliency=True)
    cams, cams_other, saliency = maps[("gradcam", layer)], maps[("gradcam", other_layer)], maps[("saliency", "input")]
    pred = logits.argmax(1)
    cam_hw = tuple(cams.shape[1:])
    pooled = cell_pool(saliency, cam_hw)
    with torch.no_grad():
        p0 = F.softmax(logits, 1).gather(1, pred[:, None])[:, 0]
        drop = {}
        for name, cell_map in (("cam", cams), ("saliency", pooled)):
            cells = cell_map.flatten(1).argmax(1)
            p = F.softmax(model(_grey_cell(images, cells, cam_hw)), 1).gather(1, pred[:, None])[:, 0]
            drop[name] = p0 - p
    return {
        "layer-disagreement": 1 - _cosine(upsample(cams, image_hw), upsample(cams_other, image_hw)),
        "pixel-disagreement": 1 - _cosine(cams, pooled),
        "deletion": drop["saliency"] - drop["cam"],
    }
