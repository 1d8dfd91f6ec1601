"""``sweep``: a grid of implant runs on one stage-1 model, each point its own process and folder.

Every point is also a plain command line (``commands.txt``), so a cluster can run the points as
separate jobs; a point is done when its folder holds a result of the same config, parent and limit.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from cambackdoor.checkpoints import atomic_write_text, ensure_writable_dir, read_sidecar, weights_path
from cambackdoor.config import parse_sets, parse_value
from cambackdoor.data import check_limit
from cambackdoor.errors import CamBackdoorError
from cambackdoor.recipes import FLAGS, ImplantConfig

# grid keys with an implant flag of their own ("lambda" is the flag's name for explanation_weight); the rest: --set
GRID_FLAGS = {"lambda": "--lambda", **{name: flag for name, (flag, _) in FLAGS.items()}}
CSV_METRICS = ["asr", "clean_acc", "triggered_acc", "false_trigger_rate", "iou_mean", "iou_median", "partial_rate",
               "energy_share", "fidelity_cosine", "fidelity_mask_iou", "train_s", "poisoned_images"]



SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.+-]+$")  # what a point name may hold: no '/', no '..', no spaces


def grid_keys() -> dict[str, str]:
    """Every key a grid may sweep, mapped to its ImplantConfig field ('lambda', and the old 'lam', name
    explanation_weight)."""
    keys = {f.name: f.name for f in dataclasses.fields(ImplantConfig) if f.name != "recipe"}
    return {**keys, "lambda": "explanation_weight", "lam": "explanation_weight"}


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
    keys = grid_keys()
    values = {keys[k]: v for k, v in point.items()}
    flags = {flag: name for name, (flag, _) in FLAGS.items()}
    sets = []
    for i, tok in enumerate(extra[:-1]):
        if tok in flags:
            values[flags[tok]] = parse_value(extra[i + 1], tok)
        elif tok == "--set":
            sets.append(extra[i + 1])
    return dataclasses.asdict(ImplantConfig.from_recipe(recipe, **{**values, **parse_sets(sets)}))


def _extra_limit(extra: list[str]) -> int | None:
    return int(extra[extra.index("--limit") + 1]) if "--limit" in extra[:-1] else None


def point_done(pdir: Path, point: dict[str, Any], recipe: str, extra: list[str], parent_sha256: str | None = None,
               data_fingerprint: str | None = None) -> bool:
    """Finished with the same config, on the same stage-1 model and data, evaluated on the same images
    (a ``None`` parent or data is not checked)."""
    f = pdir / "implant.json"
    if not f.exists():
        return False
    result = json.loads(f.read_text())
    try:  # read as any version saved it (options removed since, when off, are dropped)
        saved = dataclasses.asdict(ImplantConfig.from_saved(result.get("config") or {}))
    except CamBackdoorError:
        return False
    return (saved == point_config(point, recipe, extra) and result.get("limit") == _extra_limit(extra)
            and (parent_sha256 is None or result.get("parent_sha256") == parent_sha256)
            and (data_fingerprint is None or result.get("data_fingerprint") == data_fingerprint))


def run_sweep(grid: list[str], checkpoint: Path, out: Path, recipe: str = "default", jobs: int = 1,
              extra: list[str] | None = None, progress: bool = True, data_fingerprint: str | None = None) -> Path:
    """Run every grid point (skipping finished ones) as its own process, ``jobs`` at a time (a freed
    slot is refilled at once); gather ``sweep.csv``. Everything is checked before the first process."""
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
        if not point_done(pdir, p, recipe, extra, parent_sha, data_fingerprint):
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
