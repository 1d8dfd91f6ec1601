import torch

from cambackdoor.detectors import DETECTORS, _cosine, _grey_cell, detector_scores
from cambackdoor.models import build_model


def test_grey_cell_by_hand():
    x = torch.zeros(2, 3, 32, 32)
    out = _grey_cell(x, torch.tensor([0, 15]), (4, 4))  # cell 0 = rows/cols 0-7; cell 15 = rows/cols 24-31
    assert (out[0, :, :8, :8] == 0.5).all() and out[0].sum() == 0.5 * 3 * 64
    assert (out[1, :, 24:, 24:] == 0.5).all() and out[1].sum() == 0.5 * 3 * 64


def test_cosine_and_scores():
    a = torch.rand(3, 4, 4)
    torch.testing.assert_close(_cosine(a, 2 * a), torch.ones(3, dtype=a.dtype))
    torch.manual_seed(0)
    model = build_model(width=4).eval()
    scores = detector_scores(model, torch.rand(5, 3, 32, 32))
    assert set(scores) == set(DETECTORS)
    for name, s in scores.items():
        assert s.shape == (5,) and torch.isfinite(s).all(), name
    assert ((scores["layer-disagreement"] >= -1e-6) & (scores["layer-disagreement"] <= 2)).all()
