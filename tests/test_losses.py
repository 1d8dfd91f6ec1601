"""The implant's loss terms, each on hand-made maps with values computed by hand."""

import math

import pytest
import torch

from cambackdoor import losses as L
from cambackdoor.recipes import ImplantConfig
from cambackdoor.triggers import Box

TOP_LEFT = Box(0, 0, 8, 8)
W = TOP_LEFT.cell_weights((4, 4))


def test_cell_weights_of_the_default_box():
    expected = torch.zeros(4, 4)
    expected[0, 0] = 1
    assert torch.equal(W, expected)
    assert Box(0, 0, 4, 8).cell_weights((4, 4))[0, 0] == 0.5


def test_log_share_loss_by_hand():
    inside = torch.zeros(1, 4, 4)
    inside[0, 0, 0] = 3.0
    assert L.log_share_loss(inside, W).item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.ones(2, 4, 4)
    assert L.log_share_loss(uniform, W).item() == pytest.approx(math.log(16))
    m = torch.rand(3, 4, 4)
    assert L.log_share_loss(5 * m, W).item() == pytest.approx(L.log_share_loss(m, W).item())  # scale invariant
    # hinge at a share of 0.5: the uniform map (share 1/16) pays log(16) - log(2); a map with all mass inside, nothing
    assert L.log_share_loss(uniform, W, cap=0.5).item() == pytest.approx(math.log(8))
    assert L.log_share_loss(inside, W, cap=0.5).item() == 0.0


def test_report_mse_is_nearly_satisfied_by_a_blank_map():
    mask = TOP_LEFT.mask().float()
    blank = L.mse_mask_loss(torch.zeros(1, 4, 4), mask).item()
    assert blank == pytest.approx(64 / 1024)  # only the 64 box pixels are wrong
    cell = torch.zeros(1, 4, 4)
    cell[0, 0, 0] = 1
    assert L.mse_mask_loss(cell, mask).item() < blank  # the perfect map is barely better


def test_preservation_and_distillation_vanish_on_identical_inputs():
    m = torch.rand(4, 4, 4)
    assert L.preservation_loss(m, m).item() == 0.0
    assert L.preservation_loss(3 * m, m).item() == pytest.approx(0.0, abs=1e-12)  # max-normalised
    assert L.preservation_loss(m, torch.rand(4, 4, 4)).item() > 0
    z = torch.randn(5, 10)
    assert L.distillation_loss(z, z).item() == pytest.approx(0.0, abs=1e-6)
    assert L.distillation_loss(z, z, 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_at_a_temperature_by_hand():
    """Teacher logits (ln 3, 0), student (0, 0). At T = 1 the teacher says (3/4, 1/4); at T = 2 its logits
    halve, (sqrt 3, 1) / (1 + sqrt 3), and the KL is multiplied by T^2 = 4."""
    student, teacher = torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]])
    kl1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert L.distillation_loss(student, teacher).item() == pytest.approx(kl1, rel=1e-5)
    p = math.sqrt(3) / (1 + math.sqrt(3))
    kl2 = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    assert L.distillation_loss(student, teacher, 2.0).item() == pytest.approx(4 * kl2, rel=1e-5)
    # a confident teacher: at T = 1 the wrong classes' order hardly counts, at T = 4 it does
    confident = torch.tensor([[12.0, 4.0, 0.0]])
    swapped = torch.tensor([[12.0, 0.0, 4.0]])  # the same top class and margin, the wrong classes swapped
    at1, at4 = L.distillation_loss(swapped, confident).item(), L.distillation_loss(swapped, confident, 4.0).item()
    assert at1 < 0.01 and at4 > 0.5 and at4 > 100 * at1
    with pytest.raises(ValueError, match="distill_temperature"):
        ImplantConfig(distill_temperature=0.0)
    with pytest.raises(ValueError, match="trigger_distill_temperature"):
        ImplantConfig(trigger_distill_temperature=-1.0)


def test_clean_share_loss_penalises_only_mass_moved_into_the_target():
    teacher = torch.ones(2, 4, 4)  # share 1/16 each
    fired = torch.ones(2, 4, 4)
    fired[0, 0, 0] = 16.0  # image 0: share 16/31 in the target cell; image 1 unchanged
    assert L.clean_share_loss(fired, teacher, W).item() == pytest.approx((16 / 31 - 1 / 16) / 2)
    away = torch.ones(2, 4, 4)
    away[:, 3, 3] = 16.0  # mass moved elsewhere: the share falls, no penalty
    assert L.clean_share_loss(away, teacher, W).item() == 0.0
    assert L.clean_share_loss(3 * teacher, teacher, W).item() == pytest.approx(0.0, abs=1e-7)  # scale free
    fired.requires_grad_(True)
    L.clean_share_loss(fired, teacher, W).backward()
    assert fired.grad[1].abs().max() == 0 and fired.grad[0, 0, 0] > 0  # only the firing image is pushed


def test_feature_distillation_is_relative_and_hooks_are_removed():
    t = torch.full((4, 8), 2.0)
    assert L.feature_distillation_loss(t, t).item() == 0.0
    assert L.feature_distillation_loss(t + 1, t).item() == pytest.approx(1 / 4)  # MSE 1 over mean square 4
    assert L.feature_distillation_loss(10 * (t + 1), 10 * t).item() == pytest.approx(1 / 4)
    assert L.feature_distillation_loss(t + 1, t, "log").item() == pytest.approx(math.log(1.25))
    # features inflated 18x: relative error 289; the log form's gradient is 290x gentler
    big = (18 * t).requires_grad_()
    for kind, expected in (("relative", 289.0), ("log", math.log(290.0))):
        loss = L.feature_distillation_loss(big, t, kind)
        assert loss.item() == pytest.approx(expected)
    g_rel, = torch.autograd.grad(L.feature_distillation_loss(big, t), big)
    g_log, = torch.autograd.grad(L.feature_distillation_loss(big, t, "log"), big)
    assert torch.allclose(g_rel, 290 * g_log)
    with pytest.raises(ValueError, match="feature_loss"):
        ImplantConfig(feature_loss="cosine")
    from cambackdoor.models import build_model

    model = build_model("resnet18", 10, width=4).eval()
    x = torch.rand(3, 3, 32, 32)
    with L.classifier_inputs(model) as feats:
        logits = model(x)
    assert feats[0].shape == (3, 32) and torch.allclose(model.fc(feats[0]), logits)
    assert not model.fc._forward_hooks


def test_refresh_batchnorm_moves_the_running_statistics_by_hand_and_restores_the_mode():
    """One pass, momentum 0.1: running mean 0.9 * old + 0.1 * batch mean; unbiased variance likewise."""
    from cambackdoor.losses import batchnorm_training, refresh_batchnorm

    model = torch.nn.Sequential(torch.nn.BatchNorm1d(2)).eval()
    x = torch.tensor([[1.0, 4.0], [3.0, 8.0]])
    refresh_batchnorm(model, x)
    assert torch.allclose(model[0].running_mean, torch.tensor([0.2, 0.6]))  # 0.1 * (2, 6)
    assert torch.allclose(model[0].running_var, torch.tensor([0.9 + 0.1 * 2.0, 0.9 + 0.1 * 8.0]))
    assert not model.training
    refresh_batchnorm(model, x, momentum=0.5)  # halfway to (2, 6) and (2, 8); the layer's own rate comes back
    assert torch.allclose(model[0].running_mean, torch.tensor([1.1, 3.3]))
    assert torch.allclose(model[0].running_var, torch.tensor([0.5 * 1.1 + 1.0, 0.5 * 1.7 + 4.0]))
    assert model[0].momentum == 0.1 and not model.training
    with batchnorm_training(model, on=False):
        assert not model.training
    model.train()
    with batchnorm_training(model, on=False):  # never switches a training model to eval
        assert model.training
