"""evaluate(): the one device rule, the per-class --limit, and results written as a whole."""

import pytest
import torch

from cambackdoor.errors import CamBackdoorError
from cambackdoor.data import ImageSet, limited
from cambackdoor.evaluation import evaluate, format_table
from cambackdoor.models import build_model
from cambackdoor.training import resolve_device
from cambackdoor.triggers import parse_target, parse_trigger

TRIGGER, TARGET = parse_trigger("yellow:4@bottom-right"), parse_target("top-left:8")


def test_reference_is_moved_to_the_evaluated_models_device(tiny_data, monkeypatch):
    model, reference = build_model(width=4).eval(), build_model(width=4).eval()
    moves = []
    real_to = reference.to

    def spy(*args, **kwargs):
        moves.append(args[0] if args else kwargs.get("device"))
        return real_to(*args, **kwargs)

    monkeypatch.setattr(reference, "to", spy)  # as if its parameters lived on another device
    summary, _ = evaluate(model, tiny_data.test, TRIGGER, TARGET, reference=reference, limit=20, progress=False,
                          examples=0)
    assert moves == [next(model.parameters()).device]
    assert summary["n"] == 20 and 0 <= summary["fidelity_cosine"] <= 1


def test_device_rule(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    with pytest.raises(CamBackdoorError, match="no CUDA GPU here; use --device cpu or auto"):
        resolve_device("cuda")
    with pytest.raises(CamBackdoorError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cpu") == torch.device("cpu")


def test_bad_batch_size_and_limit(tiny_data):
    model = build_model(width=4).eval()
    for kwargs, match in (({"batch_size": 0}, "--batch-size 0"), ({"limit": 0}, "--limit 0"),
                          ({"limit": 33}, "use 30 or 40")):
        with pytest.raises(CamBackdoorError, match=match):
            evaluate(model, tiny_data.test, TRIGGER, TARGET, progress=False, **kwargs)


def test_faint_triggers_are_counted_apart(tiny_data):
    # a white square at half strength barely moves an image whose corner is already white: 5 of 20 here
    test = limited(tiny_data.test, 20)
    images = test.images.clone()
    images[:5, :, 28:, :4] = 255
    images[5:, :, 28:, :4] = 100  # moves (1 - 100/255) / 2 = 0.30 everywhere else
    test = ImageSet(images, test.labels)
    model = build_model(width=4).eval()
    summary, details = evaluate(model, test, parse_trigger("white:4@bottom-left~0.5"), parse_target("top-right:8"),
                                progress=False, examples=0)
    assert summary["faint_fraction"] == pytest.approx(5 / 20)
    change = torch.tensor(details["per_image"]["trigger_change"])
    assert change[:5].tolist() == [0.0] * 5 and change[5:] == pytest.approx(torch.full((15,), (1 - 100 / 255) / 2))
    fired = torch.tensor(details["per_image"]["iou_clean"]) > 0.5
    assert summary["false_trigger_faint"] == pytest.approx(fired[:5].float().mean().item())
    assert summary["false_trigger_visible"] == pytest.approx(fired[5:].float().mean().item())
    assert "25.00 % of images" in format_table(summary)
    # a full-strength trigger is faint nowhere: no rate there, and no table row
    summary, _ = evaluate(model, test, TRIGGER, TARGET, progress=False, examples=0)
    assert summary["faint_fraction"] == 0 and summary["asr_faint"] is None and summary["asr_visible"] is not None
    assert "faint" not in format_table(summary)
