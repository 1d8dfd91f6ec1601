"""``cambackdoor audit``: the attack under scrutiny.

Does an explanation backdoor survive what an owner routinely does (re-estimate BatchNorm statistics,
fine-tune, prune, purify inputs)? Does it fool other explainers? Can a cheap check detect it? And how
sure are the numbers? One command answers all four on the test set, with 95 % bootstrap intervals:

1. ``rows``: the model, its stage-1 reference, and the model after each defence (every defence on a
   copy, trained or estimated on training images only): accuracy, ASR, IoU, false triggers, and the
   owner's cost in clean accuracy (paired bootstrap over the same images);
2. ``explainers``: the transfer matrix, each explainer's box metrics on triggered and clean images of
   the model and of the reference (pixel methods on a stratified subset, ``pixel_limit``);
3. ``detectors``: each detector's AUROC over clean test images against their triggered copies, on the
   model and on the reference (the control);
4. a figure per model: a few clean and triggered images under every explainer.

It writes ``audit.json`` (with the exact config), ``audit.md`` and the figures into one folder, as a whole.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from cambackdoor import defences as DF
from cambackdoor import stats
from cambackdoor.checkpoints import atomic_dir, atomic_write_text
from cambackdoor.config import check_fields, check_range
from cambackdoor.data import Cifar10, ImageSet, batches, check_limit, limited
from cambackdoor.detectors import DETECTORS, detector_scores
from cambackdoor.errors import CamBackdoorError
from cambackdoor.evaluation import evaluate
from cambackdoor.explainers import DEFAULT_EXPLAINERS, Explainer, box_metrics, explain, parse_explainer
from cambackdoor.gradcam import class_activation_maps
from cambackdoor.models import prefer_channels_last
from cambackdoor.triggers import Box, PatchTrigger

DEFENCES = ("bn-reestimate", "finetune", "fine-prune", "jpeg", "blur", "shift")
BATCH, PIXEL_BATCH = 256, 96  # multiples of 8, so that channels_last is safe on the CPU (models.prefer_channels_last)


@dataclass
class AuditConfig:
    defences: str = ",".join(DEFENCES)
    explainers: str = ",".join(DEFAULT_EXPLAINERS)
    limit: int = 0  # test images for rows, CAM explainers and detectors (N/10 per class); 0 = all
    pixel_limit: int = 500  # stratified test subset for the (slow) pixel explainers; 0 = as many as limit
    bn_images: int = 10_000  # clean training images for BatchNorm re-estimation
    finetune_epochs: str = "1"  # clean fine-tuning: the epochs after which the model is measured ("1,5": both)
    finetune_lr: float = 0.01
    prune_fraction: float = 0.2  # fine-pruning: share of layer4 channels removed (least active first) ...
    prune_finetune_epochs: int = 1  # ... then fine-tuned this long
    jpeg_quality: int = 50
    blur_sigma: float = 1.0
    max_shift: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self)
        unknown = [d for d in self.defence_list if d not in DEFENCES]
        if unknown:
            raise CamBackdoorError(f"unknown defence '{unknown[0]}'; choose from {', '.join(DEFENCES)}")
        for name in self.explainer_list:
            parse_explainer(name)
        try:
            epochs = self.finetune_epoch_list
        except ValueError:
            raise ValueError(f"finetune_epochs must be comma-separated whole numbers, not {self.finetune_epochs!r}") from None
        if not epochs or min(epochs) < 1:
            raise ValueError(f"finetune_epochs must be positive, not {self.finetune_epochs!r}")
        for name in ("limit", "pixel_limit", "seed"):
            check_range(self, name, 0)
        for name in ("bn_images", "prune_finetune_epochs", "max_shift"):
            check_range(self, name, 1)
        check_range(self, "finetune_lr", 0, low_open=True)
        check_range(self, "blur_sigma", 0, low_open=True)
        check_range(self, "prune_fraction", 0, 1, high_open=True)
        check_range(self, "jpeg_quality", 1, 95)
        check_limit(self.limit or None)
        check_limit(self.pixel_limit or None)

    @property
    def defence_list(self) -> list[str]:
        return [d.strip() for d in self.defences.split(",") if d.strip()]

    @property
    def explainer_list(self) -> list[str]:
        return [e.strip() for e in self.explainers.split(",") if e.strip()]

    @property
    def finetune_epoch_list(self) -> list[int]:
        return sorted({int(e) for e in self.finetune_epochs.split(",") if e.strip()})


# ----------------------------------------------------------------------------------------------
# Rows: a model state measured with intervals


def measure(model: nn.Module, test: ImageSet, trigger: PatchTrigger, target: Box, layer: str,
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Per-image outcomes of one model state: correctness clean/triggered, success, IoU, false trigger."""
    _, details = evaluate(model, test, trigger, target, layer, progress=False, examples=0, transform=transform,
                          batch_size=BATCH)
    pi = {k: torch.tensor(v) for k, v in details["per_image"].items()}
    return {"clean_correct": (pi["pred_clean"] == pi["label"]).double(),
            "triggered_correct": (pi["pred_trig"] == pi["label"]).double(),
            "success": (pi["iou_trig"] > 0.5).double(), "iou": pi["iou_trig"].double(),
            "false_trigger": (pi["iou_clean"] > 0.5).double()}


def summarise(per: dict[str, torch.Tensor], base: dict[str, torch.Tensor] | None, seed: int) -> dict[str, Any]:
    """Means with 95 % bootstrap intervals; the triggered gap paired within the model, the cost in
    clean accuracy paired against ``base`` (the undefended model) on the same images."""
    row: dict[str, Any] = {
        "clean_acc": stats.with_ci(per["clean_correct"], seed), "triggered_acc": stats.with_ci(per["triggered_correct"], seed),
        "asr": stats.with_ci(per["success"], seed), "iou_mean": stats.with_ci(per["iou"], seed),
        "false_trigger_rate": stats.with_ci(per["false_trigger"], seed),
        "triggered_gap": stats.paired_difference(per["triggered_correct"], per["clean_correct"], seed=seed),
    }
    if base is not None:
        row["clean_cost"] = stats.paired_difference(per["clean_correct"], base["clean_correct"], seed=seed)
    return row


def defended_models(model: nn.Module, train: ImageSet, cfg: AuditConfig,
                    progress: bool) -> list[tuple[str, nn.Module, Callable | None, dict[str, Any]]]:
    """(row name, model, input transform, what was done) for every defence asked for, in order."""
    out: list[tuple[str, nn.Module, Callable | None, dict[str, Any]]] = []
    for name in cfg.defence_list:
        t0, first = time.perf_counter(), len(out)
        if name == "bn-reestimate":
            out.append((name, DF.reestimate_batchnorm(model, train, cfg.bn_images, seed=cfg.seed), None,
                        {"images": min(cfg.bn_images, len(train))}))
        elif name == "finetune":
            epochs = cfg.finetune_epoch_list
            snapshots: dict[int, nn.Module] = {}
            DF.fine_tune(model, train, epochs=max(epochs), lr=cfg.finetune_lr, seed=cfg.seed, progress=progress,
                         on_epoch=lambda e, m: snapshots.__setitem__(e, _copy(m)) if e in epochs else None)
            for e in epochs:
                out.append((f"finetune-{e}", snapshots[e], None, {"epochs": e, "lr": cfg.finetune_lr,
                                                                   "images": len(train), "optimizer": "sgd+momentum 0.9"}))
        elif name == "fine-prune":
            activity = DF.channel_activity(model, train, seed=cfg.seed)
            pruned_model, pruned = DF.prune_layer4(model, activity, cfg.prune_fraction)
            tuned = DF.fine_tune(pruned_model, train, epochs=cfg.prune_finetune_epochs, lr=cfg.finetune_lr,
                                 seed=cfg.seed, keep_zero=DF.fc_column_mask(pruned_model, pruned), progress=progress)
            out.append((name, tuned, None, {"pruned_channels": len(pruned), "of": len(activity),
                                            "finetune_epochs": cfg.prune_finetune_epochs}))
        else:
            transform = {"jpeg": lambda: DF.jpeg(cfg.jpeg_quality), "blur": lambda: DF.blur(cfg.blur_sigma),
                         "shift": lambda: DF.random_shift(cfg.max_shift, cfg.seed)}[name]()
            params = {"jpeg": {"quality": cfg.jpeg_quality}, "blur": {"sigma": cfg.blur_sigma},
                      "shift": {"max_pixels": cfg.max_shift}}[name]
            out.append((name, model, transform, params))
        for entry in out[first:]:  # the fine-tuning snapshots share one run, and its time
            entry[3]["defence_s"] = round(time.perf_counter() - t0, 1)
    return out


def _copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval()


# ----------------------------------------------------------------------------------------------
# The transfer matrix and the detectors


def explainer_table(models: dict[str, nn.Module], test: ImageSet, pixel_test: ImageSet, trigger: PatchTrigger,
                    target: Box, names: list[str], seed: int) -> list[dict[str, Any]]:
    """For each explainer and model: success rate, IoU and in-box share on triggered and clean images.
    All CAM explainers come from one forward and backward pass per batch (they share activations and
    gradients); each pixel method runs on ``pixel_test``."""
    explainers = [parse_explainer(name) for name in names]
    cams = [ex for ex in explainers if ex.kind == "cam"]
    per: dict[tuple[str, str], dict[str, list[torch.Tensor]]] = {}

    def add(ex: Explainer, model_name: str, split: str, maps: torch.Tensor, image_hw: tuple[int, int]) -> None:
        for k, v in box_metrics(ex, maps, target, image_hw).items():
            per.setdefault((ex.name, model_name), {}).setdefault(f"{split}_{k}", []).append(v.cpu())

    for model_name, model in models.items():
        device = next(model.parameters()).device
        if cams:
            layers, methods = [ex.layer or "layer4" for ex in cams], [ex.method for ex in cams]
            for x, _ in batches(test, BATCH):
                x = x.to(device)
                for split, inputs in (("triggered", trigger.apply(x)), ("clean", x)):
                    maps, _ = class_activation_maps(model, inputs, layers, methods)
                    for ex in cams:
                        add(ex, model_name, split, maps[(ex.method, ex.layer or "layer4")], tuple(x.shape[2:]))
        for ex in explainers:
            if ex.kind != "pixel":
                continue
            for x, _ in batches(pixel_test, PIXEL_BATCH):
                x = x.to(device)
                for split, inputs in (("triggered", trigger.apply(x)), ("clean", x)):
                    add(ex, model_name, split, explain(ex, model, inputs), tuple(x.shape[2:]))
    return [{"explainer": ex.name, "kind": ex.kind, "images": len(test if ex.kind == "cam" else pixel_test),
             **{m: {k: stats.with_ci(torch.cat(v), seed) for k, v in per[(ex.name, m)].items()} for m in models}}
            for ex in explainers]


def detector_table(models: dict[str, nn.Module], test: ImageSet, trigger: PatchTrigger, layer: str,
                   seed: int) -> dict[str, Any]:
    """Each detector's AUROC (clean = 0, triggered = 1) with a paired bootstrap interval, per model."""
    other = "layer3" if layer != "layer3" else "layer2"
    table: dict[str, Any] = {}
    for model_name, model in models.items():
        scores: dict[str, dict[str, list[torch.Tensor]]] = {d: {"clean": [], "triggered": []} for d in DETECTORS}
        for x, _ in batches(test, BATCH):
            x = x.to(next(model.parameters()).device)
            for split, inputs in (("clean", x), ("triggered", trigger.apply(x))):
                for d, s in detector_scores(model, inputs, layer, other).items():
                    scores[d][split].append(s.cpu())
        table[model_name] = {}
        for d in DETECTORS:
            pos, neg = torch.cat(scores[d]["triggered"]), torch.cat(scores[d]["clean"])
            lo, hi = stats.paired_auroc_ci(pos, neg, seed=seed)
            table[model_name][d] = {"auroc": stats.auroc(pos, neg), "lo": lo, "hi": hi,
                                    "mean_clean": float(neg.mean()), "mean_triggered": float(pos.mean())}
    return table


# ----------------------------------------------------------------------------------------------
# The whole battery


def check_pair(meta: dict[str, Any], ref_meta: dict[str, Any], checkpoint: str | Path, reference: str | Path) -> None:
    if meta["model"] != ref_meta["model"]:
        raise CamBackdoorError(f"reference {reference} is a {ref_meta['model']}, the checkpoint {checkpoint} a "
                               f"{meta['model']}; pass the stage-1 model the checkpoint was implanted into")


def attack_of(meta: dict[str, Any], trigger: str | None, target: str | None, layer: str | None,
              checkpoint: str | Path) -> tuple[str, str, str]:
    """The attack to audit: flags first, else the checkpoint's own; a clean model needs the flags."""
    attack = meta.get("attack") or {}
    if (trigger is None or target is None) and not attack:
        raise CamBackdoorError(f"{checkpoint} records no attack (a clean model?); pass --trigger and --target "
                               "to audit it against one")
    return trigger or attack["trigger"], target or attack["target"], layer or attack.get("layer", "layer4")


def run_audit(model: nn.Module, reference: nn.Module, data: Cifar10, trigger: PatchTrigger, target: Box,
              layer: str, cfg: AuditConfig, out: str | Path, config: dict[str, Any],
              progress: bool = True) -> dict[str, Any]:
    """The battery on ``model`` (eval mode) with ``reference`` as its stage-1 control; writes ``out``."""
    from cambackdoor.figures import explainer_grid

    timings: dict[str, float] = {}
    t = time.perf_counter()
    test = limited(data.test, cfg.limit or None)
    pixel_test = limited(test, cfg.pixel_limit or None) if cfg.pixel_limit < len(test) else test
    device = next(model.parameters()).device
    model, reference = model.eval(), reference.to(device).eval()
    # every measurement on a channels_last copy where that is safe: 1.5x faster on the CPU, same
    # weights (its convolutions round differently, ~1e-5 of a logit)
    fast = prefer_channels_last(model, device, len(test), len(pixel_test))
    view = (lambda m: copy.deepcopy(m).to(memory_format=torch.channels_last)) if fast else (lambda m: m)
    model_view, reference_view = view(model), view(reference)
    base = measure(model_view, test, trigger, target, layer)
    ref = measure(reference_view, test, trigger, target, layer)
    rows = [{"name": "model", **summarise(base, None, cfg.seed),
             "clean_drop_vs_reference": stats.paired_difference(base["clean_correct"], ref["clean_correct"],
                                                                seed=cfg.seed)},
            {"name": "reference (stage 1)", **summarise(ref, None, cfg.seed)}]
    timings["rows: model and reference"] = time.perf_counter() - t
    for name, defended, transform, params in defended_models(model, data.train, cfg, progress):
        t = time.perf_counter()
        rows.append({"name": name, "params": params, **summarise(measure(view(defended), test, trigger, target, layer,
                                                                         transform), base, cfg.seed)})
        timings[f"defence {name}"] = params["defence_s"] + time.perf_counter() - t  # preparing it + measuring
        if progress:
            print(f"audit: {name}: ASR {100 * rows[-1]['asr']['value']:.2f} %, clean "
                  f"{100 * rows[-1]['clean_acc']['value']:.2f} %", flush=True)
    models = {"model": model_view, "reference": reference_view}
    t = time.perf_counter()
    explainers = explainer_table(models, test, pixel_test, trigger, target, cfg.explainer_list, cfg.seed)
    timings["explainers"] = time.perf_counter() - t
    t = time.perf_counter()
    detectors = detector_table(models, test, trigger, layer, cfg.seed)
    timings["detectors"] = time.perf_counter() - t
    result = {"config": {**config, "audit": dataclasses.asdict(cfg)}, "images": len(test),
              "pixel_images": len(pixel_test), "channels_last": fast, "rows": rows, "explainers": explainers,
              "detectors": detectors, "timings_s": {k: round(v, 1) for k, v in timings.items()}}
    with atomic_dir(out) as tmp:
        for model_name, m in (("model", model), ("reference", reference)):  # a few images: the plain layout
            explainer_grid(m, test, trigger, target, cfg.explainer_list, tmp / f"explainers-{model_name}.png",
                           title=f"{model_name}: clean (top) and triggered (bottom) images under every explainer")
        result["timings_s"]["total"] = round(sum(timings.values()), 1)
        atomic_write_text(tmp / "audit.json", json.dumps(result, indent=1))
        atomic_write_text(tmp / "audit.md", audit_markdown(result))
    return result


# ----------------------------------------------------------------------------------------------
# Report


def _pct(ci: dict[str, float]) -> str:
    return f"{100 * ci['value']:.2f} [{100 * ci['lo']:.2f}, {100 * ci['hi']:.2f}]"


def _pt(d: dict[str, float]) -> str:
    return f"{100 * d['diff']:+.2f} [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]"


def audit_markdown(result: dict[str, Any]) -> str:
    """The audit's tables: percentages (points for differences) with 95 % bootstrap intervals."""
    cfg = result["config"]
    lines = [f"# Audit of `{cfg.get('checkpoint')}`", "",
             f"Reference `{cfg.get('reference')}`; attack `{cfg.get('trigger')}` -> `{cfg.get('target')}` at "
             f"{cfg.get('layer')}; {result['images']} test images ({result['pixel_images']} for pixel explainers). "
             "Brackets: 95 % bootstrap intervals over test images (paired for differences).", "",
             "## Defences", "",
             "| model | clean acc % | triggered acc % | ASR % | mean IoU | false triggers % | triggered − clean (pt) | "
             "owner's cost (pt) |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cost = _pt(r["clean_cost"]) if "clean_cost" in r else (
            f"vs reference: {_pt(r['clean_drop_vs_reference'])}" if "clean_drop_vs_reference" in r else "-")
        iou = r["iou_mean"]
        lines.append(f"| {r['name']} | {_pct(r['clean_acc'])} | {_pct(r['triggered_acc'])} | {_pct(r['asr'])} | "
                     f"{iou['value']:.3f} [{iou['lo']:.3f}, {iou['hi']:.3f}] | {_pct(r['false_trigger_rate'])} | "
                     f"{_pt(r['triggered_gap'])} | {cost} |")
    lines += ["", "## Explainers (transfer)", "",
              "Success: CAM test for CAMs; top-k IoU > 0.5 for pixel methods (k = the box's area). Share: mass in "
              "the box (chance for pixel maps = the box's share of the image).", "",
              "| explainer | images | model: success on triggered % | model: share on triggered | "
              "model: success on clean % | reference: success on triggered % | reference: share on triggered |",
              "|---|---|---|---|---|---|---|"]
    for r in result["explainers"]:
        m, ref = r["model"], r["reference"]
        lines.append(f"| {r['explainer']} | {r['images']} | {_pct(m['triggered_success'])} | "
                     f"{m['triggered_share']['value']:.3f} | {_pct(m['clean_success'])} | "
                     f"{_pct(ref['triggered_success'])} | {ref['triggered_share']['value']:.3f} |")
    lines += ["", "## Detectors (AUROC, clean vs triggered copies)", "",
              "| detector | model | reference (control) |", "|---|---|---|"]
    for d in result["detectors"]["model"]:
        cells = [f"{v['auroc']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"
                 for v in (result["detectors"]["model"][d], result["detectors"]["reference"][d])]
        lines.append(f"| {d} | {cells[0]} | {cells[1]} |")
    lines += ["", "## Time", "", "| part | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in result["timings_s"].items()]
    lines += ["", "![explainers on the model](explainers-model.png)", "",
              "![explainers on the reference](explainers-reference.png)", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI


def register_cli(sub: Any) -> None:
    from cambackdoor.cli import add_attack_args, add_data_args, add_device_arg

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
    p.add_argument("--pixel-limit", type=int, default=None, help="test images for pixel explainers (default 500)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other AuditConfig field, e.g. --set finetune_epochs=1,5 --set bn_images=10000")
    add_attack_args(p)
    add_device_arg(p)
    add_data_args(p)
    p.set_defaults(func=cmd_audit)


def cmd_audit(args: Any) -> int:
    from cambackdoor.checkpoints import ensure_writable_dir, load_model, read_sidecar, weights_path
    from cambackdoor.cli import load_data
    from cambackdoor.config import make_config, parse_value
    from cambackdoor.training import resolve_device
    from cambackdoor.triggers import parse_target, parse_trigger, validate_attack

    sets = {}
    for item in args.set:
        if "=" not in item:
            raise CamBackdoorError(f"--set takes KEY=VALUE, got '{item}'")
        key, value = item.split("=", 1)
        sets[key.strip()] = value if key.strip() in ("defences", "explainers", "finetune_epochs") else \
            parse_value(value, f"--set {key.strip()}")
    cfg = make_config(AuditConfig, {}, {"defences": args.defences, "explainers": args.explainers,
                                        "limit": args.limit, "pixel_limit": args.pixel_limit, **sets})
    meta, ref_meta = read_sidecar(args.checkpoint), read_sidecar(args.reference)
    check_pair(meta, ref_meta, args.checkpoint, args.reference)
    trig_spec, target_spec, layer = attack_of(meta, args.trigger, args.target, args.layer, args.checkpoint)
    trigger, target = parse_trigger(trig_spec), parse_target(target_spec)
    validate_attack(trigger, target, layer, min_ceiling=0.0)
    out = Path(args.out) if args.out else weights_path(args.checkpoint).parent / "audit"
    ensure_writable_dir(out.parent)
    device = resolve_device(args.device)
    model, _ = load_model(args.checkpoint, map_location=device)
    reference, _ = load_model(args.reference, map_location=device)
    data = load_data(args)
    config = {"checkpoint": str(args.checkpoint), "checkpoint_sha256": meta["weights_sha256"],
              "reference": str(args.reference), "reference_sha256": ref_meta["weights_sha256"], "trigger": trig_spec,
              "target": target_spec, "layer": layer, "data_fingerprint": data.fingerprint, "device": str(device)}
    t0 = time.perf_counter()
    result = run_audit(model, reference, data, trigger, target, layer, cfg, out, config, progress=not args.no_progress)
    print(audit_markdown(result).split("## Time")[0])
    print(f"wrote {out / 'audit.json'} and {out / 'audit.md'} in {time.perf_counter() - t0:.0f} s")
    return 0

