"""GenEval-style verifiable reward for the synthetic shape world, by classical image analysis.

No learned model: every pixel is given the nearest palette colour in CIELAB (or none, when it is
farther than ``color_threshold`` from all of them, as blended edge pixels usually are), each
prompt colour's mask is split into connected components, components smaller than
``min_area_frac`` of the image or without a solid 3x3 core are dropped as speckles and edge
rings, and each remaining component is classified as the ideal square / circle / triangle,
fitted to its bounding box, with the best IoU (more robust to softened VAE edges than a plain
fill ratio).

Constraints (each met or not; the score is the fraction met, in [0, 1]):

- per object of the prompt (colour ``c``, shape ``s``, count ``n``):
  ``color``  at least one component of colour ``c``;
  ``count``  exactly ``n`` components of colour ``c``;
  ``shape``  at least one component of colour ``c``, and all of them are classified ``s``;
- ``position`` (relation prompts): both colours present, and the centroid of the largest component
  of the first object's colour lies left (``left_of``) / right (``right_of``) of the second's;
- ``background`` (prompts that name one): the most frequent colour on the image's border frame.

With ``soft=True`` each constraint gives partial credit in [0, 1] instead of met / not met, and
is 1 exactly where the strict constraint is met (given a clear margin for shape and position): a
colour with too few pixels to form an object scores its share of a minimum object's area,
a count that is off by ``m`` scores ``2**-m``, a shape scores by how far its IoU with the
asked-for ideal shape is from the best other shape's, a position by a logistic of the centroid
distance, a background by the share of the frame in its colour. GenEval-style accuracy is the
strict score; the soft one is a denser training signal for the same constraints: with a score
that moves only in steps of 1 / (number of constraints), most ODE completions of neighbouring
steps score alike and TP-GRPO's increments R_k - R_{k-1} are zero.

Objects of colours the prompt does not mention are ignored, as in GenEval. ``details`` has one
entry per constraint type: the fraction of that type's constraints met, NaN where a prompt has
none of that type (e.g. ``position`` for "two red circles").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from tpgrpo.rewards import RewardOutput
from tpgrpo.world import PALETTE, PromptSpec, check_record

CONSTRAINT_TYPES: tuple[str, ...] = ("color", "count", "shape", "position", "background")

_PALETTE_NAMES: tuple[str, ...] = tuple(PALETTE)
_NO_COLOR = -1


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1], shape [..., 3] -> CIELAB (D65), shape [..., 3], float32."""
    rgb = np.clip(rgb, 0.0, 1.0).astype(np.float32)
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array(
        [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]], np.float32
    )
    xyz = linear @ (to_xyz / np.array([[0.95047], [1.0], [1.08883]], np.float32)).T
    eps = (6 / 29) ** 3
    f = np.where(xyz > eps, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1
    ).astype(np.float32)


_PALETTE_LAB = srgb_to_lab(np.array(list(PALETTE.values()), np.float32) / 255.0)  # [P, 3]


def classify_colors(images: np.ndarray, threshold: float) -> np.ndarray:
    """Images float [B, H, W, 3] in [0, 1] -> palette index per pixel, int64 [B, H, W]
    (index into ``world.PALETTE``; -1 where no palette colour is within ``threshold`` Delta-E)."""
    lab = srgb_to_lab(images)
    # |a - b|^2 expanded, so memory stays [B, H, W, P] instead of [B, H, W, P, 3]
    dist2 = (lab**2).sum(-1, keepdims=True) - 2 * lab @ _PALETTE_LAB.T + (_PALETTE_LAB**2).sum(-1)
    nearest = dist2.argmin(axis=-1)
    within = np.take_along_axis(dist2, nearest[..., None], -1)[..., 0] <= threshold**2
    return np.where(within, nearest, _NO_COLOR)


@lru_cache(maxsize=4096)
def _templates(h: int, w: int) -> dict[str, np.ndarray]:
    """Ideal shapes filling an h x w box, sampled at pixel centres: bool [h, w] each."""
    y = (np.arange(h) + 0.5)[:, None] / h  # 0 top .. 1 bottom
    x = (np.arange(w) + 0.5)[None, :] / w
    return {
        "square": np.ones((h, w), bool),
        "circle": (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25,
        "triangle": np.abs(x - 0.5) <= y / 2,  # apex at top centre, base along the bottom
    }


def shape_ious(mask: np.ndarray) -> dict[str, float]:
    """Bool mask [h, w] cropped to a component's bounding box -> IoU with each ideal shape."""
    area = mask.sum()
    ious = {}
    for name, template in _templates(*mask.shape).items():
        inter = np.logical_and(mask, template).sum()
        ious[name] = float(inter / (area + template.sum() - inter))
    return ious


def classify_shape(mask: np.ndarray, min_iou: float) -> str | None:
    """Bool mask [h, w] cropped to a component's bounding box -> best-fitting shape name, or
    None when no ideal shape reaches ``min_iou`` (irregular blobs match nothing)."""
    return _best_shape(shape_ious(mask), min_iou)


def _best_shape(ious: dict[str, float], min_iou: float) -> str | None:
    best, best_iou = None, min_iou
    for name, iou in ious.items():
        if iou >= best_iou:
            best, best_iou = name, iou
    return best


@dataclass(frozen=True)
class Component:
    """One connected region of a colour: pixel area, centroid x in pixels, classified shape, and
    its IoU with each ideal shape."""

    area: int
    cx: float
    shape: str | None
    ious: dict[str, float]


# Only regions that contain a solid 3x3 core count as objects: this drops the thin rings of
# blended colour a blurred edge can leave around a shape (red fading into yellow passes through
# orange) and noise speckles. The region itself is kept whole ("opening by
# reconstruction"), because a plain opening would blunt small triangles' apexes into trapezoids.
_CORE = np.ones((3, 3), bool)


def find_components(labels: np.ndarray, color_index: int, min_area: int, min_iou: float) -> list[Component]:
    """Palette labels int [H, W] -> the components of one colour, largest first."""
    mask = labels == color_index
    regions, _ = ndimage.label(mask)
    has_core = np.zeros(regions.max() + 1, bool)
    has_core[regions[ndimage.binary_erosion(mask, structure=_CORE)]] = True
    components = []
    for i, box in enumerate(ndimage.find_objects(regions), start=1):
        crop = regions[box] == i
        area = int(crop.sum())
        if area < min_area or not has_core[i]:
            continue
        cx = box[1].start + float((crop.sum(axis=0) * (np.arange(crop.shape[1]) + 0.5)).sum()) / area
        ious = shape_ious(crop)
        components.append(Component(area, cx, _best_shape(ious, min_iou), ious))
    return sorted(components, key=lambda c: -c.area)


def _frame(labels: np.ndarray, width: int) -> np.ndarray:
    """The labels on the outer frame of ``width`` pixels of labels int [H, W], flattened."""
    frame = np.ones(labels.shape, bool)
    frame[width:-width, width:-width] = False
    return labels[frame]


def border_color(labels: np.ndarray, width: int) -> str | None:
    """Most frequent palette colour on the outer frame of ``width`` pixels of labels int [H, W];
    None when no frame pixel has a palette colour."""
    values = _frame(labels, width)
    values = values[values != _NO_COLOR]
    if values.size == 0:
        return None
    return _PALETTE_NAMES[int(np.bincount(values, minlength=len(_PALETTE_NAMES)).argmax())]


@dataclass(frozen=True)
class VerifiableReward:
    """Callable reward; see the module docstring for the constraints.

    color_threshold: max CIELAB Delta-E from a pixel to its nearest palette colour (palette
        colours are >= ~43 apart, so 30 tolerates a VAE's colour drift while rejecting most
        blended edge pixels).
    min_area_frac: components smaller than this fraction of the image are speckles.
    min_shape_iou: a component whose best ideal-shape IoU is lower has no shape (a circle's IoU
        with the square fitted to it is pi/4 ~ 0.785, so 0.6 only rejects irregular blobs).
    border_frac: width of the frame read for the background colour, as a fraction of the side.
    soft: partial credit per constraint (see the module docstring) instead of met / not met.
    object_area_frac: with ``soft``, the pixel area (fraction of the image) at which a colour
        earns the full colour credit without forming an object: about the smallest object the
        world draws (a triangle with a side of 0.24 of the image).
    shape_margin: with ``soft``, the IoU lead over the best other shape that earns full shape
        credit (no lead: half).
    position_scale: with ``soft``, the centroid distance (fraction of the width) over which the
        position credit goes from 0.5 to 0.73 (a logistic's unit).
    """

    color_threshold: float = 30.0
    min_area_frac: float = 0.004
    min_shape_iou: float = 0.6
    border_frac: float = 0.03
    soft: bool = False
    object_area_frac: float = 0.03
    shape_margin: float = 0.2
    position_scale: float = 0.05

    def __post_init__(self) -> None:
        for name in (
            "color_threshold", "min_area_frac", "min_shape_iou", "border_frac",
            "object_area_frac", "shape_margin", "position_scale",
        ):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"verifiable reward option {name} must be a number > 0, got {value!r}")
        if not isinstance(self.soft, bool):
            raise ValueError(f"verifiable reward option soft must be true or false, got {self.soft!r}")

    def check(self, labels: np.ndarray, spec: PromptSpec) -> dict[str, list[float]]:
        """Palette labels int [H, W] and a prompt -> the credit of each constraint in [0, 1], by
        type (0 or 1 unless ``soft``)."""
        h, w = labels.shape
        min_area = max(2, math.ceil(self.min_area_frac * h * w))
        results: dict[str, list[float]] = {t: [] for t in CONSTRAINT_TYPES}
        found = {
            o.color: find_components(labels, _PALETTE_NAMES.index(o.color), min_area, self.min_shape_iou)
            for o in spec.objects
        }
        for obj in spec.objects:
            comps = found[obj.color]
            if self.soft:
                pixels = int((labels == _PALETTE_NAMES.index(obj.color)).sum())
                results["color"].append(1.0 if comps else min(1.0, pixels / (self.object_area_frac * h * w)))
                results["count"].append(2.0 ** -abs(len(comps) - obj.count) if comps else 0.0)
                results["shape"].append(float(np.mean([self._shape_credit(c, obj.shape) for c in comps])) if comps else 0.0)
            else:
                results["color"].append(float(len(comps) > 0))
                results["count"].append(float(len(comps) == obj.count))
                results["shape"].append(float(len(comps) > 0 and all(c.shape == obj.shape for c in comps)))
        if spec.relation is not None:
            first, second = (found[o.color] for o in spec.objects)
            credit = 0.0
            if first and second:
                # left_of: the first object's centroid has the smaller x.
                lead = (second[0].cx - first[0].cx) * (1 if spec.relation == "left_of" else -1)
                if self.soft:
                    credit = 1.0 / (1.0 + math.exp(-lead / (self.position_scale * w)))
                else:
                    credit = float(lead > 0)
            results["position"].append(credit)
        if spec.background is not None:
            width = max(1, round(self.border_frac * min(h, w)))
            if self.soft:
                share = float((_frame(labels, width) == _PALETTE_NAMES.index(spec.background)).mean())
                results["background"].append(min(1.0, 2.0 * share))
            else:
                results["background"].append(float(border_color(labels, width) == spec.background))
        return results

    def _shape_credit(self, component: Component, shape: str) -> float:
        other = max(iou for name, iou in component.ious.items() if name != shape)
        return min(1.0, max(0.0, 0.5 + (component.ious[shape] - other) / (2 * self.shape_margin)))

    @staticmethod
    def check_metadata(record: dict[str, Any]) -> None:
        """Refuse (``ValueError``) corrupt world metadata when the prompt set loads, rather than
        mid-training (:func:`tpgrpo.world.check_record`)."""
        check_record(record)

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> RewardOutput:
        """images float [B, 3, H, W] in [0, 1]; prompts and metadata (world dicts) of length B.
        Returns scores float32 [B] and details ``{constraint type: float32 [B]}``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
        batch = images.shape[0]
        if len(prompts) != batch or len(metadata) != batch:
            raise ValueError(f"got {batch} images, {len(prompts)} prompts and {len(metadata)} metadata entries")
        specs = [PromptSpec.from_dict(m) for m in metadata]
        for i, (prompt, spec) in enumerate(zip(prompts, specs)):
            if prompt != spec.prompt:
                raise ValueError(f"prompt {i} {prompt!r} does not match its metadata ({spec.prompt!r})")
        pixels = images.detach().to("cpu", torch.float32).permute(0, 2, 3, 1).numpy()
        labels = classify_colors(pixels, self.color_threshold)
        scores = np.zeros(batch, np.float32)
        details = {t: np.full(batch, np.nan, np.float32) for t in CONSTRAINT_TYPES}
        for i, spec in enumerate(specs):
            results = self.check(labels[i], spec)
            outcomes = [ok for oks in results.values() for ok in oks]
            scores[i] = sum(outcomes) / len(outcomes)
            for t, oks in results.items():
                if oks:
                    details[t][i] = sum(oks) / len(oks)
        return RewardOutput(
            scores=torch.from_numpy(scores),
            details={t: torch.from_numpy(v) for t, v in details.items()},
        )



@dataclass(frozen=True)
class SoftVerifiableReward(VerifiableReward):
    """``verifiable_soft``: the verifiable reward with graded credit (``soft`` on by default), a
    registry name of its own so that ``reward.name`` overrides never inherit a ``soft`` option."""

    soft: bool = True
