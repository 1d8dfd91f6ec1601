"""What a model owner routinely does to a model, each on a copy and with training images only:
BatchNorm re-estimation, clean fine-tuning, fine-pruning (Liu, Dolan-Gavitt & Garg, RAID 2018),
and input purification at test time (JPEG re-compression, Gaussian blur, a random shift).
"""

from __future__ import annotations

import copy
import io
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cambackdoor.data import ImageSet, batches, to_float
from cambackdoor.gradcam import find_layer
from cambackdoor.models import batchnorm_layers, prefer_channels_last


def clean_subset(images: ImageSet, n: int | None, seed: int = 0) -> ImageSet:
    """A seeded random subset of ``n`` images (all of them when ``n`` is None or not smaller)."""
    if n is None or n >= len(images):
        return images
    return images.subset(torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n])


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, images: ImageSet, n: int = 10_000, batch_size: int = 128,
                         seed: int = 0, augment: bool = False) -> nn.Module:
    """A copy whose BatchNorm running statistics are recomputed from ``n`` clean images (a cumulative
    average over the batches, as after a fresh training pass); weights untouched. Returned in eval mode.
    ``augment``: the images get training's random crop and flip first (drawn from ``seed``); the statistics of
    un-augmented images differ from those a model was trained with (the width-16 stage-1 model: 1.7 pt lost)."""
    device = next(model.parameters()).device
    model = copy.deepcopy(model)
    layers = batchnorm_layers(model)
    momenta = [bn.momentum for bn in layers]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch counts the same
    model.train()
    for x, _ in batches(clean_subset(images, n, seed), batch_size, augment=augment,
                        generator=torch.Generator().manual_seed(seed)):
        model(x.to(device))
    for bn, m in zip(layers, momenta):
        bn.momentum = m
    return model.eval()


def fine_tune(model: nn.Module, images: ImageSet, epochs: int = 1, lr: float = 0.01, momentum: float = 0.9,
              weight_decay: float = 5e-4, batch_size: int = 128, seed: int = 0,
              keep_zero: dict[str, torch.Tensor] | None = None,
              on_epoch: Callable[[int, nn.Module], None] | None = None, progress: bool = False) -> nn.Module:
    """A copy fine-tuned on clean ``images`` with SGD (constant ``lr``, momentum) and random
    horizontal flips; BatchNorm in training mode, as an owner's fine-tuning would have it.
    ``keep_zero`` {parameter name: mask}: entries where the mask is 0 stay 0 (pruned weights).
    ``on_epoch(epoch, model)`` sees the model after each epoch (in eval mode, then back to training)."""
    device = next(model.parameters()).device
    model = copy.deepcopy(model)
    fast = prefer_channels_last(model, device, batch_size)  # every batch is full (drop_last)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    params = dict(model.named_parameters())
    masks = {name: mask.to(device) for name, mask in (keep_zero or {}).items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        n_steps = len(images) // batch_size
        for x, y in tqdm(batches(images, batch_size, shuffle=True, generator=gen, drop_last=True), total=n_steps,
                         desc=f"fine-tune {epoch + 1}/{epochs}", disable=not progress, leave=False):
            flip = torch.rand(len(y), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x).to(device)
            loss = F.cross_entropy(model(x), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for name, mask in masks.items():
                    params[name].mul_(mask)
        if on_epoch is not None:
            model.eval()
            on_epoch(epoch + 1, model.to(memory_format=torch.contiguous_format))
            if fast:
                model.to(memory_format=torch.channels_last)
    return model.to(memory_format=torch.contiguous_format).eval()


@torch.no_grad()
def channel_activity(model: nn.Module, images: ImageSet, layer: str = "layer4", n: int = 5_000,
                     batch_size: int = 250, seed: int = 0) -> torch.Tensor:
    """Mean activation of each output channel of ``layer`` over ``n`` clean images (eval mode)."""
    device = next(model.parameters()).device
    total: list[torch.Tensor] = []
    handle = find_layer(model, layer).register_forward_hook(
        lambda _m, _i, out: total.append(out.detach().float().mean(dim=(0, 2, 3)) * out.shape[0]))
    was_training = model.training
    model.eval()
    count = 0
    try:
        for x, y in batches(clean_subset(images, n, seed), batch_size):
            model(x.to(device))
            count += len(y)
    finally:
        handle.remove()
        model.train(was_training)
    return torch.stack(total).sum(0).cpu() / max(1, count)


def prune_layer4(model: nn.Module, activity: torch.Tensor, fraction: float) -> tuple[nn.Module, torch.Tensor]:
    """A copy with the ``fraction`` least active layer4 channels pruned; returns (model, pruned indices).

    layer4's output feeds only global pooling and ``fc``, so zeroing a channel's ``fc`` column removes
    it exactly: from every logit, and (its Grad-CAM weight being that column) from layer4's CAM."""
    if not 0 <= fraction < 1:
        raise ValueError(f"prune fraction must be in [0, 1), not {fraction}")
    model = copy.deepcopy(model)
    k = int(round(fraction * len(activity)))
    pruned = activity.argsort()[:k]
    with torch.no_grad():
        model.fc.weight[:, pruned.to(model.fc.weight.device)] = 0
    return model, pruned


def fc_column_mask(model: nn.Module, pruned: torch.Tensor) -> dict[str, torch.Tensor]:
    mask = torch.ones_like(model.fc.weight)
    mask[:, pruned] = 0
    return {"fc.weight": mask}


# ----------------------------------------------------------------------------------------------
# Input purification: functions of a float batch in [0, 1], applied at test time to every input


def jpeg(quality: int = 50) -> Callable[[torch.Tensor], torch.Tensor]:
    """Re-compress each image as JPEG at ``quality`` (Pillow), as an image pipeline might."""
    from PIL import Image

    def purify(x: torch.Tensor) -> torch.Tensor:
        out = []
        for img in (x.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=quality)
            buf.seek(0)
            with Image.open(buf) as im:
                out.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        return to_float(torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)).to(x.device)

    return purify


def blur(sigma: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """Gaussian blur with standard deviation ``sigma`` pixels (kernel 2*ceil(2 sigma)+1, reflected edges)."""
    from torchvision.transforms.functional import gaussian_blur

    size = 2 * int(np.ceil(2 * sigma)) + 1
    return lambda x: gaussian_blur(x, [size, size], [sigma, sigma])


def random_shift(max_shift: int = 4, seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """Shift each image by up to ``max_shift`` pixels in each direction (edges replicated), seeded."""
    gen = torch.Generator().manual_seed(seed)

    def purify(x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        padded = F.pad(x, (max_shift,) * 4, mode="replicate")
        dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen).to(x.device)
        dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        return padded[torch.arange(n, device=x.device)[:, None, None, None],
                      torch.arange(x.shape[1], device=x.device)[None, :, None, None], rows, cols]

    return purify
