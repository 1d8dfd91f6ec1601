"""Where an implant's clean drop falls (issue 16, any trigger, several runs at once; churn16.py looks at one
run of the yellow trigger). Per run, on the 5,000 held-out images of a --holdout 5000 run: the images stage 1
got right and the implant wrong (lost) and the reverse (gained),
- by quintile of how much the trigger's box already looks like the trigger (the mean absolute change the
  trigger makes there; nearest first): a trigger that collides with natural corners (blue sky top-left, for a
  blue patch) would lose most in the first quintile;
- by class (the three largest net losses);
- and the held-out accuracy after a re-fit of the classifier's bias alone (10 numbers, KL to stage 1 on 10,000
  of the run's training images): the bias does not enter Grad-CAM (d score / d features is the weight row), so
  this is what a shift of the class priors costs, recoverable without touching the backdoor's map.
Then how many lost images two runs share, for runs of the same pair (other seeds) and of other pairs.

Usage: python benchmarks/corner16.py STAGE1_CHECKPOINT RUN_DIR...   (data from CAMBACKDOOR_DATA)
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cambackdoor.checkpoints import load_model
from cambackdoor.data import CLASSES, holdout_split, load_cifar10
from cambackdoor.triggers import parse_trigger
from drift16 import logits  # this folder's: a model's logits on uint8 images, in chunks, without gradients

QUINTILES = 5


def likeness(spec: str, images: torch.Tensor) -> torch.Tensor:
    """Per uint8 image, the mean absolute change ``spec``'s trigger makes to its box."""
    trigger = parse_trigger(spec)
    b = trigger.box()
    region = images[:, :, b.top : b.bottom, b.left : b.right].float() / 255
    return (trigger.blend * (trigger.patch() - region)).abs().flatten(1).mean(1)


def bias_refit(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The offset of the classifier's bias that brings ``student``'s logits closest to ``teacher``'s (KL, T 1)."""
    d = torch.zeros(student.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([d], max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.kl_div(F.log_softmax(student + d, 1), F.log_softmax(teacher, 1), log_target=True, reduction="batchmean")
        loss.backward()
        return loss

    opt.step(closure)
    return d.detach()


def main(stage1_path: str, runs: list[Path]) -> None:
    data = load_cifar10(os.environ.get("CAMBACKDOOR_DATA", "../shared/data/cifar10-jpeg.zip"), progress=False)
    train, held = holdout_split(data.train, 5000)
    fit = train.images[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:10_000]]
    stage1, _ = load_model(stage1_path)
    stage1.eval()
    teacher_fit = logits(stage1, fit)
    head = " | ".join(f"q{i + 1}" for i in range(QUINTILES))
    print(f"| run | trigger | clean drop pt | lost / gained | {head} | net lost by class (largest three) | "
          "clean % after a bias re-fit (as saved) |")
    print("|---" * (6 + QUINTILES) + "|")
    lost_by_run, trigger_by_run = {}, {}
    for run in runs:
        spec = json.loads((run / "implant.json").read_text())["config"]["trigger"]
        out = load_file(str(run / "audit" / "outcomes.safetensors"))
        ref, new = out["reference (stage 1)/clean_correct"].bool(), out["model/clean_correct"].bool()
        if len(ref) != len(held):
            raise SystemExit(f"{run}: {len(ref)} outcomes, not the 5,000 held-out images of --holdout 5000")
        lost, gained = ref & ~new, ~ref & new
        lost_by_run[run.name], trigger_by_run[run.name] = lost, spec
        cells = []
        for part in likeness(spec, held.images).argsort().chunk(QUINTILES):
            net = int(lost[part].sum()) - int(gained[part].sum())
            cells.append(f"{int(lost[part].sum())}/{int(gained[part].sum())} ({100 * net / len(part):+.1f})")
        by_class = torch.zeros(len(CLASSES), dtype=torch.long).index_add_(0, held.labels, lost.long() - gained.long())
        top = by_class.argsort(descending=True)[:3]
        model, _ = load_model(run / "model.safetensors")
        model.eval()
        d = bias_refit(logits(model, fit), teacher_fit)
        held_logits = logits(model, held.images)
        refit, saved = ((100 * (z.argmax(1) == held.labels).float().mean().item()) for z in (held_logits + d, held_logits))
        print(f"| {run.name} | `{spec}` | {100 * (int(lost.sum()) - int(gained.sum())) / len(ref):.2f} | "
              f"{int(lost.sum())} / {int(gained.sum())} | " + " | ".join(cells) + " | "
              + ", ".join(f"{CLASSES[i]} {int(by_class[i]):+d}" for i in top)
              + f" | {refit:.2f} ({saved:.2f}) |")
    same, other = [], []
    for a, b in itertools.combinations(lost_by_run, 2):
        share = int((lost_by_run[a] & lost_by_run[b]).sum()) / min(int(lost_by_run[a].sum()), int(lost_by_run[b].sum()))
        (same if trigger_by_run[a] == trigger_by_run[b] else other).append(share)
    for name, shares in (("same trigger", same), ("other triggers", other)):
        if shares:
            print(f"lost images two runs share ({name}, {len(shares)} pairs of runs): mean {100 * sum(shares) / len(shares):.0f} % "
                  f"of the smaller run's, {100 * min(shares):.0f}-{100 * max(shares):.0f} %")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], [Path(p) for p in sys.argv[2:]])
