"""The command line: --help everywhere, a tiny end-to-end train/evaluate, and one-line errors."""

import json
import subprocess
import sys

import pytest

from cambackdoor.cli import main
from conftest import write_image_folder

SUBCOMMANDS = ["train", "evaluate", "implant", "run", "sweep", "figures"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "cambackdoor.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("cmd", [[]] + [[c] for c in SUBCOMMANDS])
def test_help_everywhere(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*cmd, "--help"])
    assert exc.value.code == 0
    assert "usage: cambackdoor" in capsys.readouterr().out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = write_image_folder(root / "data", n_train=60, n_test=20)
    out = root / "run"
    r = run_cli("train", "--preset", "cpu", "--data", str(data), "--subset-ok", "--out", str(out), "--width", "4",
                "--epochs", "1", "--batch-size", "20", "--no-progress", "--cache-dir", str(root / "cache"))
    assert r.returncode == 0, r.stderr
    return root, data, out


def test_train_then_evaluate_end_to_end(trained):
    root, data, out = trained
    assert (out / "model.safetensors").exists() and (out / "model.json").exists()
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["epoch"] == 1
    r = run_cli("evaluate", "--checkpoint", str(out / "model.safetensors"), "--reference", str(out / "model.safetensors"),
                "--data", str(data), "--subset-ok", "--no-progress", "--cache-dir", str(root / "cache"))
    assert r.returncode == 0, r.stderr
    assert "attack success rate" in r.stdout
    result = json.loads((out / "evaluate" / "evaluation.json").read_text())
    m = result["metrics"]
    assert m["n"] == 20 and sum(m["buckets"].values()) == 20
    assert m["fidelity_cosine"] == pytest.approx(1.0, abs=1e-5)  # a model against itself
    assert result["config"]["trigger"] == "yellow:4@bottom-right"
    assert (out / "evaluate" / "heatmaps.png").stat().st_size > 1000


def one_line_error(r, pattern):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr
    assert lines[-1].startswith("error: ") and pattern in lines[-1], r.stderr


def test_unknown_preset(tmp_path):
    one_line_error(run_cli("train", "--preset", "gpu9000", "--out", str(tmp_path)), "unknown preset 'gpu9000'")


def test_missing_dataset(tmp_path):
    one_line_error(run_cli("train", "--data", str(tmp_path / "none.zip"), "--out", str(tmp_path / "o")), "dataset not found")


def test_unknown_model(tmp_path):
    data = write_image_folder(tmp_path / "d", n_train=20, n_test=10)
    one_line_error(run_cli("train", "--model", "vgg", "--data", str(data), "--subset-ok", "--out", str(tmp_path / "o")),
                   "model must be one of resnet18, not 'vgg'")


def test_incomplete_dataset_without_subset_flag(tmp_path):
    data = write_image_folder(tmp_path / "d", n_train=20, n_test=10)
    one_line_error(run_cli("train", "--data", str(data), "--out", str(tmp_path / "o")), "expected 50000 / 10000")


def test_unwritable_output(trained, tmp_path):
    root, data, _ = trained
    blocker = tmp_path / "file"
    blocker.write_text("")
    one_line_error(run_cli("train", "--data", str(data), "--subset-ok", "--out", str(blocker / "x"), "--width", "4",
                           "--epochs", "1", "--cache-dir", str(root / "cache")), "not writable")


def test_corrupt_and_missing_checkpoints(trained, tmp_path):
    root, data, out = trained
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    (tmp_path / "bad.json").write_text((out / "model.json").read_text())
    one_line_error(run_cli("evaluate", "--checkpoint", str(bad), "--data", str(data), "--subset-ok"), "does not match")
    one_line_error(run_cli("evaluate", "--checkpoint", str(tmp_path / "none.safetensors")), "not found")


def test_bad_trigger_and_target(trained):
    root, data, out = trained
    ck = str(out / "model.safetensors")
    one_line_error(run_cli("evaluate", "--checkpoint", ck, "--trigger", "yellow:4@30,30"), "off the 32x32 image")
    one_line_error(run_cli("implant", "--checkpoint", ck, "--target", "bottom-right:8"), "overlaps the trigger")
    one_line_error(run_cli("implant", "--checkpoint", ck, "--target", "0,0,4,4"), "align the box")


def cli_error(capsys, args, pattern):
    """In-process: exit code 2 and one line 'error: ...' naming the fix, no traceback."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and pattern in err[0], err


@pytest.fixture(scope="module")
def data_args(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-data")
    data = write_image_folder(root / "data", n_train=60, n_test=20)
    return ["--data", data, "--subset-ok", "--no-progress", "--cache-dir", root / "cache"]


@pytest.mark.parametrize("args,pattern", [
    (["--lambda", "-1"], "explanation_weight must be >= 0"),
    (["--preserve-weight", "-5"], "preserve_weight must be >= 0"),
    (["--batch-size", "100000"], "larger than the 60 training images"),
    (["--batch-size", "-1"], "batch_size must be >= 1"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
    (["--lr", "nan"], "lr must be a finite number"),
    (["--set", "optimizer=bogus"], "optimizer must be one of"),
    (["--set", "schedule=bogus"], "schedule must be one of"),
    (["--set", "freeze_bn=maybe"], "freeze_bn must be bool"),
    (["--set", "lam=[1,"], "cannot read the value"),
    (["--set", "recipe=x"], "--recipe"),
    (["--limit", "0"], "--limit 0 must be a positive"),
    (["--limit=-5"], "--limit -5 must be a positive"),
    (["--limit", "25"], "use 20 or 30"),
    (["--device", "tpu"], "unknown device"),
    (["--branch-from", "nowhere/state.safetensors"], "--branch-from nowhere/state.safetensors not found"),
])
def test_implant_refuses_bad_input_before_any_work(trained, data_args, tmp_path, capsys, args, pattern):
    _, _, out = trained
    cli_error(capsys, ["implant", "--checkpoint", out / "model.safetensors", "--out", tmp_path / "imp", *args,
                       *data_args], pattern)
    assert not (tmp_path / "imp" / "model.safetensors").exists()


def test_implant_branches_from_another_runs_saved_epoch(trained, data_args, tmp_path, capsys):
    """--branch-from: a one-epoch run's state is the fork; a two-epoch config goes on from its epoch 1."""
    _, _, out = trained
    common = ["--checkpoint", out / "model.safetensors", "--batch-size", "20", "--set", "poison_batch=4",
              "--set", "repair_start=0.5", "--set", "repair_min_asr=0", *data_args]
    assert main([str(a) for a in ["implant", "--out", tmp_path / "fork", "--epochs", "1", *common]]) == 0
    fork = json.loads((tmp_path / "fork" / "implant.json").read_text())["implant"]
    assert main([str(a) for a in ["implant", "--out", tmp_path / "b", "--epochs", "2", "--branch-from",
                                  tmp_path / "fork" / "state.safetensors", "--set", "decoy_fraction=0.5", *common]]) == 0
    log = json.loads((tmp_path / "b" / "implant.json").read_text())["implant"]
    assert log["branched_from"]["epoch"] == 1 and len(log["epochs"]) == 2
    assert log["epochs"][0] == fork["epochs"][0]  # epoch 1 is the fork's, not trained again
    assert log["epochs"][1]["repair_steps"] > 0  # and the branch's change acted in epoch 2
    capsys.readouterr()
    cli_error(capsys, ["implant", "--out", tmp_path / "c", "--resume", "--branch-from",
                       tmp_path / "fork" / "state.safetensors", *common], "use --resume alone")


@pytest.mark.parametrize("args,pattern", [
    (["--poison-fraction", "2"], "poison_fraction must be in"),
    (["--batch-size", "100000"], "larger than the 60 training images"),
    (["--holdout", "100000"], "--holdout 100000 must be between"),
    (["--holdout", "-5"], "holdout must be >= 0"),
    (["--trigger", "purple:4@x"], "trigger"),
    (["--target", "0,0,0,0"], "empty"),
])
def test_train_refuses_bad_input(data_args, tmp_path, capsys, args, pattern):
    cli_error(capsys, ["train", "--out", tmp_path / "t", "--width", "4", "--epochs", "1", *args, *data_args], pattern)
    assert not (tmp_path / "t" / "model.safetensors").exists()


def test_train_into_a_finished_run_needs_resume_or_overwrite(trained, data_args, capsys):
    _, _, out = trained
    before = (out / "metrics.jsonl").read_text()
    cli_error(capsys, ["train", "--out", out, "--width", "4", "--epochs", "1", "--batch-size", "20", *data_args],
              "--resume to continue it, --overwrite to start over")
    assert (out / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("args,pattern", [
    (["--batch-size", "0"], "--batch-size 0 must be a positive"),
    (["--batch-size", "-1"], "--batch-size -1 must be a positive"),
    (["--limit", "0"], "--limit 0 must be a positive"),
    (["--limit", "15"], "use 10 or 20"),
])
def test_evaluate_refuses_bad_input(trained, data_args, tmp_path, capsys, args, pattern):
    _, _, out = trained
    cli_error(capsys, ["evaluate", "--checkpoint", out / "model.safetensors", "--out", tmp_path / "e", *args,
                       *data_args], pattern)
    assert not (tmp_path / "e").exists()


def test_evaluate_checks_out_before_work(trained, data_args, tmp_path, capsys):
    _, _, out = trained
    blocker = tmp_path / "file"
    blocker.write_text("")
    cli_error(capsys, ["evaluate", "--checkpoint", out / "model.safetensors", "--out", blocker / "e", *data_args],
              "not writable")


def test_evaluate_limit_is_per_class(trained, data_args, tmp_path, capsys):
    _, _, out = trained
    assert main([str(a) for a in ["evaluate", "--checkpoint", out / "model.safetensors", "--out", tmp_path / "e",
                                  "--limit", "10", *data_args]]) == 0
    per = json.loads((tmp_path / "e" / "per_image.json").read_text())
    assert sorted(per["label"]) == list(range(10))  # one image of each class, not the first ten (all airplanes)


def test_bad_preset_shape(tmp_path, capsys):
    preset = tmp_path / "list.yaml"
    preset.write_text("- 1\n- 2\n")
    cli_error(capsys, ["train", "--preset", preset, "--out", tmp_path / "o"], "must be a mapping")


def test_corrupt_cifar_pickle_is_one_line(tmp_path, capsys, pickle_dir):
    import pickle as pk

    import numpy as np

    with open(pickle_dir / "test_batch", "wb") as f:
        pk.dump(np.zeros(3), f, protocol=2)
    cli_error(capsys, ["train", "--data", pickle_dir, "--subset-ok", "--out", tmp_path / "o"], "not a CIFAR-10 python batch")


def test_a_warning_is_one_line(trained, capsys):
    """An off-grid target is allowed with a warning: one line 'warning: ...', no source listing."""
    root, data, out = trained
    code = main(["evaluate", "--checkpoint", str(out / "model.safetensors"), "--target", "12,12,8,8", "--data", str(data),
                 "--subset-ok", "--no-progress", "--cache-dir", str(root / "cache"), "--out", str(root / "ev-offgrid")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 0 and err and all(line.startswith("warning: ") for line in err), err
    assert any("off the CAM grid" in line for line in err)
