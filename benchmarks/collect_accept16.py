"""Issue 16's acceptance table (registration 4 in docs/protocol.md): per trigger/target pair, each metric as
the mean over implant seeds with a 95 % interval (bootstrap over seeds, then images: ``stats.pooled``), and
each bar checked. Reads runs/accept16/p<PAIR>-s<SEED>/ (benchmarks/accept16.sh).

Usage: python benchmarks/collect_accept16.py [runs/accept16]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import load_file

from cambackdoor import stats

# (column, audit row, per-image outcome, bar: (">=" or "<=", value in %), or None when only reported)
ASR_COLUMNS = [("ASR", "model", "success", (">=", 99.0)),
               ("ASR after BN re-est.", "bn-reestimate", "success", (">=", 95.0)),
               ("ASR after 1 FT epoch", "finetune-1", "success", (">=", 95.0)),
               ("ASR after 5 FT epochs", "finetune-5", "success", None),
               ("ASR after fine-pruning", "fine-prune", "success", None),
               ("false triggers", "model", "false_trigger", ("<=", 0.2))]


def fmt(p: dict[str, float]) -> str:
    return f"{100 * p['value']:.2f} [{100 * p['lo']:.2f}, {100 * p['hi']:.2f}]"


def passes(value: float, bar: tuple[str, float] | None) -> str:
    if bar is None:
        return ""
    ok = value >= bar[1] if bar[0] == ">=" else value <= bar[1]
    return " ✓" if ok else " ✗"


def pair_row(runs: list[Path]) -> tuple[list[str], bool]:
    out = [load_file(str(r / "audit" / "outcomes.safetensors")) for r in runs]
    cells, ok = [], True
    for _, row, metric, bar in ASR_COLUMNS:
        if any(f"{row}/{metric}" not in o for o in out):  # a defence this registration's audit left out
            cells.append("not measured" if bar is None else "missing ✗")
            ok &= bar is None
            continue
        p = stats.pooled([o[f"{row}/{metric}"] for o in out])
        mark = passes(100 * p["value"], bar)
        ok &= mark != " ✗"
        cells.append(fmt(p) + mark)
    drop = stats.pooled([o["reference (stage 1)/clean_correct"] - o["model/clean_correct"] for o in out])
    mark = " ✓" if 100 * drop["value"] <= 0.5 and 100 * drop["hi"] <= 0.8 else " ✗"
    gap = stats.pooled([o["model/triggered_correct"] - o["model/clean_correct"] for o in out])
    gap_mark = " ✓" if abs(100 * gap["value"]) <= 1.0 else " ✗"
    implants = [json.loads((r / "implant.json").read_text()) for r in runs]
    fid = [imp["evaluation"]["fidelity_cosine"] for imp in implants]
    fid_mark = " ✓" if min(fid) >= 0.95 else " ✗"
    secs = [imp["implant"]["train_s"] for imp in implants]
    cells += [fmt(drop) + mark, fmt(gap) + gap_mark, f"{sum(fid) / len(fid):.3f} (min {min(fid):.3f}){fid_mark}",
              f"{min(secs):.0f}-{max(secs):.0f}"]
    return cells, ok and mark == gap_mark == fid_mark == " ✓"


def main(root: Path) -> None:
    head = [c for c, *_ in ASR_COLUMNS] + ["clean drop pt", "triggered − clean pt", "fidelity", "stage-2 s"]
    print("| pair | seeds | " + " | ".join(head) + " | all bars |")
    print("|---" * (len(head) + 3) + "|")
    for pair in (1, 2, 3, 4):
        runs = sorted(r for r in root.glob(f"p{pair}-s*") if (r / "audit" / "outcomes.safetensors").exists())
        if not runs:
            print(f"| {pair} | none | " + " | ".join("-" for _ in head) + " | not run |")
            continue
        cells, ok = pair_row(runs)
        seeds = ",".join(r.name.split("-s")[1] for r in runs)
        print(f"| {pair} | {seeds} | " + " | ".join(cells) + f" | {'yes' if ok and len(runs) == 3 else 'no'} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/accept16"))
