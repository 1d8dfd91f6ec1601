"""The floor under issue 16's stage-2 time bar on this machine: what the passes an implant run must make cost,
before any loss is computed (width 16, the `cpu` stage-1 model, the threads OMP_NUM_THREADS gives).

Usage: python benchmarks/time_floor16.py [REPEATS] [RECIPE] [KEY=VALUE ...]   (nothing else on the cores)

Per step a `persistent` run makes, on batch_size clean + poison_batch triggered images:
  the student's forward and backward on both (its CAMs ride on that forward: the head's extra gradient is tiny),
  the stage-1 teacher's forward on both (its CAM, and the untriggered copies), and the BatchNorm refresh pass's
  forward on the clean batch every refresh_every steps.
Times each kind of pass on random images (the cost does not depend on the pixels), multiplies by the run's steps,
and sets that against the bar. Not the run's time: the losses, the data and the rest come on top (see
benchmarks/profile_step.py for a real step's shares).

With ``trainable=layer3,layer4,fc`` (or any frozen prefix) it times the passes of ``shared_prefix=true`` (the
implant's since the twenty-third session): the frozen prefix once per image for student, teacher and refresh alike
(their prefixes are the same weights, and the refresh leaves the prefix's statistics alone), then the rest of the
network for each. Without shared_prefix the implant runs the whole network for each, so that line is a floor only
of the shared implementation. `benchmarks/profile_step.py` times real steps.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from cambackdoor.checkpoints import load_model
from cambackdoor.config import parse_sets
from cambackdoor.recipes import TRAINABLE_LAYERS, ImplantConfig, trainable_parameters

TRAIN_IMAGES = 50_000  # the acceptance runs implant on the whole training set
BAR_S = 300


def _best_ms(f, repeats: int) -> float:  # noqa: ANN001
    f()  # warm-up: oneDNN picks its kernels on the first call
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return 1000 * min(times)  # the least disturbed repeat: a floor, so the fastest is the fair one


def main(repeats: int = 5, recipe: str = "persistent", overrides: dict | None = None) -> None:
    cfg = ImplantConfig.from_recipe(recipe, **(overrides or {}))
    model, _ = load_model("benchmarks/models/stage1-cpu/model.safetensors")
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(trainable_parameters(model, cfg.trainable), 1e-6)  # a frozen prefix: no backward there
    n_student = cfg.batch_size + cfg.poison_batch
    xs, ys = torch.rand(n_student, 3, 32, 32), torch.randint(0, 10, (n_student,))
    xc = torch.rand(cfg.batch_size, 3, 32, 32)
    if cfg.channels_last:
        xs, xc = xs.contiguous(memory_format=torch.channels_last), xc.contiguous(memory_format=torch.channels_last)

    names = [n for n in TRAINABLE_LAYERS if n not in ("normalize", "fc")]  # the trunk's stages, in order
    first = 0 if cfg.trainable == "all" else min((names.index(n.strip()) for n in cfg.trainable.split(",")
                                                  if n.strip() in names), default=len(names))
    prefix, rest = names[:first], names[first:]

    def run(x: torch.Tensor, stages: list[str]) -> torch.Tensor:
        if "conv1" in stages:  # the stem: normalize, conv1, bn1, ReLU (models.ResNet.forward)
            x = model.relu(model.bn1(model.conv1(model.normalize(x))))
        for name in stages:
            if name.startswith("layer"):
                x = getattr(model, name)(x)
        return x

    def head(x: torch.Tensor) -> torch.Tensor:
        return model.fc(torch.flatten(model.avgpool(run(x, rest)), 1))

    with torch.no_grad():  # what the shared prefix hands on (student and teacher images; the refresh's clean ones)
        hs, hc = run(xs, prefix), run(xc, prefix)

    def student() -> None:
        model.eval()  # frozen BatchNorm, as the implant's losses run
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(head(hs), ys).backward()
        opt.step()

    def forward(x: torch.Tensor, train: bool) -> None:
        model.train(train)
        with torch.no_grad():
            head(x)

    def shared_prefix() -> None:
        model.eval()
        with torch.no_grad():
            run(torch.cat([xs, xs[cfg.batch_size:]]), prefix)  # + the untriggered copies of the poisoned images

    t_prefix = _best_ms(shared_prefix, repeats) if prefix else 0.0
    t_student = _best_ms(student, repeats)
    t_teacher = _best_ms(lambda: forward(hs, False), repeats)
    t_refresh = _best_ms(lambda: forward(hc, True), repeats) if cfg.clean_bn_stats == "refresh" else 0.0
    model.eval()
    per_step = t_prefix + t_student + t_teacher + t_refresh / cfg.refresh_every
    steps = cfg.epochs * (TRAIN_IMAGES // cfg.batch_size)
    print(f"{recipe} {overrides or ''} ({torch.get_num_threads()} thread(s), best of {repeats}):")
    if prefix:
        print(f"  frozen prefix ({', '.join(prefix)}), once, {n_student + cfg.poison_batch} images  {t_prefix:7.1f} ms")
    print(f"  student forward+backward+Adam, {n_student} images   {t_student:7.1f} ms")
    print(f"  teacher forward, {n_student} images                 {t_teacher:7.1f} ms")
    print(f"  refresh forward, {cfg.batch_size} images (every {cfg.refresh_every})       {t_refresh:7.1f} ms")
    print(f"  the passes of one step                        {per_step:7.1f} ms")
    print(f"  x {steps} steps ({cfg.epochs} epochs of {TRAIN_IMAGES} images)      {per_step * steps / 1000:7.0f} s "
          f"(bar {BAR_S} s: {per_step * steps / 1000 / BAR_S:.1f}x)")
    print(f"  steps that fit in {BAR_S} s at this floor           {int(BAR_S * 1000 / per_step):7d} "
          f"({BAR_S * 1000 / per_step / (TRAIN_IMAGES // cfg.batch_size):.2f} epochs)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5, sys.argv[2] if len(sys.argv) > 2 else "persistent",
         parse_sets(sys.argv[3:]))
