import warnings

import pytest
import torch

from cambackdoor.errors import CamBackdoorError
from cambackdoor.triggers import (Box, cam_resolution, faint_share, paste_decoys, parse_target, parse_trigger,
                                  validate_attack)


def test_default_trigger_paints_a_yellow_bottom_right_square():
    x = torch.rand(2, 3, 32, 32)
    t = parse_trigger("yellow:4@bottom-right")
    y = t.apply(x)
    assert torch.equal(y[:, :, 28:, 28:], torch.tensor([1.0, 1.0, 0.0])[None, :, None, None].expand(2, 3, 4, 4))
    y[:, :, 28:, 28:] = x[:, :, 28:, 28:]
    assert torch.equal(y, x)  # nothing else changed


def test_blend_and_pixel_position():
    x = torch.zeros(1, 3, 32, 32)
    y = parse_trigger("white:2@10,12~0.25").apply(x)
    assert torch.allclose(y[0, :, 10:12, 12:14], torch.full((3, 2, 2), 0.25))
    assert y.sum().item() == pytest.approx(0.25 * 12)


def test_checkerboard_pattern():
    p = parse_trigger("checkerboard:3@top-right").patch()
    red, white = torch.tensor([1.0, 0, 0]), torch.ones(3)
    assert torch.equal(p[:, 0, 0], red) and torch.equal(p[:, 0, 1], white) and torch.equal(p[:, 1, 1], red)
    assert parse_trigger("checkerboard:3@top-right").box() == Box(0, 29, 3, 3)


def test_targets_by_corner_and_coordinates():
    assert parse_target("top-left:8") == Box(0, 0, 8, 8)
    assert parse_target("bottom-left:8") == Box(24, 0, 8, 8)
    assert parse_target("2,3,4,5") == Box(2, 3, 4, 5)


@pytest.mark.parametrize("spec,match", [
    ("yellow:4@30,30", "off the 32x32 image"),
    ("yellow:0@top-left", "empty"),
    ("purple:4@top-left", "unknown trigger colour"),
    ("yellow4bottom", "cannot read trigger"),
    ("yellow:4@middle", "unknown corner"),
])
def test_bad_triggers(spec, match):
    with pytest.raises(CamBackdoorError, match=match):
        parse_trigger(spec)


@pytest.mark.parametrize("spec,match", [("0,0,0,8", "empty"), ("28,28,8,8", "off the"), ("top-left:x", "cannot read"),
                                        ("centre:8", "unknown corner")])
def test_bad_targets(spec, match):
    with pytest.raises(CamBackdoorError, match=match):
        parse_target(spec)


def test_target_overlapping_trigger_is_refused():
    with pytest.raises(CamBackdoorError, match="overlaps the trigger"):
        validate_attack(parse_trigger("yellow:4@bottom-right"), parse_target("bottom-right:8"))


def test_iou_ceiling_of_the_default_box_binary_and_graded():
    assert Box(0, 0, 8, 8).iou_ceiling((4, 4), graded=False) == pytest.approx(58 / 64)
    assert Box(0, 0, 8, 8).iou_ceiling((4, 4)) >= 63 / 64 - 1e-6  # graded maps draw finer level sets


def test_a_centred_box_is_reachable_with_graded_maps_only():
    centred = Box(12, 12, 8, 8)
    assert centred.iou_ceiling((4, 4), graded=False) < 0.3
    with pytest.warns(UserWarning, match="off the CAM grid"):
        assert validate_attack(parse_trigger("yellow:4@bottom-right"), centred, "layer4") > 0.55


def test_small_box_has_a_low_ceiling_and_is_refused_at_layer4():
    small = Box(0, 0, 4, 4)
    assert small.iou_ceiling((4, 4)) < 0.5
    with pytest.raises(CamBackdoorError, match="align the box to the 8-px grid.*earlier layer"):
        validate_attack(parse_trigger("yellow:4@bottom-right"), small, "layer4")
    # at layer3 (8x8 map, 4-px cells) a 4-px box is one cell
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert validate_attack(parse_trigger("yellow:4@bottom-right"), small, "layer3") > 0.8


def test_cam_resolution():
    assert cam_resolution("layer4") == (4, 4) and cam_resolution("layer3") == (8, 8)
    with pytest.raises(CamBackdoorError):
        cam_resolution("fc")


def test_decoys_are_solid_patches_in_the_trigger_box_and_never_the_trigger():
    images = torch.rand(500, 3, 32, 32)
    trigger = parse_trigger("yellow:4@bottom-right")
    decoys = paste_decoys(images, trigger, torch.Generator().manual_seed(0))
    assert torch.equal(decoys[:, :, :28], images[:, :, :28]) and torch.equal(decoys[:, :, :, :28], images[:, :, :, :28])
    patches = decoys[:, :, 28:, 28:]
    assert torch.equal(patches, patches[:, :, :1, :1].expand_as(patches))  # one colour per image
    colours = patches[:, :, 0, 0]
    distance = (colours - torch.tensor([1.0, 1.0, 0.0])).abs().mean(1)
    assert distance.min() >= 0.25  # e.g. (0.9, 0.95, 0.1) became (0.1, 0.05, 0.9)
    assert colours.std(0).min() > 0.2  # varied colours, not one
    again = paste_decoys(images, trigger, torch.Generator().manual_seed(0))
    assert torch.equal(again, decoys)


def test_trigger_shaped_decoys_copy_the_pattern_and_the_blend_in_other_colours():
    images = torch.rand(400, 3, 32, 32)
    trigger = parse_trigger("checkerboard:4@bottom-left~0.5")
    decoys = paste_decoys(images, trigger, torch.Generator().manual_seed(0), form="trigger")
    assert torch.equal(decoys[:, :, :28], images[:, :, :28]) and torch.equal(decoys[:, :, :, 4:], images[:, :, :, 4:])
    put = (decoys[:, :, 28:, :4] - 0.5 * images[:, :, 28:, :4]) / 0.5  # undo the half blend: the pasted pattern
    white = ((torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2).bool()
    first, second = put[:, :, ~white], put[:, :, white]  # [N, 3, 8] each: one colour per cell set
    assert torch.allclose(first, first[:, :, :1].expand_as(first), atol=1e-5)
    assert torch.allclose(second, second[:, :, :1].expand_as(second), atol=1e-5)
    assert (first[:, :, 0] - second[:, :, 0]).abs().amax(1).median() > 0.3  # two colours, not one
    red_white = trigger.patch()
    assert (put - red_white).abs().mean((1, 2, 3)).min() >= 0.25 - 1e-5  # never the trigger itself
    # a solid, pasted trigger gets the solid decoys, draw for draw
    solid = parse_trigger("yellow:4@bottom-right")
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(paste_decoys(images, solid, g(), form="trigger"), paste_decoys(images, solid, g()))
    with pytest.raises(CamBackdoorError, match="decoy form 'patterned' must be one of solid, trigger"):
        paste_decoys(images, solid, g(), form="patterned")


def test_an_attack_is_parsed_and_checked_once_and_configs_reuse_it():
    from cambackdoor.recipes import ImplantConfig
    from cambackdoor.triggers import Attack

    attack = Attack.parse("yellow:4@bottom-right", "top-left:8")
    assert attack.target.top == 0 and attack.target.height == 8 and attack.layer == "layer4"
    with pytest.raises(CamBackdoorError, match="overlaps"):
        Attack.parse("yellow:4@top-left", "top-left:8")
    cfg = ImplantConfig()
    assert cfg.attack is cfg.attack  # cached
    cfg.target = "top-right:8"  # a changed spec is parsed again
    assert cfg.attack.target.left == 24


def test_change_is_the_largest_pixel_move_of_the_trigger():
    # corners 0.0, 0.6 and 1.0 under a white square at half strength: moves of 0.5, 0.2 and 0
    x = torch.zeros(3, 3, 32, 32)
    x[1, :, 28:, :4], x[2, :, 28:, :4] = 0.6, 1.0
    x[1, 0, 31, 0] = 0.2  # one darker pixel decides its image: 0.5 * (1 - 0.2) = 0.4
    t = parse_trigger("white:4@bottom-left~0.5")
    assert t.change(x).tolist() == pytest.approx([0.5, 0.4, 0.0])
    assert t.change(x) == pytest.approx((t.apply(x) - x).abs().flatten(1).amax(1))
    # a full-strength yellow square on a white corner moves the blue channel by 1
    assert parse_trigger("yellow:4@bottom-right").change(torch.ones(1, 3, 32, 32)).tolist() == [1.0]


def test_faint_share_counts_images_the_trigger_barely_moves():
    images = torch.zeros(10, 3, 32, 32, dtype=torch.uint8)
    images[:3, :, 28:, :4] = 255  # white corners: a half-strength white square moves nothing there
    images[3, :, 28:, :4] = 240   # moves (1 - 240/255) / 2 = 0.029 < 0.05: faint too
    images[4, :, 28:, :4] = 200   # moves 0.108: visible
    assert faint_share(parse_trigger("white:4@bottom-left~0.5"), images, chunk=3) == pytest.approx(0.4)
    assert faint_share(parse_trigger("yellow:4@bottom-right"), images) == 0.0
