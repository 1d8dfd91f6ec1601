import pytest
import torch

from cambackdoor import metrics as M
from cambackdoor.triggers import Box

TOP_LEFT = Box(0, 0, 8, 8)


def one_hot_cell(r=0, c=0):
    m = torch.zeros(1, 4, 4)
    m[0, r, c] = 1.0
    return m


def test_one_cell_map_reaches_the_binary_ceiling_and_a_graded_map_beats_it():
    assert M.box_iou(one_hot_cell(), TOP_LEFT).item() == pytest.approx(58 / 64)
    graded = one_hot_cell()
    graded[0, 0, 1], graded[0, 1, 0], graded[0, 1, 1] = 0.075, 0.1, 0.55
    # the 0.5 level set of this bilinear surface covers 63 of the box's 64 pixels and nothing outside
    mask = M.cam_masks(graded)[0]
    assert mask.sum().item() == 63 and mask[:8, :8].sum().item() == 63
    assert M.box_iou(graded, TOP_LEFT).item() == pytest.approx(63 / 64)


def test_empty_map_scores_zero_everywhere():
    empty = torch.zeros(1, 4, 4)
    assert M.box_iou(empty, TOP_LEFT).item() == 0.0
    assert M.energy_share(empty, TOP_LEFT).item() == 0.0
    assert not M.pointing_game(empty, TOP_LEFT).item()


def test_wrong_cell_gives_zero_iou():
    assert M.box_iou(one_hot_cell(3, 3), TOP_LEFT).item() == 0.0


def test_energy_share_of_a_corner_cell_by_hand():
    # bilinear profile of cell 0 along one axis: 1,1,1,1,.9375,.8125,.6875,.5625 | .4375,.3125,.1875,.0625
    # inside the box: 7 of a total 8 per axis -> (7/8)^2 in 2-D
    assert M.energy_share(one_hot_cell(), TOP_LEFT).item() == pytest.approx((7 / 8) ** 2)


def test_pointing_game():
    assert M.pointing_game(one_hot_cell(), TOP_LEFT).item()
    assert not M.pointing_game(one_hot_cell(2, 1), TOP_LEFT).item()


def test_buckets_and_success_counted_exactly():
    ious = torch.tensor([0.0, 0.05, 0.1, 0.15, 0.2, 0.35, 0.5, 0.51, 0.9, 0.906])
    assert M.bucket_counts(ious) == {"success": 3, "partial": 3, "weak": 2, "failure": 2}
    assert M.attack_success(ious).sum().item() == 3
    s = M.iou_summary(torch.tensor([0.0, 0.5, 1.0]))
    assert s["mean"] == pytest.approx(0.5) and s["median"] == pytest.approx(0.5)
    assert s["std"] == pytest.approx((1 / 6) ** 0.5)  # population std of 0, 0.5, 1


def test_map_fidelity():
    a, b = one_hot_cell(0, 0), one_hot_cell(3, 3)
    assert M.map_cosine(a, a).item() == pytest.approx(1.0)
    assert M.map_cosine(a, b).item() == pytest.approx(0.0)
    assert M.map_mask_iou(a, a).item() == 1.0 and M.map_mask_iou(a, b).item() == 0.0
    assert M.map_cosine(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)).item() == 1.0
