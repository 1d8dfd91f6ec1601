"""Image sets in memory and how they are cut and served: the held-out split, the seeded per-class
``--limit`` subset, batched augmentation and batching (no per-image Python work). Images stay uint8
until a batch is made; batches are floats in [0, 1] (normalisation is the model's)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from cambackdoor.errors import CamBackdoorError

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 [N, 3, H, W]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor | slice) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index])


HOLDOUT_SEED = 1234  # one split for every stage, so a tuning run never sees its held-out images


def holdout_split(images: ImageSet, holdout: int, seed: int = HOLDOUT_SEED) -> tuple[ImageSet, ImageSet]:
    """Split off ``holdout`` images (fixed seed) to choose hyper-parameters without the test set."""
    if not 0 <= holdout < len(images):
        raise CamBackdoorError(f"--holdout {holdout} must be between 0 and {len(images) - 1} (the training set has "
                               f"{len(images)} images)")
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images.subset(perm[holdout:]), images.subset(perm[:holdout])


LIMIT_SEED = 4321  # one fixed subset per N, so every --limit N figure is on the same images


def check_limit(limit: int | None, num_classes: int = len(CLASSES)) -> None:
    """Refuse a ``--limit`` that cannot give the same number of images per class."""
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise CamBackdoorError(f"--limit {limit} must be a positive whole number of images (or left out for all)")
    if limit % num_classes:
        lo = max(num_classes, limit - limit % num_classes)
        raise CamBackdoorError(f"--limit {limit} does not split evenly over the {num_classes} classes; use "
                               f"{lo} or {lo + num_classes}")


def limited(images: ImageSet, limit: int | None, num_classes: int = len(CLASSES), seed: int = LIMIT_SEED) -> ImageSet:
    """A seeded subset with ``limit / num_classes`` images of every class (kept in their original order);
    the whole set when ``limit`` is None or not smaller than it. The test set is sorted by class, so
    its first N images would all be airplanes."""
    check_limit(limit, num_classes)
    if limit is None or limit >= len(images):
        return images
    per_class = limit // num_classes
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in range(num_classes):
        members = (images.labels == c).nonzero().flatten()
        if len(members) < per_class:
            raise CamBackdoorError(f"--limit {limit} needs {per_class} images of class {c}, the set has "
                                   f"{len(members)}; use a smaller --limit")
        keep.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
    return images.subset(torch.cat(keep).sort().values)


# ----------------------------------------------------------------------------------------------
# Batched augmentation and batching (no per-image Python work)


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random ``pad``-pixel-padded crop and horizontal flip of a whole uint8 batch at once."""
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    cropped = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(-1), cropped)


def cutout(images: torch.Tensor, size: int, generator: torch.Generator, fill: int = 128) -> torch.Tensor:
    """Copies of a uint8 batch with one ``size``x``size`` square per image set to grey (``fill``); the
    square's centre is uniform over the image, so it may hang over the edge (DeVries & Taylor, 2017)."""
    n, _, h, w = images.shape
    cy = torch.randint(0, h, (n,), generator=generator)[:, None, None]
    cx = torch.randint(0, w, (n,), generator=generator)[:, None, None]
    rows, cols = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    half = size // 2
    hole = (rows >= cy - half) & (rows < cy - half + size) & (cols >= cx - half) & (cols < cx - half + size)
    return images.masked_fill(hole[:, None].to(images.device), fill)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]."""
    return images.float().div_(255.0)


def batches(
    data: ImageSet,
    batch_size: int,
    shuffle: bool = False,
    augment: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    indices: Sequence[int] | torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (float images in [0, 1], labels) batches; shuffle/augment draw from ``generator``."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    order = torch.as_tensor(indices) if indices is not None else torch.arange(len(data))
    if shuffle:
        order = order[torch.randperm(len(order), generator=generator)]
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        x = data.images[idx]
        if augment:
            x = random_crop_flip(x, generator)
        yield to_float(x), data.labels[idx]


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)
