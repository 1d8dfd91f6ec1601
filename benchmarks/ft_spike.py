"""Where one clean fine-tuning epoch breaks a triggered map: the target cell against the other cells.

For each implanted model (held-out tuning runs, pair 1) and 2,000 of the 5,000 held-out training images,
triggered: ASR, triggered accuracy, and the median over images of the 4x4 Grad-CAM's target cell and of its
largest other cell (ReLU maps of the label), after each of
  - nothing (the implant),
  - BatchNorm re-estimation on 10,000 clean training images (the audit's defence),
  - one fine-tuning epoch as the audit runs it (SGD lr 0.01, momentum 0.9, BatchNorm in training mode),
  - the same epoch with BatchNorm frozen (eval mode): the weights move, the statistics do not.
Usage: python benchmarks/ft_spike.py runs/tune16/NAME/model.safetensors ...   (about 5 min per model, 1 thread)
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.nn.functional as F

from cambackdoor import grad_cam, load_model
from cambackdoor import metrics as M
from cambackdoor.data import load_cifar10
from cambackdoor.defences import fine_tune, reestimate_batchnorm
from cambackdoor.images import batches, holdout_split
from cambackdoor.triggers import parse_target, parse_trigger

N_IMAGES = 2000
TRIGGER, BOX = parse_trigger("yellow:4@bottom-right"), parse_target("top-left:8")


def report(name: str, model: torch.nn.Module, held_out) -> None:
    maps, correct = [], 0
    for x, y in batches(held_out.subset(torch.arange(N_IMAGES)), 250):
        cams, logits = grad_cam(model, TRIGGER.apply(x), "layer4", y)
        maps.append(cams)
        correct += (logits.argmax(1) == y).sum().item()
    cells = torch.cat(maps).flatten(1)  # (images, 16); cell 0 is the top-left target
    ok = M.attack_success(M.box_iou(cells.view(-1, 4, 4), BOX))
    print(f"| {name} | {100 * ok.float().mean():.1f} | {100 * correct / N_IMAGES:.1f} | {cells[:, 0].median():.3f} | "
          f"{cells[:, 1:].max(1).values.median():.3f} |", flush=True)


def fine_tune_frozen_bn(model: torch.nn.Module, images, lr: float = 0.01) -> torch.nn.Module:
    """The audit's fine-tuning epoch (same optimiser, flips, batches) with BatchNorm kept in eval mode."""
    model = copy.deepcopy(model).eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    for x, y in batches(images, 128, shuffle=True, generator=gen, drop_last=True):
        flip = torch.rand(len(y), generator=gen) < 0.5
        loss = F.cross_entropy(model(torch.where(flip[:, None, None, None], x.flip(-1), x)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def main(paths: list[str]) -> None:
    torch.manual_seed(0)
    data = load_cifar10(os.environ.get("CAMBACKDOOR_DATA", "../shared/data/cifar10-jpeg.zip"))
    train, held_out = holdout_split(data.train, 5000)
    print("| model, after | ASR % | triggered acc % | target cell (median) | largest other cell (median) |")
    print("|---|---|---|---|---|")
    for path in paths:
        model, _ = load_model(path)
        model.eval()
        report(f"{path}: implant", model, held_out)
        report(f"{path}: BN re-estimation", reestimate_batchnorm(model, train, 10_000), held_out)
        report(f"{path}: 1 FT epoch", fine_tune(model, train, 1), held_out)
        report(f"{path}: 1 FT epoch, BN frozen", fine_tune_frozen_bn(model, train), held_out)


if __name__ == "__main__":
    main(sys.argv[1:])
