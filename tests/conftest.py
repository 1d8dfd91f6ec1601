"""Shared fixtures: tiny synthetic CIFAR-like datasets in every supported source format."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cambackdoor.data import CLASSES, Cifar10, ImageSet


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CAMBACKDOOR_CACHE", str(tmp_path_factory.mktemp("cache")))
    torch.manual_seed(0)


def synthetic_images(n: int, seed: int = 0, size: int = 32, noise_std: float = 25.0) -> tuple[np.ndarray, np.ndarray]:
    """Learnable images: each class has its own mean colour, plus noise. Returns (N,H,W,3) uint8, labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    palette = np.random.default_rng(1234).integers(30, 225, size=(10, 3))  # shared by every split
    noise = rng.normal(0, noise_std, size=(n, size, size, 3))
    images = np.clip(palette[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return images, labels


def write_image_folder(root: Path, n_train: int = 40, n_test: int = 20, classes=CLASSES, size: int = 32) -> Path:
    from PIL import Image

    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        images, labels = synthetic_images(n, seed, size)
        for i, (img, lab) in enumerate(zip(images, labels)):
            d = root / split / classes[lab % len(classes)]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:04d}.png")  # PNG: lossless, so pixels can be compared exactly
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "cifar")


@pytest.fixture
def image_zip(image_folder, tmp_path) -> Path:
    path = tmp_path / "cifar.zip"
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(image_folder.rglob("*.png")):
            z.write(f, f.relative_to(image_folder))
    return path


@pytest.fixture
def pickle_dir(tmp_path) -> Path:
    """CIFAR-10 python batches (the torchvision download format), tiny."""
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        images, labels = synthetic_images(10, seed=10 + i)
        data = images.transpose(0, 3, 1, 2).reshape(10, -1)
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels.tolist(), b"batch_label": b"x"}, f, protocol=2)
    return root


def make_dataset(n_train: int = 400, n_test: int = 200, seed: int = 0, noise_std: float = 25.0) -> Cifar10:
    tr, ltr = synthetic_images(n_train, seed, noise_std=noise_std)
    te, lte = synthetic_images(n_test, seed + 1, noise_std=noise_std)
    to_set = lambda x, y: ImageSet(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y).long())  # noqa: E731
    return Cifar10(to_set(tr, ltr), to_set(te, lte), list(CLASSES), f"synthetic-{seed}", "synthetic")


@pytest.fixture
def tiny_data() -> Cifar10:
    return make_dataset()


@pytest.fixture(scope="module")
def clean_checkpoint(tmp_path_factory):
    """A tiny stage-1 model (width 8, 400 synthetic images) to implant, and its data."""
    from cambackdoor.training import TrainConfig, train

    data = make_dataset(n_train=400, n_test=100)
    run = tmp_path_factory.mktemp("stage1")
    train(TrainConfig(width=8, epochs=3, batch_size=50, lr=0.05, channels_last=False), data, run, progress=False)
    return data, run / "model.safetensors"
