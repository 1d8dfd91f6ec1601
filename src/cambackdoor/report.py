"""``figures``: plots and ``report.md`` for a run or a sweep folder, with the machine it ran on."""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from cambackdoor.checkpoints import atomic_write_text
from cambackdoor.errors import CamBackdoorError
from cambackdoor.figures import iou_histogram, tradeoff_plot
from cambackdoor.sweep import gather_csv
from cambackdoor.version import __version__


def read_timings(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / "timings.json").read_text())
    except (OSError, ValueError):
        return {}


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            try:
                r[k] = float(v)
            except (TypeError, ValueError):
                pass
    return rows


def environment() -> dict[str, str]:
    return {"cambackdoor": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                       f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}


def make_figures(directory: str | Path) -> Path:
    """Plots and ``report.md`` for a run directory (stage1/, implant/) or a sweep directory (sweep.csv)."""
    d = Path(directory)
    if not d.is_dir():
        raise CamBackdoorError(f"{d} is not a directory; pass a run or sweep directory")
    env = environment()
    lines = [f"# cambackdoor report: {d.name}", "",
             f"Generated {env['date']} on {env['machine']}; cambackdoor {env['cambackdoor']}, torch {env['torch']}, "
             f"Python {env['python']}.", ""]
    if (d / "sweep.csv").exists() or (d / "sweep.json").exists():
        csv_path = d / "sweep.csv" if (d / "sweep.csv").exists() else gather_csv(d)
        rows = _read_csv(csv_path)
        spec = json.loads((d / "sweep.json").read_text())
        keys = list(spec["points"][0].keys()) if spec["points"] else []
        lines += [f"Sweep of the `{spec['recipe']}` recipe over {', '.join(keys)} on `{spec['checkpoint']}`.", ""]
        for key in keys:
            others = [k for k in keys if k != key]
            if len({json.dumps([r.get(k) for k in others]) for r in rows}) > 1:
                continue  # only plot a key when the other keys are held fixed
            fig = tradeoff_plot(rows, key, d / f"tradeoff_{key}.png", xlabel=key.replace("_", " "),
                                report_points=key in ("lambda", "lam", "explanation_weight"), logx=key == "poison_fraction")
            lines += [f"![ASR and accuracy against {key}]({fig.name})", ""]
        lines += _table(rows, keys)
        lines += ["", "Each point's command (one line per point, e.g. for a SLURM array):", "", "```",
                  *(d / "commands.txt").read_text().splitlines(), "```"]
    else:
        rows = []
        for name in ("stage1", "implant"):
            f = d / name / "evaluate" / "evaluation.json"
            if f.exists():
                m = json.loads(f.read_text())["metrics"]
                rows.append((name, m))
                per = json.loads((d / name / "evaluate" / "per_image.json").read_text())
                iou_histogram(per["iou_trig"], d / name / "evaluate" / "iou_histogram.png",
                              title=f"{name}: IoU of triggered CAMs with the target", ceiling=m.get("iou_ceiling"))
        if not rows:
            raise CamBackdoorError(f"{d} holds no evaluate/evaluation.json nor sweep.csv; run 'cambackdoor run' first")
        lines += ["| model | clean acc | triggered acc | ASR | IoU mean | false triggers | fidelity (cos) |",
                  "|---|---|---|---|---|---|---|"]
        for name, m in rows:
            fid = f"{m['fidelity_cosine']:.3f}" if "fidelity_cosine" in m else "-"
            lines.append(f"| {name} | {100 * m['clean_acc']:.2f} % | {100 * m['triggered_acc']:.2f} % | "
                         f"{100 * m['asr']:.2f} % | {m['iou']['mean']:.3f} | {100 * m['false_trigger_rate']:.2f} % | {fid} |")
        lines.append("")
        timings = read_timings(d)
        if timings:
            lines += ["| stage | wall time | measured |", "|---|---|---|"]
            lines += [f"| {k} | {v['wall_s']:.0f} s | {v['date']} |" for k, v in timings.items()]
            lines += [f"| **total** | **{sum(v['wall_s'] for v in timings.values()) / 60:.1f} min** | |", ""]
        audit_md = d / "implant" / "audit" / "audit.md"
        if audit_md.exists():  # the audit's tables, its figure paths made relative to this report
            body = audit_md.read_text().split("\n", 1)[1].replace("](explainers-", "](implant/audit/explainers-")
            lines += ["## Audit of the implant", "", *body.replace("\n## ", "\n### ").splitlines(), ""]
        for name, _ in rows:
            lines += [f"![{name} heatmaps]({name}/evaluate/heatmaps.png)", "",
                      f"![{name} IoU histogram]({name}/evaluate/iou_histogram.png)", ""]
        for name in ("stage1", "implant"):
            cfg = d / name / ("config.json" if name == "stage1" else "implant.json")
            if cfg.exists():
                conf = json.loads(cfg.read_text()).get("config", json.loads(cfg.read_text()).get("train"))
                lines += [f"<details><summary>{name} config</summary>", "", "```json", json.dumps(conf, indent=1),
                          "```", "</details>", ""]
    atomic_write_text(d / "report.md", "\n".join(lines) + "\n")
    return d / "report.md"


def _table(rows: list[dict[str, Any]], keys: list[str]) -> list[str]:
    head = keys + ["clean acc", "triggered acc", "ASR", "IoU mean", "false triggers", "fidelity", "train s"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        fid = r.get("fidelity_cosine")
        out.append("| " + " | ".join([str(r[k]) for k in keys] + [
            f"{100 * r['clean_acc']:.2f} %", f"{100 * r['triggered_acc']:.2f} %", f"{100 * r['asr']:.2f} %",
            f"{r['iou_mean']:.3f}", f"{100 * r['false_trigger_rate']:.2f} %",
            f"{fid:.3f}" if isinstance(fid, float) else "-", f"{r['train_s']:.0f}"]) + " |")
    return out
