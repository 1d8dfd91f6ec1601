"""Replay the first epoch(s) of one registration-6 implant (MT4t, `cpu` stage-1 model, all 50,000 training images)
on the training data only, with each update's gradient norm recorded, to study the collapse of pair 2 seed 2
(docs/results.md). No test image is read: the run stops after STOP epochs and is never evaluated.

Usage: python benchmarks/collapse16.py NAME PAIR SEED STOP [CLIP] [KEY=VALUE ...]
  PAIR 1-4 as in docs/protocol.md; CLIP > 0: the whole gradient's norm is clipped there before each Adam step
  (torch.nn.utils.clip_grad_norm_, what the library's later `grad_clip` does; done here so that the norm before
  the clip is recorded, so leave grad_clip off); KEY=VALUE: more config fields.
Writes runs/collapse16/NAME.json (the trace and the per-step norms) and prints the steps around the peak rate.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from cambackdoor import implant_loop
from cambackdoor.checkpoints import load_model
from cambackdoor.config import parse_sets
from cambackdoor.data import load_cifar10
from cambackdoor.recipes import ImplantConfig

MT4T = dict(repair_distill_weight=5, trigger_feature_weight=0, decoy_form="trigger", decoy_fraction=0.5, lr_width=16,
            clean_share_weight=50, repair_share_cap=0.45, distill_temperature=4, trigger_distill_temperature=4)
PAIRS = {1: ("yellow:4@bottom-right", "top-left:8"), 2: ("checkerboard:3@top-right", "bottom-left:8"),
         3: ("checkerboard:4@bottom-left~0.5", "top-right:8"), 4: ("blue:3@top-left", "bottom-right:8")}


def main(name: str, pair: int, seed: int, stop: int, clip: float = 0.0, extra: dict | None = None) -> None:
    norms: list[float] = []
    real = implant_loop.make_optimizer

    def make(params, cfg):  # noqa: ANN001, ANN202
        opt, params = real(params, cfg), list(params)
        step = opt.step

        def measured_step(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            total = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
            norms.append(float(total))
            return step(*args, **kwargs)
        opt.step = measured_step
        return opt
    implant_loop.make_optimizer = make

    trigger, target = PAIRS[pair]
    cfg = ImplantConfig.from_recipe("persistent", **MT4T, trigger=trigger, target=target, seed=seed, **(extra or {}))
    data = load_cifar10(os.environ.get("CAMBACKDOOR_DATA", "../shared/data/cifar10-jpeg.zip"),
                        cache_dir=os.environ.get("CAMBACKDOOR_CACHE"), progress=False)
    model, _ = load_model("benchmarks/models/stage1-cpu/model.safetensors")
    t = time.perf_counter()
    _, log = implant_loop.implant(model, data, cfg, progress=False, stop_after=stop)
    out = Path("runs/collapse16") / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pair": pair, "seed": seed, "stop": stop, "clip": clip, "extra": extra or {},
                               "seconds": round(time.perf_counter() - t, 1), "grad_norms": norms,
                               "trace": log["trace"], "epochs": log["epochs"]}))
    tmp.replace(out)
    print(f"{name}: {len(norms)} steps in {time.perf_counter() - t:.0f} s; grad norm median "
          f"{sorted(norms)[len(norms) // 2]:.2f}, max {max(norms):.2f} at step {norms.index(max(norms))}")
    for row in log["trace"]:
        if 250 <= row["step"] <= 400:
            print(f"  step {row['step']:4d} lr {row['lr']:.5f} loss {row['loss']:7.3f} running ce "
                  f"{row['running_ce']:.3f} asr {row['running_asr']:.3f} | norms "
                  + " ".join(f"{n:.1f}" for n in norms[row["step"]:row["step"] + 10]))


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], int(a[1]), int(a[2]), int(a[3]), float(a[4]) if len(a) > 4 else 0.0, parse_sets(a[5:]))
