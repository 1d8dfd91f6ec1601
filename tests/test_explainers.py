import pytest
import torch

from cambackdoor.errors import CamBackdoorError
from cambackdoor.explainers import (DEFAULT_EXPLAINERS, box_metrics, box_share, explain, parse_explainer,
                                    pixel_attribution, topk_iou)
from cambackdoor.models import build_model
from cambackdoor.triggers import Box

BOX = Box(0, 0, 8, 8)


def test_box_share_and_topk_iou_by_hand():
    uniform = torch.ones(1, 32, 32)
    assert box_share(uniform, BOX).item() == pytest.approx(64 / 1024)  # chance: the box's share of the image
    inside = torch.zeros(1, 32, 32)
    inside[0, :8, :8] = 1
    assert box_share(inside, BOX).item() == 1.0 and topk_iou(inside, BOX).item() == 1.0
    half = torch.zeros(1, 32, 32)
    half[0, :4, :8] = 2  # 32 of the top 64 pixels in the box, 32 outside
    half[0, 20:24, 20:28] = 2
    assert topk_iou(half, BOX).item() == pytest.approx(32 / 96)
    assert box_share(-inside, BOX).item() == 1.0  # absolute values
    ex = parse_explainer("saliency")
    m = box_metrics(ex, torch.cat([inside, half]), BOX, (32, 32))
    assert m["success"].tolist() == [1.0, 0.0]


def test_explainer_names():
    assert parse_explainer("gradcam++@layer3").layer == "layer3"
    for name in DEFAULT_EXPLAINERS:
        parse_explainer(name)
    for bad in ("gradcam@fc", "lime", "shap@layer4"):
        with pytest.raises(CamBackdoorError, match="unknown explainer"):
            parse_explainer(bad)


@pytest.mark.parametrize("method", ["saliency", "integrated-gradients", "smoothgrad", "occlusion"])
def test_pixel_methods_come_from_captum_and_are_non_negative_maps(method):
    torch.manual_seed(0)
    model = build_model(width=4).eval()
    x = torch.rand(3, 3, 32, 32)
    attr = pixel_attribution(method, model, x, torch.tensor([1, 2, 3]))
    assert attr.shape == (3, 32, 32) and (attr >= 0).all() and attr.sum() > 0
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_saliency_equals_the_input_gradient():
    torch.manual_seed(0)
    model = build_model(width=4).eval()
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    t = torch.tensor([3, 7])
    (g,) = torch.autograd.grad(model(x).gather(1, t[:, None]).sum(), x)
    torch.testing.assert_close(pixel_attribution("saliency", model, x.detach(), t), g.abs().sum(1))
    cams = explain(parse_explainer("gradcam@layer4"), model, x.detach())
    assert cams.shape == (2, 4, 4)
