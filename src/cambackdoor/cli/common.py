"""What every command shares: data, device and attack flags, ``--set`` parsing, loading the data."""

from __future__ import annotations

import argparse
import os

from cambackdoor.config import parse_sets
from cambackdoor.data import Cifar10, load_cifar10

__all__ = ["DEFAULT_DATA", "default_data", "add_data_args", "load_data", "add_device_arg", "add_attack_args", "parse_sets"]
DEFAULT_DATA = "../shared/data/cifar10-jpeg.zip"


def default_data() -> str:
    return os.environ.get("CAMBACKDOOR_DATA", DEFAULT_DATA)


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help=f"CIFAR-10 source: image-folder zip/dir, python-batches dir, or "
                   f"torchvision:<root> (default: $CAMBACKDOOR_DATA or {DEFAULT_DATA})")
    p.add_argument("--cache-dir", default=None, help="where decoded datasets are cached (default ~/.cache/cambackdoor)")
    p.add_argument("--subset-ok", action="store_true", help="accept a dataset that is not the full 50,000/10,000 images")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def load_data(args: argparse.Namespace) -> Cifar10:
    return load_cifar10(args.data or default_data(), args.cache_dir,
                        expect_counts=None if args.subset_ok else (50_000, 10_000), progress=not args.no_progress)


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU) | cpu | cuda; models and data "
                   "both go there")


def add_attack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trigger", default=None, help="trigger spec, e.g. 'yellow:4@bottom-right', "
                   "'checkerboard:3@top-right', 'red:4@26,26' (colour:size@corner|row,col[~blend])")
    p.add_argument("--target", default=None, help="target box, e.g. 'top-left:8' or '0,0,8,8' (top,left,height,width)")
    p.add_argument("--layer", default=None, help="layer whose Grad-CAM is attacked/measured (default layer4)")
