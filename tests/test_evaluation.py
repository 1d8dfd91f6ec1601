"""evaluate(): the one device rule, the per-class --limit, and results written as a whole."""

import pytest
import torch

from cambackdoor.errors import CamBackdoorError
from cambackdoor.evaluation import evaluate
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
