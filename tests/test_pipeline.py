import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from cambackdoor import pipeline as P
from cambackdoor.config import config_hash
from cambackdoor.errors import CamBackdoorError
from cambackdoor.training import TrainConfig

TINY_PRESET = """
train: {width: 4, epochs: 1, batch_size: 50, lr: 0.05, channels_last: false}
implant: {recipe: default, epochs: 1, batch_size: 50, poison_fraction: 0.2, poison_batch: 20}
audit: {finetune_epochs: "1", explainers: "gradcam@layer4,saliency", pixel_limit: 20, bn_images: 100}
"""


def test_config_hash_is_stable_and_sensitive():
    a = config_hash(TrainConfig(), {"data": "x"})
    assert a == config_hash(TrainConfig(), {"data": "x"})
    assert a != config_hash(TrainConfig(lr=0.2), {"data": "x"})
    assert a != config_hash(TrainConfig(), {"data": "y"})


def test_grid_expansion_and_point_commands(tmp_path):
    points = P.expand_grid(["lambda=0.05,0.1,1", "poison_fraction=0.002,0.01"])
    assert len(points) == 6 and points[0] == {"lambda": 0.05, "poison_fraction": 0.002}
    assert points[-1] == {"lambda": 1, "poison_fraction": 0.01}
    cmd = P.point_command({"lambda": 0.1, "freeze_bn": False}, tmp_path / "m.safetensors", "default", tmp_path / "o", [])
    assert cmd[:2] == ["cambackdoor", "implant"] and "--lambda" in cmd and "freeze_bn=False" in cmd
    with pytest.raises(Exception, match="KEY=V1,V2"):
        P.expand_grid(["lambda"])


def test_run_skips_finished_stages_and_redoes_changed_ones(tmp_path, tiny_data):
    preset = tmp_path / "tiny.yaml"
    preset.write_text(TINY_PRESET)
    out = tmp_path / "run"
    first = P.run_pipeline(str(preset), out, tiny_data, progress=False)
    assert first["stages"] == {"stage1": "ran", "evaluate_stage1": "ran", "implant": "ran", "audit": "ran"}
    report = (out / "report.md").read_text()
    assert "| implant |" in report and "heatmaps.png" in report
    assert "### Defences" in report and "implant/audit/explainers-model.png" in report
    assert (out / "implant" / "evaluate" / "iou_histogram.png").stat().st_size > 1000
    timings = json.loads((out / "timings.json").read_text())
    assert {"stage1", "evaluate_stage1", "implant + evaluate", "figures + report"} <= set(timings)
    assert all(v["wall_s"] > 0 for v in timings.values()) and "| **total** |" in report
    again = P.run_pipeline(str(preset), out, tiny_data, progress=False)
    assert all(v.startswith("skipped") for v in again["stages"].values())
    changed = P.run_pipeline(str(preset), out, tiny_data, progress=False, implant_overrides={"explanation_weight": 0.5})
    assert changed["stages"]["stage1"].startswith("skipped") and changed["stages"]["implant"] == "ran"
    assert changed["stages"]["audit"] == "ran"  # a new implant is audited anew


def test_run_resumes_an_interrupted_stage1(tmp_path, tiny_data):
    from cambackdoor.training import train

    preset = tmp_path / "tiny.yaml"
    preset.write_text(TINY_PRESET.replace("epochs: 1, batch_size: 50, lr", "epochs: 2, batch_size: 50, lr"))
    from cambackdoor.config import load_preset, make_config

    cfg = make_config(TrainConfig, load_preset(str(preset))["train"])
    train(cfg, tiny_data, tmp_path / "run" / "stage1", progress=False, stop_after=1)  # "killed" after epoch 1
    log = P.run_pipeline(str(preset), tmp_path / "run", tiny_data, progress=False)
    assert log["stages"]["stage1"] == "resumed"
    lines = (tmp_path / "run" / "stage1" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [1, 2]


def test_sweep_runs_points_in_parallel_once_and_gathers_csv(tmp_path):
    from conftest import write_image_folder

    data = write_image_folder(tmp_path / "data", n_train=100, n_test=20)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, "-m", "cambackdoor.cli"]
    common = ["--data", str(data), "--subset-ok", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    r = subprocess.run(base + ["train", "--out", str(tmp_path / "s1"), "--width", "4", "--epochs", "1",
                               "--batch-size", "25", *common], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    sweep = base + ["sweep", "--grid", "lambda=0.5,1", "--checkpoint", str(tmp_path / "s1" / "model.safetensors"),
                    "--out", str(tmp_path / "sw"), "--jobs", "2", "--epochs", "1",
                    "--set", "batch_size=25", "--set", "poison_fraction=0.2", *common]
    r = subprocess.run(sweep, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "sw" / "sweep.csv")))
    assert [float(x["lambda"]) for x in rows] == [0.5, 1.0]
    assert all(0 <= float(x["asr"]) <= 1 for x in rows)
    assert len((tmp_path / "sw" / "commands.txt").read_text().splitlines()) == 2
    assert (tmp_path / "sw" / "tradeoff_lambda.png").stat().st_size > 1000
    stamp = (tmp_path / "sw" / "points" / "lambda=0.5" / "implant.json").stat().st_mtime_ns
    r = subprocess.run(sweep, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "sw" / "points" / "lambda=0.5" / "implant.json").stat().st_mtime_ns == stamp  # not recomputed


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    from conftest import write_image_folder

    from cambackdoor.checkpoints import load_model
    from cambackdoor.models import build_model

    data = write_image_folder(tmp_path / "data", n_train=400, n_test=20)
    args = ["train", "--width", "4", "--epochs", "2", "--batch-size", "200", "--data", str(data), "--subset-ok",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--lr", "0.01"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "cambackdoor.cli", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    import socket

    with socket.socket() as sock:  # a free port, not a fixed one another job may hold
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                          "--master_addr=127.0.0.1",
                          "-m", "cambackdoor.cli", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    torch.manual_seed(0)
    init = torch.cat([p.flatten() for p in build_model(width=4).parameters()])
    a = torch.cat([p.flatten() for p in load_model(tmp_path / "one" / "model")[0].parameters()]) - init
    b = torch.cat([p.flatten() for p in load_model(tmp_path / "two" / "model")[0].parameters()]) - init
    # Same global batches and averaged gradients; BatchNorm statistics are per process (100 images
    # instead of 200; SyncBatchNorm is GPU-only), which alone moves a random net's gradient by ~30 %.
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9
    assert (a - b).norm() / a.norm() < 0.45


def test_point_config_matches_what_the_command_line_builds():
    cfg = P.point_config({"lambda": 0.5, "poison_fraction": 0.02}, "default", ["--epochs", "1", "--set", "freeze_bn=false"])
    assert cfg["explanation_weight"] == 0.5 and cfg["poison_fraction"] == 0.02 and cfg["epochs"] == 1 and cfg["freeze_bn"] is False
    assert cfg["recipe"] == "default" and cfg["preserve_weight"] == 20.0


@pytest.mark.parametrize("grid,match", [
    (["lambda=../../../../esc"], "not a plain number or name"),
    (["lambda=0.1,a/b"], "not a plain number or name"),
    (["bogus=1,2"], "is not an implant setting"),
    (["recipe=default"], "is not an implant setting"),
    (["lambda=1", "lambda=2"], "given twice"),
])
def test_grid_keys_and_values_are_checked_before_any_process(grid, match, tmp_path):
    with pytest.raises(CamBackdoorError, match=match):
        P.expand_grid(grid)
    assert not list(tmp_path.iterdir())


def test_sweep_refuses_a_bad_point_before_starting_any(tmp_path):
    from cambackdoor.checkpoints import save_model
    from cambackdoor.models import build_model

    ck = save_model(tmp_path / "s1" / "model", build_model(width=4))
    with pytest.raises(CamBackdoorError, match="explanation_weight must be >= 0"):
        P.run_sweep(["lambda=1,-1"], ck, tmp_path / "sw", progress=False)
    with pytest.raises(CamBackdoorError, match="use 20 or 30"):
        P.run_sweep(["lambda=1"], ck, tmp_path / "sw", extra=["--limit", "25"], progress=False)
    assert not (tmp_path / "sw").exists()


def test_run_reevaluates_when_the_limit_changes_and_restarts_a_stale_stage1(tmp_path, tiny_data):
    preset = tmp_path / "tiny.yaml"
    preset.write_text(TINY_PRESET)
    out = tmp_path / "run"
    P.run_pipeline(str(preset), out, tiny_data, progress=False, limit=100)
    again = P.run_pipeline(str(preset), out, tiny_data, progress=False)  # all images now: not the 100-image result
    assert again["stages"]["implant"] == "ran" and again["stages"]["evaluate_stage1"] == "ran"
    assert json.loads((out / "implant" / "implant.json").read_text())["evaluation"]["n"] == 200
    # a stage 1 killed under another config leaves a state behind; run starts that stage over instead of failing
    from cambackdoor.config import load_preset, make_config
    from cambackdoor.training import train

    cfg = make_config(TrainConfig, {**load_preset(str(preset))["train"], "epochs": 2})
    train(cfg, tiny_data, out / "stage1", progress=False, stop_after=1, overwrite=True)
    log = P.run_pipeline(str(preset), out, tiny_data, progress=False)
    assert log["stages"]["stage1"] == "ran"
    assert [json.loads(s)["epoch"] for s in (out / "stage1" / "metrics.jsonl").read_text().splitlines()] == [1]
