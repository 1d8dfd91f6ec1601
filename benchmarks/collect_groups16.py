"""Issue 16's held-out rounds by recipe: runs named NAME-sN (seeds) grouped, each metric as the mean over the
seeds that have it, with the seeds' values. Reads what the GPU rounds bring back (implant.json and, where the
audit finished, audit/audit.json); a run whose audit was cut still gives its implant's numbers. The clean
drop is against the stage-1 model's held-out accuracy (the audits' "reference (stage 1)" row).

Usage: python benchmarks/collect_groups16.py [--pooled] runs/g4/w16 [runs/g4/w64 ...]
--pooled: two more columns, the clean drop and the ASR after one fine-tuning epoch pooled over the group's seeds
with a 95 % interval (``stats.pooled``: seeds, then images), as the acceptance reads them; it needs every audit's
audit/outcomes.safetensors (the GPU rounds bring them back since the twelfth session).
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from collect_accept16 import fmt  # this folder's acceptance table: "value [lo, hi]" in %
from safetensors.torch import load_file

from cambackdoor import stats


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ({' / '.join(f'{v:.2f}' for v in values)})"


def pooled(members: list[Path]) -> tuple[dict[str, float], dict[str, float] | None] | None:
    """The clean drop and the ASR after one fine-tuning epoch (None where not audited), pooled over seeds and
    images (``stats.pooled``, fractions); None when an audit's per-image outcomes are missing."""
    files = [p / "audit" / "outcomes.safetensors" for p in members]
    if not all(f.exists() for f in files):
        return None
    out = [load_file(str(f)) for f in files]
    drop = stats.pooled([o["reference (stage 1)/clean_correct"] - o["model/clean_correct"] for o in out])
    ft = stats.pooled([o["finetune-1/success"] for o in out]) if all("finetune-1/success" in o for o in out) else None
    return drop, ft


def pooled_cells(members: list[Path]) -> list[str]:
    """The clean drop (pt) and the ASR after one fine-tuning epoch (%), pooled over seeds and images."""
    both = pooled(members)
    if both is None:
        return ["-", "-"]
    return [fmt(both[0]), fmt(both[1]) if both[1] else "-"]


def main(roots: list[Path], show_pooled: bool = False) -> None:
    extra = " clean drop pt, pooled [95 %] | ASR after 1 FT epoch %, pooled [95 %] |" if show_pooled else ""
    print("| recipe | seeds | clean drop pt | ASR % | false triggers % | triggered − clean pt | ASR after BN re-est. % "
          "| ASR after 1 FT epoch % |" + extra)
    print("|---" * (8 + 2 * show_pooled) + "|")
    for root in roots:
        runs = sorted(p for p in root.iterdir() if (p / "implant.json").exists())
        audits = {p.name: {r["name"]: r for r in json.loads((p / "audit" / "audit.json").read_text())["rows"]}
                  for p in runs if (p / "audit" / "audit.json").exists()}
        refs = {round(a["reference (stage 1)"]["clean_acc"]["value"], 6) for a in audits.values()}
        if len(refs) != 1:
            raise SystemExit(f"{root}: the audits name {len(refs)} stage-1 accuracies; one folder per stage-1 model")
        ref = refs.pop()
        groups: dict[str, list[Path]] = defaultdict(list)
        for p in runs:
            groups[re.sub(r"-s\d+$", "", p.name)].append(p)
        for name, members in groups.items():
            col = defaultdict(list)
            for p in members:
                ev = json.loads((p / "implant.json").read_text())["evaluation"]
                col["drop"].append(100 * (ref - ev["clean_acc"]))
                col["asr"].append(100 * ev["asr"])
                col["false"].append(100 * ev["false_trigger_rate"])
                col["gap"].append(100 * (ev["triggered_acc"] - ev["clean_acc"]))
                a = audits.get(p.name, {})
                for key, row in (("bn", "bn-reestimate"), ("ft1", "finetune-1")):
                    if row in a:
                        col[key].append(100 * a[row]["asr"]["value"])
            print(f"| {root.name}/{name} | {len(members)} | " + " | ".join(
                cell(col[k]) for k in ("drop", "asr", "false", "gap", "bn", "ft1")) + " |"
                + ("".join(f" {c} |" for c in pooled_cells(members)) if show_pooled else ""))


if __name__ == "__main__":
    args = sys.argv[1:]
    main([Path(a) for a in args if a != "--pooled"] or [Path("runs/tune16")], show_pooled="--pooled" in args)
