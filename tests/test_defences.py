import copy

import pytest
import torch
import torch.nn.functional as F

from cambackdoor import defences as DF
from cambackdoor.data import batches
from cambackdoor.models import build_model


def _loss(model, images):
    """The loss fine-tuning minimises: BatchNorm on batch statistics (on a copy, so nothing is updated)."""
    model = copy.deepcopy(model).train()
    with torch.no_grad():
        return sum(F.cross_entropy(model(x), y, reduction="sum").item() for x, y in batches(images, 100)) / len(images)


def test_batchnorm_reestimation_sets_the_statistics_of_the_data(tiny_data):
    model = build_model(width=4).eval()
    after = DF.reestimate_batchnorm(model, tiny_data.train, n=400, batch_size=100)  # equal batches: the plain mean
    assert torch.equal(after.conv1.weight, model.conv1.weight)  # weights untouched
    assert not torch.equal(after.bn1.running_mean, model.bn1.running_mean)
    assert model.bn1.running_mean.abs().sum() == 0  # the original is not changed
    # the first BatchNorm's running mean is now the mean of conv1's outputs over the 400 images
    with torch.no_grad():
        out = model.conv1(model.normalize(tiny_data.train.images.float() / 255))
    torch.testing.assert_close(after.bn1.running_mean, out.mean(dim=(0, 2, 3)), atol=1e-4, rtol=1e-4)
    assert not after.training and after.bn1.momentum == model.bn1.momentum


def test_batchnorm_reestimation_on_augmented_images(tiny_data):
    """With ``augment`` the statistics are those of the images after training's crop and flip, drawn from the seed."""
    from cambackdoor.data import random_crop_flip

    model = build_model(width=4).eval()
    plain = DF.reestimate_batchnorm(model, tiny_data.train, n=400, batch_size=100)
    after = DF.reestimate_batchnorm(model, tiny_data.train, n=400, batch_size=100, seed=3, augment=True)
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([random_crop_flip(tiny_data.train.images[i:i + 100], gen) for i in range(0, 400, 100)])
    with torch.no_grad():
        out = model.conv1(model.normalize(x.float() / 255))
    torch.testing.assert_close(after.bn1.running_mean, out.mean(dim=(0, 2, 3)), atol=1e-4, rtol=1e-4)
    assert (after.bn1.running_mean - plain.bn1.running_mean).abs().max() > 1e-3  # the padding shows


def test_fine_tuning_lowers_the_clean_loss_and_reports_each_epoch():
    from conftest import make_dataset

    easy = make_dataset(noise_std=8.0)
    torch.manual_seed(0)
    model = build_model(width=8).eval()
    seen = []
    tuned = DF.fine_tune(model, easy.train, epochs=2, lr=0.01, batch_size=25,
                         on_epoch=lambda e, m: seen.append((e, m.training)))
    assert seen == [(1, False), (2, False)]
    assert _loss(tuned, easy.train) < 0.75 * _loss(model, easy.train)  # seen: 0.28-0.6 over six seeds
    assert not tuned.training


def test_pruning_removes_the_least_active_channels_and_they_stay_removed(tiny_data):
    torch.manual_seed(0)
    model = build_model(width=4).eval()
    activity = torch.arange(32.0).flip(0)  # channel 31 least active, then 30, ...
    pruned_model, pruned = DF.prune_layer4(model, activity, 0.25)
    assert sorted(pruned.tolist()) == list(range(24, 32))
    assert pruned_model.fc.weight[:, 24:].abs().sum() == 0 and torch.equal(pruned_model.fc.weight[:, :24],
                                                                            model.fc.weight[:, :24])
    # a pruned channel no longer moves any logit
    feats = torch.rand(2, 32)
    bumped = feats.clone()
    bumped[:, 30] += 5
    assert torch.equal(pruned_model.fc(feats), pruned_model.fc(bumped))
    tuned = DF.fine_tune(pruned_model, tiny_data.train, epochs=1, lr=0.05, batch_size=50,
                         keep_zero=DF.fc_column_mask(pruned_model, pruned))
    assert tuned.fc.weight[:, 24:].abs().sum() == 0 and not torch.equal(tuned.fc.weight, pruned_model.fc.weight)
    measured = DF.channel_activity(model, tiny_data.train, n=100)
    assert measured.shape == (32,) and (measured >= 0).all()  # layer4 ends in a ReLU


def test_purifications():
    x = torch.rand(4, 3, 32, 32)
    flat = torch.full((2, 3, 32, 32), 0.4)
    torch.testing.assert_close(DF.blur(1.0)(flat), flat)  # a constant image stays constant
    assert DF.blur(1.0)(x).std() < x.std()  # noise is smoothed
    j = DF.jpeg(50)(x)
    assert j.shape == x.shape and 0 <= j.min() and j.max() <= 1 and not torch.equal(j, x)
    assert (DF.jpeg(50)(flat) - flat).abs().max() < 0.02
    ramp = torch.arange(32.0).expand(1, 3, 32, 32).clone()
    shifted = DF.random_shift(4, seed=0)(ramp.expand(50, 3, 32, 32))
    offsets = shifted[:, 0, 16, 16] - 16  # the ramp's value at the centre gives the horizontal shift
    assert offsets.abs().max() <= 4 and len(offsets.unique()) > 3
    with pytest.raises(ValueError, match="prune fraction"):
        DF.prune_layer4(build_model(width=4), torch.ones(32), 1.0)


def test_channels_last_rule_and_a_fast_fine_tune_learns_like_the_plain_one():
    from conftest import make_dataset

    from cambackdoor.models import prefer_channels_last

    narrow, wide = build_model(width=8), build_model(width=16)
    assert not prefer_channels_last(narrow, "cpu", 128)  # the CPU backward is unsafe below width 16
    assert prefer_channels_last(wide, "cpu", 128, 10_000) and not prefer_channels_last(wide, "cpu", 128, 100)
    assert prefer_channels_last(narrow, "cuda", 3)
    easy = make_dataset(noise_std=8.0)
    torch.manual_seed(0)
    wide.eval()
    fast = DF.fine_tune(wide, easy.train, epochs=2, lr=0.01, batch_size=40)  # width 16, batch 40: channels_last
    plain_model = copy.deepcopy(wide)
    plain_model.arch = {**wide.arch, "width": 8}  # the same network, marked so that the rule says no
    plain = DF.fine_tune(plain_model, easy.train, epochs=2, lr=0.01, batch_size=40)
    assert fast.conv1.weight.is_contiguous() and not fast.training
    # channels_last convolutions round differently (up to ~1 % of a gradient here), so the two runs are
    # not equal; both must do the job
    for tuned in (fast, plain):
        assert _loss(tuned, easy.train) < 0.75 * _loss(wide, easy.train)
