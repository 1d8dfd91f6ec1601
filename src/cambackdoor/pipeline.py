"""``run``: stage 1 -> evaluate -> implant -> evaluate -> audit -> figures -> report, in one folder.

Every stage is skipped when its output exists with the same config hash (and data, parent and
limit), so a killed ``run`` continues where it stopped. Sweeps: :mod:`cambackdoor.sweep`; the report:
:mod:`cambackdoor.report`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from cambackdoor.audit import AuditConfig, run_audit
from cambackdoor.checkpoints import (atomic_write_text, ensure_writable_dir, load_model, read_sidecar,
                                     state_config_hash, weights_path)
from cambackdoor.config import config_hash, load_preset, make_config
from cambackdoor.data import check_limit
from cambackdoor.evaluation import evaluate, write_evaluation
from cambackdoor.implant import run_implant
from cambackdoor.recipes import ImplantConfig
from cambackdoor.report import environment, make_figures, read_timings
from cambackdoor.sweep import (GRID_FLAGS, expand_grid, gather_csv, grid_keys, point_command, point_config,
                               point_done, point_name, run_sweep)
from cambackdoor.training import TrainConfig, resolve_device, train
from cambackdoor.triggers import parse_target, parse_trigger

__all__ = ["run_pipeline", "run_audit_stage", "stage1_done", "implant_done", "evaluation_done", "implant_hash",
           # the sweep and the report lived here before the split (kept importable from here)
           "GRID_FLAGS", "expand_grid", "gather_csv", "grid_keys", "point_command", "point_config", "point_done",
           "point_name", "run_sweep", "make_figures", "environment"]

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


def implant_hash(cfg: Any, checkpoint: Path, fingerprint: str) -> str:
    sidecar = json.loads(weights_path(checkpoint).with_suffix(".json").read_text())
    return config_hash(cfg, {"parent": sidecar.get("weights_sha256"), "data": fingerprint})


# ----------------------------------------------------------------------------------------------
# run


def run_pipeline(preset: str, out: Path, data: Any, progress: bool = True, train_overrides: dict | None = None,
                 implant_overrides: dict | None = None, limit: int | None = None,
                 device: Any = None) -> dict[str, Any]:
    values = load_preset(preset)
    tcfg = make_config(TrainConfig, values.get("train", {}), train_overrides)
    icfg_values = dict(values.get("implant") or {})
    recipe = icfg_values.pop("recipe", "default")
    icfg = ImplantConfig.from_recipe(recipe, **{**icfg_values, **(implant_overrides or {})})
    check_limit(limit, len(data.classes))
    device = resolve_device(device)
    out = ensure_writable_dir(out)
    log: dict[str, Any] = {"preset": preset, "stages": {}}
    timings = read_timings(out)

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
    trigger, target = icfg.attack.trigger, icfg.attack.target
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
