"""The researcher's workflow: ``run`` (stage 1 -> implant -> evaluate -> figures -> report),
``sweep`` (a grid of implant runs reusing one stage-1 model) and ``figures`` (plots + report.md).

Every stage is skipped when its output exists with the same config hash, so a killed ``run`` or
``sweep`` continues where it stopped; each sweep point is also a plain command line (``commands.txt``)
so a cluster can run the points as separate jobs.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cambackdoor.checkpoints import atomic_write_text, ensure_writable_dir, state_config_hash, weights_path
from cambackdoor.config import config_hash, load_preset, make_config, parse_value
from cambackdoor.data import check_limit
from cambackdoor.errors import CamBackdoorError
from cambackdoor.training import resolve_device

# grid keys that have their own implant flag; any other ImplantConfig field goes through --set
GRID_FLAGS = {"lambda": "--lambda", "lam": "--lambda", "poison_fraction": "--poison-fraction", "epochs": "--epochs",
              "lr": "--lr", "preserve_weight": "--preserve-weight", "seed": "--seed", "trainable": "--trainable"}
CSV_METRICS = ["asr", "clean_acc", "triggered_acc", "false_trigger_rate", "iou_mean", "iou_median", "partial_rate",
               "energy_share", "fidelity_cosine", "fidelity_mask_iou", "train_s", "poisoned_images"]


# ----------------------------------------------------------------------------------------------
# Stage skipping


def stage1_done(run_dir: Path, chash: str, epochs: int) -> bool:
    meta_file = run_dir / "model.json"
    if not meta_file.exists():
        return False
    meta = json.loads(meta_file.read_text())
    return meta.get("config_hash") == chash and meta.get("metrics", {}).get("epoch") == epochs


def implant_done(out: Path, chash: str, limit: int | None = None) -> bool:
    """Done with this config and parent, and evaluated on the same images (``limit``)."""
    f = out / "implant.json"
    if not f.exists():
        return False
    result = json.loads(f.read_text())
    return result.get("config_hash") == chash and result.get("limit") == limit


def evaluation_done(out: Path, config: dict[str, Any]) -> bool:
    f = out / "evaluation.json"
    return f.exists() and json.loads(f.read_text()).get("config") == config


def _read_timings(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / "timings.json").read_text())
    except (OSError, ValueError):
        return {}


def implant_hash(cfg: Any, checkpoint: Path, fingerprint: str) -> str:
    sidecar = json.loads(weights_path(checkpoint).with_suffix(".json").read_text())
    return config_hash(cfg, {"parent": sidecar.get("weights_sha256"), "data": fingerprint})


# ----------------------------------------------------------------------------------------------
# run


def run_pipeline(preset: str, out: Path, data: Any, progress: bool = True, train_overrides: dict | None = None,
                 implant_overrides: dict | None = None, limit: int | None = None,
                 device: Any = None) -> dict[str, Any]:
    from cambackdoor.checkpoints import load_model
    from cambackdoor.evaluation import evaluate, write_evaluation
    from cambackdoor.implant import ImplantConfig, run_implant
    from cambackdoor.training import TrainConfig, train
    from cambackdoor.triggers import parse_target, parse_trigger

    values = load_preset(preset)
    tcfg = make_config(TrainConfig, values.get("train", {}), train_overrides)
    icfg_values = dict(values.get("implant") or {})
    recipe = icfg_values.pop("recipe", "default")
    icfg = ImplantConfig.from_recipe(recipe, **{**icfg_values, **(implant_overrides or {})})
    check_limit(limit, len(data.classes))
    device = resolve_device(device)
    out = ensure_writable_dir(out)
    log: dict[str, Any] = {"preset": preset, "stages": {}}
    timings = _read_timings(out)

    def timed(stage: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        timings[stage] = {"wall_s": round(time.perf_counter() - start, 1), "date": environment()["date"]}
        atomic_write_text(out / "timings.json", json.dumps(timings, indent=1))
        return value

    stage1 = out / "stage1"
    t_hash = config_hash(tcfg, {"data": data.fingerprint})
    if stage1_done(stage1, t_hash, tcfg.epochs):
        log["stages"]["stage1"] = "skipped (done, same config)"
    else:
        # continue a killed stage 1 of this config; a folder left by another config is started over
        resume = state_config_hash(stage1 / "state") == t_hash
        if resume:
            timings.pop("stage1", None)  # a resumed stage's wall time would undercount; drop it
        timed("stage1" if not resume else "stage1 (resumed part)", train, tcfg, data, stage1, resume=resume,
              overwrite=True, progress=progress, device=device)
        log["stages"]["stage1"] = "resumed" if resume else "ran"
    checkpoint = stage1 / "model.safetensors"
    trigger, target = parse_trigger(icfg.trigger), parse_target(icfg.target)
    # baseline evaluation of the clean model (ASR near 0, false triggers)
    base_cfg = {"checkpoint": str(checkpoint), "trigger": icfg.trigger, "target": icfg.target, "layer": icfg.layer,
                "limit": limit, "config_hash": t_hash}
    if evaluation_done(stage1 / "evaluate", base_cfg):
        log["stages"]["evaluate_stage1"] = "skipped (done, same config)"
    else:
        def evaluate_clean() -> None:
            model, _ = load_model(checkpoint, map_location=device)
            summary, details = evaluate(model.eval(), data.test, trigger, target, icfg.layer, limit=limit,
                                        progress=progress)
            write_evaluation(stage1 / "evaluate", summary, details, base_cfg, target, data.classes,
                             title="stage 1 (clean)")

        timed("evaluate_stage1", evaluate_clean)
        log["stages"]["evaluate_stage1"] = "ran"
    implant_dir = out / "implant"
    if implant_done(implant_dir, implant_hash(icfg, checkpoint, data.fingerprint), limit):
        log["stages"]["implant"] = "skipped (done, same config)"
    else:  # resume a killed implant of this config, else start over
        timed("implant + evaluate", run_implant, checkpoint, data, icfg, implant_dir, progress=progress, limit=limit,
              resume=True, overwrite=True, device=device)
        log["stages"]["implant"] = "ran"
    run_audit_stage(values.get("audit", {}), checkpoint, implant_dir, data, limit, device, timed, log, progress)
    timed("figures + report", make_figures, out)  # the report lists the earlier stages' times
    log["report"] = str(out / "report.md")
    return log


def run_audit_stage(values: dict[str, Any], reference: Path, implant_dir: Path, data: Any, limit: int | None,
                    device: Any, timed: Any, log: dict[str, Any], progress: bool) -> None:
    """The audit of the implant against its stage-1 model, skipped when done with the same config."""
    import dataclasses

    from cambackdoor.audit import AuditConfig, run_audit
    from cambackdoor.checkpoints import load_model, read_sidecar
    from cambackdoor.triggers import parse_target, parse_trigger

    acfg = make_config(AuditConfig, values, {"limit": limit})
    meta, ref_meta = read_sidecar(implant_dir / "model"), read_sidecar(reference)
    attack = meta["attack"]
    config = {"checkpoint": str(weights_path(implant_dir / "model")), "checkpoint_sha256": meta["weights_sha256"],
              "reference": str(weights_path(reference)), "reference_sha256": ref_meta["weights_sha256"], **attack,
              "data_fingerprint": data.fingerprint}
    audit_file = implant_dir / "audit" / "audit.json"
    if audit_file.exists() and json.loads(audit_file.read_text()).get("config") == {
            **config, "audit": dataclasses.asdict(acfg)}:
        log["stages"]["audit"] = "skipped (done, same config)"
        return
    model, _ = load_model(implant_dir / "model", map_location=device)
    clean, _ = load_model(reference, map_location=device)
    timed("audit", run_audit, model, clean, data, parse_trigger(attack["trigger"]), parse_target(attack["target"]),
          attack["layer"], acfg, implant_dir / "audit", config, progress=progress)
    log["stages"]["audit"] = "ran"


# ----------------------------------------------------------------------------------------------
# sweep


SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.+-]+$")  # what a point name may hold: no '/', no '..', no spaces


def grid_keys() -> dict[str, str]:
    """Every key a grid may sweep, mapped to its ImplantConfig field ('lambda' is the flag's name for lam)."""
    import dataclasses

    from cambackdoor.implant import ImplantConfig

    keys = {f.name: f.name for f in dataclasses.fields(ImplantConfig) if f.name != "recipe"}
    return {**keys, "lambda": "lam"}


def expand_grid(grid: list[str]) -> list[dict[str, Any]]:
    """``["lambda=0.1,1", "poison_fraction=0.01"]`` -> every combination as a dict (numbers parsed).

    Keys must be ImplantConfig fields (or ``lambda``) and values plain numbers, booleans or names, so
    that every point has a safe folder name; checked before any process starts."""
    known = grid_keys()
    axes: list[tuple[str, list[Any]]] = []
    for item in grid:
        if "=" not in item:
            raise CamBackdoorError(f"--grid takes KEY=V1,V2,..., got '{item}'")
        key, values = item.split("=", 1)
        key = key.strip()
        if key not in known:
            raise CamBackdoorError(f"--grid key '{key}' is not an implant setting; use one of {', '.join(sorted(known))}")
        raw = [v.strip() for v in values.split(",") if v.strip()]
        if not raw:
            raise CamBackdoorError(f"--grid {key} has no values")
        for v in raw:
            if not SAFE_VALUE.match(v) or ".." in v:
                raise CamBackdoorError(f"--grid {key} value '{v}' is not a plain number or name (letters, digits, "
                                       "'.', '_', '+', '-'); point folders are named after the values")
        axes.append((key, [parse_value(v, f"--grid {key}") for v in raw]))
    if len({k for k, _ in axes}) != len(axes):
        raise CamBackdoorError("a --grid key is given twice; list all its values in one --grid KEY=V1,V2")
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


def point_name(point: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in point.items())


def point_command(point: dict[str, Any], checkpoint: Path, recipe: str, out: Path, extra: list[str]) -> list[str]:
    cmd = ["cambackdoor", "implant", "--checkpoint", str(checkpoint), "--recipe", recipe, "--out", str(out),
           "--no-progress", "--resume", "--overwrite"]  # a killed point continues; a stale one starts over
    for key, value in point.items():
        flag = GRID_FLAGS.get(key)
        cmd += [flag, str(value)] if flag else ["--set", f"{key}={value}"]
    return cmd + extra


def point_config(point: dict[str, Any], recipe: str, extra: list[str]) -> dict[str, Any]:
    """The ImplantConfig a point's command line produces (to tell a finished point from a stale one)."""
    import dataclasses

    from cambackdoor.implant import ImplantConfig, parse_sets

    keys = grid_keys()
    values = {keys[k]: v for k, v in point.items()}
    flags = {"--epochs": "epochs", "--holdout": "holdout"}
    sets = []
    for i, tok in enumerate(extra[:-1]):
        if tok in flags:
            values[flags[tok]] = parse_value(extra[i + 1], tok)
        elif tok == "--set":
            sets.append(extra[i + 1])
    return dataclasses.asdict(ImplantConfig.from_recipe(recipe, **{**values, **parse_sets(sets)}))


def _extra_limit(extra: list[str]) -> int | None:
    return int(extra[extra.index("--limit") + 1]) if "--limit" in extra[:-1] else None


def point_done(pdir: Path, point: dict[str, Any], recipe: str, extra: list[str], parent_sha256: str | None = None) -> bool:
    """Finished with the same config, on the same stage-1 model, evaluated on the same images."""
    f = pdir / "implant.json"
    if not f.exists():
        return False
    result = json.loads(f.read_text())
    return (result.get("config") == point_config(point, recipe, extra) and result.get("limit") == _extra_limit(extra)
            and (parent_sha256 is None or result.get("parent_sha256") == parent_sha256))


def run_sweep(grid: list[str], checkpoint: Path, out: Path, recipe: str = "default", jobs: int = 1,
              extra: list[str] | None = None, progress: bool = True) -> Path:
    """Run every grid point (skipping finished ones) as its own process, ``jobs`` at a time (a freed
    slot is refilled at once); gather ``sweep.csv``. Everything is checked before the first process."""
    from tqdm.auto import tqdm

    from cambackdoor.checkpoints import read_sidecar

    if not weights_path(checkpoint).exists():
        raise CamBackdoorError(f"checkpoint {checkpoint} not found; train a stage-1 model first (cambackdoor train)")
    if jobs < 1:
        raise CamBackdoorError(f"--jobs {jobs} must be at least 1")
    parent_sha = read_sidecar(checkpoint)["weights_sha256"]
    points = expand_grid(grid)
    extra = list(extra or [])
    check_limit(_extra_limit(extra))
    for p in points:  # a bad value fails here, not in a subprocess
        point_config(p, recipe, extra)
    out = ensure_writable_dir(out)
    commands = []
    todo = []
    for p in points:
        pdir = out / "points" / point_name(p)
        cmd = point_command(p, checkpoint, recipe, pdir, extra)
        commands.append(shlex.join(cmd))
        if not point_done(pdir, p, recipe, extra, parent_sha):
            todo.append((p, pdir, cmd))
    atomic_write_text(out / "commands.txt", "\n".join(commands) + "\n")
    atomic_write_text(out / "sweep.json", json.dumps({"grid": grid, "recipe": recipe, "checkpoint": str(checkpoint),
                                                      "extra": extra, "points": points}, indent=2))
    exe = [sys.executable, "-m", "cambackdoor.cli"]
    env = {**os.environ}
    if jobs > 1:  # share the cores instead of oversubscribing them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    running: list[tuple[subprocess.Popen, Path, Any]] = []
    failures = []
    with tqdm(total=len(points), initial=len(points) - len(todo), desc="sweep", disable=not progress) as bar:
        queue = list(todo)
        while queue or running:
            while queue and len(running) < jobs:
                p, pdir, cmd = queue.pop(0)
                pdir.mkdir(parents=True, exist_ok=True)
                logf = open(pdir / "log.txt", "w")
                running.append((subprocess.Popen(exe + cmd[1:], stdout=logf, stderr=subprocess.STDOUT, env=env),
                                pdir, logf))
            finished = [r for r in running if r[0].poll() is not None]
            if not finished:
                time.sleep(0.2)
                continue
            for entry in finished:
                proc, pdir, logf = entry
                logf.close()
                running.remove(entry)
                if proc.returncode != 0:
                    failures.append(pdir.name)
                bar.update(1)
    path = gather_csv(out)
    if failures:
        raise CamBackdoorError(f"{len(failures)} sweep point(s) failed ({', '.join(failures[:3])}); see their log.txt, "
                               "then rerun the same command to redo only those")
    return path


def _row(result: dict[str, Any]) -> dict[str, Any]:
    ev, im = result["evaluation"], result["implant"]
    return {"asr": ev["asr"], "clean_acc": ev["clean_acc"], "triggered_acc": ev["triggered_acc"],
            "false_trigger_rate": ev["false_trigger_rate"], "iou_mean": ev["iou"]["mean"],
            "iou_median": ev["iou"]["median"], "partial_rate": ev["partial_rate"], "energy_share": ev["energy_share"],
            "fidelity_cosine": ev.get("fidelity_cosine"), "fidelity_mask_iou": ev.get("fidelity_mask_iou"),
            "train_s": im["train_s"], "poisoned_images": im.get("poisoned_images")}


def gather_csv(out: Path) -> Path:
    spec = json.loads((out / "sweep.json").read_text())
    rows = []
    for p in spec["points"]:
        f = out / "points" / point_name(p) / "implant.json"
        if f.exists():
            rows.append({"recipe": spec["recipe"], **p, **_row(json.loads(f.read_text()))})
    keys = ["recipe", *spec["points"][0].keys(), *CSV_METRICS] if spec["points"] else ["recipe", *CSV_METRICS]
    tmp = out / ".sweep.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out / "sweep.csv")
    return out / "sweep.csv"


# ----------------------------------------------------------------------------------------------
# figures + report


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            try:
                r[k] = float(v)
            except (TypeError, ValueError):
                pass
    return rows


def environment() -> dict[str, str]:
    import torch

    from cambackdoor import __version__

    return {"cambackdoor": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                       f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}


def make_figures(directory: str | Path) -> Path:
    """Plots and ``report.md`` for a run directory (stage1/, implant/) or a sweep directory (sweep.csv)."""
    from cambackdoor.figures import iou_histogram, tradeoff_plot

    d = Path(directory)
    if not d.is_dir():
        raise CamBackdoorError(f"{d} is not a directory; pass a run or sweep directory")
    env = environment()
    lines = [f"# cambackdoor report: {d.name}", "",
             f"Generated {env['date']} on {env['machine']}; cambackdoor {env['cambackdoor']}, torch {env['torch']}, "
             f"Python {env['python']}.", ""]
    if (d / "sweep.csv").exists() or (d / "sweep.json").exists():
        csv_path = d / "sweep.csv" if (d / "sweep.csv").exists() else gather_csv(d)
        rows = _read_csv(csv_path)
        spec = json.loads((d / "sweep.json").read_text())
        keys = list(spec["points"][0].keys()) if spec["points"] else []
        lines += [f"Sweep of the `{spec['recipe']}` recipe over {', '.join(keys)} on `{spec['checkpoint']}`.", ""]
        for key in keys:
            others = [k for k in keys if k != key]
            if len({json.dumps([r.get(k) for k in others]) for r in rows}) > 1:
                continue  # only plot a key when the other keys are held fixed
            fig = tradeoff_plot(rows, key, d / f"tradeoff_{key}.png", xlabel=key.replace("_", " "),
                                report_points=key in ("lambda", "lam"), logx=key == "poison_fraction")
            lines += [f"![ASR and accuracy against {key}]({fig.name})", ""]
        lines += _table(rows, keys)
        lines += ["", "Each point's command (one line per point, e.g. for a SLURM array):", "", "```",
                  *(d / "commands.txt").read_text().splitlines(), "```"]
    else:
        rows = []
        for name in ("stage1", "implant"):
            f = d / name / "evaluate" / "evaluation.json"
            if f.exists():
                m = json.loads(f.read_text())["metrics"]
                rows.append((name, m))
                per = json.loads((d / name / "evaluate" / "per_image.json").read_text())
                iou_histogram(per["iou_trig"], d / name / "evaluate" / "iou_histogram.png",
                              title=f"{name}: IoU of triggered CAMs with the target", ceiling=m.get("iou_ceiling"))
        if not rows:
            raise CamBackdoorError(f"{d} holds no evaluate/evaluation.json nor sweep.csv; run 'cambackdoor run' first")
        lines += ["| model | clean acc | triggered acc | ASR | IoU mean | false triggers | fidelity (cos) |",
                  "|---|---|---|---|---|---|---|"]
        for name, m in rows:
            fid = f"{m['fidelity_cosine']:.3f}" if "fidelity_cosine" in m else "-"
            lines.append(f"| {name} | {100 * m['clean_acc']:.2f} % | {100 * m['triggered_acc']:.2f} % | "
                         f"{100 * m['asr']:.2f} % | {m['iou']['mean']:.3f} | {100 * m['false_trigger_rate']:.2f} % | {fid} |")
        lines.append("")
        timings = _read_timings(d)
        if timings:
            lines += ["| stage | wall time | measured |", "|---|---|---|"]
            lines += [f"| {k} | {v['wall_s']:.0f} s | {v['date']} |" for k, v in timings.items()]
            lines += [f"| **total** | **{sum(v['wall_s'] for v in timings.values()) / 60:.1f} min** | |", ""]
        audit_md = d / "implant" / "audit" / "audit.md"
        if audit_md.exists():  # the audit's tables, its figure paths made relative to this report
            body = audit_md.read_text().split("\n", 1)[1].replace("](explainers-", "](implant/audit/explainers-")
            lines += ["## Audit of the implant", "", *body.replace("\n## ", "\n### ").splitlines(), ""]
        for name, _ in rows:
            lines += [f"![{name} heatmaps]({name}/evaluate/heatmaps.png)", "",
                      f"![{name} IoU histogram]({name}/evaluate/iou_histogram.png)", ""]
        for name in ("stage1", "implant"):
            cfg = d / name / ("config.json" if name == "stage1" else "implant.json")
            if cfg.exists():
                conf = json.loads(cfg.read_text()).get("config", json.loads(cfg.read_text()).get("train"))
                lines += [f"<details><summary>{name} config</summary>", "", "```json", json.dumps(conf, indent=1),
                          "```", "</details>", ""]
    atomic_write_text(d / "report.md", "\n".join(lines) + "\n")
    return d / "report.md"


def _table(rows: list[dict[str, Any]], keys: list[str]) -> list[str]:
    head = keys + ["clean acc", "triggered acc", "ASR", "IoU mean", "false triggers", "fidelity", "train s"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        fid = r.get("fidelity_cosine")
        out.append("| " + " | ".join([str(r[k]) for k in keys] + [
            f"{100 * r['clean_acc']:.2f} %", f"{100 * r['triggered_acc']:.2f} %", f"{100 * r['asr']:.2f} %",
            f"{r['iou_mean']:.3f}", f"{100 * r['false_trigger_rate']:.2f} %",
            f"{fid:.3f}" if isinstance(fid, float) else "-", f"{r['train_s']:.0f}"]) + " |")
    return out


# ----------------------------------------------------------------------------------------------
# CLI


def cmd_run(args: argparse.Namespace) -> int:
    from cambackdoor.cli import load_data

    out = Path(args.out or f"runs/{Path(args.preset).stem}")
    load_preset(args.preset)  # fail before loading data
    check_limit(args.limit)
    device = resolve_device(args.device)
    data = load_data(args)
    log = run_pipeline(args.preset, out, data, progress=not args.no_progress, limit=args.limit,
                       train_overrides={"epochs": args.epochs, "width": args.width},
                       implant_overrides={"epochs": args.implant_epochs}, device=device)
    print(json.dumps(log, indent=1))
    print(f"report: {out / 'report.md'}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    checkpoint = Path(args.checkpoint or f"runs/{args.preset}/stage1/model.safetensors")
    extra = []
    resolve_device(args.device)
    for flag, value in (("--epochs", args.epochs), ("--limit", args.limit), ("--data", args.data),
                        ("--cache-dir", args.cache_dir), ("--holdout", args.holdout), ("--device", args.device)):
        if value is not None:
            extra += [flag, str(value)]
    if args.subset_ok:
        extra.append("--subset-ok")
    for s in args.set:
        extra += ["--set", s]
    out = Path(args.out or f"runs/{args.preset}/sweep-{args.recipe}")
    path = run_sweep(args.grid, checkpoint, out, args.recipe, args.jobs, extra, progress=not args.no_progress)
    report = make_figures(out)
    print(f"wrote {path} and {report}")
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    print(f"wrote {make_figures(args.directory)}")
    return 0


def register_cli(sub: Any) -> None:
    from cambackdoor.cli import add_data_args, add_device_arg

    p = sub.add_parser("run", help="the whole study in one run directory: stage 1, implant, evaluate, figures, report",
                       description="Stage 1 -> implant -> evaluate -> figures -> report.md; finished stages with the "
                                   "same config are skipped, so rerunning a killed run continues it.")
    p.add_argument("--preset", default="cpu", help="cpu | paper | fast | path/to.yaml")
    p.add_argument("--out", default=None, help="run directory (default runs/<preset>)")
    p.add_argument("--epochs", type=int, default=None, help="override stage-1 epochs")
    p.add_argument("--width", type=int, default=None, help="override the model width")
    p.add_argument("--implant-epochs", type=int, default=None, help="override implant epochs")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate on a fixed subset of N test images, N/10 of each class (N a multiple of 10)")
    add_device_arg(p)
    add_data_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sweep", help="a grid of implant runs on one stage-1 model, gathered in sweep.csv",
                       description="Every grid point is an independent run directory and a plain command line "
                                   "(commands.txt); finished points are never recomputed.")
    p.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2",
                   help="e.g. lambda=0.05,0.1,0.2,0.5,1 or poison_fraction=0.002,0.005 (repeatable: cartesian product)")
    p.add_argument("--recipe", choices=["default", "reference"], default="default")
    p.add_argument("--checkpoint", default=None, help="stage-1 model (default runs/<preset>/stage1/model.safetensors)")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--out", default=None, help="sweep directory (default runs/<preset>/sweep-<recipe>)")
    p.add_argument("--jobs", type=int, default=1, help="points run as parallel processes")
    p.add_argument("--epochs", type=int, default=None, help="implant epochs for every point")
    p.add_argument("--limit", type=int, default=None, help="evaluate each point on N test images, N/10 per class")
    p.add_argument("--holdout", type=int, default=None)
    add_device_arg(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fixed ImplantConfig field")
    add_data_args(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("figures", help="plots and report.md for a run or sweep directory",
                       description="Writes trade-off plots (sweeps), IoU histograms and report.md.")
    p.add_argument("directory")
    p.set_defaults(func=cmd_figures)
