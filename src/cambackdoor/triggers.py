"""Patch triggers and target regions, with validation and the IoU ceiling of a CAM resolution.

Specs used on the command line:
  trigger: ``COLOUR:SIZE@WHERE[~BLEND]`` - COLOUR a name (yellow, red, ...), ``r,g,b`` in [0, 1] is
           not accepted here; ``checkerboard`` (red/white) is a pattern. WHERE a corner or ``row,col``.
           e.g. ``yellow:4@bottom-right``, ``checkerboard:3@top-right``, ``red:4@10,12~0.5``.
  target:  ``CORNER:SIZE`` (e.g. ``top-left:8``) or ``top,left,height,width`` (e.g. ``0,0,8,8``).
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch

from cambackdoor.errors import CamBackdoorError
from cambackdoor.gradcam import minmax, upsample

COLOURS = {
    "yellow": (1.0, 1.0, 0.0), "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "magenta": (1.0, 0.0, 1.0), "cyan": (0.0, 1.0, 1.0),
}
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
IMAGE_HW = (32, 32)
LAYER_STRIDE = {"layer1": 1, "layer2": 2, "layer3": 4, "layer4": 8}
# A trigger that moves no pixel of an image by more than this (13 of 255 grey levels) is "faint" there (a blended
# white one on a bright corner): the model sees nearly the same image triggered or not, so misses and false
# triggers gather there (docs/results.md, registration 4, pair 3); evaluations count them apart.
FAINT_CHANGE = 0.05


@dataclass(frozen=True)
class Box:
    """An axis-aligned pixel box [top, top+height) x [left, left+width)."""

    top: int
    left: int
    height: int
    width: int

    @property
    def bottom(self) -> int:
        return self.top + self.height

    @property
    def right(self) -> int:
        return self.left + self.width

    def validate(self, image_hw: tuple[int, int] = IMAGE_HW, what: str = "box") -> "Box":
        if self.height <= 0 or self.width <= 0:
            raise CamBackdoorError(f"{what} {self} is empty; give a positive height and width")
        if self.top < 0 or self.left < 0 or self.bottom > image_hw[0] or self.right > image_hw[1]:
            raise CamBackdoorError(
                f"{what} rows {self.top}-{self.bottom}, cols {self.left}-{self.right} is off the "
                f"{image_hw[0]}x{image_hw[1]} image; move or shrink it"
            )
        return self

    def overlaps(self, other: "Box") -> bool:
        return self.top < other.bottom and other.top < self.bottom and self.left < other.right and other.left < self.right

    def mask(self, image_hw: tuple[int, int] = IMAGE_HW) -> torch.Tensor:
        m = torch.zeros(image_hw, dtype=torch.bool)
        m[self.top : self.bottom, self.left : self.right] = True
        return m

    def cell_weights(self, cam_hw: tuple[int, int], image_hw: tuple[int, int] = IMAGE_HW) -> torch.Tensor:
        """Share of each CAM cell covered by the box ([h, w] in [0, 1]): the box at CAM resolution."""
        m = self.mask(image_hw).float()[None, None]
        return torch.nn.functional.adaptive_avg_pool2d(m, cam_hw)[0, 0]

    def iou_ceiling(self, cam_hw: tuple[int, int], image_hw: tuple[int, int] = IMAGE_HW, graded: bool = True) -> float:
        return iou_ceiling(self, tuple(cam_hw), tuple(image_hw), graded)


def corner_box(corner: str, size: int | tuple[int, int], image_hw: tuple[int, int] = IMAGE_HW) -> Box:
    h, w = (size, size) if isinstance(size, int) else size
    if corner not in CORNERS:
        raise CamBackdoorError(f"unknown corner '{corner}'; use one of {', '.join(CORNERS)} or row,col")
    top = 0 if corner.startswith("top") else image_hw[0] - h
    left = 0 if corner.endswith("left") else image_hw[1] - w
    return Box(top, left, h, w)


@dataclass(frozen=True)
class PatchTrigger:
    """A square patch pasted (or blended) onto [0, 1] images: a solid colour or a small pattern."""

    size: int = 4
    colour: tuple[float, float, float] = (1.0, 1.0, 0.0)
    position: str | tuple[int, int] = "bottom-right"
    pattern: str | None = None  # "checkerboard": red/white squares
    blend: float = 1.0
    image_hw: tuple[int, int] = IMAGE_HW

    def box(self) -> Box:
        if isinstance(self.position, str):
            return corner_box(self.position, self.size, self.image_hw)
        return Box(self.position[0], self.position[1], self.size, self.size)

    def validate(self) -> "PatchTrigger":
        if not 0 < self.blend <= 1:
            raise CamBackdoorError(f"trigger blend {self.blend} must be in (0, 1]")
        self.box().validate(self.image_hw, "trigger")
        return self

    def cells(self) -> torch.Tensor | None:
        """The pattern's [size, size] mask of its second colour (checkerboard: the white cells); None if solid."""
        if self.pattern not in (None, "checkerboard"):
            raise CamBackdoorError(f"unknown trigger pattern '{self.pattern}'; use checkerboard or a colour")
        ij = torch.arange(self.size)
        return None if self.pattern is None else ((ij[:, None] + ij[None, :]) % 2).bool()

    def patch(self) -> torch.Tensor:
        """The [3, size, size] patch in [0, 1]."""
        cells = self.cells()
        if cells is not None:  # checkerboard: red and white
            return torch.where(cells[None], torch.ones(3, 1, 1), torch.tensor([1.0, 0.0, 0.0])[:, None, None])
        return torch.tensor(self.colour, dtype=torch.float32)[:, None, None].expand(3, self.size, self.size)

    def change(self, images: torch.Tensor) -> torch.Tensor:
        """Per image of a [N, 3, H, W] float batch in [0, 1], the largest change :meth:`apply` makes to
        any pixel and channel (0 where the image already shows the trigger)."""
        b = self.box()
        region = images[:, :, b.top : b.bottom, b.left : b.right]
        patch = self.patch().to(images.device, images.dtype)
        return (self.blend * (patch - region)).abs().flatten(1).amax(1)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """A triggered copy of a [N, 3, H, W] float batch in [0, 1]."""
        b = self.box()
        out = images.clone()
        patch = self.patch().to(images.device, images.dtype)
        region = out[:, :, b.top : b.bottom, b.left : b.right]
        out[:, :, b.top : b.bottom, b.left : b.right] = (1 - self.blend) * region + self.blend * patch
        return out


def faint_share(trigger: PatchTrigger, images: torch.Tensor, chunk: int = 4096) -> float:
    """Share of a uint8 [N, 3, H, W] image set on which ``trigger`` is faint (:data:`FAINT_CHANGE`), in
    chunks so that 50,000 images never need a float copy at once."""
    faint = sum(int((trigger.change(images[i : i + chunk].float() / 255) < FAINT_CHANGE).sum())
                for i in range(0, len(images), chunk))
    return faint / max(1, len(images))


DECOY_FORMS = ("solid", "trigger")  # paste_decoys's forms


def paste_decoys(
    images: torch.Tensor, trigger: PatchTrigger, generator: torch.Generator, min_distance: float = 0.25,
    form: str = "solid",
) -> torch.Tensor:
    """Copies of ``images`` with a random patch in the trigger's box ("decoys"), kept at the clean maps in
    training so the backdoor keys on the trigger, not on any patch (or yellowish corner) there. ``form``
    solid: a random solid colour, pasted; trigger: the trigger's form (its checkerboard) in random colours,
    blended as the trigger is, so that a blended pattern alone is not enough. A decoy within
    ``min_distance`` (mean absolute difference) of the trigger patch becomes its complement."""
    if form not in DECOY_FORMS:
        raise CamBackdoorError(f"decoy form '{form}' must be one of {', '.join(DECOY_FORMS)}")
    b, n, like = trigger.box(), images.shape[0], dict(device=images.device, dtype=images.dtype)
    decoys = torch.rand(n, 3, generator=generator).to(**like)[:, :, None, None].expand(n, 3, b.height, b.width)
    cells = trigger.cells() if form == "trigger" else None
    if cells is not None:
        second = torch.rand(n, 3, generator=generator).to(**like)[:, :, None, None]
        decoys = torch.where(cells.to(images.device), second, decoys)
    too_close = (decoys - trigger.patch().to(**like)).abs().mean((1, 2, 3)) < min_distance
    decoys = torch.where(too_close[:, None, None, None], 1 - decoys, decoys)
    blend = trigger.blend if form == "trigger" else 1.0
    out, region = images.clone(), images[:, :, b.top : b.bottom, b.left : b.right]
    out[:, :, b.top : b.bottom, b.left : b.right] = decoys if blend == 1 else (1 - blend) * region + blend * decoys
    return out


def parse_trigger(spec: str) -> PatchTrigger:
    """Parse ``COLOUR:SIZE@WHERE[~BLEND]`` (see module doc) into a validated trigger."""
    try:
        spec, blend = (spec.split("~", 1) + ["1"])[:2]
        what, where = spec.split("@", 1)
        name, size = what.split(":", 1)
        position: str | tuple[int, int] = where
        if "," in where:
            r, c = where.split(",")
            position = (int(r), int(c))
        kwargs = dict(size=int(size), position=position, blend=float(blend))
    except ValueError:
        raise CamBackdoorError(
            f"cannot read trigger '{spec}'; write COLOUR:SIZE@CORNER or COLOUR:SIZE@ROW,COL, e.g. yellow:4@bottom-right"
        ) from None
    if name == "checkerboard":
        return PatchTrigger(pattern="checkerboard", **kwargs).validate()  # type: ignore[arg-type]
    if name not in COLOURS:
        raise CamBackdoorError(f"unknown trigger colour '{name}'; use one of {', '.join(COLOURS)} or checkerboard")
    return PatchTrigger(colour=COLOURS[name], **kwargs).validate()  # type: ignore[arg-type]


def parse_target(spec: str, image_hw: tuple[int, int] = IMAGE_HW) -> Box:
    """Parse ``CORNER:SIZE`` or ``top,left,height,width`` into a validated box."""
    try:
        if ":" in spec:
            corner, size = spec.split(":", 1)
            if corner not in CORNERS:
                raise CamBackdoorError(f"unknown corner '{corner}' in target '{spec}'; use one of {', '.join(CORNERS)}")
            box = corner_box(corner, int(size), image_hw)
        else:
            top, left, h, w = (int(v) for v in spec.split(","))
            box = Box(top, left, h, w)
    except ValueError:
        raise CamBackdoorError(f"cannot read target '{spec}'; write CORNER:SIZE (top-left:8) or top,left,height,width") from None
    return box.validate(image_hw, "target")


def cam_resolution(layer: str, image_hw: tuple[int, int] = IMAGE_HW) -> tuple[int, int]:
    """CAM size of a CIFAR ResNet layer (layer4 -> 4x4 on 32x32 inputs)."""
    if layer not in LAYER_STRIDE:
        raise CamBackdoorError(f"unknown layer '{layer}' for the CIFAR ResNet; use one of {', '.join(LAYER_STRIDE)}")
    s = LAYER_STRIDE[layer]
    return image_hw[0] // s, image_hw[1] // s


def validate_attack(trigger: PatchTrigger, target: Box, layer: str = "layer4", min_ceiling: float = 0.5) -> float:
    """Check trigger, target and layer together; returns the IoU ceiling found over graded cell maps
    (errors if below ``min_ceiling``: no map we can find passes the success test there)."""
    trigger.validate()
    target.validate(trigger.image_hw, "target")
    if target.overlaps(trigger.box()):
        raise CamBackdoorError(f"target {target} overlaps the trigger at {trigger.box()}; move one of them apart")
    cam_hw = cam_resolution(layer, trigger.image_hw)
    ceiling = target.iou_ceiling(cam_hw, trigger.image_hw)
    if ceiling < min_ceiling:
        stride = trigger.image_hw[0] // cam_hw[0]
        raise CamBackdoorError(
            f"no {cam_hw[0]}x{cam_hw[1]} {layer} map can reach IoU > {min_ceiling} with target {target} (ceiling "
            f"{ceiling:.3f}); align the box to the {stride}-px grid (e.g. top-left:{2 * stride}) or use an earlier layer"
        )
    if ceiling < 0.8:
        warnings.warn(f"target {target} is off the CAM grid: best reachable IoU at {layer} is {ceiling:.3f}", stacklevel=2)
    return ceiling


@dataclass(frozen=True)
class Attack:
    """Trigger, target box and attacked layer, parsed and checked together once and passed down."""

    trigger: PatchTrigger
    target: Box
    layer: str = "layer4"

    @classmethod
    def parse(cls, trigger: str, target: str, layer: str = "layer4", min_ceiling: float = 0.5) -> "Attack":
        attack = cls(parse_trigger(trigger), parse_target(target), layer)
        validate_attack(attack.trigger, attack.target, layer, min_ceiling)
        return attack


def _box_ious(maps: torch.Tensor, box: Box, image_hw: tuple[int, int]) -> torch.Tensor:
    """IoU with ``box`` of each map's metric mask (upsample -> min-max -> > 0.5)."""
    masks = minmax(upsample(maps, image_hw)) > 0.5
    target = box.mask(image_hw)
    return (masks & target).flatten(1).sum(1).float() / (masks | target).flatten(1).sum(1).float().clamp_min(1)


def _descend(m: torch.Tensor, score: float, cells: list[tuple[int, int]], box: Box, image_hw: tuple[int, int],
             ) -> tuple[torch.Tensor, float]:
    """Coordinate ascent: set one cell at a time to its best value on a grid of 41, until nothing improves."""
    values = torch.linspace(0, 1, 41)
    improved = True
    while improved:
        improved = False
        for r, c in cells:
            cand = m[None].repeat(len(values), 1, 1)
            cand[:, r, c] = values
            ious = _box_ious(cand, box, image_hw)
            j = int(ious.argmax())
            if ious[j] > score + 1e-9:
                m, score, improved = cand[j], float(ious[j]), True
    return m, score


def _jitter(m: torch.Tensor, score: float, cells: list[tuple[int, int]], box: Box, image_hw: tuple[int, int],
            gen: torch.Generator, rounds: int = 12, batch: int = 128) -> tuple[torch.Tensor, float]:
    """Random search: move 1-3 cells at once (moves one cell at a time cannot make), keep the best."""
    w = m.shape[1]
    index = torch.tensor([r * w + c for r, c in cells])
    for _ in range(rounds):
        cand = m.flatten()[None].repeat(batch, 1)
        moved = torch.randint(1, 4, (batch,), generator=gen)
        sigma = torch.tensor([0.5, 0.15, 0.04])[torch.randint(0, 3, (batch,), generator=gen)]
        for j in range(3):
            pick = index[torch.randint(0, len(index), (batch,), generator=gen)]
            rows = (moved > j).nonzero().flatten()
            noise = torch.randn(len(rows), generator=gen) * sigma[rows]
            cand[rows, pick[rows]] = (cand[rows, pick[rows]] + noise).clamp(0, 1)
        cand = cand.view(batch, *m.shape)
        ious = _box_ious(cand, box, image_hw)
        j = int(ious.argmax())
        if ious[j] > score:
            m, score = cand[j], float(ious[j])
    return m, score


@lru_cache(maxsize=64)
def iou_ceiling(box: Box, cam_hw: tuple[int, int], image_hw: tuple[int, int] = IMAGE_HW, graded: bool = True) -> float:
    """Best IoU with ``box`` of a cell map's thresholded mask (upsample -> min-max -> > 0.5) that we can find.

    ``graded=False``: the exact best over *binary* cell maps near the box (every on/off pattern up to 9
    cells, rectangles of cells beyond): 58/64 = 0.906 for the top-left 8x8 box at 4x4. ``graded=True``
    (default) goes on from the best binary maps with coordinate ascent and a seeded random search over
    graded cell values, since the mask is a level set of a bilinear surface and graded maps draw finer
    level sets: the top-left 8x8 box reaches 63/64 = 0.984 (e.g. cells (0,0)=1, (0,1)=0.075, (1,0)=0.1,
    (1,1)=0.55), a centred 8x8 box 0.557 where binary maps give 0.276. A search result: a lower bound on
    the true ceiling, deterministic.
    """
    h, w = cam_hw
    sy, sx = image_hw[0] / h, image_hw[1] / w
    r0, r1 = max(0, int(box.top // sy) - 1), min(h, int(-(-box.bottom // sy)) + 1)
    c0, c1 = max(0, int(box.left // sx) - 1), min(w, int(-(-box.right // sx)) + 1)
    cells = [(r, c) for r in range(r0, r1) for c in range(c0, c1)]
    maps = []
    if len(cells) <= 9:
        for bits in itertools.product((0.0, 1.0), repeat=len(cells)):
            if any(bits):
                m = torch.zeros(h, w)
                for (r, c), b in zip(cells, bits):
                    m[r, c] = b
                maps.append(m)
    else:
        for ra, rb in itertools.combinations(range(r0, r1 + 1), 2):
            for ca, cb in itertools.combinations(range(c0, c1 + 1), 2):
                m = torch.zeros(h, w)
                m[ra:rb, ca:cb] = 1.0
                maps.append(m)
    stacked = torch.stack(maps)
    ious = _box_ious(stacked, box, image_hw)
    best = float(ious.max())
    if not graded:
        return best
    gen = torch.Generator().manual_seed(0)
    for i in ious.argsort(descending=True)[:4].tolist():
        m, score = _descend(stacked[i].clone(), float(ious[i]), cells, box, image_hw)
        m, score = _jitter(m, score, cells, box, image_hw, gen)
        best = max(best, _descend(m, score, cells, box, image_hw)[1])
    return best


DEFAULT_TRIGGER = "yellow:4@bottom-right"
DEFAULT_TARGET = "top-left:8"
