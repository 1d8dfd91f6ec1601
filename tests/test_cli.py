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
                   "unknown model 'vgg'")


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
    one_line_error(run_cli("implant", "--checkpoint", ck, "--target", "4,4,8,8"), "align the box")
