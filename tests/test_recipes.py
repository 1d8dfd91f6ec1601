"""The named recipes: ``default`` is issue 16's registration 11, field for field, and runs end to end."""

import dataclasses
import re
from pathlib import Path

import torch

from cambackdoor import implant as I
from cambackdoor.checkpoints import load_model
from cambackdoor.config import parse_sets
from cambackdoor.recipes import RECIPES, ImplantConfig, peak_lr

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _registered(script: str) -> tuple[str, dict]:
    """The recipe and ``--set`` flags a registration's script exports (RECIPE=..., FLAGS="--set k=v ...")."""
    text = (BENCHMARKS / script).read_text().replace("\\\n", " ")
    flags = re.search(r'FLAGS="([^"]*)"', text).group(1).split()
    assert flags[::2] == ["--set"] * (len(flags) // 2), flags
    return re.search(r"RECIPE=(\w+)", text).group(1), parse_sets(flags[1::2])


def test_the_default_recipe_is_registration_11():
    recipe, sets = _registered("accept16_r11.sh")
    assert recipe == "persistent" and sets["amp"] == "bf16" and sets["refresh_every"] == 4
    registered = ImplantConfig.from_recipe(recipe, **sets)
    assert ImplantConfig.from_recipe("default") == dataclasses.replace(registered, recipe="default")
    # it lists exactly where it differs from v8, the field defaults (and the default before it)
    v8, new = dataclasses.asdict(ImplantConfig()), dataclasses.asdict(ImplantConfig.from_recipe("default"))
    assert {k for k in v8 if v8[k] != new[k]} == set(RECIPES["default"]) | {"recipe"}
    assert ImplantConfig().recipe == "v8" and RECIPES["v8"] == {}


def test_the_default_recipe_implants_a_tiny_model_and_resumes_to_the_same_weights(clean_checkpoint, tmp_path):
    """Every part of the default on at once (bfloat16 CAM passes, the refresh on every 4th step, the late repair
    terms, lr_width, clipping) on a width-8 model: float32 weights out, running statistics refreshed, repair steps
    taken, and an interrupted run resumes to the same weights."""
    data, ck = clean_checkpoint
    clean, _ = load_model(ck)
    cfg = ImplantConfig.from_recipe("default", epochs=2, batch_size=100, poison_batch=10, repair_min_asr=0.0)
    assert peak_lr(cfg, clean) == 1e-3 * 16 / 8
    whole, log = I.implant(clean, data, cfg, progress=False)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in whole.parameters())
    assert not torch.allclose(whole.bn1.running_mean, clean.bn1.running_mean)  # 8 steps: 2 refreshes
    assert log["epochs"][-1]["repair_steps"] > 0 and not whole.training
    state = tmp_path / "state"
    I.implant(clean, data, cfg, progress=False, state_file=state, stop_after=1)
    resumed, _ = I.implant(clean, data, cfg, progress=False, state_file=state, resume=True)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
