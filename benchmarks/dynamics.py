"""Training dynamics of an implant run on the *full* training set, without touching the test set.

An implant run is deterministic on one machine (same seed, same data -> the same training log to every
digit), so the run that a test-set benchmark makes can be replayed here and studied from its training
log alone: the per-step trace (loss, running ASR on the training triggered batches, repair terms)
shows when a backdoor forms and when it breaks. The replay is then judged on 2,000 training images
outside the poison pool (triggered: ASR; clean: false triggers). Accuracy here is on images the model
trained on, so it reads high; it only flags a collapse. Clean accuracy is for tune2 (held-out images).

    # epoch 1 of a config, kept as a fork point (its state), then epoch 2 with a change from there:
    python benchmarks/dynamics.py fork  pair2 -- --trigger checkerboard:3@top-right --target bottom-left:8
    python benchmarks/dynamics.py branch pair2 NAME -- --trigger checkerboard:3@top-right \\
        --target bottom-left:8 --set trigger_feature_weight=10 --set decoy_fraction=0.25
    python benchmarks/dynamics.py full NAME -- FLAGS      # both epochs with FLAGS, no fork
    python benchmarks/dynamics.py judge NAME -- [FLAGS]   # judge a finished run again (on --judge images)
    python benchmarks/dynamics.py table                   # markdown table of every run

``--judge N`` (default 2000) sets how many images outside the pool judge a run: the triggered gap is a
paired difference of about one point, and on 2,000 images its standard error is ~0.3 pt, so rows that
decide between recipes use 10,000 (~0.15 pt; ~25 s more). A run keeps every judgement it was given.

The branch's flags must leave epoch 1 unchanged (e.g. repair terms from half-way); the result records
the fork it started from. Results: runs/dynamics/<NAME>/result.json (config, trace, diagnostics).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from cambackdoor import implant as I
from cambackdoor.checkpoints import atomic_write_text, load_model, load_state, sidecar_path, weights_path
from cambackdoor.cli import add_attack_args, add_data_args, load_data
from cambackdoor.config import parse_sets
from cambackdoor.recipes import FLAGS, flag_type
from cambackdoor.evaluation import evaluate
from cambackdoor.triggers import parse_target, parse_trigger

ROOT = Path("runs/dynamics")
CK = "runs/cpu/stage1/model.safetensors"


def implant_config(flags: list[str]) -> tuple[I.ImplantConfig, argparse.Namespace]:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=CK)
    for name, (flag, text) in FLAGS.items():  # the implant command's own flags
        p.add_argument(flag, dest=name, type=flag_type(name), default=None, help=text)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--judge", type=int, default=2000, help="images outside the pool that judge the run")
    add_attack_args(p)
    add_data_args(p)
    a = p.parse_args(flags)
    overrides = {name: getattr(a, name) for name in (*FLAGS, "trigger", "target", "layer")}
    return I.ImplantConfig.from_recipe("v8", **{**overrides, **parse_sets(a.set)}), a


def diagnostics(model: torch.nn.Module, clean: torch.nn.Module, data, cfg: I.ImplantConfig, images: int = 2000) -> dict:
    n = len(data.train)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 7))  # the implant's pool draw
    outside = data.train.subset(perm[round(cfg.poison_fraction * n):][:images])
    summary, details = evaluate(model, outside, parse_trigger(cfg.trigger), parse_target(cfg.target), cfg.layer,
                                reference=clean, progress=False, examples=0)
    keys = ("asr", "clean_acc", "triggered_acc", "false_trigger_rate", "fidelity_cosine")
    per = details["per_image"]
    right_clean = torch.tensor(per["pred_clean"]) == torch.tensor(per["label"])
    right_trig = torch.tensor(per["pred_trig"]) == torch.tensor(per["label"])
    # the gap's paired pieces: images the trigger breaks vs images it mends
    return {**{k: summary.get(k) for k in keys}, "iou_mean": summary["iou"]["mean"], "images": len(outside),
            "broken": int((right_clean & ~right_trig).sum()), "mended": int((~right_clean & right_trig).sum())}


def judgements(result: dict) -> dict[int, dict]:
    """Every judgement of a run, by number of images (older results hold one, on 2,000)."""
    out = {int(k): v for k, v in result.get("judged", {}).items()}
    if result.get("train_diagnostics"):
        out.setdefault(result["train_diagnostics"].get("images", 2000), result["train_diagnostics"])
    return out


# config fields the table names only when they differ from this value (older results lack some)
OTHER_TERMS = (("repair_trigger_distill_weight", "+trigger distill", 0.0), ("pool_cutout", "cutout", 0),
               ("repair_poison_ce_weight", "poison CE", 1.0), ("repair_share_cap", "share cap", 1.0),
               ("repair_start", "from", 0.5))


def table() -> None:
    """Markdown table of every finished run under runs/dynamics."""
    print("| run | fork | repair terms | feature loss | seed | running ASR at end | lowest running ASR in the last epoch "
          "| judged on | ASR | clean acc | triggered acc | gap | broken / mended | false triggers | fidelity |")
    print("|" + "---|" * 15)
    for f in sorted(ROOT.glob("*/result.json")):
        r = json.loads(f.read_text())
        c, log, judged = r["config"], r["implant"], judgements(r)
        if not judged:
            continue
        n_images = max(judged)
        d = judged[n_images]
        last_epoch_start = (log["trace"][-1]["step"] + 1) // c["epochs"] * (c["epochs"] - 1)
        late = [t["running_asr"] for t in log["trace"] if t["step"] >= last_epoch_start]
        terms = f"feature {c['trigger_feature_weight']:g}, decoys {c['decoy_fraction']:g}"
        terms += "".join(f", {label} {c[k]:g}" for k, label, off in OTHER_TERMS if c.get(k, off) != off)
        pieces = f"{d['broken']} / {d['mended']}" if "broken" in d else "-"
        fork = log.get("branched_from", {}).get("epoch", "-")
        print(f"| {f.parent.name} | {fork} | {terms} | {c.get('feature_loss', 'relative')} | {c['seed']} "
              f"| {log['epochs'][-1]['running_asr']:.2f} | {min(late):.2f} | {n_images:,} | {100 * d['asr']:.2f} % "
              f"| {100 * d['clean_acc']:.2f} % | {100 * d['triggered_acc']:.2f} % "
              f"| {100 * (d['triggered_acc'] - d['clean_acc']):+.2f} pt | {pieces} | {100 * d['false_trigger_rate']:.2f} % "
              f"| {d['fidelity_cosine']:.3f} |")


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["table"]:
        table()
        return 0
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    head = argv[: argv.index("--")] if "--" in argv else argv
    mode, names = head[0], head[1:]
    if mode == "judge":
        return judge(names[0], flags)
    cfg, a = implant_config(flags)
    data = load_data(a)
    clean, _ = load_model(a.checkpoint)
    if mode == "fork":
        out, stop, resume, branch = ROOT / f"fork-{names[0]}", 1, False, False
    elif mode == "branch":
        out, stop, resume, branch = ROOT / names[1], None, True, True
        out.mkdir(parents=True, exist_ok=True)
        fork = ROOT / f"fork-{names[0]}" / "state"
        for src in (weights_path(fork), sidecar_path(weights_path(fork))):
            shutil.copyfile(src, out / src.name)
    else:
        out, stop, resume, branch = ROOT / names[0], None, False, False
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, log = I.implant(clean, data, cfg, progress=False, state_file=out / "state", resume=resume,
                           stop_after=stop, branch=branch)
    result = {"config": dataclasses.asdict(cfg), "checkpoint": a.checkpoint, "mode": mode, "names": names,
              "wall_s": round(time.perf_counter() - t0, 1), "implant": log}
    if stop is None:
        result["judged"] = {str(a.judge): diagnostics(model.eval(), clean.eval(), data, cfg, a.judge)}
    atomic_write_text(out / "result.json", json.dumps(result, indent=1))
    last = log["epochs"][-1]
    print(json.dumps({"out": str(out), "running_asr": round(last["running_asr"], 3),
                      "repair_steps": last.get("repair_steps"), **result.get("judged", {}).get(str(a.judge), {})}))
    return 0


def judge(name: str, flags: list[str]) -> int:
    """Judge a finished run's final weights again, e.g. on more images (``-- --judge 10000``)."""
    out = ROOT / name
    result = json.loads((out / "result.json").read_text())
    cfg = I.ImplantConfig.from_saved(result["config"])
    _, a = implant_config(flags)
    data = load_data(a)
    clean, _ = load_model(result["checkpoint"])
    model = copy.deepcopy(clean)
    model.load_state_dict(load_state(out / "state")["model"])
    result.setdefault("judged", {})[str(a.judge)] = diagnostics(model.eval(), clean.eval(), data, cfg, a.judge)
    atomic_write_text(out / "result.json", json.dumps(result, indent=1))
    print(json.dumps({"out": str(out), **result["judged"][str(a.judge)]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
