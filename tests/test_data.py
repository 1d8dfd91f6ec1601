import pickle

import numpy as np
import pytest
import torch

from cambackdoor import data as D
from cambackdoor.errors import CamBackdoorError
from conftest import synthetic_images, write_image_folder


def test_image_folder_loads_pixels_labels_and_alphabetical_classes(image_folder):
    d = D.load_cifar10(image_folder, expect_counts=(40, 20), progress=False)
    assert d.classes == D.CLASSES
    assert d.train.images.shape == (40, 3, 32, 32) and d.train.images.dtype == torch.uint8
    assert d.test.images.shape == (20, 3, 32, 32)
    # entries are sorted by path: class folder first, then file name
    images, labels = synthetic_images(40, seed=1)
    order = sorted(range(40), key=lambda i: (D.CLASSES[labels[i]], i))
    assert torch.equal(d.train.labels, torch.tensor(labels[order]))
    assert torch.equal(d.train.images, torch.from_numpy(images[order]).permute(0, 3, 1, 2))


def test_zip_and_folder_give_the_same_tensors(image_folder, image_zip):
    a = D.load_cifar10(image_folder, expect_counts=None, progress=False)
    b = D.load_cifar10(image_zip, expect_counts=None, progress=False)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert a.fingerprint != b.fingerprint  # fingerprints are of the source bytes


def test_pickle_batches_load_with_restricted_unpickler(pickle_dir):
    d = D.load_cifar10(pickle_dir, expect_counts=(50, 10), progress=False)
    images, labels = synthetic_images(10, seed=10)
    assert torch.equal(d.train.images[:10], torch.from_numpy(images).permute(0, 3, 1, 2))
    assert d.train.labels[:10].tolist() == labels.tolist()
    assert d.classes == D.CLASSES


def test_pickle_with_foreign_global_is_refused(pickle_dir):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(pickle_dir / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(CamBackdoorError, match="not a CIFAR-10 python batch"):
        D.load_cifar10(pickle_dir, expect_counts=None, progress=False)


def test_cache_is_reused_without_decoding(image_zip, monkeypatch, tmp_path):
    first = D.load_cifar10(image_zip, cache_dir=tmp_path / "c", expect_counts=None, progress=False)
    assert len(list((tmp_path / "c").glob("cifar10-*.safetensors"))) == 1

    def no_decode(*a, **k):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(D, "_read_image_folder", no_decode)
    second = D.load_cifar10(image_zip, cache_dir=tmp_path / "c", expect_counts=None, progress=False)
    assert torch.equal(first.train.images, second.train.images)
    assert second.fingerprint == first.fingerprint


def test_changed_source_changes_fingerprint_and_cache(image_folder, tmp_path):
    a = D.load_cifar10(image_folder, cache_dir=tmp_path / "c", expect_counts=None, progress=False)
    (image_folder / "train" / "cat" / "0003.png").unlink()
    b = D.load_cifar10(image_folder, cache_dir=tmp_path / "c", expect_counts=None, progress=False)
    assert a.fingerprint != b.fingerprint and len(b.train) == len(a.train) - 1


def test_counts_are_checked(image_folder):
    with pytest.raises(CamBackdoorError, match="found 40 train / 20 test images, expected 50000 / 10000"):
        D.load_cifar10(image_folder, progress=False)


def test_wrong_class_count_is_reported(tmp_path):
    root = write_image_folder(tmp_path / "nine", classes=D.CLASSES[:9])
    with pytest.raises(CamBackdoorError, match="found 9 classes"):
        D.load_cifar10(root, expect_counts=None, progress=False)


def test_wrong_image_size_is_reported(tmp_path):
    root = write_image_folder(tmp_path / "small", size=28)
    with pytest.raises(CamBackdoorError, match="28x28; CIFAR-10 images are 32x32"):
        D.load_cifar10(root, expect_counts=None, progress=False)


def test_missing_and_malformed_sources(tmp_path):
    with pytest.raises(CamBackdoorError, match="dataset not found"):
        D.load_cifar10(tmp_path / "nope.zip", progress=False)
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CamBackdoorError, match="not a valid zip"):
        D.load_cifar10(bad, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CamBackdoorError, match="image-folder layout"):
        D.load_cifar10(tmp_path / "empty", progress=False)


def test_torchvision_source_downloads_then_reads_batches(pickle_dir, tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    calls = []

    def fake_download(url, root, md5=None):
        calls.append((url, md5))
        import shutil

        shutil.copytree(pickle_dir, tmp_path / "tv" / "cifar-10-batches-py")

    monkeypatch.setattr(tvu, "download_and_extract_archive", fake_download)
    d = D.load_cifar10(f"torchvision:{tmp_path / 'tv'}", expect_counts=(50, 10), progress=False)
    assert calls == [(D.CIFAR_URL, D.CIFAR_MD5)] and len(d.test) == 10


def test_offline_download_fails_with_a_hint(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    with pytest.raises(CamBackdoorError, match="cannot download CIFAR-10.*image-folder zip"):
        D.load_cifar10(f"torchvision:{tmp_path}", progress=False)


def test_random_crop_flip_is_a_padded_shift_or_its_mirror():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8)  # no zeros, so padding is visible
    y = D.random_crop_flip(x, g, pad=2)
    assert y.shape == x.shape and y.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips = 0
    for i in range(64):
        windows = [(padded[i, :, a : a + 8, b : b + 8], f) for a in range(5) for b in range(5) for f in (0, 1)]
        hits = [f for w, f in windows if torch.equal(y[i], w.flip(-1) if f else w)]
        assert hits, f"image {i} is not a crop of the padded image"
        flips += hits[0]
    assert 10 < flips < 54  # both orientations occur


def test_cutout_greys_one_clipped_square_per_image():
    g = torch.Generator().manual_seed(0)
    x = torch.full((200, 3, 8, 8), 7, dtype=torch.uint8)
    y = D.cutout(x, 4, g, fill=128)
    grey = (y == 128).all(1)  # [n, h, w]: every channel greyed together
    assert torch.equal((y == 128).any(1), grey) and torch.equal(x, torch.full_like(x, 7))  # input untouched
    for mask in grey:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        # one axis-aligned rectangle, at most 4x4, clipped only where it meets the edge
        assert mask.sum() == len(rows) * len(cols) and 1 <= len(rows) <= 4 and 1 <= len(cols) <= 4
        assert len(rows) == 4 or rows[0] == 0 or rows[-1] == 7
        assert len(cols) == 4 or cols[0] == 0 or cols[-1] == 7
    assert (grey.sum((1, 2)) == 16).float().mean() > 0.3  # most squares lie fully inside an 8x8 image


def test_batches_are_floats_in_unit_range_and_cover_everything(tiny_data):
    seen = []
    for x, y in D.batches(tiny_data.train, 64, shuffle=True, augment=True):
        assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        seen.append(y)
    assert sorted(torch.cat(seen).tolist()) == sorted(tiny_data.train.labels.tolist())
    assert len(list(D.batches(tiny_data.train, 64, drop_last=True))) == 400 // 64


def test_holdout_split_is_disjoint_and_fixed(tiny_data):
    a, h = D.holdout_split(tiny_data.train, 50, seed=3)
    a2, h2 = D.holdout_split(tiny_data.train, 50, seed=3)
    assert len(h) == 50 and len(a) == 350 and torch.equal(h.images, h2.images)
    all_rows = {tuple(r.flatten()[:16].tolist()) for r in torch.cat([a.images, h.images])}
    assert len(all_rows) == len({tuple(r.flatten()[:16].tolist()) for r in tiny_data.train.images})


def test_validate_accepts_full_sized_counts():
    big = D.Cifar10(D.ImageSet(torch.zeros(50_000, 3, 32, 32, dtype=torch.uint8), torch.zeros(50_000, dtype=torch.long)),
                    D.ImageSet(torch.zeros(10_000, 3, 32, 32, dtype=torch.uint8), torch.zeros(10_000, dtype=torch.long)),
                    list(D.CLASSES), "x", "x")
    D.validate(big)  # does not raise
    assert np.prod(big.train.images.shape) == 50_000 * 3072


def test_limit_is_a_seeded_subset_with_the_same_count_per_class(tiny_data):
    sorted_by_class = D.ImageSet(tiny_data.test.images[tiny_data.test.labels.argsort()],
                                 tiny_data.test.labels.sort().values)  # like the real test set
    sub = D.limited(sorted_by_class, 50)
    assert len(sub) == 50 and torch.bincount(sub.labels, minlength=10).tolist() == [5] * 10
    again = D.limited(sorted_by_class, 50)
    assert torch.equal(sub.images, again.images)  # the same images every time
    assert D.limited(sorted_by_class, None) is sorted_by_class and len(D.limited(sorted_by_class, 10_000)) == 200


@pytest.mark.parametrize("limit,match", [(0, "positive"), (-5, "positive"), (25, "use 20 or 30"), (5, "use 10 or 20")])
def test_bad_limits_are_refused(tiny_data, limit, match):
    with pytest.raises(CamBackdoorError, match=match):
        D.limited(tiny_data.test, limit)


@pytest.mark.parametrize("label", [42, -3])
def test_labels_out_of_range_are_refused(pickle_dir, label):
    images, labels = synthetic_images(10, seed=15)
    labels[3] = label
    with open(pickle_dir / "test_batch", "wb") as f:
        pickle.dump({b"data": images.transpose(0, 3, 1, 2).reshape(10, -1), b"labels": labels.tolist()}, f, protocol=2)
    with pytest.raises(CamBackdoorError, match=f"holds label {label}, outside 0-9"):
        D.load_cifar10(pickle_dir, expect_counts=None, progress=False)


def test_pickle_whose_top_level_is_an_array_is_refused(pickle_dir):
    with open(pickle_dir / "test_batch", "wb") as f:
        pickle.dump(np.zeros(3), f, protocol=2)
    with pytest.raises(CamBackdoorError, match="not a CIFAR-10 python batch.*top level is a ndarray"):
        D.load_cifar10(pickle_dir, expect_counts=None, progress=False)


def test_pickle_asking_for_a_huge_array_is_refused_without_allocating(pickle_dir):
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:
        from numpy.core.multiarray import _reconstruct

    class Huge:
        def __reduce__(self):
            return (_reconstruct, (np.ndarray, (2**50,), b"b"))  # 1 PiB

    with open(pickle_dir / "test_batch", "wb") as f:
        pickle.dump({b"data": Huge(), b"labels": []}, f, protocol=2)
    with pytest.raises(CamBackdoorError, match="refusing an array of shape"):
        D.load_cifar10(pickle_dir, expect_counts=None, progress=False)


def test_corrupt_zip_member_is_a_one_line_error(image_zip):
    import zipfile

    with zipfile.ZipFile(image_zip) as z:
        info = z.infolist()[5]
    raw = bytearray(image_zip.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + 40] ^= 0xFF  # a stored member's data: its CRC no longer matches
    image_zip.write_bytes(bytes(raw))
    with pytest.raises(CamBackdoorError, match=f"damaged: member {info.filename}"):
        D.load_cifar10(image_zip, expect_counts=None, progress=False)


def test_edited_cache_is_not_trusted(image_zip, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    first = D.load_cifar10(image_zip, cache_dir=tmp_path / "c", expect_counts=None, progress=False)
    (cache,) = (tmp_path / "c").glob("cifar10-*.safetensors")
    with safe_open(str(cache), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(cache))
    tensors["train_images"][0] = 0  # someone edits the cached pixels, metadata untouched
    save_file(tensors, str(cache), metadata=meta)
    second = D.load_cifar10(image_zip, cache_dir=tmp_path / "c", expect_counts=None, progress=False)
    assert torch.equal(second.train.images, first.train.images)  # decoded again from the source


@pytest.mark.parametrize("holdout", [400, 100_000, -5])
def test_holdout_must_leave_training_images(tiny_data, holdout):
    with pytest.raises(CamBackdoorError, match="--holdout"):
        D.holdout_split(tiny_data.train, holdout)
