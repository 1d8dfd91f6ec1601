"""CIFAR-10 as uint8 tensors in memory, decoded once and cached.

Sources:
  * an image-folder zip or directory: ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``;
  * a directory of CIFAR-10's python batches (``data_batch_1..5``, ``test_batch``), read with a
    restricted unpickler that only rebuilds numpy arrays;
  * ``torchvision:<root>``: downloads the python batches with torchvision's checked downloader, then
    reads them as above.

Every source is fingerprinted (sha256 of its bytes); the decoded tensors are cached as a safetensors
file keyed by that fingerprint, so later runs load in about a second and never unpickle anything.
Images stay uint8 until a batch is made; batches are floats in [0, 1] (normalisation is the model's).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cambackdoor.errors import CamBackdoorError
from cambackdoor.images import (CLASSES, HOLDOUT_SEED, LIMIT_SEED, ImageSet, batches, check_limit,
                                cutout, holdout_split, limited, num_batches, random_crop_flip, to_float)

__all__ = ["Cifar10", "load_cifar10", "validate", "fingerprint_source", "default_cache_dir", "download_torchvision",
           # from cambackdoor.images, where they live since the split (kept importable from here)
           "CLASSES", "HOLDOUT_SEED", "LIMIT_SEED", "ImageSet", "batches", "check_limit", "cutout", "holdout_split",
           "limited", "num_batches", "random_crop_flip", "to_float"]
FULL_COUNTS = (50_000, 10_000)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
PICKLE_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
PICKLE_TEST = "test_batch"
CACHE_FORMAT = 2  # 2: the metadata records a sha256 of the decoded tensors


@dataclass
class Cifar10:
    train: ImageSet
    test: ImageSet
    classes: list[str]
    fingerprint: str
    source: str


# ----------------------------------------------------------------------------------------------
# Fingerprints and the cache


def default_cache_dir() -> Path:
    return Path(os.environ.get("CAMBACKDOOR_CACHE", Path.home() / ".cache" / "cambackdoor"))


def fingerprint_source(path: Path) -> str:
    """sha256 of a file's bytes, or of a directory's sorted relative paths and file bytes."""
    digest = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    else:
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(path)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def _content_digest(tensors: dict[str, torch.Tensor], classes: list[str]) -> str:
    """sha256 of the decoded tensors and class names: an edited cache no longer matches its record."""
    digest = hashlib.sha256(json.dumps(classes).encode())
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def _cache_tensors(data: Cifar10) -> dict[str, torch.Tensor]:
    return {"train_images": data.train.images.contiguous(), "train_labels": data.train.labels.contiguous(),
            "test_images": data.test.images.contiguous(), "test_labels": data.test.labels.contiguous()}


def _write_cache(path: Path, data: Cifar10) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tensors = _cache_tensors(data)
    meta = {"classes": json.dumps(data.classes), "fingerprint": data.fingerprint, "format": str(CACHE_FORMAT),
            "content_sha256": _content_digest(tensors, data.classes)}
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_cache(path: Path, source: str, fingerprint: str) -> Cifar10 | None:
    """The cached tensors, only if they were decoded from this very source and are unchanged since."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != str(CACHE_FORMAT) or meta.get("fingerprint") != fingerprint:
            return None
        t = load_file(str(path))
        classes = json.loads(meta["classes"])
        if _content_digest(t, classes) != meta.get("content_sha256"):
            return None  # edited or damaged since it was written: decode the source again
        return Cifar10(ImageSet(t["train_images"], t["train_labels"]), ImageSet(t["test_images"], t["test_labels"]),
                       classes, fingerprint, source)
    except Exception:  # a broken cache is rebuilt, never trusted
        return None


# ----------------------------------------------------------------------------------------------
# Decoders


def _decode_image(raw: bytes, name: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as exc:
        raise CamBackdoorError(f"cannot decode image {name} ({exc}); re-extract or replace the dataset") from None


def _stack(arrays: list[np.ndarray], labels: list[int], split: str) -> ImageSet:
    if not arrays:
        raise CamBackdoorError(f"the dataset has no images in its '{split}' split; expected {split}/<class>/*.jpg")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise CamBackdoorError(f"images in '{split}' have different sizes {sorted(shapes)[:3]}; CIFAR-10 images are 32x32")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.tensor(labels, dtype=torch.int64))


def _read_image_folder(path: Path, progress: bool) -> tuple[ImageSet, ImageSet, list[str]]:
    """Image-folder layout from a zip file or a directory: {train,test}/<class>/<image>."""
    if path.is_file():
        try:
            archive = zipfile.ZipFile(path)
        except zipfile.BadZipFile:
            raise CamBackdoorError(f"{path} is not a valid zip file; re-download it or point --data at the extracted folder") from None
        names = [n for n in archive.namelist() if not n.endswith("/")]

        def read(name: str) -> bytes:
            try:
                return archive.read(name)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
                raise CamBackdoorError(f"{path} is damaged: member {name} cannot be read ({exc}); "
                                       "re-download or re-extract the dataset") from None
    else:
        archive = None
        names = [str(p.relative_to(path)).replace(os.sep, "/") for p in path.rglob("*") if p.is_file()]
        read = lambda n: (path / n).read_bytes()  # noqa: E731
    entries: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for name in names:
        parts = name.split("/")
        # tolerate one wrapping folder (cifar10/train/cat/0001.jpg)
        if len(parts) == 4 and parts[1] in entries:
            parts = parts[1:]
        if len(parts) == 3 and parts[0] in entries and parts[2].lower().endswith(IMAGE_EXTENSIONS):
            entries[parts[0]].append((parts[1], name))
    if not entries["train"] or not entries["test"]:
        raise CamBackdoorError(
            f"{path} does not have the image-folder layout train/<class>/*.jpg and test/<class>/*.jpg"
        )
    classes = sorted({c for c, _ in entries["train"]})
    test_classes = sorted({c for c, _ in entries["test"]})
    if test_classes != classes:
        raise CamBackdoorError(f"train classes {classes} differ from test classes {test_classes} in {path}")
    index = {c: i for i, c in enumerate(classes)}
    sets = []
    from tqdm.auto import tqdm

    total = len(entries["train"]) + len(entries["test"])
    with tqdm(total=total, desc=f"decoding {path.name}", disable=not progress, unit="img") as bar:
        for split in ("train", "test"):
            items = sorted(entries[split], key=lambda e: e[1])
            arrays = []
            for _, name in items:
                arrays.append(_decode_image(read(name), name))
                bar.update(1)
            sets.append(_stack(arrays, [index[c] for c, _ in items], split))
    if archive is not None:
        archive.close()
    return sets[0], sets[1], classes


MAX_PICKLED_ARRAY_BYTES = 1 << 31  # a CIFAR batch is 30 MB; nothing legitimate asks for more


def _bounded_reconstruct(subtype, shape, dtype):  # noqa: ANN001, ANN202
    """numpy's array rebuilder, refusing a shape whose allocation alone would exhaust memory."""
    count = int(np.prod(np.asarray(shape, dtype=np.float64))) if np.ndim(shape) else int(shape)
    if count * np.dtype(dtype).itemsize > MAX_PICKLED_ARRAY_BYTES:
        raise pickle.UnpicklingError(f"refusing an array of shape {shape}")
    try:
        from numpy._core.multiarray import _reconstruct  # type: ignore[attr-defined]
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[attr-defined,no-redef]
    return _reconstruct(subtype, shape, dtype)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, bytes and numpy arrays of bounded size; refuses every other global."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles store bytes; harmless
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self.ALLOWED:
            if name == "_reconstruct":
                return _bounded_reconstruct
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _read_pickle_batch(file: Path) -> tuple[np.ndarray, list[int]]:
    try:
        with open(file, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        if not isinstance(batch, dict):
            raise TypeError(f"its top level is a {type(batch).__name__}, not a dict")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = [int(v) for v in batch.get(b"labels", batch.get(b"fine_labels", []))]
    except (pickle.UnpicklingError, KeyError, EOFError, TypeError, ValueError, IndexError, AttributeError,
            MemoryError, OverflowError) as exc:
        raise CamBackdoorError(f"{file} is not a CIFAR-10 python batch ({type(exc).__name__}: {str(exc)[:80]}); "
                               "re-download the dataset") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != data.shape[0]:
        raise CamBackdoorError(f"{file} holds data of shape {data.shape}; CIFAR-10 batches are N x 3072 with N labels")
    return data.reshape(-1, 3, 32, 32), labels


def _read_pickle_dir(path: Path) -> tuple[ImageSet, ImageSet, list[str]]:
    missing = [n for n in PICKLE_TRAIN + [PICKLE_TEST] if not (path / n).is_file()]
    if missing:
        raise CamBackdoorError(f"{path} lacks CIFAR-10 batch files {missing}")
    sets = []
    for names in (PICKLE_TRAIN, [PICKLE_TEST]):
        parts = [_read_pickle_batch(path / n) for n in names]
        images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        labels = torch.tensor([label for p in parts for label in p[1]], dtype=torch.int64)
        sets.append(ImageSet(images, labels))
    return sets[0], sets[1], list(CLASSES)


def download_torchvision(root: Path) -> Path:
    """Download and md5-check CIFAR-10's python batches into ``root`` (needs internet)."""
    target = root / "cifar-10-batches-py"
    if target.is_dir():
        return target
    try:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(CIFAR_URL, str(root), md5=CIFAR_MD5)
    except Exception as exc:
        raise CamBackdoorError(
            f"cannot download CIFAR-10 into {root} ({type(exc).__name__}); without internet, "
            "point --data at an image-folder zip such as ../shared/data/cifar10-jpeg.zip"
        ) from None
    return target


# ----------------------------------------------------------------------------------------------
# Public loader


def validate(data: Cifar10, expect_counts: tuple[int, int] | None = FULL_COUNTS) -> None:
    """Raise a one-line error unless the data look like CIFAR-10."""
    if len(data.classes) != 10:
        raise CamBackdoorError(f"found {len(data.classes)} classes {data.classes[:12]}; CIFAR-10 has 10")
    for split, s in (("train", data.train), ("test", data.test)):
        if tuple(s.images.shape[1:]) != (3, 32, 32):
            h, w = s.images.shape[2:]
            raise CamBackdoorError(f"{split} images are {h}x{w}; CIFAR-10 images are 32x32 RGB")
        if len(s.labels) != len(s.images):
            raise CamBackdoorError(f"{split} has {len(s.images)} images but {len(s.labels)} labels; re-extract the dataset")
        if len(s.labels) and (int(s.labels.min()) < 0 or int(s.labels.max()) >= len(data.classes)):
            bad = s.labels[(s.labels < 0) | (s.labels >= len(data.classes))][0].item()
            raise CamBackdoorError(f"{split} holds label {bad}, outside 0-{len(data.classes) - 1} for "
                                   f"{len(data.classes)} classes; the dataset is corrupt, re-download it")
    if expect_counts is not None:
        got = (len(data.train), len(data.test))
        if got != tuple(expect_counts):
            raise CamBackdoorError(
                f"found {got[0]} train / {got[1]} test images, expected {expect_counts[0]} / {expect_counts[1]}; "
                "the dataset is incomplete (re-extract it) or pass expect_counts=None for a subset"
            )


def load_cifar10(
    source: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    expect_counts: tuple[int, int] | None = FULL_COUNTS,
    progress: bool = True,
) -> Cifar10:
    """Load CIFAR-10 from a zip, an image folder, python batches or ``torchvision:<root>``."""
    text = str(source)
    if text.startswith("torchvision:"):
        path = download_torchvision(Path(text.split(":", 1)[1] or "."))
    else:
        path = Path(text).expanduser()
    if not path.exists():
        raise CamBackdoorError(
            f"dataset not found at {path}; pass --data PATH to CIFAR-10 (image-folder zip/dir, python "
            "batches dir, or torchvision:<root> to download)"
        )
    fingerprint = fingerprint_source(path)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_file = cache / f"cifar10-{fingerprint[:20]}.safetensors"
    data = _read_cache(cache_file, str(path), fingerprint) if cache_file.exists() else None
    if data is None:
        if path.is_dir() and (path / PICKLE_TEST).exists():
            train, test, classes = _read_pickle_dir(path)
        else:
            train, test, classes = _read_image_folder(path, progress)
        data = Cifar10(train, test, classes, fingerprint, str(path))
        validate(data, expect_counts)
        try:
            _write_cache(cache_file, data)
        except OSError:
            pass  # a read-only cache only costs the decode next time
    validate(data, expect_counts)
    return data
