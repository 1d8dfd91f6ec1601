"""``cambackdoor evaluate``: accuracy, attack success, IoU, false triggers and fidelity of a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cambackdoor.checkpoints import ensure_writable_dir, load_model, weights_path
from cambackdoor.cli.common import add_attack_args, add_data_args, add_device_arg, load_data
from cambackdoor.data import check_limit
from cambackdoor.errors import CamBackdoorError
from cambackdoor.evaluation import attack_from, evaluate, format_table, write_evaluation
from cambackdoor.training import resolve_device
from cambackdoor.triggers import Attack


def cmd_evaluate(args: argparse.Namespace) -> int:
    check_limit(args.limit)
    if args.batch_size < 1:
        raise CamBackdoorError(f"--batch-size {args.batch_size} must be a positive whole number")
    out = Path(args.out) if args.out else weights_path(args.checkpoint).parent / "evaluate"
    ensure_writable_dir(out.parent)  # before the work, not after it
    device = resolve_device(args.device)
    model, meta = load_model(args.checkpoint, map_location=device)
    trig_spec, target_spec, layer = attack_from(meta, args.trigger, args.target, args.layer)
    attack = Attack.parse(trig_spec, target_spec, layer, min_ceiling=0.0)
    trigger, target = attack.trigger, attack.target
    reference = None
    if args.reference:
        reference, _ = load_model(args.reference, map_location=device)
        reference.eval()
    data = load_data(args)
    model.eval()  # evaluation is defined in eval mode (BatchNorm running statistics)
    summary, details = evaluate(model, data.test, trigger, target, layer, reference, args.limit, args.batch_size,
                                args.method, progress=not args.no_progress)
    config = {"checkpoint": str(args.checkpoint), "checkpoint_sha256": meta.get("weights_sha256"),
              "reference": args.reference, "trigger": trig_spec, "target": target_spec, "layer": layer,
              "limit": args.limit, "method": args.method, "data_fingerprint": data.fingerprint}
    write_evaluation(out, summary, details, config, target, data.classes,
                     title=f"{Path(args.checkpoint).name}: ASR {100 * summary['asr']:.1f} %")
    print(format_table(summary))
    print(f"wrote {out / 'evaluation.json'} and {out / 'heatmaps.png'}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="measure accuracy, attack success, IoU, false triggers, fidelity",
                       description="Evaluate a checkpoint on the test set (all 10,000 images by default).")
    p.add_argument("--checkpoint", required=True, help="model .safetensors (with its .json sidecar)")
    p.add_argument("--reference", default=None, help="clean model to measure clean-map fidelity against")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate a fixed subset of N test images, N/10 of each class (N a multiple of 10)")
    add_device_arg(p)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--method", choices=["gradcam", "gradcam++", "layercam"], default="gradcam")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint folder>/evaluate)")
    add_attack_args(p)
    add_data_args(p)
    p.set_defaults(func=cmd_evaluate)
