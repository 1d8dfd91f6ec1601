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

It writes ``audit.json`` (with the exact config), ``audit.md``, the figures and ``outcomes.safetensors``
(each row's per-image outcomes, ``ROW/METRIC``, for intervals pooled over seeds: :func:`stats.pooled`)
into one folder, as a whole.
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
from safetensors.torch import save_file
from torch import nn

from cambackdoor import defences as DF
from cambackdoor import stats
from cambackdoor.audit_tables import audit_markdown
from cambackdoor.checkpoints import atomic_dir, atomic_write_text
from cambackdoor.config import check_fields, check_range
from cambackdoor.data import Cifar10, ImageSet, batches, check_limit, limited
from cambackdoor.detectors import DETECTORS, detector_scores
from cambackdoor.errors import CamBackdoorError
from cambackdoor.evaluation import evaluate
from cambackdoor.figures import explainer_grid
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
    pixel_limit: int = 300  # stratified test subset for the (slow) pixel explainers; 0 = as many as limit
    bn_images: int = 10_000  # clean training images for BatchNorm re-estimation ...
    bn_augment: bool = False  # ... with training's random crop and flip: the plain images' statistics cost a clean
    # model accuracy (width-16 stage 1: 85.26 -> 83.54 % held-out; augmented: 85.26 %), an owner would notice
    finetune_epochs: str = "1"  # clean fine-tuning: the epochs after which the model is measured ("1,5": both)
    finetune_lr: float = 0.01
    prune_fraction: float = 0.2  # fine-pruning: share of layer4 channels removed (least active first) ...
    prune_finetune_epochs: int = 1  # ... then fine-tuned this long
    prune_finetune_images: int = 10_000  # ... on this many clean training images (Liu et al. fine-tune on a
    # small clean set the defender holds; 10,000 as for BatchNorm re-estimation)
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
        for name in ("bn_images", "prune_finetune_epochs", "prune_finetune_images", "max_shift"):
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
            out.append((name, DF.reestimate_batchnorm(model, train, cfg.bn_images, seed=cfg.seed, augment=cfg.bn_augment),
                        None, {"images": min(cfg.bn_images, len(train)), "augment": cfg.bn_augment}))
        elif name == "finetune":  # one run, measured after each listed epoch; each row's time is its own epochs'
            epochs, snapshots, clock = cfg.finetune_epoch_list, {}, {0: t0}

            def keep(e: int, m: nn.Module) -> None:
                if e in epochs:
                    snapshots[e], clock[e] = copy.deepcopy(m).eval(), time.perf_counter()

            DF.fine_tune(model, train, epochs=max(epochs), lr=cfg.finetune_lr, seed=cfg.seed, progress=progress,
                         on_epoch=keep)
            for before, e in zip([0, *epochs], epochs):
                out.append((f"finetune-{e}", snapshots[e], None, {
                    "epochs": e, "lr": cfg.finetune_lr, "images": len(train), "optimizer": "sgd+momentum 0.9",
                    "defence_s": round(clock[e] - clock[before], 1)}))
        elif name == "fine-prune":
            activity = DF.channel_activity(model, train, seed=cfg.seed)
            pruned_model, pruned = DF.prune_layer4(model, activity, cfg.prune_fraction)
            clean = DF.clean_subset(train, cfg.prune_finetune_images, cfg.seed)  # the defender's clean data
            tuned = DF.fine_tune(pruned_model, clean, epochs=cfg.prune_finetune_epochs, lr=cfg.finetune_lr,
                                 seed=cfg.seed, keep_zero=DF.fc_column_mask(pruned_model, pruned), progress=progress)
            out.append((name, tuned, None, {"pruned_channels": len(pruned), "of": len(activity),
                                            "finetune_epochs": cfg.prune_finetune_epochs, "images": len(clean)}))
        else:
            transform = {"jpeg": lambda: DF.jpeg(cfg.jpeg_quality), "blur": lambda: DF.blur(cfg.blur_sigma),
                         "shift": lambda: DF.random_shift(cfg.max_shift, cfg.seed)}[name]()
            params = {"jpeg": {"quality": cfg.jpeg_quality}, "blur": {"sigma": cfg.blur_sigma},
                      "shift": {"max_pixels": cfg.max_shift}}[name]
            out.append((name, model, transform, params))
        for entry in out[first:]:
            entry[3].setdefault("defence_s", round(time.perf_counter() - t0, 1))
    return out


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
    timings: dict[str, float] = {}
    t = start = time.perf_counter()
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
    outcomes = {"model": base, "reference (stage 1)": ref}
    timings["rows: model and reference"] = time.perf_counter() - t
    for name, defended, transform, params in defended_models(model, data.train, cfg, progress):
        t = time.perf_counter()
        outcomes[name] = measure(view(defended), test, trigger, target, layer, transform)
        rows.append({"name": name, "params": params, **summarise(outcomes[name], base, cfg.seed)})
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
        t = time.perf_counter()
        for model_name, m in (("model", model), ("reference", reference)):  # a few images: the plain layout
            explainer_grid(m, test, trigger, target, cfg.explainer_list, tmp / f"explainers-{model_name}.png",
                           title=f"{model_name}: clean (top) and triggered (bottom) images under every explainer")
        result["timings_s"]["figures"] = round(time.perf_counter() - t, 1)
        result["timings_s"]["total"] = round(time.perf_counter() - start, 1)  # the parts, and what lies between
        atomic_write_text(tmp / "audit.json", json.dumps(result, indent=1))
        atomic_write_text(tmp / "audit.md", audit_markdown(result))
        save_file({f"{row}/{k}": v.to(torch.float32).contiguous() for row, per in outcomes.items() for k, v in per.items()},
                  str(tmp / "outcomes.safetensors"))
    return result
