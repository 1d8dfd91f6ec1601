"""The audit end to end on a tiny implanted model, and its one-line errors."""

import json

import pytest

from cambackdoor import audit as A
from cambackdoor import implant as I
from cambackdoor.checkpoints import save_model
from cambackdoor.cli import main
from cambackdoor.errors import CamBackdoorError
from cambackdoor.models import build_model
from cambackdoor.training import TrainConfig, train
from conftest import write_image_folder

FAST = dict(finetune_epochs="1,2", bn_images=200, pixel_limit=20, limit=50, prune_finetune_images=100,
            explainers="gradcam@layer4,gradcam@layer3,saliency,occlusion")


@pytest.fixture(scope="module")
def implanted(tmp_path_factory):
    from conftest import make_dataset

    data = make_dataset(n_train=400, n_test=100)
    root = tmp_path_factory.mktemp("audit")
    train(TrainConfig(width=8, epochs=3, batch_size=50, lr=0.05, channels_last=False), data, root / "s1", progress=False)
    cfg = I.ImplantConfig.from_recipe("v8", epochs=6, batch_size=50, poison_fraction=0.25, poison_batch=25,
                                      lr=1e-2, explanation_weight=3.0, preserve_weight=10.0)
    I.run_implant(root / "s1" / "model.safetensors", data, cfg, root / "imp", progress=False, limit=50)
    return data, root


def test_audit_battery_on_a_tiny_implant(implanted, tmp_path):
    from cambackdoor.checkpoints import load_model
    from cambackdoor.triggers import parse_target, parse_trigger

    data, root = implanted
    model, meta = load_model(root / "imp" / "model")
    reference, _ = load_model(root / "s1" / "model")
    cfg = A.AuditConfig(**FAST)
    result = A.run_audit(model, reference, data, parse_trigger(meta["attack"]["trigger"]),
                         parse_target(meta["attack"]["target"]), "layer4", cfg, tmp_path / "a", {"checkpoint": "x"},
                         progress=False)
    names = [r["name"] for r in result["rows"]]
    assert names == ["model", "reference (stage 1)", "bn-reestimate", "finetune-1", "finetune-2", "fine-prune", "jpeg",
                     "blur", "shift"]
    model_row = result["rows"][0]
    assert model_row["asr"]["value"] > 0.5  # the tiny implant worked
    for r in result["rows"]:
        for k in ("clean_acc", "triggered_acc", "asr", "false_trigger_rate"):
            assert r[k]["lo"] <= r[k]["value"] <= r[k]["hi"], (r["name"], k)
        if r["name"] not in ("model", "reference (stage 1)"):
            assert r["clean_cost"]["lo"] <= r["clean_cost"]["diff"] <= r["clean_cost"]["hi"]
    by_name = {r["explainer"]: r for r in result["explainers"]}
    assert by_name["gradcam@layer4"]["images"] == 50 and by_name["saliency"]["images"] == 20
    assert by_name["gradcam@layer4"]["model"]["triggered_success"]["value"] == pytest.approx(model_row["asr"]["value"])
    for d in result["detectors"]["model"].values():
        assert 0 <= d["lo"] <= d["auroc"] <= d["hi"] <= 1
    saved = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert saved["config"]["audit"]["finetune_epochs"] == "1,2" and "## Detectors" in (tmp_path / "a" / "audit.md").read_text()
    params = {r["name"]: r.get("params", {}) for r in result["rows"]}
    assert params["fine-prune"]["images"] == 100 and params["finetune-2"]["images"] == 400
    times = saved["timings_s"]  # each fine-tuning row counts its own epochs; the total holds every part
    assert times["defence finetune-1"] > 0 and times["defence finetune-2"] > 0
    assert times["total"] >= sum(v for k, v in times.items() if k != "total") - 0.5
    for name in ("explainers-model.png", "explainers-reference.png"):
        assert (tmp_path / "a" / name).stat().st_size > 1000
    from safetensors.torch import load_file  # per-image outcomes, for intervals pooled over seeds
    outcomes = load_file(str(tmp_path / "a" / "outcomes.safetensors"))
    assert {k.split("/")[0] for k in outcomes} == set(names) and outcomes["model/success"].shape == (50,)
    for r in result["rows"]:
        assert outcomes[f"{r['name']}/clean_correct"].mean().item() == pytest.approx(r["clean_acc"]["value"])


@pytest.mark.parametrize("values,match", [
    ({"defences": "bn-reestimate,prayer"}, "unknown defence 'prayer'"),
    ({"explainers": "gradcam@layer4,lime"}, "unknown explainer 'lime'"),
    ({"finetune_epochs": "1,x"}, "finetune_epochs must be"),
    ({"limit": 25}, "use 20 or 30"),
])
def test_bad_audit_settings(values, match):
    from cambackdoor.config import make_config

    with pytest.raises(CamBackdoorError, match=match):
        make_config(A.AuditConfig, {}, values)


def test_cli_one_line_errors(implanted, tmp_path, capsys):
    data, root = implanted
    folder = write_image_folder(tmp_path / "d", n_train=20, n_test=10)
    common = ["--data", str(folder), "--subset-ok", "--no-progress", "--cache-dir", str(tmp_path / "c")]
    imp, s1 = str(root / "imp" / "model.safetensors"), str(root / "s1" / "model.safetensors")
    wide = str(save_model(tmp_path / "w" / "m", build_model(width=16)))

    def error(args, pattern):
        assert main(["audit", *args, *common]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and pattern in err[0], err

    error(["--checkpoint", imp, "--reference", s1, "--defences", "prayer"], "unknown defence 'prayer'")
    error(["--checkpoint", imp, "--reference", s1, "--explainers", "lime"], "unknown explainer 'lime'")
    error(["--checkpoint", imp, "--reference", wide], "pass the stage-1 model the checkpoint was implanted into")
    error(["--checkpoint", s1, "--reference", s1], "records no attack")



def test_cli_holdout_audits_the_held_out_split_not_the_test_set(implanted, tmp_path, capsys):
    """--holdout N: the rows are measured on the N held-out training images (the split implant
    --holdout N keeps out), the defences use the other training images."""
    import torch

    from cambackdoor.checkpoints import load_model
    from cambackdoor.data import holdout_split, load_cifar10

    _, root = implanted
    folder = write_image_folder(tmp_path / "d", n_train=40, n_test=10)
    common = ["--data", str(folder), "--subset-ok", "--no-progress", "--cache-dir", str(tmp_path / "c")]
    imp, s1, out = str(root / "imp" / "model.safetensors"), str(root / "s1" / "model.safetensors"), tmp_path / "a"
    assert main(["audit", "--checkpoint", imp, "--reference", s1, "--holdout", "12", "--defences", "bn-reestimate",
                 "--explainers", "gradcam@layer4", "--out", str(out), *common]) == 0
    saved = json.loads((out / "audit.json").read_text())
    assert saved["config"]["split"] == "holdout 12" and saved["images"] == 12
    assert saved["rows"][2]["params"]["images"] == 28  # BatchNorm re-estimated on the other 28 training images
    held_out = holdout_split(load_cifar10(str(folder), str(tmp_path / "c"), expect_counts=None, progress=False).train, 12)[1]
    for row, path in ((0, imp), (1, s1)):  # accuracy counted by hand on exactly the held-out images
        model, _ = load_model(path)
        with torch.no_grad():
            correct = (model.eval()(held_out.images.float() / 255).argmax(1) == held_out.labels).sum().item()
        assert saved["rows"][row]["clean_acc"]["value"] == pytest.approx(correct / 12)
    assert "holdout 12 split" in (out / "audit.md").read_text()
    assert main(["audit", "--checkpoint", imp, "--reference", s1, "--holdout", "400", *common]) == 2
    assert "--holdout 400 must be between 0 and" in capsys.readouterr().err
