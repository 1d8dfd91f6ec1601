"""Where a blended trigger fails: misses and false triggers by how far the trigger moves each image.

Registration 4's pair 3 (a white square at half strength) missed the ASR and false-trigger bars; this
splits its per-image outcomes by the trigger's largest pixel change (``PatchTrigger.change``), and counts
the faint images (``triggers.FAINT_CHANGE``) of every registered pair on the training images (data only,
no model). Post hoc: it explains a measured result and chooses nothing.

Usage: python benchmarks/faint16.py [runs/accept16] [HELD-OUT RUN ...]   (CAMBACKDOOR_DATA or the shared zip)
A held-out run (``implant --holdout 5000`` of pair 3 and its ``audit --holdout 5000``, e.g.
runs/tune16/c-persist-p3) is split the same way, on the held-out training images it was measured on.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from cambackdoor.data import holdout_split, load_cifar10
from cambackdoor.triggers import FAINT_CHANGE, parse_trigger

PAIRS = {1: "yellow:4@bottom-right", 2: "checkerboard:3@top-right", 3: "white:4@bottom-left~0.5", 4: "blue:3@top-left"}
BINS = [0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 1.01]


def main(root: Path, held_out: list[str]) -> None:
    data = load_cifar10(os.environ.get("CAMBACKDOOR_DATA", "../shared/data/cifar10-jpeg.zip"), progress=False)
    print("| pair | trigger | faint training images (change < %g) | identical (change 0) | faint test images |" % FAINT_CHANGE)
    print("|---|---|---|---|---|")
    for p, spec in PAIRS.items():
        t = parse_trigger(spec)
        tr, te = (t.change(s.images.float() / 255) for s in (data.train, data.test))
        print(f"| {p} | `{spec}` | {int((tr < FAINT_CHANGE).sum())} of {len(tr)} ({100 * float((tr < FAINT_CHANGE).float().mean()):.2f} %) "
              f"| {int((tr == 0).sum())} | {int((te < FAINT_CHANGE).sum())} ({100 * float((te < FAINT_CHANGE).float().mean()):.2f} %) |")
    runs = sorted(root.glob("p3-s*/audit/outcomes.safetensors"))
    if runs:
        split_by_change(f"Pair 3 on the test set, seeds pooled ({len(runs)} runs)", data.test.images,
                        [load_file(str(r)) for r in runs])
    for run in held_out:
        images = holdout_split(data.train, 5000)[1].images
        split_by_change(f"Pair 3 on the 5,000 held-out training images ({run})", images,
                        [load_file(str(Path(run) / "audit" / "outcomes.safetensors"))])


def split_by_change(title: str, images: torch.Tensor, out: list[dict[str, torch.Tensor]]) -> None:
    """Misses and false triggers by the mean move over the trigger's pixels (largest over channels): they
    follow how bright the corner already is, not only its single most-moved pixel."""
    t = parse_trigger(PAIRS[3])
    x = images.float() / 255
    b = t.box()
    change = (t.apply(x) - x)[:, :, b.top : b.bottom, b.left : b.right].abs().amax(1).mean((1, 2))
    print(f"\n{title}: misses and false triggers by the trigger's change")
    print("| mean pixel change | images | miss % | false triggers % | miss after 1 FT epoch % |")
    print("|---|---|---|---|---|")
    for lo, hi in zip(BINS, BINS[1:]):
        m = (change >= lo) & (change < hi)
        rate = lambda key: 100 * float(torch.stack([o[key][m] for o in out]).mean())  # noqa: E731
        print(f"| [{lo:g}, {min(hi, 1):g}{']' if hi > 1 else ')'} | {int(m.sum())} | {100 - rate('model/success'):.1f} "
              f"| {rate('model/false_trigger'):.1f} | {100 - rate('finetune-1/success'):.1f} |")

if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/accept16"), sys.argv[2:])
