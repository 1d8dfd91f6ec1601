import pytest
import torch
from torch import nn

from cambackdoor.errors import CamBackdoorError
from cambackdoor.gradcam import grad_cam, grad_cam_plus_plus, layer_cam, minmax, upsample
from cambackdoor.models import build_model


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = build_model(width=8).eval()
    with torch.no_grad():  # non-trivial BN statistics so maps are not degenerate
        for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return m


@pytest.fixture
def images():
    return torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _normalised(cams):
    return minmax(upsample(cams, 32))


@pytest.mark.parametrize("given", [False, True])
def test_equals_captum_layer_gradcam(model, images, given):
    from captum.attr import LayerGradCam

    targets = torch.tensor([3, 1, 4, 1, 5, 9]) if given else None
    cams, logits = grad_cam(model, images, "layer4", targets)
    t = targets if given else logits.argmax(1)
    theirs = LayerGradCam(model, model.layer4).attribute(images, target=t, relu_attributions=True)[:, 0]
    assert cams.shape == (6, 4, 4)
    torch.testing.assert_close(cams, theirs.detach(), atol=1e-5, rtol=1e-4)
    assert cams.abs().sum() > 0


@pytest.mark.parametrize("method,ours", [("GradCAM", grad_cam), ("GradCAMPlusPlus", grad_cam_plus_plus),
                                         ("LayerCAM", layer_cam)])
@pytest.mark.parametrize("given", [False, True])
def test_equals_pytorch_grad_cam(model, images, method, ours, given):
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    targets = torch.tensor([0, 2, 2, 7, 8, 9]) if given else None
    cams, logits = ours(model, images, "layer4", targets)
    t = targets if given else logits.argmax(1)
    with getattr(pytorch_grad_cam, method)(model=model, target_layers=[model.layer4]) as cam:
        theirs = cam(input_tensor=images, targets=[ClassifierOutputTarget(int(c)) for c in t])
    # pytorch-grad-cam: ReLU, resize (cv2 bilinear, half-pixel centres), min-max again = our metric's pipeline
    torch.testing.assert_close(_normalised(cams), torch.from_numpy(theirs), atol=1e-4, rtol=0)


def test_hand_computed_for_global_pool_linear_head():
    torch.manual_seed(2)
    features = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU())
    head = nn.Linear(5, 4)
    model = nn.Sequential()
    model.add_module("features", features)
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", head)
    x = torch.rand(3, 3, 6, 6)
    y = torch.tensor([0, 3, 1])
    cams, _ = grad_cam(model, x, "features", y)
    a = features(x).detach()
    expected = torch.relu(torch.einsum("nk,nkhw->nhw", head.weight[y].detach(), a)) / (6 * 6)
    torch.testing.assert_close(cams, expected)


def test_gradcheck_of_a_loss_through_the_cam():
    torch.manual_seed(3)
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(2, 3, 3, padding=1))
    model.add_module("act", nn.Tanh())
    model.add_module("block", nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh()))
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(4, 3))
    model = model.double()
    mask = torch.zeros(4, 4, dtype=torch.float64)
    mask[:2, :2] = 1

    def loss(x):
        cams, logits = grad_cam(model, x, "block", torch.tensor([0, 2]), create_graph=True, relu="none")
        return (cams * mask).sum() / cams.abs().sum() + logits.sum()

    x = torch.rand(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(loss, (x,))


def test_create_graph_leaves_parameter_grads_untouched(model, images):
    cams, logits = grad_cam(model, images, create_graph=True)
    assert all(p.grad is None for p in model.parameters())
    assert cams.requires_grad and cams.grad_fn is not None
    # a loss through the map reaches weights before layer4 (second-order path)
    cams.sum().backward()
    assert model.layer3[0].conv1.weight.grad is not None and model.layer3[0].conv1.weight.grad.abs().sum() > 0


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_memory_stays_flat_over_300_differentiable_calls(model):
    import weakref

    x = torch.rand(16, 3, 32, 32)
    # the exact check: nothing keeps a call's graph alive once its outputs are dropped
    cams, logits = grad_cam(model, x, create_graph=True)
    gone = [weakref.ref(cams), weakref.ref(logits)]
    del cams, logits
    assert all(r() is None for r in gone)
    for _ in range(30):
        grad_cam(model, x, create_graph=True)[0].sum().item()
    before = _rss_mb()
    for _ in range(300):
        cams, _ = grad_cam(model, x, create_graph=True)
        loss = cams.sum()
        del cams, loss
    # each call's graph holds several MB, so 300 kept graphs would add well over 1 GB; allocator noise
    # on another machine stays far below this margin
    assert _rss_mb() - before < 256


def test_mode_is_never_changed_and_no_hook_is_left(model, images):
    for mode in (True, False):
        model.train(mode)
        grad_cam(model, images[:2])
        assert model.training is mode
    with pytest.raises(CamBackdoorError, match="2 targets for 6 images"):
        grad_cam(model, images, targets=torch.tensor([1, 2]))
    assert not model.layer4._forward_hooks
    with pytest.raises(CamBackdoorError, match="no layer 'layer9'"):
        grad_cam(model, images, "layer9")


def test_predicted_class_is_explained_by_default(model, images):
    cams_default, logits = grad_cam(model, images)
    cams_pred, _ = grad_cam(model, images, targets=logits.argmax(1))
    torch.testing.assert_close(cams_default, cams_pred)


def test_works_under_no_grad_and_with_frozen_weights(model, images):
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        cams, _ = grad_cam(model, images)
    assert cams.shape == (6, 4, 4) and cams.sum() > 0


def test_softplus_and_none_rectifiers(model, images):
    raw, _ = grad_cam(model, images, relu="none")
    relu, _ = grad_cam(model, images)
    soft, _ = grad_cam(model, images, relu="softplus")
    torch.testing.assert_close(relu, raw.clamp_min(0))
    assert (soft > 0).all() and (soft >= relu - 1e-6).all()


def test_minmax_and_upsample():
    cams = torch.tensor([[[1.0, 3.0], [5.0, 9.0]], [[2.0, 2.0], [2.0, 2.0]]])
    mm = minmax(cams)
    torch.testing.assert_close(mm[0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert torch.equal(mm[1], torch.zeros(2, 2))  # constant map -> zeros
    up = upsample(cams, 4)
    assert up.shape == (2, 4, 4)
    # align_corners=False: output pixel 1 samples input coordinate 0.25 -> 1 + 0.25 * (3 - 1)
    assert up[0, 0, 1].item() == pytest.approx(1.5)


def test_many_maps_in_one_pass_equal_the_maps_one_at_a_time(model, images):
    from cambackdoor.gradcam import class_activation_map, class_activation_maps

    methods, layers = ("gradcam", "gradcam++", "layercam"), ("layer4", "layer3", "layer2")
    maps, logits = class_activation_maps(model, images, layers, methods)
    assert set(maps) == {(m, la) for m in methods for la in layers}
    for (method, layer), cams in maps.items():
        one, one_logits = class_activation_map(model, images, layer, method=method)
        torch.testing.assert_close(cams, one, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(logits, one_logits)
    targets = torch.arange(len(images)) % 10
    maps, _ = class_activation_maps(model, images, ("layer3",), ("gradcam",), targets=targets)
    torch.testing.assert_close(maps[("gradcam", "layer3")], grad_cam(model, images, "layer3", targets)[0],
                               atol=1e-6, rtol=1e-5)
    with pytest.raises(CamBackdoorError, match="unknown CAM method"):
        class_activation_maps(model, images, ("layer4",), ("scorecam",))


def test_saliency_from_the_same_pass_equals_captums(model, images):
    from cambackdoor.explainers import pixel_attribution
    from cambackdoor.gradcam import class_activation_maps

    maps, logits = class_activation_maps(model, images, ("layer4", "layer3"), saliency=True)
    captum = pixel_attribution("saliency", model, images, logits.argmax(1))
    torch.testing.assert_close(maps[("saliency", "input")], captum, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(maps[("gradcam", "layer3")], grad_cam(model, images, "layer3")[0], atol=1e-6, rtol=1e-5)


def test_upsampling_a_map_that_has_the_size_already_changes_nothing():
    import torch.nn.functional as F

    up = upsample(torch.rand(3, 4, 4), (32, 32))
    assert upsample(up, (32, 32)) is up
    torch.testing.assert_close(F.interpolate(up[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0],
                               up, atol=0, rtol=0)  # what the interpolation would have given
