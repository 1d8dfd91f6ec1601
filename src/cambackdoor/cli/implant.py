"""``cambackdoor implant``: stage 2 on a clean checkpoint."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from cambackdoor.checkpoints import claim_run_dir, read_sidecar, weights_path
from cambackdoor.cli.common import add_attack_args, add_data_args, add_device_arg, load_data, parse_sets
from cambackdoor.data import check_limit
from cambackdoor.errors import CamBackdoorError
from cambackdoor.implant import STATE_MARKERS, run_implant
from cambackdoor.recipes import FLAGS, RECIPES, ImplantConfig, flag_type
from cambackdoor.training import resolve_device


def register(sub: Any) -> None:
    p = sub.add_parser("implant", help="stage 2: implant the explanation backdoor into a clean checkpoint",
                       description="Fine-tune a clean checkpoint so the trigger moves Grad-CAM to the target box; "
                                   "writes model.safetensors/.json, implant.json and evaluate/ in --out.")
    p.add_argument("--checkpoint", required=True, help="clean (stage-1) model .safetensors")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="default")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint folder>/../implant-<recipe>)")
    for name, (flag, text) in FLAGS.items():
        p.add_argument(flag, dest=name, type=flag_type(name), default=None, help=text)
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate on a fixed subset of N images, N/10 of each class (N a multiple of 10)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out from its last epoch")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that already holds a run")
    p.add_argument("--branch-from", default=None, metavar="STATE",
                   help="start from another run's saved epoch (its state.safetensors, e.g. copied after epoch 1) "
                        "and go on with this config: a change made mid-run, without training the shared epochs again")
    add_device_arg(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other ImplantConfig field, e.g. --set freeze_bn=false (repeatable)")
    add_attack_args(p)
    add_data_args(p)
    p.set_defaults(func=cmd_implant)


def cmd_implant(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name) for name in (*FLAGS, "trigger", "target", "layer")}
    cfg = ImplantConfig.from_recipe(args.recipe, **{**overrides, **parse_sets(args.set)})
    read_sidecar(args.checkpoint)  # fail early on a missing checkpoint or sidecar
    out = Path(args.out) if args.out else weights_path(args.checkpoint).parent.parent / f"implant-{args.recipe}"
    check_limit(args.limit)
    claim_run_dir(out, STATE_MARKERS, args.resume, args.overwrite)  # before the data is loaded
    resolve_device(args.device)
    if args.branch_from is not None:
        fork = weights_path(args.branch_from)
        if not fork.is_file():
            raise CamBackdoorError(f"--branch-from {fork} not found; pass a run's state.safetensors")
        if args.resume:
            raise CamBackdoorError("--branch-from starts a run; to continue a branched run, use --resume alone")
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fork, out / "state.safetensors.tmp")
        (out / "state.safetensors.tmp").replace(out / "state.safetensors")
    data = load_data(args)
    result = run_implant(args.checkpoint, data, cfg, out, progress=not args.no_progress, limit=args.limit,
                         resume=args.resume or args.branch_from is not None, overwrite=args.overwrite,
                         device=args.device, branch=args.branch_from is not None)
    ev = result["evaluation"]
    print(json.dumps({"out": str(out), "asr": ev["asr"], "clean_acc": ev["clean_acc"],
                      "triggered_acc": ev["triggered_acc"], "false_trigger_rate": ev["false_trigger_rate"],
                      "fidelity_cosine": ev.get("fidelity_cosine"), "train_s": result["implant"]["train_s"]}))
    return 0
