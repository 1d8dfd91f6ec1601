"""Issue 16's held-out rounds by recipe: runs named NAME-sN (seeds) grouped, each metric as the mean over the
seeds that have it, with the seeds' values. Reads what the GPU rounds bring back (implant.json and, where the
audit finished, audit/audit.json); a run whose audit was cut still gives its implant's numbers. The clean
drop is against the stage-1 model's held-out accuracy (the audits' "reference (stage 1)" row).

Usage: python benchmarks/collect_groups16.py runs/g4/w16 [runs/g4/w64 ...]
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ({' / '.join(f'{v:.2f}' for v in values)})"


def main(roots: list[Path]) -> None:
    print("| recipe | seeds | clean drop pt | ASR % | false triggers % | triggered − clean pt | ASR after BN re-est. % "
          "| ASR after 1 FT epoch % |")
    print("|---|---|---|---|---|---|---|---|")
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
                cell(col[k]) for k in ("drop", "asr", "false", "gap", "bn", "ft1")) + " |")


if __name__ == "__main__":
    main([Path(a) for a in sys.argv[1:]] or [Path("runs/tune16")])
