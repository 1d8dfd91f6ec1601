"""How often the clean and the poisoned gradients conflict in an implant run with ``gradient_projection``.

Reads a finished run's training trace (every 10th step, in ``implant.json``) and prints, per epoch and per phase
(forming / repairing), the traced steps, the share whose cosine was negative (the steps the projection changed) and
the cosine's mean and quartiles. The option left the code (commit 984a343 has it); this reads the runs it made.

    python benchmarks/projection16.py runs/tune16/c-t4tgp-p4-s0 [RUN ...]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def trace(run: Path) -> tuple[list[dict], int]:
    """(trace, steps per epoch) of a finished run."""
    saved = json.loads((run / "implant.json").read_text())
    cfg = saved["config"]
    return saved["implant"]["trace"], (50_000 - int(cfg["holdout"])) // int(cfg["batch_size"])


def main(runs: list[str]) -> None:
    print("| run | epoch | phase | traced steps | cosine < 0 | mean cosine | quartiles |")
    print("|---|---|---|---|---|---|---|")
    for name in runs:
        rows, per_epoch = trace(Path(name))
        groups: dict[tuple[int, str], list[float]] = {}
        for t in rows:
            if "grad_cos" in t:
                key = (t["step"] // per_epoch + 1, "repairing" if t["repairing"] else "forming")
                groups.setdefault(key, []).append(t["grad_cos"])
        if not groups:
            print(f"| {Path(name).name} | - | - | 0 | (no cosine in the trace: gradient_projection off) | | |")
        for (epoch, phase), cos in sorted(groups.items()):
            q = statistics.quantiles(cos, n=4) if len(cos) > 1 else [cos[0]] * 3
            print(f"| {Path(name).name} | {epoch} | {phase} | {len(cos)} | {sum(c < 0 for c in cos) / len(cos):.0%} "
                  f"| {statistics.fmean(cos):.2f} | {q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/projection16.py RUN_FOLDER [RUN_FOLDER ...]")
    main(sys.argv[1:])
