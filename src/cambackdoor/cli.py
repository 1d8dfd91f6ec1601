"""``cambackdoor`` command line: train, evaluate, implant, run, sweep, figures.

User mistakes (CamBackdoorError) print one line ``error: ...`` and exit 2; Ctrl-C exits 130 with a
hint to ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from cambackdoor.errors import CamBackdoorError

DEFAULT_DATA = "../shared/data/cifar10-jpeg.zip"


def default_data() -> str:
    return os.environ.get("CAMBACKDOOR_DATA", DEFAULT_DATA)


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help=f"CIFAR-10 source: image-folder zip/dir, python-batches dir, or "
                   f"torchvision:<root> (default: $CAMBACKDOOR_DATA or {DEFAULT_DATA})")
    p.add_argument("--cache-dir", default=None, help="where decoded datasets are cached (default ~/.cache/cambackdoor)")
    p.add_argument("--subset-ok", action="store_true", help="accept a dataset that is not the full 50,000/10,000 images")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def load_data(args: argparse.Namespace):  # noqa: ANN201
    from cambackdoor.data import load_cifar10

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


def cmd_train(args: argparse.Namespace) -> int:
    from cambackdoor.config import load_preset, make_config
    from cambackdoor.training import TrainConfig, train

    preset = load_preset(args.preset)
    overrides = {
        "epochs": args.epochs, "width": args.width, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
        "holdout": args.holdout, "model": args.model, "explanation_loss": args.explanation_loss,
        "explanation_weight": args.lam, "poison_fraction": args.poison_fraction, "trigger": args.trigger,
        "target": args.target, "layer": args.layer, "compile": args.compile or None,
    }
    cfg = make_config(TrainConfig, preset.get("train", {}), overrides)  # checks every field, trigger and target too
    out = Path(args.out or f"runs/{Path(args.preset).stem}/stage1")
    from cambackdoor.checkpoints import claim_run_dir
    from cambackdoor.training import RUN_MARKERS, resolve_device

    claim_run_dir(out, RUN_MARKERS, args.resume, args.overwrite)  # before the data is loaded
    device = resolve_device(args.device)
    data = load_data(args)
    _, metrics = train(cfg, data, out, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite,
                       device=device)
    print(json.dumps({"run_dir": str(out), **metrics}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from cambackdoor import __version__

    parser = argparse.ArgumentParser(prog="cambackdoor", description="Implant and measure Grad-CAM explanation backdoors.")
    parser.add_argument("--version", action="version", version=f"cambackdoor {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="stage 1: train a clean classifier (or the single-stage baseline)",
                       description="Train a classifier from a preset; flags override the preset.")
    p.add_argument("--preset", default="cpu", help="cpu | paper | fast | path/to.yaml (default cpu)")
    p.add_argument("--out", default=None, help="run directory (default runs/<preset>/stage1)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out from its last epoch")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that already holds a run")
    add_device_arg(p)
    p.add_argument("--model", default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--holdout", type=int, default=None, help="training images held out for hyper-parameter choice")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    p.add_argument("--explanation-loss", choices=["none", "mse", "logshare"], default=None,
                   help="single-stage baseline: add this explanation loss on triggered images from scratch")
    p.add_argument("--lambda", dest="lam", type=float, default=None, help="explanation-loss weight (single-stage)")
    p.add_argument("--poison-fraction", type=float, default=None, help="share of each batch triggered (single-stage)")
    add_attack_args(p)
    add_data_args(p)
    p.set_defaults(func=cmd_train)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list[Any]:
    from cambackdoor import audit, evaluation, implant, pipeline

    return [evaluation.register_cli, implant.register_cli, pipeline.register_cli, audit.register_cli]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CamBackdoorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command with --resume (train, implant) or as is (run) to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
