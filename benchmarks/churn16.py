"""Where a held-out implant's clean drop comes from (issue 16 probe): images the stage-1 model got right and
the implant gets wrong (lost) against the reverse (gained), by class and by tenth of how close the trigger's
corner already is to the trigger's colour (yellowness for the default trigger: (r + g)/2 - b).

Usage: python benchmarks/churn16.py IMPLANT_RUN STAGE1_CHECKPOINT   (a --holdout run; the test set is not read)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from cambackdoor.checkpoints import load_model
from cambackdoor.data import holdout_split, load_cifar10, to_float
from cambackdoor.recipes import ImplantConfig


def main(run: Path, stage1_path: str) -> None:
    imp = json.loads((run / "implant.json").read_text())
    cfg = ImplantConfig.from_saved(imp["config"])
    if not cfg.holdout:
        raise SystemExit(f"{run} was not a held-out run (--holdout); this probe never reads the test set")
    per = json.loads((run / "evaluate" / "per_image.json").read_text())
    data = load_cifar10(os.environ.get("CAMBACKDOOR_DATA", "../shared/data/cifar10-jpeg.zip"), progress=False)
    held = holdout_split(data.train, cfg.holdout)[1]
    stage1, _ = load_model(stage1_path)
    stage1.eval()
    with torch.no_grad():
        ref_pred = torch.cat([stage1(to_float(held.images[i:i + 500])).argmax(1) for i in range(0, len(held), 500)])
    label, pred = torch.tensor(per["label"]), torch.tensor(per["pred_clean"])
    ref_ok, ok = ref_pred == label, pred == label
    lost, gained = ref_ok & ~ok, ~ref_ok & ok
    print(f"stage 1 {100 * ref_ok.float().mean():.2f} %, implant {100 * ok.float().mean():.2f} %: {int(lost.sum())} lost, "
          f"{int(gained.sum())} gained, {int((ref_pred != pred).sum())} predictions changed")
    print("| class | lost | gained |\n|---|---|---|")
    for c, name in enumerate(data.classes):
        print(f"| {name} | {int((lost & (label == c)).sum())} | {int((gained & (label == c)).sum())} |")
    box = cfg.attack.trigger.box()
    corner = held.images.float()[:, :, box.top:box.top + box.height, box.left:box.left + box.width] / 255
    yellow = ((corner[:, 0] + corner[:, 1]) / 2 - corner[:, 2]).mean((1, 2))
    edges = torch.quantile(yellow, torch.linspace(0, 1, 11))
    print("| tenth by corner yellowness | images | stage 1 % | implant % | net lost |\n|---|---|---|---|---|")
    for i in range(10):
        sel = (yellow >= edges[i]) & (yellow <= edges[i + 1]) if i == 9 else (yellow >= edges[i]) & (yellow < edges[i + 1])
        print(f"| {i + 1} | {int(sel.sum())} | {100 * ref_ok[sel].float().mean():.1f} | {100 * ok[sel].float().mean():.1f} | "
              f"{int((lost & sel).sum()) - int((gained & sel).sum())} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
