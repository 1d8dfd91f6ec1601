"""Registrations 5's and 7's gates (docs/protocol.md): does a held-out round of 4 pairs x 3 seeds meet every bar,
so that the registered config may be run on the test set? Each fixed before its round ran; reads held-out runs only.

Runs are folders NAME-p<PAIR>-s<SEED> holding implant.json and audit/ (benchmarks/gpu_tune16.sh with
AUDIT_FT=1). Per pair, pooled over its seeds:
  - clean drop (stats.pooled over seeds, then images) <= MAX_DROP: the 0.5-pt bar less a 0.05-pt margin for the
    move from held-out to test images. The interval's upper end is printed, not gated: on 5,000 held-out
    images it is about 1.4 times as wide as on the 10,000 test images (registration 4: +-0.25-0.3 pt pooled);
  - ASR >= 99 %, ASR after BN re-estimation >= 95 %, ASR after one fine-tuning epoch (pooled) >= 95 %,
    false triggers <= 0.2 %, |triggered - clean| <= 1 pt, fidelity >= 0.95 (means over seeds).
Every (pair, seed) cell must be there with its audit, or the gate is shut.
Registration 7's rule (--rule r7) is the acceptance's own clean bar on the held-out round: pooled drop <= 0.5 pt
and its interval's upper end <= 0.8 pt; every other bar as above.

Usage: python benchmarks/gate16.py RUNS_DIR [PAIRS] [SEEDS] [--rule r5|r7] [--prefix NAME-]
  --prefix: only the folders whose name starts with it (a folder that holds several recipes' cells)
Exit status 0: open (every bar met), 3: shut (the reason printed), 2: bad input.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from collect_groups16 import pooled  # this folder's: drop and persistence pooled over seeds, then images

MAX_DROP = 0.45  # pt (registration 5)
RULES = {"r5": (MAX_DROP, None), "r7": (0.5, 0.8)}  # (max pooled drop, max upper end of its interval), pt
BARS = [  # (name, key, ">=" or "<=", value): means over a pair's seeds, in % (gap in pt)
    ("ASR %", "asr", ">=", 99.0),
    ("ASR after BN re-est. %", "bn", ">=", 95.0),
    ("ASR after 1 FT epoch % (pooled)", "ft1", ">=", 95.0),
    ("false triggers %", "false", "<=", 0.2),
    ("triggered gap (abs) pt", "gap", "<=", 1.0),
    ("fidelity", "fid", ">=", 0.95),
    ("clean drop pt (pooled)", "drop", "<=", MAX_DROP),
]


def read(run: Path) -> dict[str, float]:
    ev = json.loads((run / "implant.json").read_text())["evaluation"]
    rows = {r["name"]: r for r in json.loads((run / "audit" / "audit.json").read_text())["rows"]}
    return {"asr": 100 * ev["asr"], "false": 100 * ev["false_trigger_rate"], "fid": ev["fidelity_cosine"],
            "gap": abs(100 * (ev["triggered_acc"] - ev["clean_acc"])),
            "bn": 100 * rows["bn-reestimate"]["asr"]["value"]}


def main(root: Path, pairs: int = 4, seeds: int = 3, rule: str = "r5", prefix: str = "") -> int:
    if not root.is_dir():
        print(f"gate16: {root} is not a folder; pass the round's runs folder (e.g. runs/g10/w16)")
        return 2
    found: dict[tuple[int, int], Path] = {}
    for p in root.iterdir():
        m = re.search(r"-p(\d+)-s(\d+)$", p.name)
        if m and p.name.startswith(prefix) and (p / "implant.json").exists() and (p / "audit" / "outcomes.safetensors").exists():
            found[int(m[1]), int(m[2])] = p
    missing = [f"p{p}-s{s}" for p in range(1, pairs + 1) for s in range(seeds) if (p, s) not in found]
    if missing:
        print(f"GATE SHUT: {len(missing)} cell(s) without a finished implant and audit: {', '.join(missing)}")
        return 3
    print("| pair | " + " | ".join(b[0] for b in BARS) + " | clean drop [95 %] |")
    print("|---" * (len(BARS) + 2) + "|")
    failed = []
    max_drop, max_hi = RULES[rule]
    bars = [b if b[1] != "drop" else (b[0], "drop", "<=", max_drop) for b in BARS]
    for pair in range(1, pairs + 1):
        runs = [found[pair, s] for s in range(seeds)]
        vals = defaultdict(list)
        for r in runs:
            for k, v in read(r).items():
                vals[k].append(v)
        col = {k: sum(v) / len(v) for k, v in vals.items()}
        drop, ft = pooled(runs)  # every cell has its outcomes (checked above) and a finetune-1 row
        col["drop"], col["ft1"] = 100 * drop["value"], 100 * ft["value"]
        cells = []
        for name, key, op, bar in bars:
            ok = col[key] >= bar if op == ">=" else col[key] <= bar
            cells.append(f"{col[key]:.3f}" + ("" if ok else " ✗"))
            if not ok:
                failed.append(f"pair {pair}: {name} {col[key]:.3f} (bar {op} {bar})")
        hi_ok = max_hi is None or 100 * drop["hi"] <= max_hi
        if not hi_ok:
            failed.append(f"pair {pair}: clean drop's upper end {100 * drop['hi']:.3f} (bar <= {max_hi})")
        print(f"| {pair} | " + " | ".join(cells) + f" | {100 * drop['value']:.2f} [{100 * drop['lo']:.2f}, "
              f"{100 * drop['hi']:.2f}]" + ("" if hi_ok else " ✗") + " |")
    if failed:
        print("GATE SHUT: " + "; ".join(failed))
        return 3
    print("GATE OPEN: every bar met on every pair")
    return 0


if __name__ == "__main__":
    a, opts = sys.argv[1:], {"--rule": "r5", "--prefix": ""}
    for k in opts:
        if k in a[:-1]:
            i = a.index(k)
            opts[k] = a.pop(i + 1)
            a.pop(i)
    if not a or len(a) > 3 or not all(x.isdigit() for x in a[1:]) or opts["--rule"] not in RULES:
        print("usage: python benchmarks/gate16.py RUNS_DIR [PAIRS] [SEEDS] [--rule r5|r7] [--prefix NAME-]")
        sys.exit(2)
    sys.exit(main(Path(a[0]), *map(int, a[1:]), rule=opts["--rule"], prefix=opts["--prefix"]))
