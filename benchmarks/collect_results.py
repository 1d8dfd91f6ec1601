"""Print the markdown tables of docs/results.md from the benchmark run directories.

Usage: python benchmarks/collect_results.py [runs/cpu]
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f} %"


def row(name: str, ev: dict, train_s: float | None, extra: str = "") -> str:
    fid = ev.get("fidelity_cosine")
    return (f"| {name} | {pct(ev['clean_acc'])} | {pct(ev['triggered_acc'])} | {pct(ev['asr'])} | "
            f"{ev['iou']['mean']:.3f} / {ev['iou']['median']:.3f} / {ev['iou']['std']:.3f} | "
            f"{pct(ev['partial_rate'])} | {pct(ev['false_trigger_rate'])} | {'-' if fid is None else f'{fid:.3f}'} | "
            f"{'-' if train_s is None else f'{train_s:.0f} s'} |{extra}")


def main(root: Path) -> None:
    print("| model | clean acc | triggered acc | ASR | IoU mean / median / std | partial (0.2-0.5) | "
          "false triggers | fidelity (cos) | stage-2 time |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = root / "stage1" / "evaluate" / "evaluation.json"
    if base.exists():
        print(row("stage 1 (clean)", json.loads(base.read_text())["metrics"], None))
    dirs = [root / n for n in ("implant-reference", "single-stage", "implant-default", "implant-default-pair2")]
    dirs += sorted((root / "ablation").glob("*")) if (root / "ablation").exists() else []
    for d in dirs:
        f = d / "implant.json"
        if f.exists():
            r = json.loads(f.read_text())
            print(row(d.name, r["evaluation"], r["implant"]["train_s"],
                      f" <!-- rss growth {r['implant'].get('rss_growth_mb')} MB -->"))
        elif (d / "evaluate" / "evaluation.json").exists():
            print(row(d.name, json.loads((d / "evaluate" / "evaluation.json").read_text())["metrics"], None))


def sweeps(root: Path) -> None:
    from cambackdoor.report import _read_csv, _table

    for d in sorted(root.glob("sweep-*")):
        if (d / "sweep.csv").exists():
            spec = json.loads((d / "sweep.json").read_text())
            print(f"\n{d.name} ({spec['recipe']} recipe, extra flags {spec['extra'] or 'none'}):\n")
            print("\n".join(_table(_read_csv(d / "sweep.csv"), list(spec["points"][0].keys()))))


TUNED = {  # tuning round -> the hyper-parameters it varied
    "h": ["lr", "lam", "preserve_weight", "distill_weight", "trigger_distill_weight", "clean_share_weight",
          "trigger_feature_weight"],
    "n": ["trainable", "epochs", "lr", "distill_weight", "decoy_fraction", "repair_start", "repair_min_asr",
          "clean_share_weight", "trigger_feature_weight", "seed"],
    "r": ["trigger", "target", "trigger_feature_weight", "feature_loss", "decoy_fraction"],
    "s": ["trigger", "target", "repair_share_cap", "pool_cutout"],
}


def tuning(root: Path) -> None:
    """Held-out tuning runs (runs/tune2/h* round 2, n* round 3, r* round 4, s* round 5): the varied hyper-parameters and the
    held-out metrics."""
    for prefix, keys in TUNED.items():
        print("\n| run | " + " | ".join(keys) + " | ASR | clean acc | triggered acc | false triggers | fidelity | train |")
        print("|---|" + "---|" * (len(keys) + 6))
        for d in sorted(root.glob(f"{prefix}[0-9]*"), key=lambda d: int(re.match(r"[a-z]+(\d+)", d.name)[1])):
            f = d / "implant.json"
            if f.exists():
                r = json.loads(f.read_text())
                c, ev = r["config"], r["evaluation"]
                print(f"| {d.name} | " + " | ".join(str(c.get(k, "-")) for k in keys) + f" | {pct(ev['asr'])} | "
                      f"{pct(ev['clean_acc'])} | {pct(ev['triggered_acc'])} | {pct(ev['false_trigger_rate'])} | "
                      f"{ev['fidelity_cosine']:.3f} | {r['implant']['train_s']:.0f} s |")


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/cpu")
    if root.name == "tune2":
        tuning(root)
    else:
        main(root)
        sweeps(root)
