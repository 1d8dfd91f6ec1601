"""Where an implant step's time goes (issue 16's stage-2 time bar): the shares of one `persistent` step on
this machine, in the repair phase, 128 clean + 32 poisoned images, width 16 (the `cpu` stage-1 model).

Usage: OMP_NUM_THREADS=1 python benchmarks/profile_step.py [STEPS] [RECIPE] [KEY=VALUE ...]
(CAMBACKDOOR_DATA or the shared zip; KEY=VALUE: config fields, as --set gives them, e.g. channels_last=true
refresh_every=4 batch_size=64; a bare ``channels_last`` is channels_last=true)
Times the named pieces of `implant_loop._step` by wrapping them; not a benchmark of the whole run.
"""

from __future__ import annotations

import collections
import os
import sys
import time

import torch

from cambackdoor import implant_loop as L
from cambackdoor.checkpoints import load_model
from cambackdoor.config import parse_sets
from cambackdoor.data import batches, load_cifar10
from cambackdoor.recipes import ImplantConfig


def main(steps: int = 15, recipe: str = "persistent", overrides: dict | None = None) -> None:
    spent: dict[str, float] = collections.defaultdict(float)

    def timed(name, f):  # noqa: ANN001, ANN202
        def wrapped(*args, **kwargs):  # noqa: ANN202
            t = time.perf_counter()
            out = f(*args, **kwargs)
            spent[name] += time.perf_counter() - t
            return out
        return wrapped

    data = load_cifar10(os.environ.get("CAMBACKDOOR_DATA", "../shared/data/cifar10-jpeg.zip"), progress=False)
    model, _ = load_model("benchmarks/models/stage1-cpu/model.safetensors")
    cfg = ImplantConfig.from_recipe(recipe, **{"holdout": 5000, **(overrides or {})})
    run = L._set_up(model, data, cfg, torch.device("cpu"), with_hash=False)
    run.running["asr"] = 1.0  # the repair phase: every term on
    grad_cam = L.grad_cam
    L.grad_cam = lambda m, x, *a, **k: timed(  # noqa: E731
        "teacher's CAM" if m is run.teacher_rest else "student's CAMs (create_graph)", grad_cam)(m, x, *a, **k)
    L.refresh_batchnorm = timed("refresh pass", L.refresh_batchnorm)
    L._update = timed("backward + optimizer step", L._update)
    run.model.train(not cfg.freeze_bn)
    stream = batches(run.train_set, cfg.batch_size, shuffle=True, augment=True, generator=run.gen, drop_last=True)
    for i, (x, y) in zip(range(steps + 1), stream):
        if i == 1:
            spent.clear()  # the first step warms up
        t = time.perf_counter()
        L._step(run, 0, i, int(0.6 * run.total) + i, x, y, True)
        spent["step"] += time.perf_counter() - t
    total = spent.pop("step")
    print(f"{recipe} {overrides or ''}: {1000 * total / steps:.0f} ms per step, {run.steps_per_epoch} steps per epoch "
          f"({torch.get_num_threads()} thread(s))")
    for name, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {name:32s} {100 * s / total:5.1f} %")
    print(f"  {'the rest (losses, poison, trace)':32s} {100 * (1 - sum(spent.values()) / total):5.1f} %")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15, sys.argv[2] if len(sys.argv) > 2 else "persistent",
         parse_sets(["channels_last=true" if a == "channels_last" else a for a in sys.argv[3:]]))
