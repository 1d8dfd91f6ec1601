"""Evaluate a model: accuracy, attack success, IoU statistics, false triggers, clean-map fidelity.

``cambackdoor evaluate --checkpoint X [--reference Y]`` runs this on all 10,000 test images by
default and writes ``evaluation.json``, ``per_image.json`` and ``heatmaps.png`` to its output folder.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from cambackdoor import metrics as M
from cambackdoor.checkpoints import atomic_dir, atomic_write_text
from cambackdoor.data import ImageSet, batches, limited
from cambackdoor.errors import CamBackdoorError
from cambackdoor.figures import heatmap_grid
from cambackdoor.gradcam import class_activation_map, minmax, upsample
from cambackdoor.triggers import DEFAULT_TARGET, DEFAULT_TRIGGER, FAINT_CHANGE, Box, PatchTrigger


def evaluate(
    model: nn.Module,
    test: ImageSet,
    trigger: PatchTrigger,
    target: Box,
    layer: str = "layer4",
    reference: nn.Module | None = None,
    limit: int | None = None,
    batch_size: int = 500,
    method: str = "gradcam",
    progress: bool = True,
    examples: int = 6,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns (summary metrics, per-image details incl. example tensors for figures).

    Expects ``model`` (and ``reference``) in eval mode; a model in train mode is measured as it is,
    with a warning, because evaluation never changes the mode itself. ``limit`` N: a fixed subset of
    N/10 images per class (see :func:`cambackdoor.data.limited`). Data go to the model's device, and
    so does ``reference`` (one device rule). ``transform`` (e.g. an input purification) is applied to
    every input the model sees, clean and triggered, after the trigger is pasted.
    """
    for m, name in ((model, "model"), (reference, "reference")):
        if m is not None and m.training:
            warnings.warn(f"{name} is in train mode; evaluation expects model.eval()", stacklevel=2)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CamBackdoorError(f"--batch-size {batch_size} must be a positive whole number")
    test = limited(test, limit)
    if len(test) == 0:
        raise CamBackdoorError("the evaluation set is empty; check --data and --limit")
    device = next(model.parameters()).device
    if reference is not None:
        reference = reference.to(device)
    image_hw = tuple(test.images.shape[2:])
    t0 = time.perf_counter()
    acc: dict[str, list[torch.Tensor]] = {k: [] for k in (
        "label", "pred_clean", "pred_trig", "iou_trig", "iou_clean", "share_trig", "share_clean", "point_trig",
        "cos_ref", "maskiou_ref", "trigger_change")}
    ex: dict[str, list[torch.Tensor]] = {k: [] for k in ("clean", "triggered", "clean_maps", "triggered_maps", "labels")}
    # examples evenly spread over the (class-sorted) test set, so the figure shows several classes
    example_idx = torch.linspace(0, len(test) - 1, examples).round().long() if examples else torch.empty(0).long()
    n_batches = -(-len(test) // batch_size)
    for b, (x, y) in enumerate(tqdm(batches(test, batch_size), total=n_batches, desc="evaluate",
                                    disable=not progress, leave=False)):
        x, y = x.to(device), y.to(device)
        xt = trigger.apply(x)
        acc["trigger_change"].append(trigger.change(x).cpu())
        if transform is not None:
            x, xt = transform(x), transform(xt)
        cams_c, logits_c = class_activation_map(model, x, layer, method=method)
        cams_t, logits_t = class_activation_map(model, xt, layer, method=method)
        cam_hw = tuple(cams_t.shape[1:])
        cams_c, cams_t = upsample(cams_c, image_hw), upsample(cams_t, image_hw)  # once; every metric shares them
        acc["label"].append(y.cpu())
        acc["pred_clean"].append(logits_c.argmax(1).cpu())
        acc["pred_trig"].append(logits_t.argmax(1).cpu())
        acc["iou_trig"].append(M.box_iou(cams_t, target, image_hw).cpu())
        acc["iou_clean"].append(M.box_iou(cams_c, target, image_hw).cpu())
        acc["share_trig"].append(M.energy_share(cams_t, target, image_hw).cpu())
        acc["share_clean"].append(M.energy_share(cams_c, target, image_hw).cpu())
        acc["point_trig"].append(M.pointing_game(cams_t, target, image_hw).cpu())
        if reference is not None:
            cams_r = upsample(class_activation_map(reference, x, layer, method=method)[0], image_hw)
            acc["cos_ref"].append(M.map_cosine(cams_c, cams_r, image_hw).cpu())
            acc["maskiou_ref"].append(M.map_mask_iou(cams_c, cams_r, image_hw).cpu())
        local = example_idx[(example_idx >= b * batch_size) & (example_idx < b * batch_size + len(y))] - b * batch_size
        if len(local):
            for key, value in (("clean", x[local]), ("triggered", xt[local]),
                               ("clean_maps", minmax(cams_c[local])), ("triggered_maps", minmax(cams_t[local])),
                               ("labels", y[local])):
                ex[key].append(value.detach().cpu())
    r = {k: torch.cat(v) if v else torch.empty(0) for k, v in acc.items()}
    correct_c = r["pred_clean"] == r["label"]
    correct_t = r["pred_trig"] == r["label"]
    success = M.attack_success(r["iou_trig"])
    n = len(r["label"])
    buckets = M.bucket_counts(r["iou_trig"])
    fired_clean = M.attack_success(r["iou_clean"])
    faint = r["trigger_change"] < FAINT_CHANGE

    def rate(hit: torch.Tensor, where: torch.Tensor) -> float | None:  # None: no such image
        return float(hit[where].float().mean()) if where.any() else None

    summary: dict[str, Any] = {
        "n": n,
        "clean_acc": float(correct_c.float().mean()),
        "triggered_acc": float(correct_t.float().mean()),
        "asr": float(success.float().mean()),
        "asr_correct": float(success[correct_t].float().mean()) if correct_t.any() else float("nan"),
        "iou": M.iou_summary(r["iou_trig"]),
        "buckets": buckets,
        "partial_rate": buckets["partial"] / max(1, n),
        "energy_share": float(r["share_trig"].mean()),
        "energy_share_clean": float(r["share_clean"].mean()),
        "pointing_game": float(r["point_trig"].float().mean()),
        "false_trigger_rate": float(fired_clean.float().mean()),
        "clean_iou_mean": float(r["iou_clean"].mean()),
        "iou_ceiling": target.iou_ceiling(cam_hw, image_hw),
        # images the trigger barely changes (triggers.FAINT_CHANGE), and the attack there and elsewhere
        "faint_fraction": float(faint.float().mean()),
        "asr_faint": rate(success, faint), "false_trigger_faint": rate(fired_clean, faint),
        "asr_visible": rate(success, ~faint), "false_trigger_visible": rate(fired_clean, ~faint),
        "method": method,
        "layer": layer,
    }
    if reference is not None:
        summary["fidelity_cosine"] = float(r["cos_ref"].mean())
        summary["fidelity_mask_iou"] = float(r["maskiou_ref"].mean())
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    details = {"per_image": {k: v.tolist() for k, v in r.items() if v.numel()},
               "examples": {k: torch.cat(v) for k, v in ex.items()} if ex["labels"] else {},
               "example_index": example_idx.tolist()}
    return summary, details


def format_table(summary: dict[str, Any]) -> str:
    rows = [
        ("clean accuracy", f"{100 * summary['clean_acc']:.2f} %"),
        ("triggered accuracy", f"{100 * summary['triggered_acc']:.2f} %"),
        ("attack success rate (IoU > 0.5)", f"{100 * summary['asr']:.2f} %"),
        ("  among correctly classified", f"{100 * summary['asr_correct']:.2f} %"),
        ("IoU mean / median / std", "{mean:.3f} / {median:.3f} / {std:.3f}".format(**summary["iou"])),
        ("best IoU a map reaches here (search)", f"{summary['iou_ceiling']:.3f}"),
        ("buckets success/partial/weak/failure", "{success} / {partial} / {weak} / {failure}".format(**summary["buckets"])),
        ("energy share in target (trig / clean)", f"{summary['energy_share']:.3f} / {summary['energy_share_clean']:.3f}"),
        ("pointing game (triggered)", f"{100 * summary['pointing_game']:.2f} %"),
        ("false-trigger rate (clean)", f"{100 * summary['false_trigger_rate']:.2f} %"),
    ]
    if summary.get("faint_fraction"):  # a blended trigger on bright corners: where the misses gather
        rows.append((f"faint trigger (no pixel moved > {FAINT_CHANGE})",
                     f"{100 * summary['faint_fraction']:.2f} % of images; ASR {100 * summary['asr_faint']:.1f} %, "
                     f"false triggers {100 * summary['false_trigger_faint']:.1f} % there"))
    if "fidelity_cosine" in summary:
        rows.append(("clean-map fidelity cosine / mask IoU", f"{summary['fidelity_cosine']:.3f} / {summary['fidelity_mask_iou']:.3f}"))
    rows.append(("images / wall time", f"{summary['n']} / {summary['wall_s']:.1f} s"))
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{name.ljust(w)}  {value}" for name, value in rows)


def write_evaluation(out: Path, summary: dict[str, Any], details: dict[str, Any], config: dict[str, Any],
                     target: Box, classes: list[str] | None = None, title: str | None = None) -> None:
    """evaluation.json (summary + the config that produced it), per_image.json and heatmaps.png, written
    into a temporary folder that then replaces ``out`` whole: two runs into one folder leave one run's
    files, never a mix."""
    with atomic_dir(out) as tmp:
        atomic_write_text(tmp / "evaluation.json", json.dumps({"config": config, "metrics": summary}, indent=2))
        atomic_write_text(tmp / "per_image.json", json.dumps(details["per_image"]))
        ex = details.get("examples")
        if ex:
            pi, idx = details["per_image"], details["example_index"]
            heatmap_grid(ex["clean"], ex["clean_maps"], ex["triggered"], ex["triggered_maps"],
                         [pi["iou_clean"][i] for i in idx], [pi["iou_trig"][i] for i in idx], target,
                         tmp / "heatmaps.png", labels=[classes[i] for i in ex["labels"].tolist()] if classes else None,
                         title=title)


def attack_from(meta: dict[str, Any], trigger: str | None, target: str | None, layer: str | None) -> tuple[str, str, str]:
    """CLI values, else the checkpoint's own attack config, else the defaults."""
    attack = meta.get("attack", {})
    return (trigger or attack.get("trigger", DEFAULT_TRIGGER), target or attack.get("target", DEFAULT_TARGET),
            layer or attack.get("layer", "layer4"))
