"""Config checks: every field is validated where it is parsed (types, signs, finite numbers, names)."""

import dataclasses

import pytest

from cambackdoor.config import load_preset, make_config
from cambackdoor.errors import CamBackdoorError
from cambackdoor.config import parse_sets
from cambackdoor.implant import ImplantConfig
from cambackdoor.training import TrainConfig


@pytest.mark.parametrize("values,match", [
    ({"explanation_weight": -1}, "explanation_weight must be >= 0"),
    ({"preserve_weight": -5}, "preserve_weight must be >= 0"),
    ({"optimizer": "bogus"}, "optimizer must be one of"),
    ({"schedule": "bogus"}, "schedule must be one of"),
    ({"freeze_bn": "maybe"}, "freeze_bn must be bool"),
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"lr": 0}, "lr must be > 0"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"batch_size": -1}, "batch_size must be >= 1"),
    ({"epochs": 1.5}, "epochs must be int"),
    ({"poison_fraction": 2}, "poison_fraction must be in"),
    ({"trainable": "layer9"}, "trainable must be all or"),
    ({"cam_relu": "gelu"}, "cam_relu must be one of"),
    ({"explain_class": "top"}, "explain_class must be one of"),
    ({"target": "0,0,0,8"}, "empty"),
])
def test_bad_implant_settings_are_refused_where_they_are_parsed(values, match):
    with pytest.raises(CamBackdoorError, match=match):
        ImplantConfig.from_recipe("v8", **values)


@pytest.mark.parametrize("values,match", [
    ({"poison_fraction": 2.0}, "poison_fraction must be in"),
    ({"explanation_weight": -1.0}, "explanation_weight must be >= 0"),
    ({"holdout": -5}, "holdout must be >= 0"),
    ({"trigger": "purple:4@x"}, "unknown trigger colour|cannot read trigger"),
    ({"target": "0,0,0,0"}, "empty"),
    ({"amp": "fp8"}, "amp must be one of"),
    ({"channels_last": "yes"}, "channels_last must be bool"),
    ({"width": 0}, "width must be >= 1"),
])
def test_bad_train_settings_are_refused_even_without_an_explanation_loss(values, match):
    with pytest.raises(CamBackdoorError, match=match):
        make_config(TrainConfig, {}, values)


def test_ints_become_floats_and_valid_configs_pass():
    cfg = make_config(ImplantConfig, {"explanation_weight": 2, "lr": 1})
    assert isinstance(cfg.explanation_weight, float) and cfg.explanation_weight == 2.0 and isinstance(cfg.lr, float)
    assert ImplantConfig.from_recipe("reference").explain_class == "predicted"
    persistent = ImplantConfig.from_recipe("persistent", seed=2)  # v8 plus three fields, overridable
    v8 = ImplantConfig.from_recipe("v8", seed=2)
    changed = {k for k, v in dataclasses.asdict(persistent).items() if dataclasses.asdict(v8)[k] != v}
    assert changed == {"recipe", "clean_bn_stats", "bn_momentum", "epochs"} and persistent.epochs == 4


@pytest.mark.parametrize("items,match", [
    (["lam=[1,"], "cannot read the value"),
    (["recipe=x"], "--recipe"),
    (["lam"], "KEY=VALUE"),
])
def test_bad_set_items(items, match):
    with pytest.raises(CamBackdoorError, match=match):
        ImplantConfig.from_recipe("v8", **parse_sets(items))


@pytest.mark.parametrize("text,match", [
    ("- 1\n- 2\n", "must be a mapping"),
    ("42\n", "must be a mapping"),
    ("train: [1, 2]\n", "section 'train'.*mapping"),
    ("stage3: {}\n", "unknown section"),
    ("train: {width: [\n", "not valid YAML"),
])
def test_malformed_presets(tmp_path, text, match):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(CamBackdoorError, match=match):
        load_preset(str(path))


def test_the_explanation_weight_has_one_name_and_the_old_one_still_works():
    from cambackdoor.sweep import grid_keys

    cfg = ImplantConfig.from_recipe("v8", lam=1.0)  # --set lam=1 from an old command line
    assert cfg.explanation_weight == 1.0 and cfg.lam == 1.0
    assert ImplantConfig.from_saved({"lam": 0.5}).explanation_weight == 0.5  # a config saved before the rename
    assert grid_keys()["lambda"] == grid_keys()["lam"] == "explanation_weight"
