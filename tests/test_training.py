import json

import pytest
import torch

from cambackdoor.checkpoints import load_model
from cambackdoor.errors import TrainingDiverged
from cambackdoor.training import TrainConfig, lr_factor, train

TINY = dict(width=4, epochs=2, batch_size=50, lr=0.05, channels_last=False, label_smoothing=0.0)


def test_tiny_training_learns_and_logs(tiny_data, tmp_path):
    cfg = TrainConfig(**{**TINY, "width": 8, "batch_size": 25})
    model, metrics = train(cfg, tiny_data, tmp_path / "run", progress=False)
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert metrics["test_acc"] > 0.5  # classes differ by mean colour: far above chance (0.1)
    loaded, meta = load_model(tmp_path / "run" / "model")
    assert meta["config"]["train"]["width"] == 8 and meta["metrics"]["epoch"] == 2
    assert meta["data_fingerprint"] == tiny_data.fingerprint
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["epochs"] == 2


def test_resume_after_interruption_matches_uninterrupted_run(tiny_data, tmp_path):
    cfg = TrainConfig(**{**TINY, "optimizer": "adam", "lr": 3e-3})
    full, _ = train(cfg, tiny_data, tmp_path / "full", progress=False)
    train(cfg, tiny_data, tmp_path / "cut", progress=False, stop_after=1)
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 1
    resumed, metrics = train(cfg, tiny_data, tmp_path / "cut", resume=True, progress=False)
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert metrics["epoch"] == 2
    assert [json.loads(s)["epoch"] for s in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_with_another_config_is_refused(tiny_data, tmp_path):
    train(TrainConfig(**TINY), tiny_data, tmp_path / "r", progress=False, stop_after=1)
    from cambackdoor.errors import CamBackdoorError

    with pytest.raises(CamBackdoorError, match="another config"):
        train(TrainConfig(**{**TINY, "lr": 0.01}), tiny_data, tmp_path / "r", resume=True, progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path):
    calls = {"n": 0}
    steps_per_epoch = 400 // 50

    def poison(model, x, y, g):
        calls["n"] += 1
        bad = calls["n"] > steps_per_epoch + 2  # NaN in the 2nd epoch
        return torch.tensor(float("nan") if bad else 0.0), {}

    with pytest.raises(TrainingDiverged, match="loss became nan at epoch 2.*last good checkpoint is kept"):
        train(TrainConfig(**TINY), tiny_data, tmp_path / "r", progress=False, extra_loss=poison)
    model, meta = load_model(tmp_path / "r" / "model")
    assert meta["metrics"]["epoch"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_lr_schedules():
    assert lr_factor("onecycle", 0, 100, 0.2) == pytest.approx(0.1)
    assert lr_factor("onecycle", 20, 100, 0.2) == pytest.approx(1.0)
    assert lr_factor("onecycle", 60, 100, 0.2) == pytest.approx(0.5)
    assert lr_factor("onecycle", 100, 100, 0.2) == pytest.approx(0.0)
    assert lr_factor("cosine", 50, 100) == pytest.approx(0.5)
    assert lr_factor("constant", 77, 100) == 1.0


def test_holdout_accuracy_is_reported(tiny_data, tmp_path):
    _, metrics = train(TrainConfig(**{**TINY, "epochs": 1, "holdout": 100}), tiny_data, tmp_path / "h", progress=False)
    assert 0.0 <= metrics["holdout_acc"] <= 1.0
