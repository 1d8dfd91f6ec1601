"""The v8 (the default of the time) and reference implants replay: the same weights as the code before the redesign.

``tests/data/replay-*.safetensors`` were written once by the implant loop as it stood before the
redesign (commit f12250c, the script is in the docstring of :func:`_run`); a tiny width-4 model from a
fixed seed, two epochs on 200 synthetic images, every term of each recipe active (the default's repair
terms with ``repair_min_asr=0``). Any change to the loop's order of random draws, or to its arithmetic beyond a
few per cent of a term, shows.

The weights agree to the bit only on CPU kernels that round as those that wrote the fixtures (AVX2, one thread).
Other kernels round differently and two epochs amplify it, so the weights are compared through the update the
implant made (trained - parent), as the distance's share of that update's norm. Measured (twenty-first session):
AVX-512 or no SIMD (``ATEN_CPU_CAPABILITY``), 1 or 2 threads: at most 0.13 % (default) and 0.002 % (reference);
another random stream (seed + 1): 83 % and 52 %; the explanation weight 1 % higher: 1.9 % and 0.2 %.
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cambackdoor.implant import implant
from cambackdoor.models import build_model
from cambackdoor.errors import CamBackdoorError
from cambackdoor.recipes import RECIPES, ImplantConfig

DATA = Path(__file__).parent / "data"
CASES = {  # "default": the fixture's name, from when v8 was the default recipe
    "default": dict(recipe="v8", epochs=2, batch_size=50, poison_fraction=0.25, poison_batch=25, repair_min_asr=0.0),
    "reference": dict(recipe="reference", epochs=2, batch_size=25, lr=1e-3),
}
# the largest distance from the fixture, as a share of the update's norm: ~40x the rounding measured on other
# kernels (module docstring), far under what another random stream gives
TOLERANCE = {"default": 0.05, "reference": 0.001}


def _run(case):
    """As the fixtures were made: make_dataset(n_train=200, n_test=20); torch.manual_seed(0);
    build_model(width=4).eval(); implant(parent, data, cfg)."""
    from conftest import make_dataset

    values = dict(CASES[case])
    cfg = ImplantConfig.from_recipe(values.pop("recipe"), **values)
    return implant(_parent(), make_dataset(n_train=200, n_test=20), cfg, progress=False)


def _parent():
    torch.manual_seed(0)
    return build_model(width=4).eval()


def _norm(tensors):
    return sum((t.double() ** 2).sum() for t in tensors).sqrt()


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_implant_replays_to_the_same_weights(case):
    model, log = _run(case)
    expected = load_file(DATA / f"replay-{case}.safetensors")
    state = model.state_dict()
    parent = _parent().state_dict()
    assert set(state) == set(expected)
    floats = [k for k, v in expected.items() if v.is_floating_point()]
    for name in set(expected) - set(floats):  # BatchNorm's step counters: exact everywhere
        assert torch.equal(state[name], expected[name]), name
    update = _norm(expected[k].double() - parent[k].double() for k in floats)
    distance = _norm(state[k].double() - expected[k].double() for k in floats)
    assert update > 0.005 * _norm(expected[k] for k in floats)  # the implant moved them
    assert distance <= TOLERANCE[case] * update, f"{case}: {distance / update:.2%} of the update"
    if case == "default":
        assert log["epochs"][-1]["repair_steps"] > 0  # the repair terms took part


def test_a_config_saved_before_the_redesign_still_loads():
    saved = json.loads((DATA / "implant-config-v8.json").read_text())  # runs/cpu/implant-default, 2026-11-25
    # saved before 2026-11-28, it names v8 "default": the label stays as saved, the values are v8's
    assert saved["recipe"] == "default" and ImplantConfig.from_recipe("v8") == ImplantConfig()
    assert ImplantConfig.from_saved(saved) == dataclasses.replace(ImplantConfig(), recipe="default")
    saved = {**saved, "recipe": "v8"}
    # a config from before the repair terms (the v2 default) had none of these fields: it reads back as v2
    v2 = {k: v for k, v in saved.items() if k not in ("trigger_feature_weight", "feature_loss", "decoy_fraction",
                                                       "repair_share_cap", "pool_cutout", "explain_class",
                                                       "cam_eval_mode")}
    old = ImplantConfig.from_saved(v2)
    assert (old.trigger_feature_weight, old.decoy_fraction, old.repair_share_cap, old.pool_cutout) == (0, 0, 1, 0)
    assert not old.has_repair_terms and old.explain_class == "label" and not old.cam_eval_mode
    with pytest.raises(CamBackdoorError, match="removed option.*repair_poison_ce_weight"):
        ImplantConfig.from_saved({**saved, "repair_poison_ce_weight": 0.5})  # a rejected option that was on
    with pytest.raises(CamBackdoorError, match="rejected option.*f12250c"):
        ImplantConfig.from_recipe("v8", repair_trigger_distill_weight=1.0)  # --set repair_trigger_distill_weight=1
    with pytest.raises(CamBackdoorError, match="unknown fields"):
        ImplantConfig.from_saved({**saved, "warp_drive": 1})
    # rejected on 2026-11-26: simulated maintenance and clean_bn_stats=train; switched off they read back
    assert ImplantConfig.from_saved({**saved, "maintenance_weight": 0.0, "maintenance_lr": 1.0}) == ImplantConfig()
    assert ImplantConfig.from_saved({**saved, "trigger_dropout": 0.0}) == ImplantConfig()  # rejected 2026-11-27
    assert ImplantConfig.from_saved({**saved, "gradient_projection": "off"}) == ImplantConfig()
    assert ImplantConfig.from_saved({**saved, "teacher_flip": False}) == ImplantConfig()
    for bad, commit in (({"maintenance_weight": 1.0}, "650083d"), ({"clean_bn_stats": "train"}, "650083d"),
                        ({"trigger_dropout": 0.25}, "d8ec76d"), ({"gradient_projection": "always"}, "984a343"),
                        ({"teacher_flip": True}, "0315208")):
        with pytest.raises(CamBackdoorError, match=f"removed option.*{next(iter(bad))}.*{commit}"):
            ImplantConfig.from_saved({**saved, **bad})
        with pytest.raises(CamBackdoorError, match=f"rejected option.*{commit}"):
            ImplantConfig.from_recipe("persistent", **bad)


def test_each_recipe_lists_only_where_it_differs_from_the_defaults():
    default = dataclasses.asdict(ImplantConfig())
    reference = dataclasses.asdict(ImplantConfig.from_recipe("reference"))
    differ = {k for k in default if default[k] != reference[k]} - {"recipe"}
    assert differ <= set(RECIPES["reference"]) and RECIPES["v8"] == {}
