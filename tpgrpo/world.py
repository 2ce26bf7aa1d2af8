"""A seeded synthetic world of coloured shapes: prompts, metadata, ground-truth images.

This is the embedded default's data source (DESIGN.md §3). A prompt names one or two kinds of
object (colour + shape), optionally a count, a left/right relation and a background colour, e.g.
``"two blue squares"`` or ``"a red circle left of a yellow triangle on a white background"``.
Every prompt has a structured form, :class:`PromptSpec`, whose ``to_dict()`` is the metadata the
verifiable reward (:mod:`tpgrpo.rewards.verifiable`) checks an image against.

Metadata schema (one JSON object per prompt, also one line of ``train.jsonl`` / ``test.jsonl``)::

    {"prompt": "a red circle left of a blue square on a white background",
     "kind": "position",                  # "single" | "counting" | "two_objects" | "position"
     "objects": [{"color": "red", "shape": "circle", "count": 1},
                 {"color": "blue", "shape": "square", "count": 1}],
     "relation": "left_of",               # "left_of" | "right_of" | null; objects[0] REL objects[1]
     "background": "white"}               # "white" | "black" | null (null: DEFAULT_BACKGROUND, unchecked)

Rules that keep the world unambiguous for a classical checker: the objects of one prompt have
different colours (so a colour mask identifies an object), and no object has the background's
colour. Prompts are lower-case words separated by single spaces, every word is in
:data:`VOCABULARY`, and none is longer than :data:`MAX_PROMPT_WORDS` words.

Train/test split: the colour-shape pairs in :data:`HELD_OUT_PAIRS` never occur in a train prompt or
a pretraining image; every test prompt contains at least one of them, so the test set measures
compositional generalisation and is disjoint from train by construction. The pairs are a fixed
constant rather than drawn from the seed so that pretraining data, prompt sets and evaluation agree
without passing the seed around.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from PIL import Image, ImageDraw

from tpgrpo import data
from tpgrpo.fileio import atomic_write_text

Kind = Literal["single", "counting", "two_objects", "position"]
Relation = Literal["left_of", "right_of"]
Split = Literal["train", "test"]

KINDS: tuple[str, ...] = get_args(Kind)
RELATIONS: tuple[str, ...] = get_args(Relation)
SPLITS: tuple[str, ...] = get_args(Split)

# sRGB values picked for separation in CIELAB (every pair of palette colours, gray included, is
# at least ~43 Delta-E apart), so that nearest-colour masks survive the blur and colour drift of a
# small VAE. Blue and purple are pushed apart in hue because they are the closest pair.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (245, 225, 20),
    "green": (30, 170, 50),
    "cyan": (20, 215, 225),
    "blue": (20, 80, 235),
    "purple": (165, 30, 175),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "white")
"""Object colours."""
BACKGROUNDS: tuple[str, ...] = ("white", "black")
"""Background colours a prompt may name."""
DEFAULT_BACKGROUND = "gray"
"""Background of images whose prompt names none; never an object colour, never checked."""
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
MAX_COUNT = 3

HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "circle"), ("blue", "square"), ("purple", "circle")}
)
"""(colour, shape) pairs that only test prompts contain. Each colour and each shape still occurs
in train with other partners, so a test prompt is a new combination of known words."""

_NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
_RELATION_WORDS = {"left_of": "left of", "right_of": "right of"}

MAX_PROMPT_WORDS = 12
"""Longest prompt, in words (the tiny text encoder has 16 positions, one token per word)."""

VOCABULARY: list[str] = [
    "a", "an", *_NUMBER_WORDS.values(),
    *COLORS, *(c for c in BACKGROUNDS if c not in COLORS),
    *SHAPES, *(f"{s}s" for s in SHAPES),
    "and", "left", "right", "of", "on", "background",
]  # fmt: skip
"""Every word that can appear in a prompt, each once."""


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class ObjectSpec:
    """``count`` objects of one colour and shape."""

    color: str
    shape: str
    count: int = 1

    def __post_init__(self) -> None:
        if self.color not in COLORS:
            raise ValueError(f"unknown object color {self.color!r}; expected one of {COLORS}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if not isinstance(self.count, int) or not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"object count must be an int in 1..{MAX_COUNT}, got {self.count!r}")

    @property
    def pair(self) -> tuple[str, str]:
        return (self.color, self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"color": self.color, "shape": self.shape, "count": self.count}


@dataclass(frozen=True)
class PromptSpec:
    """Structured form of a world prompt; ``prompt`` is generated from it, never stored apart."""

    kind: Kind
    objects: tuple[ObjectSpec, ...]
    relation: Relation | None = None
    background: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown prompt kind {self.kind!r}; expected one of {KINDS}")
        n_objects = 2 if self.kind in ("two_objects", "position") else 1
        if len(self.objects) != n_objects:
            raise ValueError(f"kind {self.kind!r} needs {n_objects} object(s), got {len(self.objects)}")
        if self.kind != "counting" and any(o.count != 1 for o in self.objects):
            raise ValueError(f"only 'counting' prompts may have count != 1 (kind {self.kind!r})")
        if (self.relation is None) == (self.kind == "position"):
            raise ValueError(f"a relation is required for 'position' prompts and only for them (kind {self.kind!r}, relation {self.relation!r})")
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"unknown relation {self.relation!r}; expected one of {RELATIONS}")
        colors = [o.color for o in self.objects]
        if len(set(colors)) != len(colors):
            raise ValueError(f"objects of one prompt must have different colours, got {colors}")
        if self.background is not None:
            if self.background not in BACKGROUNDS:
                raise ValueError(f"unknown background {self.background!r}; expected one of {BACKGROUNDS}")
            if self.background in colors:
                raise ValueError(f"an object has the background's colour {self.background!r}")

    @property
    def prompt(self) -> str:
        def phrase(o: ObjectSpec) -> str:
            if self.kind == "counting":
                return f"{_NUMBER_WORDS[o.count]} {o.color} {o.shape}{'s' if o.count > 1 else ''}"
            return f"{_article(o.color)} {o.color} {o.shape}"

        text = phrase(self.objects[0])
        if self.kind == "two_objects":
            text += f" and {phrase(self.objects[1])}"
        elif self.kind == "position":
            assert self.relation is not None
            text += f" {_RELATION_WORDS[self.relation]} {phrase(self.objects[1])}"
        if self.background is not None:
            text += f" on {_article(self.background)} {self.background} background"
        return text

    @property
    def background_color(self) -> str:
        """The colour the image's background has (the default one when the prompt names none)."""
        return self.background or DEFAULT_BACKGROUND

    def pairs(self) -> set[tuple[str, str]]:
        return {o.pair for o in self.objects}

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "kind": self.kind,
            "objects": [o.to_dict() for o in self.objects],
            "relation": self.relation,
            "background": self.background,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PromptSpec:
        """Inverse of :meth:`to_dict`. A ``prompt`` entry, when present, must match the metadata:
        a mismatch means the prompt and metadata lists got out of step somewhere upstream."""
        try:
            objects = tuple(
                ObjectSpec(color=o["color"], shape=o["shape"], count=o.get("count", 1))
                for o in data["objects"]
            )
            spec = cls(
                kind=data["kind"],
                objects=objects,
                relation=data.get("relation"),
                background=data.get("background"),
            )
        except KeyError as err:
            raise ValueError(f"world metadata lacks key {err.args[0]!r}: {dict(data)}") from None
        except (TypeError, AttributeError) as err:
            raise ValueError(f"malformed world metadata ({err}): {dict(data)}") from None
        if "prompt" in data and data["prompt"] != spec.prompt:
            raise ValueError(f"prompt {data['prompt']!r} does not match its metadata (which reads {spec.prompt!r})")
        return spec


# --------------------------------------------------------------------------------------------
# Prompt space and sampling


def _split_allows(spec: PromptSpec, split: Split) -> bool:
    held_out = bool(spec.pairs() & HELD_OUT_PAIRS)
    return held_out if split == "test" else not held_out


def _all_specs() -> Iterator[PromptSpec]:
    pairs = [ObjectSpec(c, s) for c in COLORS for s in SHAPES]
    backgrounds: tuple[str | None, ...] = (None, *BACKGROUNDS)
    for bg in backgrounds:
        for o in pairs:
            if o.color == bg:
                continue
            yield PromptSpec("single", (o,), background=bg)
            for n in range(1, MAX_COUNT + 1):
                yield PromptSpec("counting", (ObjectSpec(o.color, o.shape, n),), background=bg)
            for o2 in pairs:
                if o2.color in (o.color, bg):
                    continue
                yield PromptSpec("two_objects", (o, o2), background=bg)
                for rel in RELATIONS:
                    yield PromptSpec("position", (o, o2), relation=rel, background=bg)


@lru_cache(maxsize=len(SPLITS))
def prompt_pool(split: Split) -> dict[str, tuple[PromptSpec, ...]]:
    """Every prompt of ``split``, grouped by kind, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    pool: dict[str, list[PromptSpec]] = {k: [] for k in KINDS}
    for spec in _all_specs():
        if _split_allows(spec, split):
            pool[spec.kind].append(spec)
    return {k: tuple(v) for k, v in pool.items()}


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def sample_prompts(n: int, seed: int, split: Split) -> list[PromptSpec]:
    """``n`` prompts of ``split``, kinds balanced (remainder to the first kinds), deterministic in
    ``seed``. Within a kind prompts are distinct until the kind's pool is exhausted, then the
    shuffled pool repeats. The result is shuffled across kinds."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pool = prompt_pool(split)
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    out: list[PromptSpec] = []
    for i, kind in enumerate(KINDS):
        k = n // len(KINDS) + (i < n % len(KINDS))
        specs = pool[kind]
        order = rng.permutation(len(specs))
        out.extend(specs[order[j % len(specs)]] for j in range(k))
    return [out[j] for j in rng.permutation(len(out))]


@dataclass(frozen=True)
class PromptSetPaths:
    train: Path
    test: Path


def write_prompts(path: str | Path, specs: Iterable[PromptSpec]) -> Path:
    """Write one metadata JSON object per line (the format :func:`load_prompts` reads)."""
    return atomic_write_text(path, "".join(json.dumps(s.to_dict()) + "\n" for s in specs))


def write_prompt_sets(out_dir: str | Path, n_train: int, n_test: int, seed: int) -> PromptSetPaths:
    """Write ``out_dir/train.jsonl`` and ``out_dir/test.jsonl``; deterministic in ``seed``."""
    out_dir = Path(out_dir)
    return PromptSetPaths(
        train=write_prompts(out_dir / "train.jsonl", sample_prompts(n_train, seed, "train")),
        test=write_prompts(out_dir / "test.jsonl", sample_prompts(n_test, seed, "test")),
    )




def check_record(record: Mapping[str, Any]) -> None:
    """Validate a prompt record that carries world metadata (a ``kind`` key) as a
    :class:`PromptSpec` (``ValueError`` naming the field); other records (prompt sets for real
    models) pass."""
    if "kind" in record:
        PromptSpec.from_dict(dict(record))


def load_prompts(path: str | Path) -> list[dict[str, Any]]:
    """A jsonl prompt set (:func:`tpgrpo.data.load_prompts`) whose world records are validated
    (:func:`check_record`), so a corrupt prompt set fails here rather than mid-training."""
    return data.load_prompts(path, check=check_record)


# --------------------------------------------------------------------------------------------
# Rendering

# Geometry as fractions of the image side, so 32, 64 and 128 pixel images look alike.
_MIN_SIDE, _MAX_SIDE = 0.24, 0.36
_BORDER = 0.06  # keeps shapes off the frame the reward reads the background from
_GAP = 0.1  # between objects: blurred same-colour objects must not merge into one component
_MAX_TRIES = 500


@dataclass(frozen=True)
class _Box:
    x0: int
    y0: int
    side: int

    def clear_of(self, other: _Box, gap: int) -> bool:
        return (
            self.x0 >= other.x0 + other.side + gap
            or other.x0 >= self.x0 + self.side + gap
            or self.y0 >= other.y0 + other.side + gap
            or other.y0 >= self.y0 + self.side + gap
        )


def _place(n: int, size: int, ordered: bool, rng: np.random.Generator) -> list[_Box]:
    """``n`` square boxes inside the border, pairwise ``_GAP`` apart; with ``ordered`` every box
    lies entirely right of the previous one plus the gap, so centroid x order is unambiguous."""
    border, gap = max(1, round(_BORDER * size)), max(2, round(_GAP * size))
    lo, hi = max(3, round(_MIN_SIDE * size)), max(4, round(_MAX_SIDE * size))
    for _ in range(_MAX_TRIES):
        boxes: list[_Box] = []
        for _ in range(n):
            side = int(rng.integers(lo, hi + 1))
            x_min = boxes[-1].x0 + boxes[-1].side + gap if ordered and boxes else border
            x_max, y_max = size - border - side, size - border - side
            if x_max < x_min:
                break
            box = _Box(int(rng.integers(x_min, x_max + 1)), int(rng.integers(border, y_max + 1)), side)
            if not all(box.clear_of(b, gap) for b in boxes):
                break
            boxes.append(box)
        if len(boxes) == n:
            return boxes
    raise RuntimeError(f"could not place {n} objects on a {size}x{size} image in {_MAX_TRIES} tries")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: _Box, color: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box.x0, box.y0, box.x0 + box.side - 1, box.y0 + box.side - 1
    if shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=color)
    elif shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=color)
    else:  # triangles point up: the reward's ideal triangle assumes this orientation
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=color)


def render(
    meta: PromptSpec | Mapping[str, Any], size: int = 64, rng: np.random.Generator | int | None = None
) -> Image.Image:
    """Draw an RGB ``size``x``size`` image that satisfies ``meta`` (a spec or its dict).

    Objects get random sizes and non-overlapping positions; for a relation ``A left_of B`` every
    A lies entirely left of every B. No anti-aliasing: blur is left to the caller (or the VAE).
    """
    spec = meta if isinstance(meta, PromptSpec) else PromptSpec.from_dict(meta)
    rng = _as_rng(rng)
    instances = [o for o in spec.objects for _ in range(o.count)]
    if spec.relation is not None:
        ordered = instances if spec.relation == "left_of" else instances[::-1]
        boxes = _place(len(ordered), size, ordered=True, rng=rng)
        placed = list(zip(ordered, boxes))
    else:
        placed = list(zip(instances, _place(len(instances), size, ordered=False, rng=rng)))
    image = Image.new("RGB", (size, size), PALETTE[spec.background_color])
    draw = ImageDraw.Draw(image)
    for obj, box in placed:
        _draw_shape(draw, obj.shape, box, PALETTE[obj.color])
    return image


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float32 tensor [3, H, W] in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class TrainingBatch:
    """Pretraining samples: ``images`` float32 [n, 3, size, size] in [0, 1], with their prompts
    and metadata dicts (index-aligned)."""

    images: torch.Tensor
    prompts: list[str]
    metadata: list[dict[str, Any]]


def sample_specs(n: int, rng: np.random.Generator | int | None, split: Split = "train") -> list[PromptSpec]:
    """``n`` independent draws from ``split``: a uniform kind, then a uniform prompt of that kind."""
    rng = _as_rng(rng)
    pool = prompt_pool(split)
    kinds = rng.integers(0, len(KINDS), size=n)
    return [pool[KINDS[k]][int(rng.integers(len(pool[KINDS[k]])))] for k in kinds]


def sample_training_batch(n: int, size: int = 64, rng: np.random.Generator | int | None = None) -> TrainingBatch:
    """``n`` (image, prompt, metadata) samples from the TRAIN distribution only (no held-out pair)."""
    rng = _as_rng(rng)
    specs = sample_specs(n, rng, "train")
    images = [image_to_tensor(render(s, size, rng)) for s in specs]
    return TrainingBatch(
        images=torch.stack(images) if images else torch.empty(0, 3, size, size),
        prompts=[s.prompt for s in specs],
        metadata=[s.to_dict() for s in specs],
    )


def iter_training_batches(
    batch_size: int, size: int = 64, seed: int = 0
) -> Iterator[TrainingBatch]:
    """Endless stream of :func:`sample_training_batch` batches, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    while True:
        yield sample_training_batch(batch_size, size, rng)
