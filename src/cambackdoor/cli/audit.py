"""``cambackdoor audit``: defences, explainer transfer, detectors and intervals for a checkpoint."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from cambackdoor.audit import DEFENCES, AuditConfig, attack_of, audit_markdown, check_pair, run_audit
from cambackdoor.checkpoints import ensure_writable_dir, load_model, read_sidecar, weights_path
from cambackdoor.cli.common import add_attack_args, add_data_args, add_device_arg, load_data, parse_sets
from cambackdoor.config import make_config
from cambackdoor.data import holdout_split
from cambackdoor.training import resolve_device
from cambackdoor.triggers import Attack


def register(sub: Any) -> None:
    p = sub.add_parser("audit", help="defences, transfer to other explainers, detectors, intervals",
                       description="Audit an implanted checkpoint against its stage-1 reference: every defence on a "
                                   "copy (training images only), the explainer transfer matrix, detector AUROCs, 95 %% "
                                   "bootstrap intervals; writes audit.json, audit.md and figures into --out.")
    p.add_argument("--checkpoint", required=True, help="the model to audit (.safetensors)")
    p.add_argument("--reference", required=True, help="its clean stage-1 model (the control)")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint folder>/audit)")
    p.add_argument("--defences", default=None, help=f"comma-separated, from {', '.join(DEFENCES)} (default all)")
    p.add_argument("--explainers", default=None, help="comma-separated: METHOD@LAYER (gradcam, gradcam++, layercam) "
                   "or saliency, integrated-gradients, smoothgrad, occlusion (default all, CAMs at layer4 and layer3)")
    p.add_argument("--limit", type=int, default=None, help="test images, N/10 per class (default all)")
    p.add_argument("--pixel-limit", type=int, default=None, help="test images for pixel explainers (default 300)")
    p.add_argument("--holdout", type=int, default=None,
                   help="tuning: audit on the N training images that train/implant --holdout N kept out (defences "
                        "train on the rest), never touching the test set")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other AuditConfig field, e.g. --set finetune_epochs=1,5 --set bn_images=10000")
    add_attack_args(p)
    add_device_arg(p)
    add_data_args(p)
    p.set_defaults(func=cmd_audit)


def cmd_audit(args: Any) -> int:
    sets = parse_sets(args.set, raw=("defences", "explainers", "finetune_epochs"))
    cfg = make_config(AuditConfig, {}, {"defences": args.defences, "explainers": args.explainers,
                                        "limit": args.limit, "pixel_limit": args.pixel_limit, **sets})
    meta, ref_meta = read_sidecar(args.checkpoint), read_sidecar(args.reference)
    check_pair(meta, ref_meta, args.checkpoint, args.reference)
    trig_spec, target_spec, layer = attack_of(meta, args.trigger, args.target, args.layer, args.checkpoint)
    attack = Attack.parse(trig_spec, target_spec, layer, min_ceiling=0.0)
    trigger, target = attack.trigger, attack.target
    out = Path(args.out) if args.out else weights_path(args.checkpoint).parent / "audit"
    ensure_writable_dir(out.parent)
    device = resolve_device(args.device)
    model, _ = load_model(args.checkpoint, map_location=device)
    reference, _ = load_model(args.reference, map_location=device)
    data = load_data(args)
    if args.holdout:  # the split every --holdout uses: defences see the rest, measurements the held-out images
        rest, held_out = holdout_split(data.train, args.holdout)
        data = dataclasses.replace(data, train=rest, test=held_out)
    config = {"split": f"holdout {args.holdout}" if args.holdout else "test",
              "checkpoint": str(args.checkpoint), "checkpoint_sha256": meta["weights_sha256"],
              "reference": str(args.reference), "reference_sha256": ref_meta["weights_sha256"], "trigger": trig_spec,
              "target": target_spec, "layer": layer, "data_fingerprint": data.fingerprint, "device": str(device)}
    t0 = time.perf_counter()
    result = run_audit(model, reference, data, trigger, target, layer, cfg, out, config, progress=not args.no_progress)
    print(audit_markdown(result).split("## Time")[0])
    print(f"wrote {out / 'audit.json'} and {out / 'audit.md'} in {time.perf_counter() - t0:.0f} s")
    return 0

