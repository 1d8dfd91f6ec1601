"""``cambackdoor run``, ``sweep`` and ``figures``: the researcher's workflow."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cambackdoor.cli.common import add_data_args, add_device_arg, default_data, load_data
from cambackdoor.config import load_preset
from cambackdoor.data import check_limit, fingerprint_source
from cambackdoor.pipeline import run_pipeline
from cambackdoor.recipes import RECIPES
from cambackdoor.report import make_figures
from cambackdoor.sweep import run_sweep
from cambackdoor.training import resolve_device


def cmd_run(args: argparse.Namespace) -> int:
    out = Path(args.out or f"runs/{Path(args.preset).stem}")
    load_preset(args.preset)  # fail before loading data
    check_limit(args.limit)
    device = resolve_device(args.device)
    data = load_data(args)
    log = run_pipeline(args.preset, out, data, progress=not args.no_progress, limit=args.limit,
                       train_overrides={"epochs": args.epochs, "width": args.width},
                       implant_overrides={"epochs": args.implant_epochs}, device=device)
    print(json.dumps(log, indent=1))
    print(f"report: {out / 'report.md'}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    checkpoint = Path(args.checkpoint or f"runs/{args.preset}/stage1/model.safetensors")
    extra = []
    resolve_device(args.device)
    for flag, value in (("--epochs", args.epochs), ("--limit", args.limit), ("--data", args.data),
                        ("--cache-dir", args.cache_dir), ("--holdout", args.holdout), ("--device", args.device)):
        if value is not None:
            extra += [flag, str(value)]
    if args.subset_ok:
        extra.append("--subset-ok")
    for s in args.set:
        extra += ["--set", s]
    out = Path(args.out or f"runs/{args.preset}/sweep-{args.recipe}")
    source = Path(args.data or default_data()).expanduser()  # a finished point must be on the same data
    fingerprint = fingerprint_source(source) if source.exists() else None
    path = run_sweep(args.grid, checkpoint, out, args.recipe, args.jobs, extra, progress=not args.no_progress,
                     data_fingerprint=fingerprint)
    report = make_figures(out)
    print(f"wrote {path} and {report}")
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    print(f"wrote {make_figures(args.directory)}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="the whole study in one run directory: stage 1, implant, evaluate, figures, report",
                       description="Stage 1 -> implant -> evaluate -> figures -> report.md; finished stages with the "
                                   "same config are skipped, so rerunning a killed run continues it.")
    p.add_argument("--preset", default="cpu", help="cpu | paper | fast | path/to.yaml")
    p.add_argument("--out", default=None, help="run directory (default runs/<preset>)")
    p.add_argument("--epochs", type=int, default=None, help="override stage-1 epochs")
    p.add_argument("--width", type=int, default=None, help="override the model width")
    p.add_argument("--implant-epochs", type=int, default=None, help="override implant epochs")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate on a fixed subset of N test images, N/10 of each class (N a multiple of 10)")
    add_device_arg(p)
    add_data_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sweep", help="a grid of implant runs on one stage-1 model, gathered in sweep.csv",
                       description="Every grid point is an independent run directory and a plain command line "
                                   "(commands.txt); finished points are never recomputed.")
    p.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2",
                   help="e.g. lambda=0.05,0.1,0.2,0.5,1 or poison_fraction=0.002,0.005 (repeatable: cartesian product)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="default")
    p.add_argument("--checkpoint", default=None, help="stage-1 model (default runs/<preset>/stage1/model.safetensors)")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--out", default=None, help="sweep directory (default runs/<preset>/sweep-<recipe>)")
    p.add_argument("--jobs", type=int, default=1, help="points run as parallel processes")
    p.add_argument("--epochs", type=int, default=None, help="implant epochs for every point")
    p.add_argument("--limit", type=int, default=None, help="evaluate each point on N test images, N/10 per class")
    p.add_argument("--holdout", type=int, default=None)
    add_device_arg(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fixed ImplantConfig field")
    add_data_args(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("figures", help="plots and report.md for a run or sweep directory",
                       description="Writes trade-off plots (sweeps), IoU histograms and report.md.")
    p.add_argument("directory")
    p.set_defaults(func=cmd_figures)
