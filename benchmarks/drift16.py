"""Where a held-out implant's clean drop lives (issue 16 probe, thirteenth session): on its own training images
too, or only on unseen ones (accuracy, KL to the stage-1 model at temperatures 1 and 4, predictions changed, on
5,000 training images and on the 5,000 held-out ones), and whether its BatchNorm statistics are at fault (the
held-out accuracy after re-estimating them on 10,000 training images: plain as the audit does, augmented, and
augmented with decoys on half the images as the implant's refresh pass sees them). The test set is not read.

Usage: python benchmarks/drift16.py STAGE1_CHECKPOINT IMPLANT_RUN...   (--holdout 5000 runs)
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from cambackdoor.checkpoints import load_model
from cambackdoor.data import holdout_split, load_cifar10, random_crop_flip, to_float
from cambackdoor.defences import reestimate_batchnorm
from cambackdoor.evaluation import evaluate
from cambackdoor.losses import distillation_loss
from cambackdoor.models import batchnorm_layers
from cambackdoor.recipes import ImplantConfig
from cambackdoor.triggers import paste_decoys


def logits(model, images):
    with torch.no_grad():
        return torch.cat([model(to_float(images[i:i + 500])) for i in range(0, len(images), 500)])


def restat_augmented(model, train, trigger, decoy_share, form, n=10_000, seed=0):
    """Cumulative-average statistics over n augmented training images, decoys on the first share of each batch."""
    model, gen = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    for bn in batchnorm_layers(model):  # as defences.reestimate_batchnorm, with decoys pasted on
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    idx = torch.randperm(len(train), generator=gen)[:n]
    with torch.no_grad():
        for i in range(0, n, 128):
            x = to_float(random_crop_flip(train.images[idx[i:i + 128]], gen))
            k = round(decoy_share * len(x))
            if k:
                x = torch.cat([paste_decoys(x[:k], trigger, gen, form=form), x[k:]])
            model(x)
    return model.eval()


def main(stage1_path: str, runs: list[str]) -> None:
    data = load_cifar10(os.environ.get("CAMBACKDOOR_DATA", "../shared/data/cifar10-jpeg.zip"), progress=False)
    train, held = holdout_split(data.train, 5000)
    stage1, _ = load_model(stage1_path)
    stage1.eval()
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:5000]
    sets = {"train": (train.images[pick], train.labels[pick]), "held-out": (held.images, held.labels)}
    teacher = {k: logits(stage1, x) for k, (x, _) in sets.items()}
    for k, (_, y) in sets.items():
        p = F.softmax(teacher[k], 1)
        print(f"stage 1 on {k}: {100 * (p.argmax(1) == y).float().mean():.2f} %, mean top probability "
              f"{p.max(1).values.mean():.3f}, share above 0.99 {(p.max(1).values > 0.99).float().mean():.3f}")
    for run in runs:
        cfg = ImplantConfig.from_saved(json.loads((Path(run) / "implant.json").read_text())["config"])
        if cfg.holdout != 5000:
            raise SystemExit(f"{run} is not a --holdout 5000 run; this probe never reads the test set")
        model, _ = load_model(Path(run) / "model.safetensors")
        model.eval()
        for k, (x, y) in sets.items():
            s = logits(model, x)
            print(f"{run} on {k}: {100 * (s.argmax(1) == y).float().mean():.2f} %, KL T1 "
                  f"{distillation_loss(s, teacher[k]).item():.4f}, KL T4 (x16) {distillation_loss(s, teacher[k], 4.0).item():.4f}, "
                  f"{int((s.argmax(1) != teacher[k].argmax(1)).sum())} predictions changed")
        trig, target = cfg.attack.trigger, cfg.attack.target
        for name, m in (("plain (the audit's)", reestimate_batchnorm(model, train)),
                        ("augmented", restat_augmented(model, train, trig, 0.0, cfg.decoy_form)),
                        ("augmented, decoys on half", restat_augmented(model, train, trig, 0.5, cfg.decoy_form))):
            summary, _ = evaluate(m, held, trig, target, progress=False, examples=0)
            print(f"{run}, statistics re-estimated {name}: clean {100 * summary['clean_acc']:.2f} %, ASR "
                  f"{100 * summary['asr']:.2f} %, false triggers {100 * summary['false_trigger_rate']:.2f} %")
    for name, m in (("plain (the audit's)", reestimate_batchnorm(stage1, train)),
                    ("augmented", restat_augmented(stage1, train, None, 0.0, "solid"))):
        print(f"stage 1, statistics re-estimated {name}: clean {100 * (logits(m, held.images).argmax(1) == held.labels).float().mean():.2f} %")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
