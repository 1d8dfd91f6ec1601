"""The audit's tables in markdown (``audit.md``): percentages, points for differences, 95 % intervals."""

from __future__ import annotations

from typing import Any


def _pct(ci: dict[str, float]) -> str:
    return f"{100 * ci['value']:.2f} [{100 * ci['lo']:.2f}, {100 * ci['hi']:.2f}]"


def _pt(d: dict[str, float]) -> str:
    return f"{100 * d['diff']:+.2f} [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]"


def audit_markdown(result: dict[str, Any]) -> str:
    """The audit's tables: percentages (points for differences) with 95 % bootstrap intervals."""
    cfg = result["config"]
    images = "test images" if cfg.get("split", "test") == "test" else f"images of the training set's {cfg['split']} split"
    lines = [f"# Audit of `{cfg.get('checkpoint')}`", "",
             f"Reference `{cfg.get('reference')}`; attack `{cfg.get('trigger')}` -> `{cfg.get('target')}` at "
             f"{cfg.get('layer')}; {result['images']} {images} ({result['pixel_images']} for pixel explainers). "
             "Brackets: 95 % bootstrap intervals over those images (paired for differences).", "",
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
