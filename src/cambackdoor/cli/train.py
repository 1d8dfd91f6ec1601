"""``cambackdoor train``: stage 1 (or the single-stage baseline) from a preset."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cambackdoor.checkpoints import claim_run_dir
from cambackdoor.cli.common import add_attack_args, add_data_args, add_device_arg, load_data
from cambackdoor.config import load_preset, make_config
from cambackdoor.training import RUN_MARKERS, TrainConfig, resolve_device, train


def cmd_train(args: argparse.Namespace) -> int:
    preset = load_preset(args.preset)
    overrides = {
        "epochs": args.epochs, "width": args.width, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
        "holdout": args.holdout, "model": args.model, "explanation_loss": args.explanation_loss,
        "explanation_weight": args.lam, "poison_fraction": args.poison_fraction, "trigger": args.trigger,
        "target": args.target, "layer": args.layer, "compile": args.compile or None,
    }
    cfg = make_config(TrainConfig, preset.get("train", {}), overrides)  # checks every field, trigger and target too
    out = Path(args.out or f"runs/{Path(args.preset).stem}/stage1")
    claim_run_dir(out, RUN_MARKERS, args.resume, args.overwrite)  # before the data is loaded
    device = resolve_device(args.device)
    data = load_data(args)
    _, metrics = train(cfg, data, out, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite,
                       device=device)
    print(json.dumps({"run_dir": str(out), **metrics}))
    return 0


def register(sub: Any) -> None:
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
