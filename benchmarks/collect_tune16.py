"""Issue 16's held-out tuning table: each run under runs/tune16/ (implant + audit on the held-out images).

Usage: python benchmarks/collect_tune16.py [runs/tune16]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def pct(ci: dict | None) -> str:
    return "-" if ci is None else f"{100 * ci['value']:.2f}"


def norms(log: dict) -> str:
    """The largest whole-gradient norm of the run and the steps its clip cut (logged since the twentieth session)."""
    eps = [e for e in log.get("epochs", []) if "grad_norm_max" in e]
    return f"{max(e['grad_norm_max'] for e in eps):.0f} ({sum(e['clipped_steps'] for e in eps)})" if eps else "-"


def main(root: Path) -> None:
    print("| run | stage-2 s | clean % | clean drop pt [95 %] | triggered − clean pt | ASR % | false triggers % | "
          "fidelity | ASR after BN re-est. % | triggered acc after BN re-est. % | ASR after 1 FT epoch % | "
          "clean after FT % | max grad norm (steps clipped) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run in sorted(p for p in root.iterdir() if (p / "implant.json").exists()):
        imp = json.loads((run / "implant.json").read_text())
        ev, log = imp["evaluation"], imp["implant"]
        audit_file = run / "audit" / "audit.json"
        rows = {r["name"]: r for r in json.loads(audit_file.read_text())["rows"]} if audit_file.exists() else {}
        m = rows.get("model", {})
        drop = m.get("clean_drop_vs_reference")
        gap = m.get("triggered_gap")
        print(f"| {run.name} | {log['train_s']:.0f} | {100 * ev['clean_acc']:.2f} | "
              # the audit's difference is model - stage 1; the column is the drop (stage 1 - model), as docs write it
              + (f"{-100 * drop['diff']:.2f} [{-100 * drop['hi']:.2f}, {-100 * drop['lo']:.2f}]" if drop else "-")
              + " | " + ("-" if gap is None else f"{100 * gap['diff']:+.2f}") + f" | {100 * ev['asr']:.2f} | "
              f"{100 * ev['false_trigger_rate']:.2f} | {ev.get('fidelity_cosine', float('nan')):.3f} | "
              f"{pct(rows.get('bn-reestimate', {}).get('asr'))} | {pct(rows.get('bn-reestimate', {}).get('triggered_acc'))} | "
              f"{pct(rows.get('finetune-1', {}).get('asr'))} | "
              f"{pct(rows.get('finetune-1', {}).get('clean_acc'))} | {norms(log)} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tune16"))
