import pytest
import torch

from cambackdoor.errors import CamBackdoorError
from cambackdoor.models import CIFAR_MEAN, CIFAR_STD, build_model, count_parameters


def test_standard_width_has_the_resnet18_parameter_count():
    # CIFAR ResNet-18 at width 64: 11,173,962 parameters (3x3 stem, no max-pool, 10 classes)
    assert count_parameters(build_model("resnet18", 10, 64)) == 11_173_962


def test_output_shape_and_layer4_resolution():
    model = build_model(width=8).eval()
    seen = {}
    model.layer4.register_forward_hook(lambda m, i, o: seen.update(shape=tuple(o.shape)) or None)
    out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert seen["shape"] == (2, 64, 4, 4)


def test_torchvision_style_names_with_normalisation_first():
    names = [n for n, _ in build_model(width=4).named_children()]
    assert names[0] == "normalize"
    assert [n for n in names if n in {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}] == [
        "conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]


def test_model_normalises_unit_range_input_itself():
    model = build_model(width=4).eval()
    x = torch.rand(1, 3, 32, 32)
    manual = (x - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    assert torch.allclose(model.normalize(x), manual)


def test_width_scales_channels_and_classes():
    model = build_model(width=4, num_classes=7)
    assert model.conv1.out_channels == 4 and model.fc.in_features == 32 and model.fc.out_features == 7


def test_unknown_model_is_a_clear_error():
    with pytest.raises(CamBackdoorError, match="unknown model 'vgg11'; available: resnet18"):
        build_model("vgg11")
