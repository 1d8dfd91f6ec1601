import pytest
import torch

from cambackdoor import stats


def test_auroc_by_hand():
    # pairs (pos > neg): 0.9 beats both, 0.8 beats both, 0.4 beats 0.3 only -> 5 of 6
    assert stats.auroc(torch.tensor([0.9, 0.8, 0.4]), torch.tensor([0.5, 0.3])) == pytest.approx(5 / 6)
    assert stats.auroc(torch.tensor([0.5]), torch.tensor([0.5])) == 0.5  # a tie counts half
    assert stats.auroc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])) == 0.0
    x = torch.arange(100.0)
    assert stats.auroc(x, x) == pytest.approx(0.5)


def test_bootstrap_interval_covers_the_mean_with_the_expected_width():
    values = torch.zeros(2000)
    values[:600] = 1  # a rate of exactly 0.3
    lo, hi = stats.bootstrap_ci(values)
    assert lo < 0.3 < hi
    expected = 2 * 1.96 * (0.3 * 0.7 / 2000) ** 0.5  # normal approximation: 0.040
    assert 0.8 * expected < hi - lo < 1.2 * expected
    assert stats.bootstrap_ci(values) == (lo, hi)  # seeded


def test_paired_difference_is_tighter_than_unpaired():
    torch.manual_seed(0)
    base = (torch.rand(5000) < 0.85).double()
    flipped = base.clone()
    flipped[:50] = 1 - flipped[:50]  # the same images, 50 outcomes changed
    d = stats.paired_difference(flipped, base)
    assert d["diff"] == pytest.approx(float(flipped.mean() - base.mean()))
    assert d["lo"] <= d["diff"] <= d["hi"] and d["hi"] - d["lo"] < 0.01  # unpaired would be ~0.014 wide
    with pytest.raises(ValueError, match="same images"):
        stats.paired_difference(base, base[:10])


def test_paired_auroc_interval():
    clean = torch.arange(200.0)
    trig = clean + 50  # the triggered copy scores higher
    auc = stats.auroc(trig, clean)
    lo, hi = stats.paired_auroc_ci(trig, clean, n_boot=100)
    assert lo <= auc <= hi and 0.5 < lo
