"""The synthetic shape world: prompt grammar, splits, prompt files, rendering, training samples."""

from __future__ import annotations

import json
from itertools import chain

import numpy as np
import pytest
import torch
from scipy import ndimage

from tpgrpo import world
from tpgrpo.errors import PromptFileError
from tpgrpo.world import ObjectSpec, PromptSpec

ALL_SPECS = [s for split in world.SPLITS for pool in world.prompt_pool(split).values() for s in pool]


def color_mask(image, color: str) -> np.ndarray:
    """Bool [H, W]: pixels of exactly this palette colour (renders are not anti-aliased)."""
    return (np.asarray(image) == world.PALETTE[color]).all(axis=-1)


# ---------------------------------------------------------------- grammar and metadata


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        (PromptSpec("single", (ObjectSpec("red", "circle"),)), "a red circle"),
        (PromptSpec("single", (ObjectSpec("orange", "square"),), background="black"), "an orange square on a black background"),
        (PromptSpec("counting", (ObjectSpec("blue", "square", 2),)), "two blue squares"),
        (PromptSpec("counting", (ObjectSpec("cyan", "triangle", 1),)), "one cyan triangle"),
        (PromptSpec("two_objects", (ObjectSpec("white", "circle"), ObjectSpec("green", "square"))), "a white circle and a green square"),
        (
            PromptSpec("position", (ObjectSpec("blue", "square"), ObjectSpec("yellow", "triangle")), relation="left_of", background="white"),
            "a blue square left of a yellow triangle on a white background",
        ),
        (PromptSpec("position", (ObjectSpec("red", "circle"), ObjectSpec("purple", "circle")), relation="right_of"), "a red circle right of a purple circle"),
    ],
)
def test_prompt_text(spec: PromptSpec, text: str) -> None:
    assert spec.prompt == text
    assert PromptSpec.from_dict(spec.to_dict()) == spec


def test_metadata_is_json_and_round_trips() -> None:
    spec = PromptSpec("counting", (ObjectSpec("green", "triangle", 3),), background="white")
    data = json.loads(json.dumps(spec.to_dict()))
    assert data == {
        "prompt": "three green triangles on a white background",
        "kind": "counting",
        "objects": [{"color": "green", "shape": "triangle", "count": 3}],
        "relation": None,
        "background": "white",
    }
    assert PromptSpec.from_dict(data) == spec


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ObjectSpec("pink", "circle"), "unknown object color"),
        (lambda: ObjectSpec("red", "star"), "unknown shape"),
        (lambda: ObjectSpec("red", "circle", 4), "count"),
        (lambda: PromptSpec("single", (ObjectSpec("red", "circle", 2),)), "only 'counting'"),
        (lambda: PromptSpec("two_objects", (ObjectSpec("red", "circle"), ObjectSpec("red", "square"))), "different colours"),
        (lambda: PromptSpec("single", (ObjectSpec("white", "circle"),), background="white"), "background's colour"),
        (lambda: PromptSpec("position", (ObjectSpec("red", "circle"), ObjectSpec("blue", "square"))), "relation is required"),
        (lambda: PromptSpec("single", (ObjectSpec("red", "circle"),), background="gray"), "unknown background"),
        (lambda: PromptSpec("single", (ObjectSpec("red", "circle"), ObjectSpec("blue", "square"))), "needs 1 object"),
    ],
)
def test_invalid_specs_are_rejected(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_from_dict_rejects_mismatched_prompt_and_missing_keys() -> None:
    data = PromptSpec("single", (ObjectSpec("red", "circle"),)).to_dict()
    with pytest.raises(ValueError, match="does not match its metadata"):
        PromptSpec.from_dict({**data, "prompt": "a blue circle"})
    with pytest.raises(ValueError, match="lacks key 'kind'"):
        PromptSpec.from_dict({k: v for k, v in data.items() if k != "kind"})


def test_vocabulary_covers_exactly_the_words_used() -> None:
    used = set(chain.from_iterable(s.prompt.split(" ") for s in ALL_SPECS))
    assert used == set(world.VOCABULARY)
    assert len(world.VOCABULARY) == len(set(world.VOCABULARY))


def test_prompts_are_tokenizer_friendly_and_short() -> None:
    for spec in ALL_SPECS:
        words = spec.prompt.split(" ")
        assert all(w and w.isalpha() and w.islower() for w in words), spec.prompt
        assert len(words) <= world.MAX_PROMPT_WORDS
    assert max(len(s.prompt.split(" ")) for s in ALL_SPECS) == world.MAX_PROMPT_WORDS


# ---------------------------------------------------------------- splits and sampling


def test_held_out_pairs_split_train_and_test() -> None:
    train, test = (list(chain.from_iterable(world.prompt_pool(s).values())) for s in world.SPLITS)
    assert not any(s.pairs() & world.HELD_OUT_PAIRS for s in train)
    assert all(s.pairs() & world.HELD_OUT_PAIRS for s in test)
    assert not {s.prompt for s in train} & {s.prompt for s in test}
    # every word of a held-out pair is still seen in train, in other combinations
    train_pairs = set(chain.from_iterable(s.pairs() for s in train))
    assert {c for c, _ in train_pairs} == set(world.COLORS)
    assert {s for _, s in train_pairs} == set(world.SHAPES)
    assert all(world.prompt_pool(split)[kind] for split in world.SPLITS for kind in world.KINDS)


def test_sample_prompts_is_deterministic_balanced_and_split_pure() -> None:
    a = world.sample_prompts(203, seed=7, split="test")
    assert a == world.sample_prompts(203, seed=7, split="test")
    assert a != world.sample_prompts(203, seed=8, split="test")
    assert len(a) == 203
    counts = {k: sum(s.kind == k for s in a) for k in world.KINDS}
    assert counts == {"single": 51, "counting": 51, "two_objects": 51, "position": 50}
    assert all(s.pairs() & world.HELD_OUT_PAIRS for s in a)
    # a kind repeats prompts only once its pool is exhausted (12 single test prompts exist)
    singles = [s for s in a if s.kind == "single"]
    assert len(set(singles)) == len(world.prompt_pool("test")["single"]) == 12
    assert len({s for s in a if s.kind == "position"}) == 50
    train = world.sample_prompts(400, seed=7, split="train")
    assert not any(s.pairs() & world.HELD_OUT_PAIRS for s in train)
    with pytest.raises(ValueError, match="unknown split"):
        world.sample_prompts(4, seed=0, split="val")  # type: ignore[arg-type]


def test_write_and_load_prompt_sets(tmp_path) -> None:
    paths = world.write_prompt_sets(tmp_path / "prompts", n_train=40, n_test=12, seed=3)
    assert paths.train == tmp_path / "prompts" / "train.jsonl"
    train, test = world.load_prompts(paths.train), world.load_prompts(paths.test)
    assert train == [s.to_dict() for s in world.sample_prompts(40, 3, "train")]
    assert test == [s.to_dict() for s in world.sample_prompts(12, 3, "test")]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    first = paths.train.read_bytes()
    world.write_prompt_sets(tmp_path / "prompts", n_train=40, n_test=12, seed=3)
    assert paths.train.read_bytes() == first


def test_load_prompts_accepts_plain_prompt_records(tmp_path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a photo of a cat"}\n\n{"prompt": "a dog", "tag": 1}\n')
    assert world.load_prompts(path) == [{"prompt": "a photo of a cat"}, {"prompt": "a dog", "tag": 1}]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"p\.jsonl: prompt file not found"),
        ("", r"p\.jsonl: prompt file is empty"),
        ("\n  \n", r"p\.jsonl: prompt file is empty"),
        ('{"prompt": "a red circle"}\n{"prompt": oops}\n', r"p\.jsonl:2: invalid JSON"),
        ('{"prompt": "a"}\n\n{"text": "a red circle"}\n', r"p\.jsonl:3: missing or empty string field 'prompt'"),
        ('{"prompt": ""}\n', r"p\.jsonl:1: missing or empty string field 'prompt'"),
        ('["a red circle"]\n', r"p\.jsonl:1: expected a JSON object, got list"),
        ('{"prompt": "a red circle", "kind": "single", "objects": [{"color": "red", "shape": "star"}]}\n', r"p\.jsonl:1: unknown shape"),
        ('{"prompt": "a blue circle", "kind": "single", "objects": [{"color": "red", "shape": "circle"}]}\n', r"p\.jsonl:1: .*does not match"),
    ],
)
def test_load_prompts_errors_name_file_and_line(tmp_path, content: str | None, message: str) -> None:
    path = tmp_path / "p.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PromptFileError, match=message) as info:
        world.load_prompts(path)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- rendering


@pytest.mark.parametrize("size", [32, 64, 128])
def test_render_matches_metadata(size: int) -> None:
    rng = np.random.default_rng(size)
    for spec in world.sample_specs(120, rng, "train") + world.sample_specs(40, rng, "test"):
        image = world.render(spec, size, rng)
        assert image.size == (size, size) and image.mode == "RGB"
        pixels = np.asarray(image)
        corners = pixels[[0, 0, -1, -1], [0, -1, 0, -1]]
        assert (corners == world.PALETTE[spec.background_color]).all()
        masks = [color_mask(image, o.color) for o in spec.objects]
        for obj, mask in zip(spec.objects, masks):
            assert ndimage.label(mask)[1] == obj.count, spec.prompt
        if spec.relation is not None:
            left, right = masks if spec.relation == "left_of" else masks[::-1]
            gap = np.nonzero(right.any(0))[0].min() - np.nonzero(left.any(0))[0].max()
            assert gap >= 0.1 * size, spec.prompt


def test_render_is_deterministic_and_accepts_dicts() -> None:
    spec = PromptSpec("counting", (ObjectSpec("yellow", "triangle", 3),), background="black")
    a = np.asarray(world.render(spec, 64, np.random.default_rng(5)))
    b = np.asarray(world.render(spec.to_dict(), 64, 5))
    assert (a == b).all()
    assert not (a == np.asarray(world.render(spec, 64, 6))).all()


def test_render_shapes_have_expected_fill() -> None:
    """A square fills its bounding box, a circle ~pi/4 of it, a triangle ~1/2."""
    expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
    for shape, fill in expected.items():
        spec = PromptSpec("single", (ObjectSpec("red", shape),))
        mask = color_mask(world.render(spec, 128, 0), "red")
        rows, cols = np.nonzero(mask)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert mask.sum() / box == pytest.approx(fill, abs=0.06), shape


# ---------------------------------------------------------------- pretraining samples


def test_training_batch_is_train_only_and_well_formed() -> None:
    batch = world.sample_training_batch(48, size=32, rng=np.random.default_rng(0))
    assert batch.images.shape == (48, 3, 32, 32) and batch.images.dtype == torch.float32
    assert 0.0 <= batch.images.min() and batch.images.max() <= 1.0
    assert len(batch.prompts) == len(batch.metadata) == 48
    specs = [PromptSpec.from_dict(m) for m in batch.metadata]
    assert [s.prompt for s in specs] == batch.prompts
    assert not any(s.pairs() & world.HELD_OUT_PAIRS for s in specs)
    assert {s.kind for s in specs} == set(world.KINDS)
    again = world.sample_training_batch(48, size=32, rng=np.random.default_rng(0))
    assert torch.equal(batch.images, again.images) and batch.prompts == again.prompts


def test_training_batch_images_match_their_prompts() -> None:
    stream = world.iter_training_batches(8, size=64, seed=1)
    batch = next(stream)
    assert next(stream).prompts != batch.prompts
    for image, spec in zip(batch.images, map(PromptSpec.from_dict, batch.metadata)):
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        for obj in spec.objects:
            mask = (pixels == world.PALETTE[obj.color]).all(-1)
            assert ndimage.label(mask)[1] == obj.count
