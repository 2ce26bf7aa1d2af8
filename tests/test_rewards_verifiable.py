"""Reward registry and the classical verifiable reward on the shape world."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from itertools import combinations

import numpy as np
import pytest
import torch
from PIL import ImageFilter

from tpgrpo import rewards, world
from tpgrpo.rewards import RewardOutput, available_rewards, build_reward, register_reward
from tpgrpo.rewards.verifiable import VerifiableReward
from tpgrpo.world import ObjectSpec, PromptSpec

NAN = math.nan


def to_batch(images) -> torch.Tensor:
    return torch.stack([world.image_to_tensor(im) for im in images])


def score(reward, spec: PromptSpec, image_spec: PromptSpec, size: int, seed: int) -> RewardOutput:
    """Score prompt ``spec`` against an image rendered from ``image_spec``."""
    image = world.render(image_spec, size, seed)
    return reward(to_batch([image]), [spec.prompt], [spec.to_dict()])


@pytest.fixture(scope="module")
def reward():
    return build_reward("verifiable")


def mixed_specs(n: int, seed: int) -> list[PromptSpec]:
    rng = np.random.default_rng(seed)
    return world.sample_specs(n, rng, "train") + world.sample_specs(n, rng, "test")


# ---------------------------------------------------------------- registry


def test_unknown_reward_lists_available() -> None:
    with pytest.raises(ValueError, match=r"^unknown reward 'foo'; available: .*verifiable"):
        build_reward("foo")
    assert "verifiable" in available_rewards()


def test_unknown_option_is_named() -> None:
    with pytest.raises(TypeError, match=r"unknown option\(s\) 'colour_threshold' for reward 'verifiable'; valid: color_threshold"):
        build_reward("verifiable", colour_threshold=20)
    with pytest.raises(ValueError, match="min_area_frac must be a number > 0"):
        build_reward("verifiable", min_area_frac=0)
    assert build_reward("verifiable", color_threshold=25.0).color_threshold == 25.0


def test_reward_module_is_imported_lazily() -> None:
    code = (
        "import sys, tpgrpo.rewards as r\n"
        "assert 'tpgrpo.rewards.verifiable' not in sys.modules\n"
        "r.build_reward('verifiable')\n"
        "assert 'tpgrpo.rewards.verifiable' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_register_reward(monkeypatch) -> None:
    monkeypatch.setattr(rewards, "_REGISTRY", {"verifiable": rewards._REGISTRY["verifiable"]})

    def constant(value: float = 1.0):
        return lambda images, prompts, metadata: RewardOutput(torch.full((len(prompts),), value))

    register_reward("constant", constant)
    assert available_rewards() == ["constant", "verifiable"]
    assert build_reward("constant", value=0.5)(torch.zeros(2, 3, 8, 8), ["a", "b"], [{}, {}]).scores.tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="already registered"):
        register_reward("constant", constant)
    with pytest.raises(ValueError, match="module:attribute"):
        register_reward("lazy", "tpgrpo.rewards.nothing", overwrite=True)


def test_reward_output_validates_shapes() -> None:
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        RewardOutput(torch.zeros(2, 1))
    with pytest.raises(ValueError, match="detail 'x'"):
        RewardOutput(torch.zeros(2), {"x": torch.zeros(3)})


# ---------------------------------------------------------------- output contract


def test_output_shapes_and_dtypes(reward) -> None:
    specs = mixed_specs(3, 0)
    images = to_batch(world.render(s, 64, i) for i, s in enumerate(specs))
    out = reward(images, [s.prompt for s in specs], [s.to_dict() for s in specs])
    assert isinstance(out, RewardOutput)
    assert out.scores.shape == (6,) and out.scores.dtype == torch.float32
    assert set(out.details) == {"color", "count", "shape", "position", "background"}
    for value in out.details.values():
        assert value.shape == (6,) and value.dtype == torch.float32
    for i, spec in enumerate(specs):
        assert math.isnan(out.details["position"][i]) == (spec.relation is None)
        assert math.isnan(out.details["background"][i]) == (spec.background is None)


def test_inputs_are_validated(reward) -> None:
    spec = PromptSpec("single", (ObjectSpec("red", "circle"),))
    image = to_batch([world.render(spec, 32, 0)])
    with pytest.raises(ValueError, match="does not match its metadata"):
        reward(image, ["a blue circle"], [spec.to_dict()])
    with pytest.raises(ValueError, match="1 images, 2 prompts"):
        reward(image, [spec.prompt] * 2, [spec.to_dict()] * 2)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        reward(image[:, :1], [spec.prompt], [spec.to_dict()])


# ---------------------------------------------------------------- ground truth


@pytest.mark.parametrize(("size", "blur"), [(32, 0.0), (64, 0.0), (128, 0.0), (32, 0.5), (64, 1.0)])
def test_ground_truth_scores_one(reward, size: int, blur: float) -> None:
    """Blur mimics a VAE's softened edges (PIL radius 1.0 at 64 px, scaled with the size)."""
    specs = mixed_specs(100 if size <= 64 else 25, size)
    images = [world.render(s, size, i) for i, s in enumerate(specs)]
    if blur:
        images = [im.filter(ImageFilter.GaussianBlur(blur)) for im in images]
    out = reward(to_batch(images), [s.prompt for s in specs], [s.to_dict() for s in specs])
    assert {s.kind for s in specs} == set(world.KINDS)
    bad = [specs[i].prompt for i in torch.nonzero(out.scores < 1).flatten().tolist()]
    assert not bad, bad


# ---------------------------------------------------------------- wrong images, hand-worked


def single(color: str, shape: str, bg: str | None = None) -> PromptSpec:
    return PromptSpec("single", (ObjectSpec(color, shape),), background=bg)


def count(color: str, shape: str, n: int, bg: str | None = None) -> PromptSpec:
    return PromptSpec("counting", (ObjectSpec(color, shape, n),), background=bg)


def pair(kind: str, a: tuple[str, str], b: tuple[str, str], relation: str | None = None, bg: str | None = None) -> PromptSpec:
    return PromptSpec(kind, (ObjectSpec(*a), ObjectSpec(*b)), relation=relation, background=bg)  # type: ignore[arg-type]


# (prompt, rendered image, score, details [color, count, shape, position, background])
WRONG_IMAGES = [
    # 3 blue squares for "two": colour and shape right, count wrong -> 2/3
    (count("blue", "square", 2), count("blue", "square", 3), 2 / 3, [1, 0, 1, NAN, NAN]),
    # green for red: nothing of the prompt's colour -> 0/3
    (single("red", "circle"), single("green", "circle"), 0.0, [0, 0, 0, NAN, NAN]),
    # square for circle -> 2/3
    (single("red", "circle"), single("red", "square"), 2 / 3, [1, 1, 0, NAN, NAN]),
    # left/right swapped: 6 object constraints right, relation wrong -> 6/7
    (
        pair("position", ("red", "circle"), ("blue", "square"), "left_of"),
        pair("position", ("red", "circle"), ("blue", "square"), "right_of"),
        6 / 7,
        [1, 1, 1, 0, NAN],
    ),
    # black instead of white background -> 3/4; the default gray background is wrong too
    (single("red", "circle", "white"), single("red", "circle", "black"), 3 / 4, [1, 1, 1, NAN, 0]),
    (single("red", "circle", "white"), single("red", "circle"), 3 / 4, [1, 1, 1, NAN, 0]),
    # second object missing: 3 of 6 -> 1/2
    (pair("two_objects", ("red", "circle"), ("blue", "square")), single("red", "circle"), 1 / 2, [0.5, 0.5, 0.5, NAN, NAN]),
    # one yellow circle for three yellow triangles: colour only -> 1/3
    (count("yellow", "triangle", 3), single("yellow", "circle"), 1 / 3, [1, 0, 0, NAN, NAN]),
    # triangle for circle, sides swapped, wrong background: colour 2/2, count 2/2, shape 1/2 -> 5/8
    (
        pair("position", ("red", "circle"), ("blue", "square"), "left_of", "black"),
        pair("position", ("red", "triangle"), ("blue", "square"), "right_of", "white"),
        5 / 8,
        [1, 1, 0.5, 0, 0],
    ),
    # the relation needs both objects: blue absent -> colour 1/2, count 1/2, shape 1/2, position 0 -> 3/7
    (pair("position", ("red", "circle"), ("blue", "square"), "right_of"), single("red", "circle"), 3 / 7, [0.5, 0.5, 0.5, 0, NAN]),
    # extra objects of unmentioned colours are ignored -> 1
    (single("red", "circle"), pair("two_objects", ("red", "circle"), ("green", "triangle")), 1.0, [1, 1, 1, NAN, NAN]),
]


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize(("prompt", "image", "expected", "details"), WRONG_IMAGES)
def test_wrong_images_score_as_hand_worked(reward, size, prompt, image, expected, details) -> None:
    for seed in range(5):
        out = score(reward, prompt, image, size, seed)
        assert out.scores.item() == pytest.approx(expected, abs=1e-6), (prompt.prompt, image.prompt, seed)
        got = [out.details[k].item() for k in ("color", "count", "shape", "position", "background")]
        assert got == pytest.approx(details, nan_ok=True), (prompt.prompt, image.prompt, seed)


# ---------------------------------------------------------------- degenerate images


@pytest.mark.parametrize("size", [32, 64])
def test_blank_images_score_zero(reward, size: int) -> None:
    specs = mixed_specs(50, 1)
    prompts, metadata = [s.prompt for s in specs], [s.to_dict() for s in specs]
    gray = torch.full((len(specs), 3, size, size), 128 / 255)
    assert reward(gray, prompts, metadata).scores.eq(0).all()
    # a blank black image meets exactly one constraint, the background, of black-background prompts
    black = reward(torch.zeros(len(specs), 3, size, size), prompts, metadata)
    for spec, value in zip(specs, black.scores.tolist()):
        n_constraints = 3 * len(spec.objects) + (spec.relation is not None) + (spec.background is not None)
        assert value == pytest.approx(1 / n_constraints if spec.background == "black" else 0.0)


@pytest.mark.parametrize("size", [32, 64])
def test_noise_scores_low(reward, size: int) -> None:
    specs = mixed_specs(100, 2)
    noise = torch.rand(len(specs), 3, size, size, generator=torch.Generator().manual_seed(0))
    out = reward(noise, [s.prompt for s in specs], [s.to_dict() for s in specs])
    # only a border frame whose most common colour happens to be the named background scores
    assert out.scores.mean() < 0.05
    assert torch.nan_to_num(out.details["count"]).eq(0).all()


def test_shuffled_prompts_score_low(reward) -> None:
    specs = mixed_specs(200, 3)
    images = to_batch(world.render(s, 64, i) for i, s in enumerate(specs))
    perm = np.random.default_rng(0).permutation(len(specs))
    shuffled = [specs[j] for j in perm]
    out = reward(images, [s.prompt for s in shuffled], [s.to_dict() for s in shuffled])
    # measured 0.17-0.19 (chance agreement on colour, background and counts); ground truth is 1.0
    assert 0.05 < out.scores.mean().item() < 0.3


# ---------------------------------------------------------------- building blocks


def test_palette_colours_are_separable() -> None:
    from tpgrpo.rewards.verifiable import _PALETTE_LAB, VerifiableReward, classify_colors

    distances = [np.linalg.norm(a - b) for a, b in combinations(_PALETTE_LAB, 2)]
    assert min(distances) > VerifiableReward().color_threshold + 10
    pure = np.array(list(world.PALETTE.values()), np.float32)[None, :, None, :] / 255  # [1, P, 1, 3]
    assert classify_colors(pure, 30.0)[0, :, 0].tolist() == list(range(len(world.PALETTE)))
    assert classify_colors(np.full((1, 1, 1, 3), [0.5, 0.3, 0.1], np.float32), 30.0).item() == -1  # brown


def test_ideal_shapes_classify_as_themselves() -> None:
    from tpgrpo.rewards.verifiable import _templates, classify_shape

    for h, w in [(6, 6), (12, 12), (30, 30), (20, 26)]:
        templates = _templates(h, w)
        assert set(templates) == set(world.SHAPES)
        for name, mask in templates.items():
            assert classify_shape(mask, 0.6) == name
    ring = _templates(20, 20)["square"].copy()
    ring[3:-3, 3:-3] = False
    assert classify_shape(ring, 0.6) is None


def test_speed(reward) -> None:
    specs = mixed_specs(32, 4)
    images = to_batch(world.render(s, 64, i) for i, s in enumerate(specs))
    args = (images, [s.prompt for s in specs], [s.to_dict() for s in specs])
    reward(*args)
    start = time.perf_counter()
    reward(*args)
    per_image = (time.perf_counter() - start) / len(specs)
    assert per_image < 0.02, f"{per_image * 1000:.1f} ms per 64x64 image"


# ---------------------------------------------------------------- soft (graded) credit

_INDEX = {name: i for i, name in enumerate(world.PALETTE)}


def _labels(size: int = 32) -> np.ndarray:
    return np.full((size, size), _INDEX["gray"], np.int64)


def _position_spec(relation: str) -> PromptSpec:
    return PromptSpec("position", (ObjectSpec("red", "square"), ObjectSpec("blue", "square")), relation=relation)


def test_soft_position_is_a_logistic_of_the_centroid_lead() -> None:
    labels = _labels()
    labels[10:16, 4:10] = _INDEX["red"]  # centroid x = 7.0
    labels[10:16, 10:16] = _INDEX["blue"]  # centroid x = 13.0
    soft, strict = VerifiableReward(soft=True), VerifiableReward()
    # lead 6 px over a scale of 0.05 * 32 = 1.6 px
    assert soft.check(labels, _position_spec("left_of"))["position"] == [pytest.approx(1 / (1 + math.exp(-3.75)))]
    assert soft.check(labels, _position_spec("right_of"))["position"] == [pytest.approx(1 / (1 + math.exp(3.75)))]
    assert strict.check(labels, _position_spec("left_of"))["position"] == [1.0]
    assert strict.check(labels, _position_spec("right_of"))["position"] == [0.0]
    # 6x6 squares: the ideal circle in a 6x6 box covers all but the 4 corner pixels, IoU 32/36,
    # so the square's lead of 4/36 earns 0.5 + (4/36) / 0.4 of the shape credit
    assert soft.check(labels, _position_spec("left_of"))["shape"] == [pytest.approx(0.5 + 4 / 36 / 0.4)] * 2


def test_soft_count_colour_and_shape_credit() -> None:
    soft = VerifiableReward(soft=True)
    labels = _labels()
    yy, xx = np.mgrid[0:8, 0:8]
    disc = (xx + 0.5 - 4) ** 2 + (yy + 0.5 - 4) ** 2 <= 16  # the reward's ideal circle in an 8x8 box
    labels[4:12, 4:12][disc] = _INDEX["red"]
    two = PromptSpec("counting", (ObjectSpec("red", "circle", 2),))
    # circle IoU 1 leads the square's (the disc's share of its box) by less than the 0.2 margin
    shape = 0.5 + (1 - disc.sum() / 64) / 0.4
    assert soft.check(labels, two) == {
        "color": [1.0], "count": [0.5], "shape": [pytest.approx(shape)], "position": [], "background": [],
    }
    assert VerifiableReward().check(labels, two)["count"] == [0.0]
    # three scattered yellow pixels: no object (no 3x3 core), colour credit 3 / (0.03 * 32 * 32)
    labels[20, 20] = labels[22, 25] = labels[28, 3] = _INDEX["yellow"]
    yellow = PromptSpec("single", (ObjectSpec("yellow", "triangle"),))
    got = soft.check(labels, yellow)
    assert got["color"] == [pytest.approx(3 / 30.72)] and got["count"] == [0.0] and got["shape"] == [0.0]
    assert VerifiableReward().check(labels, yellow)["color"] == [0.0]
    # an 8x8 square where a circle is asked: circle IoU (the disc's share) trails the square's 1
    labels = _labels()
    labels[4:12, 4:12] = _INDEX["red"]
    circle = PromptSpec("single", (ObjectSpec("red", "circle"),))
    assert soft.check(labels, circle)["shape"] == [pytest.approx(0.5 + (disc.sum() / 64 - 1) / 0.4)]


def test_soft_background_is_the_frame_share() -> None:
    labels = _labels()
    labels[10:16, 10:16] = _INDEX["red"]
    frame = np.ones(labels.shape, bool)
    frame[1:-1, 1:-1] = False  # width round(0.03 * 32) = 1: 124 pixels
    rows, cols = np.nonzero(frame)
    labels[rows[:50], cols[:50]] = _INDEX["white"]
    spec = PromptSpec("single", (ObjectSpec("red", "square"),), background="white")
    assert VerifiableReward(soft=True).check(labels, spec)["background"] == [pytest.approx(100 / 124)]
    assert VerifiableReward().check(labels, spec)["background"] == [0.0]  # the frame is mostly gray


def test_soft_scores_rank_ground_truth_above_wrong_images() -> None:
    soft = build_reward("verifiable_soft")
    assert soft.soft
    specs = mixed_specs(12, seed=3)
    images = to_batch(world.render(s, 64, i).filter(ImageFilter.GaussianBlur(1.0)) for i, s in enumerate(specs))
    right = soft(images, [s.prompt for s in specs], [s.to_dict() for s in specs]).scores
    same = build_reward("verifiable", soft=True)(images, [s.prompt for s in specs], [s.to_dict() for s in specs])
    assert torch.equal(right, same.scores)
    shifted = specs[1:] + specs[:1]
    wrong = soft(images, [s.prompt for s in shifted], [s.to_dict() for s in shifted]).scores
    assert right.mean() > 0.9 and (right > wrong).float().mean() > 0.9
