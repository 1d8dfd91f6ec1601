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


def test_pooled_interval_holds_the_spread_between_seeds_by_hand():
    # two seeds, constant within each (0 and 1): images add nothing; a resample draws two seeds with
    # replacement, so its mean is 0, 0.5 or 1 with chances 1/4, 1/2, 1/4 -> the 95 % interval is [0, 1]
    zeros, ones = torch.zeros(400), torch.ones(400)
    p = stats.pooled([zeros, ones])
    assert (p["value"], p["lo"], p["hi"]) == (0.5, 0.0, 1.0)
    assert stats.pooled([ones, ones, ones]) == {"value": 1.0, "lo": 1.0, "hi": 1.0}
    # one seed: the plain bootstrap over images (a rate of 0.3 on 2,000 images, about +-0.020)
    values = torch.zeros(2000)
    values[:600] = 1
    one = stats.pooled([values])
    assert one["value"] == pytest.approx(0.3) and 0.8 * 0.040 < one["hi"] - one["lo"] < 1.2 * 0.040
    # three seeds that agree: about 1/sqrt(3) of one seed's width, and seeded
    three = stats.pooled([values, values.flip(0), values.roll(7)])
    assert 0.45 * 0.040 < three["hi"] - three["lo"] < 0.75 * 0.040 and three == stats.pooled([values, values.flip(0), values.roll(7)])
    with pytest.raises(ValueError, match="at least one"):
        stats.pooled([])


def test_paired_auroc_interval():
    clean = torch.arange(200.0)
    trig = clean + 50  # the triggered copy scores higher
    auc = stats.auroc(trig, clean)
    lo, hi = stats.paired_auroc_ci(trig, clean, n_boot=100)
    assert lo <= auc <= hi and 0.5 < lo
