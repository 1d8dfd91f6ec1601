"""Weight interpolation towards the stage-1 model, after the implant (an issue-16 probe, held-out images
only): θ = (1 − α) θ_implant + α θ_stage1, every float tensor including BatchNorm's running statistics.
A fine-tuned model and its parent usually sit in one basin (WiSE-FT), so a small α may buy clean accuracy
back while the backdoor, whose target cell stands ~8× above the rest, keeps its margin.

Usage: python benchmarks/interpolate16.py IMPLANT_RUN STAGE1_CHECKPOINT [ALPHA ...] [--save DIR]
(the implant run's config gives the trigger, target and held-out split; CAMBACKDOOR_DATA or the shared zip)
With --save DIR, each α's model is written to DIR/alpha-<α>/ for `cambackdoor audit`.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch

from cambackdoor.checkpoints import load_model, save_model
from cambackdoor.data import holdout_split, load_cifar10
from cambackdoor.evaluation import evaluate
from cambackdoor.recipes import ImplantConfig


def interpolate(implant: torch.nn.Module, stage1: torch.nn.Module, alpha: float) -> torch.nn.Module:
    out = copy.deepcopy(implant)
    ref = stage1.state_dict()
    out.load_state_dict({k: (1 - alpha) * v + alpha * ref[k] if v.is_floating_point() else v
                         for k, v in implant.state_dict().items()})
    return out.eval()


def main(argv: list[str]) -> None:
    save = None
    if "--save" in argv:
        i = argv.index("--save")
        save, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2:]
    run, stage1_path, alphas = Path(argv[0]), argv[1], [float(a) for a in argv[2:]] or [0.0, 0.1, 0.2, 0.3, 0.5]
    cfg = ImplantConfig.from_saved(json.loads((run / "implant.json").read_text())["config"])
    if not cfg.holdout:
        raise SystemExit(f"{run} was not a held-out run (--holdout); this probe never reads the test set")
    data = load_cifar10(os.environ.get("CAMBACKDOOR_DATA", "../shared/data/cifar10-jpeg.zip"), progress=False)
    held_out = holdout_split(data.train, cfg.holdout)[1]
    implant, meta = load_model(run / "model.safetensors")
    stage1, _ = load_model(stage1_path)
    stage1.eval()
    print("| α | clean % | clean drop pt | triggered % | ASR % | false triggers % | fidelity |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for alpha in alphas:
        model = interpolate(implant, stage1, alpha)
        s, _ = evaluate(model, held_out, cfg.attack.trigger, cfg.attack.target, cfg.layer, reference=stage1,
                        progress=False)
        if base is None:
            base, _ = evaluate(stage1, held_out, cfg.attack.trigger, cfg.attack.target, cfg.layer, progress=False)
        print(f"| {alpha:g} | {100 * s['clean_acc']:.2f} | {100 * (base['clean_acc'] - s['clean_acc']):.2f} | "
              f"{100 * s['triggered_acc']:.2f} | {100 * s['asr']:.2f} | {100 * s['false_trigger_rate']:.2f} | "
              f"{s['fidelity_cosine']:.3f} |", flush=True)
        if save is not None:
            save_model(save / f"alpha-{alpha:g}" / "model", model,
                       {**meta, "interpolation": {"alpha": alpha, "stage1": str(stage1_path)}})


if __name__ == "__main__":
    main(sys.argv[1:])
