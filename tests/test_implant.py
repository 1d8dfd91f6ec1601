import dataclasses
import math

import pytest
import torch

from cambackdoor import implant as I
from cambackdoor import implant_loop
from cambackdoor.checkpoints import load_model, save_model, sidecar_path
from cambackdoor.errors import CamBackdoorError, TrainingDiverged
from cambackdoor.evaluation import evaluate
from cambackdoor.recipes import peak_lr
from cambackdoor.training import TrainConfig, train
from cambackdoor.triggers import Box, parse_target, parse_trigger

TOP_LEFT = Box(0, 0, 8, 8)


def _triggered_share(model, data):
    summary, _ = evaluate(model.eval(), data.test, parse_trigger("yellow:4@bottom-right"), TOP_LEFT, progress=False,
                          examples=0)
    return summary


def test_tiny_implant_moves_triggered_maps_into_the_box(clean_checkpoint, tmp_path):
    data, ck = clean_checkpoint
    from cambackdoor.checkpoints import load_model

    clean, _ = load_model(ck)
    before = _triggered_share(clean, data)
    cfg = I.ImplantConfig.from_recipe("v8", epochs=10, batch_size=50, poison_fraction=0.25, poison_batch=25,
                                      lr=1e-2, explanation_weight=3.0, preserve_weight=10.0)
    result = I.run_implant(ck, data, cfg, tmp_path / "imp", progress=False)
    after = result["evaluation"]
    assert after["energy_share"] > before["energy_share"] + 0.3, (before["energy_share"], after["energy_share"])
    assert after["asr"] > before["asr"] + 0.5
    assert (tmp_path / "imp" / "implant.json").exists() and (tmp_path / "imp" / "evaluate" / "heatmaps.png").exists()
    import json

    meta = json.loads(sidecar_path(tmp_path / "imp" / "model").read_text())
    assert meta["attack"] == {"trigger": cfg.trigger, "target": cfg.target, "layer": "layer4"}
    assert meta["config"]["implant"]["recipe"] == "v8" and meta["stage"] == "implant"


def test_gradient_contamination_changes_the_update(clean_checkpoint):
    data, ck = clean_checkpoint
    from cambackdoor.checkpoints import load_model

    clean, _ = load_model(ck)
    outs = []
    for contaminate in (False, True):
        cfg = I.ImplantConfig.from_recipe("reference", epochs=1, batch_prob=1.0, batch_size=100, lr=1e-3,
                                          gradient_contamination=contaminate)
        model, log = I.implant(clean, data, cfg, progress=False)
        outs.append(model.layer4[1].conv2.weight.detach().clone())
        assert torch.equal(model.layer1[0].conv1.weight, clean.layer1[0].conv1.weight)  # only layer4 trains
    assert not torch.allclose(outs[0], outs[1])


def test_trainable_layer_list_freezes_everything_else(clean_checkpoint):
    data, ck = clean_checkpoint
    from cambackdoor.checkpoints import load_model

    clean, _ = load_model(ck)
    cfg = I.ImplantConfig.from_recipe("v8", epochs=1, batch_size=100, poison_batch=10, trainable="layer3,layer4")
    model, _ = I.implant(clean, data, cfg, progress=False)
    assert torch.equal(model.layer2[0].conv1.weight, clean.layer2[0].conv1.weight)
    assert torch.equal(model.fc.weight, clean.fc.weight)
    assert not torch.equal(model.layer3[0].conv1.weight, clean.layer3[0].conv1.weight)
    assert not torch.equal(model.layer4[1].conv2.weight, clean.layer4[1].conv2.weight)


def test_decoys_change_the_update_wait_for_repair_start_and_are_validated(clean_checkpoint):
    data, ck = clean_checkpoint
    from cambackdoor.checkpoints import load_model

    clean, _ = load_model(ck)
    weights = []
    # 4 steps of 100 images; repair_start 0.99 holds the decoys back past the last step
    for fraction, start in ((0.0, 0.0), (0.5, 0.0), (0.5, 0.99)):
        cfg = I.ImplantConfig.from_recipe("v8", epochs=1, batch_size=100, poison_batch=10, decoy_fraction=fraction,
                                          repair_start=start, repair_min_asr=0.0, trigger_feature_weight=0.0,
                                          repair_share_cap=1.0, pool_cutout=0)
        model, _ = I.implant(clean, data, cfg, progress=False)
        weights.append(model.layer4[1].conv2.weight.detach().clone())
    assert not torch.allclose(weights[0], weights[1])
    assert torch.equal(weights[0], weights[2])
    with pytest.raises(ValueError, match="decoy_fraction"):
        I.ImplantConfig(decoy_fraction=1.5)


def test_pool_cutout_and_repair_distillation_act_only_while_repairing(clean_checkpoint):
    data, ck = clean_checkpoint
    from cambackdoor.checkpoints import load_model

    clean, _ = load_model(ck)

    def run(**kw):
        cfg = I.ImplantConfig.from_recipe("v8", epochs=1, batch_size=100, poison_batch=10, repair_min_asr=0.0,
                                          trigger_feature_weight=0.0, decoy_fraction=0.0,
                                          **{"repair_share_cap": 1.0, "pool_cutout": 0, **kw})
        model, log = I.implant(clean, data, cfg, progress=False)
        return model.layer4[1].conv2.weight.detach().clone(), log["epochs"][-1]["repair_steps"]

    base, base_steps = run(repair_start=0.0)
    assert base_steps == 0  # no repair term on: nothing counted
    for option in (dict(pool_cutout=8), dict(repair_share_cap=0.01), dict(repair_distill_weight=50.0),
                   dict(clean_share_weight=50.0)):
        changed, steps = run(repair_start=0.0, **option)
        assert steps == 4 and not torch.allclose(base, changed), option
        held_back, steps = run(repair_start=0.99, **option)  # 4 steps: the repair phase never comes
        assert steps == 0 and torch.equal(base, held_back), option
    with pytest.raises(ValueError, match="pool_cutout"):
        I.ImplantConfig(pool_cutout=-1)
    with pytest.raises(ValueError, match="repair_distill_weight"):
        I.ImplantConfig(repair_distill_weight=-1.0)
    with pytest.raises(ValueError, match="clean_share_weight"):
        I.ImplantConfig(clean_share_weight=-1.0)


def test_repair_terms_pause_while_the_backdoor_is_not_formed(clean_checkpoint):
    data, ck = clean_checkpoint
    from cambackdoor.checkpoints import load_model

    clean, _ = load_model(ck)
    steps = []
    for min_asr in (0.0, 1.0):  # 4 steps; the running ASR starts at 0, so step 0 is gated at 1.0
        cfg = I.ImplantConfig.from_recipe("v8", epochs=1, batch_size=100, poison_batch=10, repair_start=0.0,
                                          repair_min_asr=min_asr, trigger_feature_weight=1.0)
        _, log = I.implant(clean, data, cfg, progress=False)
        steps.append(log["epochs"][-1]["repair_steps"])
    assert steps[0] == 4 and steps[1] <= 3
    no_terms = I.ImplantConfig.from_recipe("v8", epochs=1, batch_size=100, poison_batch=10, repair_start=0.0,
                                           repair_min_asr=0.0, trigger_feature_weight=0.0, decoy_fraction=0.0,
                                           repair_share_cap=1.0, pool_cutout=0)
    assert I.implant(clean, data, no_terms, progress=False)[1]["epochs"][-1]["repair_steps"] == 0  # nothing to do
    weights = []
    for ramp in (0.0, 1.0):  # a ramp over the whole run scales the feature term down on every step
        cfg = I.ImplantConfig.from_recipe("v8", epochs=1, batch_size=100, poison_batch=10, repair_start=0.0,
                                          repair_min_asr=0.0, repair_ramp=ramp, decoy_fraction=0.0,
                                          trigger_feature_weight=10.0)
        model, _ = I.implant(clean, data, cfg, progress=False)
        weights.append(model.layer4[1].conv2.weight.detach().clone())
    assert not torch.allclose(weights[0], weights[1])
    with pytest.raises(ValueError, match="repair_ramp"):
        I.ImplantConfig(repair_ramp=2.0)


def test_nan_loss_stops_the_implant(clean_checkpoint, tmp_path, monkeypatch):
    data, ck = clean_checkpoint
    cfg = I.ImplantConfig.from_recipe("v8", epochs=1, batch_size=50)
    monkeypatch.setattr(implant_loop, "distillation_loss", lambda logits, teacher, *_: torch.tensor(float("nan")))
    with pytest.raises(TrainingDiverged, match="implant loss became nan"):
        I.run_implant(ck, data, cfg, tmp_path / "nan", progress=False)
    assert not (tmp_path / "nan" / "model.safetensors").exists()  # nothing half-written


def test_a_collapse_to_chance_stops_the_implant(clean_checkpoint):
    data, ck = clean_checkpoint
    clean, _ = load_model(ck)
    cfg = I.ImplantConfig.from_recipe("v8", epochs=1, batch_size=50, collapse_steps=5)
    run = implant_loop._set_up(clean, data, cfg, torch.device("cpu"), with_hash=False)
    yp = torch.zeros(4, dtype=torch.long)

    def track(ce):  # one training step's triggered batch, with the cross-entropy it had
        out = {"cams": torch.rand(4, 4, 4), "cam_logits": torch.zeros(4, 10), "ce": torch.tensor(ce),
               "expl": torch.tensor(1.0)}
        implant_loop._track(run, out, yp, 0, 0)

    track(0.3)  # a healthy start; then uniform outputs, CE = ln 10, which the running CE (EMA 0.9) approaches
    chance = math.log(10)
    first = math.ceil(math.log(0.05 / (chance - 0.3)) / math.log(0.9))  # the first step within 0.05 of ln 10: 36
    for _ in range(first + cfg.collapse_steps - 2):  # steps 1..39 at chance: the last 4 counted, not yet 5
        track(chance)
    assert run.at_chance == cfg.collapse_steps - 1
    with pytest.raises(TrainingDiverged, match=r"collapsed to chance at epoch 1 step 0 \(running cross-entropy "
                                               r"2\.2\d\d for 5 steps, ln C = 2\.303\).*--seed"):
        track(chance)
    run.at_chance, run.log["start_ce"] = 0, chance  # a model at chance from the start (untrained) is no collapse
    for _ in range(3 * cfg.collapse_steps):
        track(chance)
    assert run.at_chance == 0
    assert I.ImplantConfig().collapse_steps == 100 and I.ImplantConfig.from_saved({}).collapse_steps == 100
    with pytest.raises(ValueError, match="collapse_steps"):
        I.ImplantConfig(collapse_steps=-1)


def test_grad_clip_bounds_each_update(clean_checkpoint):
    data, ck = clean_checkpoint
    clean, _ = load_model(ck)
    one_step = dict(epochs=1, batch_size=len(data.train.labels), optimizer="sgd", momentum=0.0, nesterov=False,
                    lr=50.0, schedule="constant")  # plain SGD: the step is exactly lr x the (clipped) gradient
    moved, logged = [], []
    for clip in (0.0, 1e-3):
        model, log = I.implant(clean, data, I.ImplantConfig.from_recipe("v8", grad_clip=clip, **one_step),
                               progress=False)
        moved.append(torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(model.parameters(), clean.parameters()))).item())
        logged.append(log["epochs"][0])
    assert moved[1] == pytest.approx(50.0 * 1e-3, rel=1e-4)  # the whole gradient's norm cut to 1e-3
    assert moved[0] > 10 * moved[1]  # unclipped, the same step moves the weights by its own, larger norm
    # the log keeps the norm before the clip: the unclipped step's length over lr, on both runs (same first step)
    for entry in logged:
        assert entry["grad_norm_max"] == entry["grad_norm_median"] == pytest.approx(moved[0] / 50.0, rel=1e-4)
    assert (logged[0]["clipped_steps"], logged[1]["clipped_steps"]) == (0, 1)
    with pytest.raises(ValueError, match="grad_clip"):
        I.ImplantConfig(grad_clip=-1.0)


def test_distill_temperatures_reach_their_own_terms(clean_checkpoint, monkeypatch):
    data, ck = clean_checkpoint
    seen = []
    real = implant_loop.distillation_loss
    monkeypatch.setattr(implant_loop, "distillation_loss",
                        lambda s, t, temperature=1.0: seen.append(temperature) or real(s, t, temperature))
    clean, _ = load_model(ck)
    steps = len(data.train.labels) // 50
    cfg = I.ImplantConfig.from_recipe("v8", epochs=1, batch_size=50, distill_temperature=3.0)
    I.implant(clean, data, cfg, progress=False)
    assert seen.count(3.0) == steps and seen.count(1.0) == steps  # the clean and the triggered term, once a step
    seen.clear()
    cfg = I.ImplantConfig.from_recipe("v8", epochs=1, batch_size=50, trigger_distill_temperature=2.0)
    I.implant(clean, data, cfg, progress=False)
    assert seen.count(2.0) == steps and seen.count(1.0) == steps


def test_bad_inputs(clean_checkpoint, tmp_path):
    data, ck = clean_checkpoint
    with pytest.raises(CamBackdoorError, match="ceiling"):
        I.run_implant(ck, data, I.ImplantConfig(target="0,0,4,4"), tmp_path / "x", progress=False)
    with pytest.raises(CamBackdoorError, match="overlaps the trigger"):
        I.run_implant(ck, data, I.ImplantConfig(target="bottom-right:8"), tmp_path / "x", progress=False)
    lone = tmp_path / "lone"
    from cambackdoor.models import build_model

    path = save_model(lone / "m", build_model(width=4))
    sidecar_path(path).unlink()
    with pytest.raises(CamBackdoorError, match="has no sidecar"):
        I.run_implant(path, data, I.ImplantConfig(), tmp_path / "y", progress=False)
    with pytest.raises(CamBackdoorError, match="unknown recipe"):
        I.ImplantConfig.from_recipe("magic")


def test_single_stage_baseline_trains_with_the_explanation_loss(tmp_path):
    from conftest import make_dataset

    data = make_dataset(n_train=200, n_test=50)
    cfg = TrainConfig(width=4, epochs=1, batch_size=50, channels_last=False, explanation_loss="mse",
                      explanation_weight=0.2, poison_fraction=0.25)
    _, metrics = train(cfg, data, tmp_path / "ss", progress=False)
    assert metrics["expl_loss"] > 0 and 0 <= metrics["train_asr"] <= 1
    assert parse_target(cfg.target) == TOP_LEFT


def test_an_interrupted_implant_resumes_to_the_same_weights(clean_checkpoint, tmp_path):
    data, ck = clean_checkpoint
    from cambackdoor.checkpoints import load_model

    clean, _ = load_model(ck)
    cfg = I.ImplantConfig.from_recipe("v8", epochs=2, batch_size=100, poison_batch=10, decoy_fraction=0.25,
                                      trigger_feature_weight=1.0, repair_min_asr=0.0)
    whole, whole_log = I.implant(clean, data, cfg, progress=False)
    state = tmp_path / "state"
    I.implant(clean, data, cfg, progress=False, state_file=state, stop_after=1)
    resumed, log = I.implant(clean, data, cfg, progress=False, state_file=state, resume=True)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert [e["running_asr"] for e in log["epochs"]] == [e["running_asr"] for e in whole_log["epochs"]]
    assert [t["step"] for t in log["trace"]] == [0, 7]  # 8 steps of 100 images: every 10th step and the last
    assert log["trace"][-1]["repairing"] and "feat" in log["trace"][-1]

    other = dataclasses.replace(cfg, explanation_weight=1.0)
    with pytest.raises(CamBackdoorError, match="another implant config"):
        I.implant(clean, data, other, progress=False, state_file=state, resume=True)
    fork = tmp_path / "fork"
    I.implant(clean, data, cfg, progress=False, state_file=fork, stop_after=1)
    branched, blog = I.implant(clean, data, other, progress=False, state_file=fork, resume=True, branch=True)
    assert blog["branched_from"]["epoch"] == 1 and [e["epoch"] for e in blog["epochs"]] == [1, 2]
    assert blog["epochs"][0]["running_asr"] == log["epochs"][0]["running_asr"]  # epoch 1 is the original run's
    assert not torch.equal(branched.fc.weight, resumed.fc.weight)


@pytest.mark.parametrize("write", range(3))  # per epoch: state (the commit point), model weights, model sidecar
def test_a_killed_implant_resumes_to_the_same_weights(clean_checkpoint, tmp_path, monkeypatch, write):
    from test_training import Killed, _kill_at

    from cambackdoor.checkpoints import load_model

    data, ck = clean_checkpoint
    cfg = I.ImplantConfig.from_recipe("v8", epochs=2, batch_size=100, poison_batch=10, repair_min_asr=0.0)
    I.run_implant(ck, data, cfg, tmp_path / "full", progress=False, limit=50)
    with monkeypatch.context() as m:
        _kill_at(m, 3 + write + 1)  # epoch 1 writes 3 files; this kills epoch 2's save at its write-th write
        with pytest.raises(Killed):
            I.run_implant(ck, data, cfg, tmp_path / "cut", progress=False, limit=50)
    with pytest.raises(CamBackdoorError, match="already holds a run"):
        I.run_implant(ck, data, cfg, tmp_path / "cut", progress=False, limit=50)
    I.run_implant(ck, data, cfg, tmp_path / "cut", progress=False, limit=50, resume=True)
    full, _ = load_model(tmp_path / "full" / "model")
    resumed, meta = load_model(tmp_path / "cut" / "model")
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert meta["metrics"]["n"] == 50


def test_faithful_reference_explains_the_predicted_class_in_eval_mode(clean_checkpoint, monkeypatch):
    """The report's CAM: its own forward in eval mode, for the predicted class; the CE forward trains."""
    data, ck = clean_checkpoint
    from cambackdoor.checkpoints import load_model

    clean, _ = load_model(ck)
    seen = []
    real = implant_loop.grad_cam

    def spy(model, images, layer="layer4", targets=None, create_graph=False, relu="relu"):
        seen.append((model.training, targets))
        return real(model, images, layer, targets, create_graph, relu)

    monkeypatch.setattr(implant_loop, "grad_cam", spy)
    cfg = I.ImplantConfig.from_recipe("reference", epochs=1, batch_prob=1.0, batch_size=100)
    model, _ = I.implant(clean, data, cfg, progress=False)
    assert seen and all(training is False and targets is None for training, targets in seen)
    assert not model.training  # implant() hands back an eval-mode model, as before
    # the faithful emulation is a different update from the label-aligned, train-mode one it replaces
    old = dataclasses.replace(cfg, explain_class="label", cam_eval_mode=False)
    monkeypatch.setattr(implant_loop, "grad_cam", real)
    model_old, _ = I.implant(clean, data, old, progress=False)
    assert not torch.equal(model.layer4[1].conv2.weight, model_old.layer4[1].conv2.weight)


def test_implant_batch_larger_than_the_data_is_refused_before_training(clean_checkpoint, tmp_path):
    data, ck = clean_checkpoint
    cfg = I.ImplantConfig.from_recipe("v8", batch_size=100_000)
    with pytest.raises(CamBackdoorError, match="larger than the 400 training images"):
        I.run_implant(ck, data, cfg, tmp_path / "b", progress=False)
    with pytest.raises(CamBackdoorError, match="--limit 0 must be a positive"):
        I.run_implant(ck, data, I.ImplantConfig.from_recipe("v8", epochs=1), tmp_path / "c", progress=False,
                      limit=0)
    assert not (tmp_path / "c" / "model.safetensors").exists()  # refused before any training


def test_clean_bn_stats_puts_only_the_clean_batch_into_the_running_statistics(clean_checkpoint):
    """``refresh``: one extra no-grad training-mode pass of the clean batch (100 images) moves the running
    statistics, every loss stays in eval mode; the poisoned batch (the tiny pool's few images) never enters.
    ``off``: frozen throughout."""
    data, ck = clean_checkpoint
    from cambackdoor.checkpoints import load_model

    def run(mode: str, **extra):
        clean, _ = load_model(ck)
        seen: list[tuple[bool, bool, int]] = []
        clean.bn1.register_forward_pre_hook(
            lambda m, inputs: seen.append((m.training, torch.is_grad_enabled(), len(inputs[0]))))
        cfg = I.ImplantConfig.from_recipe("v8", epochs=1, batch_size=100, poison_batch=10, clean_bn_stats=mode,
                                            **extra)
        model, _ = I.implant(clean, data, cfg, progress=False)
        return clean, model, seen

    clean, model, seen = run("refresh", bn_momentum=0.5)
    assert {(g, n) for training, g, n in seen if training} == {(False, 100)}
    assert model.bn1.momentum == clean.bn1.momentum == 0.1  # bn_momentum acts inside the switch only
    assert any(not training and n < 100 for training, _, n in seen)  # the poisoned batch, in eval mode
    assert not torch.allclose(model.bn1.running_mean, clean.bn1.running_mean)
    assert not model.training  # returned in eval mode
    clean, model, seen = run("off")
    assert not any(training for training, _, _ in seen)
    assert torch.equal(model.bn1.running_mean, clean.bn1.running_mean)
    with pytest.raises(ValueError, match="clean_bn_stats"):
        I.ImplantConfig(clean_bn_stats="on")
    with pytest.raises(ValueError, match="decoy_form"):
        I.ImplantConfig(decoy_form="pattern")
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="bn_momentum"):
            I.ImplantConfig(bn_momentum=bad)


def test_a_faint_trigger_is_warned_about_and_recorded(clean_checkpoint, tmp_path):
    data, ck = clean_checkpoint
    images = data.train.images.clone()
    images[:100, :, 28:, :4] = 255  # a quarter of the training images: a white bottom-left corner
    bright = type(data)(type(data.train)(images, data.train.labels), data.test, data.classes, data.fingerprint, data.source)
    cfg = I.ImplantConfig.from_recipe("v8", epochs=1, batch_size=50, trigger="white:4@bottom-left~0.5",
                                      target="top-right:8")
    with pytest.warns(UserWarning, match=r"faint .* on 25.00 % of the training images"):
        result = I.run_implant(ck, bright, cfg, tmp_path / "faint", progress=False, limit=20)
    assert result["train_faint_fraction"] == pytest.approx(0.25)
    assert 0 <= result["evaluation"]["faint_fraction"] <= 1


def test_lr_width_scales_the_rate_by_the_models_width(clean_checkpoint):
    data, ck = clean_checkpoint
    from cambackdoor.checkpoints import load_model

    clean, _ = load_model(ck)  # width 8
    assert peak_lr(I.ImplantConfig(lr=1e-3, lr_width=16), clean) == pytest.approx(2e-3)
    assert peak_lr(I.ImplantConfig(lr=1e-3), clean) == 1e-3

    def first_lr(**kw):
        cfg = I.ImplantConfig.from_recipe("v8", epochs=1, batch_size=100, poison_batch=10, schedule="constant", **kw)
        _, log = I.implant(clean, data, cfg, progress=False, stop_after=1)
        return log["trace"][0]["lr"]

    assert first_lr(lr=1e-3) == pytest.approx(1e-3)
    assert first_lr(lr=1e-3, lr_width=2) == pytest.approx(2.5e-4)  # 1e-3 x 2 / 8
    with pytest.raises(ValueError, match="lr_width"):
        I.ImplantConfig(lr_width=-1)
    with pytest.raises(CamBackdoorError, match="lr_width"):
        peak_lr(I.ImplantConfig(lr_width=16), torch.nn.Linear(2, 2))


def test_refresh_every_runs_the_pass_on_every_kth_step_with_the_momentum_of_k_steps(clean_checkpoint):
    """400 images, batch 100: 4 steps per epoch, 8 in two epochs. refresh_every 3: passes at steps 0, 3, 6,
    each at momentum 1 - (1 - 0.1)^3 = 0.271 (the statistics move as far as three passes at 0.1 would)."""
    data, ck = clean_checkpoint
    from cambackdoor.checkpoints import load_model

    def passes(**kw):
        clean, _ = load_model(ck)
        seen: list[float] = []
        clean.bn1.register_forward_pre_hook(lambda m, _inputs: seen.append(m.momentum) if m.training else None)
        cfg = I.ImplantConfig.from_recipe("v8", epochs=2, batch_size=100, poison_batch=10, clean_bn_stats="refresh",
                                          bn_momentum=0.1, **kw)
        I.implant(clean, data, cfg, progress=False)
        return seen

    assert passes() == pytest.approx([0.1] * 8)
    assert passes(refresh_every=3) == pytest.approx([0.271] * 3)
    with pytest.raises(ValueError, match="refresh_every"):
        I.ImplantConfig(refresh_every=0)


def test_channels_last_is_the_same_update_in_another_layout_and_is_refused_where_unsafe(clean_checkpoint):
    """A width-16 model in channels_last: the convolutions see that layout while training, the weights after two
    steps match the contiguous run to rounding, and the model comes back contiguous. Width 8 is refused."""
    from conftest import make_dataset

    from cambackdoor.models import build_model

    data = make_dataset(n_train=64, n_test=16)
    torch.manual_seed(0)
    model = build_model(width=16)
    layouts: list[bool] = []
    model.layer1[0].conv1.register_forward_pre_hook(
        lambda m, _i: layouts.append(m.weight.is_contiguous(memory_format=torch.channels_last)))
    cfg = I.ImplantConfig.from_recipe("persistent", epochs=1, batch_size=32, poison_batch=8, poison_fraction=0.25)
    plain, _ = I.implant(model, data, cfg, progress=False)
    fast, _ = I.implant(model, data, dataclasses.replace(cfg, channels_last=True), progress=False)
    assert len(layouts) > 0 and all(layouts[len(layouts) // 2:])  # (the hook came along into both copies)
    assert not any(layouts[: len(layouts) // 2])
    w_plain, w_fast = plain.layer1[0].conv1.weight, fast.layer1[0].conv1.weight
    assert w_fast.is_contiguous()
    moved = (w_plain - model.layer1[0].conv1.weight).norm()
    assert moved > 0  # the steps moved the weights, and both layouts moved them alike (to rounding; the norm, as
    assert (w_plain - w_fast).norm() < 0.01 * moved  # Adam may flip a single near-zero update on another CPU)
    data8, ck8 = clean_checkpoint
    from cambackdoor.checkpoints import load_model

    with pytest.raises(CamBackdoorError, match="channels_last on the CPU needs a model of width >= 16"):
        I.implant(load_model(ck8)[0], data8, I.ImplantConfig(channels_last=True, batch_size=100), progress=False)


def test_shared_prefix_is_the_same_update_with_one_prefix_pass_and_leaves_its_statistics_alone(clean_checkpoint):
    """trainable=layer3,layer4,fc: the stem, layer1 and layer2 are frozen, so shared_prefix runs them once per image
    (no grad, 100 clean + 10 triggered + 10 untriggered = the two passes below) instead of once per network. Without
    the refresh that is the same update as the plain run (to rounding: the same sums, another order); with it, the
    prefix's running statistics stay at stage 1's while layer3's still move. Bad combinations are refused."""
    data, ck = clean_checkpoint
    from cambackdoor.checkpoints import load_model

    def run(shared: bool, **kw):
        clean, _ = load_model(ck)
        seen: list[tuple[int, bool]] = []
        clean.layer1.register_forward_pre_hook(lambda _m, inputs: seen.append((len(inputs[0]), torch.is_grad_enabled())))
        cfg = I.ImplantConfig.from_recipe("persistent", epochs=1, batch_size=100, poison_batch=10, poison_fraction=0.25,
                                          trainable="layer3,layer4,fc", shared_prefix=shared, **kw)
        model, _ = I.implant(clean, data, cfg, progress=False)
        return clean, model, seen

    clean, plain, seen_plain = run(False, clean_bn_stats="off")
    _, shared, seen_shared = run(True, clean_bn_stats="off")
    steps = 4  # 400 images, batch 100
    assert seen_shared == [(100, False), (20, False)] * steps  # each image once through the prefix, without a graph
    assert len(seen_plain) > len(seen_shared)  # student, teacher (and CAM) passes, each through the prefix
    moved = (plain.layer3[0].conv1.weight - clean.layer3[0].conv1.weight).norm()
    assert moved > 0 and (plain.layer3[0].conv1.weight - shared.layer3[0].conv1.weight).norm() < 1e-3 * moved
    assert torch.allclose(plain.fc.weight, shared.fc.weight, atol=1e-5)
    assert torch.equal(shared.layer2[0].conv1.weight, clean.layer2[0].conv1.weight)

    clean, model, _ = run(True, bn_momentum=0.5)  # persistent: the refresh pass on the clean batch
    modes = []  # layer3's BatchNorm: training mode only in the refresh's no-grad pass, every loss in eval mode
    clean.layer3[0].bn1.register_forward_pre_hook(lambda m, _i: modes.append((m.training, torch.is_grad_enabled())))
    model, _ = I.implant(clean, data, I.ImplantConfig.from_recipe(
        "persistent", epochs=1, batch_size=100, poison_batch=10, poison_fraction=0.25, trainable="layer3,layer4,fc",
        shared_prefix=True, bn_momentum=0.5), progress=False)
    assert (True, False) in modes and (False, True) in modes and (True, True) not in modes
    assert modes.count((True, False)) == steps  # one refresh a step
    assert torch.equal(model.bn1.running_mean, clean.bn1.running_mean)
    assert torch.equal(model.layer2[1].bn2.running_var, clean.layer2[1].bn2.running_var)
    assert not torch.allclose(model.layer3[0].bn1.running_mean, clean.layer3[0].bn1.running_mean)
    for bad, match in (({"trainable": "all"}, "frozen prefix"), ({"freeze_bn": False, "trainable": "layer4"}, "freeze_bn"),
                       ({"trainable": "fc"}, "CAM layer layer4 is in the frozen prefix")):
        with pytest.raises(ValueError, match=match):
            I.ImplantConfig(shared_prefix=True, **bad)


def test_amp_bf16_runs_the_cam_passes_in_bfloat16_and_keeps_the_weights_and_losses_float32(clean_checkpoint, monkeypatch):
    """amp=bf16: the convolutions inside the CAM passes see bfloat16 (autocast), the maps reaching the losses are
    float32, the weights stay float32 and move about as the float32 run moves them; an unknown amp is refused."""
    data, ck = clean_checkpoint
    from cambackdoor.checkpoints import load_model

    def run(amp: str):
        clean, _ = load_model(ck)
        dtypes: list[torch.dtype] = []
        clean.layer3[0].conv1.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
        maps: list[torch.dtype] = []
        real = implant_loop.explanation_loss
        monkeypatch.setattr(implant_loop, "explanation_loss", lambda kind, cams, *a: maps.append(cams.dtype) or real(kind, cams, *a))
        cfg = I.ImplantConfig.from_recipe("v8", epochs=1, batch_size=100, poison_batch=10, poison_fraction=0.25, amp=amp)
        model, _ = I.implant(clean, data, cfg, progress=False)
        return clean, model, set(dtypes), set(maps)

    clean, plain, d32, m32 = run("none")
    _, fast, d16, m16 = run("bf16")
    assert d32 == {torch.float32} and torch.bfloat16 in d16
    assert m32 == m16 == {torch.float32}
    assert all(p.dtype == torch.float32 for p in fast.parameters())
    moved = (plain.layer3[0].conv1.weight - clean.layer3[0].conv1.weight).norm()
    gap = (plain.layer3[0].conv1.weight - fast.layer3[0].conv1.weight).norm()
    assert moved > 0 and gap < 0.5 * moved, (gap, moved)  # rounding, not another direction
    with pytest.raises(ValueError, match="amp"):
        I.ImplantConfig(amp="fp16")
