"""The real rewards (PickScore, CLIP score, aesthetic, OCR, JPEG), the weighted sum and the reward
config. CLIP rewards run on a tiny random CLIP written to disk in the hub layout, and are checked
against the transformers model's own forward pass; OCR runs the real RapidOCR models on text
rendered with DejaVu."""

from __future__ import annotations

import argparse
import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from tpgrpo import world
from tpgrpo.config import config_from_dict
from tpgrpo.errors import ConfigError
from tpgrpo.rewards import available_rewards, build_reward, reward_from_section

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
CLIP_WORDS = ["a", "photo", "of", "cat", "dog", "red", "circle", "blue", "square", "on", "white", "background"]
PROMPTS = ["a photo of a cat", "a red circle", "a blue square on a white background", "dog"]


def quantised(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random images float [B, 3, H, W] on uint8 levels, as a decoded image would be."""
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 255).round() / 255


# ---------------------------------------------------------------- tiny CLIP on disk


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A random CLIP (32 px, 2 layers per tower) saved as a hub repository is laid out: model,
    tokenizer files and a hand-written ``preprocessor_config.json`` (32 px shortest edge, centre
    crop 32, OpenAI mean/std)."""
    from transformers import CLIPConfig, CLIPModel

    from tpgrpo.models.tiny import build_clip_tokenizer

    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    tokenizer = build_clip_tokenizer(CLIP_WORDS, 77, path)
    tokenizer.save_pretrained(path)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **tower,
        ),
        vision_config=dict(image_size=32, patch_size=8, **tower),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "do_resize": True,
                "size": {"shortest_edge": 32},
                "resample": 3,
                "do_center_crop": True,
                "crop_size": {"height": 32, "width": 32},
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "do_convert_rgb": True,
            }
        )
    )
    return path


def reference_clip(path: Path, images: torch.Tensor, prompts: list[str]):
    """The transformers reference: CLIPProcessor on 8-bit PIL images, then CLIPModel's forward."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(path, dtype=torch.float32).eval()
    processor = CLIPProcessor.from_pretrained(path)
    pil = [Image.fromarray(a) for a in (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()]
    inputs = processor(text=prompts, images=pil, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs)


@pytest.mark.parametrize("size", [(32, 32), (48, 40), (20, 20)])
def test_pickscore_matches_reference(tiny_clip: Path, size: tuple[int, int]) -> None:
    """At the model's resolution the preprocessing is exact; resizing (48x40 -> 38x32 and crop,
    20 -> 32) is PIL's bicubic up to one 8-bit level here and there (measured: 3e-5 relative)."""
    images = quantised((4, 3, *size), seed=size[1])
    out = build_reward("pickscore", path=str(tiny_clip))(images, PROMPTS, [{}] * 4)
    ref = reference_clip(tiny_clip, images, PROMPTS)
    raw = ref.logits_per_image.diagonal()  # logit_scale * cos(image, text), the PickScore reference
    tol = 1e-5 if size == (32, 32) else 1e-3
    assert out.scores.dtype == torch.float32 and out.scores.shape == (4,)
    torch.testing.assert_close(out.details["raw"], raw, atol=tol * raw.abs().max().item(), rtol=0)
    torch.testing.assert_close(out.scores, raw / 26, atol=tol * raw.abs().max().item() / 26, rtol=0)
    # the score must depend on the pairing of image and prompt
    swapped = build_reward("pickscore", path=str(tiny_clip))(images, PROMPTS[::-1], [{}] * 4)
    assert not torch.allclose(swapped.scores, out.scores)


def test_pickscore_default_processor_is_the_clip_h_one(monkeypatch) -> None:
    from tpgrpo.rewards import pickscore

    monkeypatch.setattr(pickscore, "ClipEncoder", lambda *args: args)
    assert pickscore.PickScore().clip == ("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", None, "float32")
    assert pickscore.PickScore(path="/local/pickscore").clip[1] == "/local/pickscore"
    assert pickscore.PickScore(processor_path="/p").clip[1] == "/p"


def test_clipscore_matches_reference(tiny_clip: Path) -> None:
    images = quantised((4, 3, 32, 32), seed=1)
    out = build_reward("clipscore", path=str(tiny_clip))(images, PROMPTS, [{}] * 4)
    ref = reference_clip(tiny_clip, images, PROMPTS)
    torch.testing.assert_close(out.scores, (ref.image_embeds * ref.text_embeds).sum(-1), atol=1e-5, rtol=0)
    assert out.scores.abs().max() <= 1


def test_clip_bfloat16_is_close(tiny_clip: Path) -> None:
    images = quantised((4, 3, 32, 32), seed=2)
    full = build_reward("clipscore", path=str(tiny_clip))(images, PROMPTS, [{}] * 4).scores
    half = build_reward("clipscore", path=str(tiny_clip), dtype="bfloat16", device="cpu")(images, PROMPTS, [{}] * 4).scores
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="dtype: expected one of float32, bfloat16, float16, got 'fp8'"):
        build_reward("clipscore", path=str(tiny_clip), dtype="fp8")


# ---------------------------------------------------------------- aesthetic


def test_aesthetic_head_has_the_original_layout() -> None:
    from tpgrpo.rewards.aesthetic import AestheticHead

    keys = [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    state = AestheticHead().state_dict()
    assert sorted(state) == sorted(keys)
    assert state["layers.0.weight"].shape == (1024, 768) and state["layers.7.weight"].shape == (1, 16)


@pytest.fixture(scope="module")
def aesthetic_head(tmp_path_factory) -> dict[str, Path]:
    """A random head for the tiny CLIP's 16-d embeddings, as .safetensors and as a .pth state dict."""
    from safetensors.torch import save_file

    from tpgrpo.rewards.aesthetic import AestheticHead

    torch.manual_seed(1)
    state = AestheticHead(16).state_dict()
    root = tmp_path_factory.mktemp("aesthetic")
    save_file(state, root / "head.safetensors")
    torch.save(state, root / "head.pth")
    return {"safetensors": root / "head.safetensors", "pth": root / "head.pth"}


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_aesthetic_matches_reference(tiny_clip: Path, aesthetic_head, fmt: str) -> None:
    from safetensors.torch import load_file

    from tpgrpo.rewards.aesthetic import AestheticHead

    images = quantised((3, 3, 32, 32), seed=3)
    out = build_reward("aesthetic", head_path=str(aesthetic_head[fmt]), clip_path=str(tiny_clip))(images, PROMPTS[:3], [{}] * 3)
    head = AestheticHead(16).eval()
    head.load_state_dict(load_file(aesthetic_head["safetensors"]))
    with torch.no_grad():
        expected = head(reference_clip(tiny_clip, images, PROMPTS[:3]).image_embeds)[:, 0]
    torch.testing.assert_close(out.scores, expected, atol=1e-5, rtol=0)


def test_aesthetic_head_errors(tiny_clip: Path, aesthetic_head, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="option head_path is required"):
        build_reward("aesthetic", clip_path=str(tiny_clip))
    with pytest.raises(FileNotFoundError, match="aesthetic head weights not found"):
        build_reward("aesthetic", head_path=str(tmp_path / "missing.pth"), clip_path=str(tiny_clip))
    # a .pth that carries any object besides tensors is refused, never unpickled
    state = torch.load(aesthetic_head["pth"], weights_only=True)
    torch.save({**state, "extra": argparse.Namespace(x=1)}, tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError):
        build_reward("aesthetic", head_path=str(tmp_path / "evil.pth"), clip_path=str(tiny_clip))
    from tpgrpo.rewards.aesthetic import AestheticHead

    torch.save(AestheticHead(768).state_dict(), tmp_path / "l14.pth")
    with pytest.raises(ValueError, match="expects 768-d embeddings, CLIP .* gives 16"):
        build_reward("aesthetic", head_path=str(tmp_path / "l14.pth"), clip_path=str(tiny_clip))


# ---------------------------------------------------------------- OCR


def render_text(text: str, size: tuple[int, int] = (256, 96)) -> torch.Tensor:
    """Black DejaVu Sans Bold text, centred on white: float [3, H, W] in [0, 1]."""
    image = Image.new("RGB", size, "white")
    if text:
        draw = ImageDraw.Draw(image)
        draw.text((size[0] / 2, size[1] / 2), text, fill="black", font=ImageFont.truetype(FONT, 36), anchor="mm")
    return world.image_to_tensor(image)


@pytest.fixture(scope="module")
def ocr():
    return build_reward("ocr")


def test_ocr_scores_rendered_text(ocr) -> None:
    cases = [  # (rendered text, prompt, metadata, expected score)
        ("HELLO", 'a neon sign that says "hello"', {}, "high"),
        ("WORLD", 'a neon sign that says "hello"', {}, 0.2),  # 4 of 5 letters wrong
        ("", 'a neon sign that says "hello"', {}, 0.0),  # nothing to recognise
        ("HELLO", "a neon sign that says hello", {}, 0.0),  # no quoted target
        ("Flow GRPO", "a poster", {"text": "flow grpo"}, "high"),  # metadata target, spaces ignored
    ]
    images = torch.stack([render_text(text) for text, *_ in cases])
    out = ocr(images, [c[1] for c in cases], [c[2] for c in cases])
    assert out.scores.dtype == torch.float32 and out.scores.shape == (len(cases),)
    for (text, prompt, _, expected), got in zip(cases, out.scores.tolist()):
        if expected == "high":
            assert got > 0.8, (text, prompt, got)
        else:
            assert got == pytest.approx(expected, abs=1e-6), (text, prompt, got)


def test_ocr_handles_empty_engine_results(ocr, monkeypatch) -> None:
    class Empty:
        txts = None

    for result in (None, Empty()):
        monkeypatch.setattr(ocr, "engine", lambda image, r=result: r)
        out = ocr(torch.ones(2, 3, 16, 16), ['"hi"', '"there"'], [{}, {}])
        assert out.scores.tolist() == [0.0, 0.0]


def test_ocr_text_matching() -> None:
    from tpgrpo.rewards.ocr import edit_distance, target_text, text_score

    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3 and edit_distance("abc", "abc") == 0
    assert target_text('a sign "Open" and a banner "24 h"', {}) == "Open24 h"
    assert target_text("a sign saying “Café”", {}) == "Café"
    assert target_text('a sign "x"', {"text": "y"}) == "y"
    assert text_score("OPEN 24H", "open24h") == 1.0
    assert text_score("WELCOME TO OPEN DAY", "open") == 1.0  # target inside the recognised text
    assert text_score("opem", "open") == pytest.approx(0.75)
    assert text_score("a much longer unrelated text", "ab") == 0.0  # distance capped at the target length
    assert text_score("anything", "   ") == 0.0


# ---------------------------------------------------------------- JPEG


def test_jpeg_sizes() -> None:
    import io

    noise = quantised((1, 3, 64, 64), seed=4)
    flat = torch.full((1, 3, 64, 64), 0.5)
    images = torch.cat([noise, flat])
    size = build_reward("jpeg_incompressibility")(images, ["", ""], [{}, {}]).scores
    assert size[0] > 5 * size[1] > 0
    buffer = io.BytesIO()
    Image.fromarray((noise[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=95)
    assert size[0].item() == pytest.approx(buffer.tell() / 1000)
    assert torch.equal(build_reward("jpeg_compressibility")(images, ["", ""], [{}, {}]).scores, -size)
    assert build_reward("jpeg_incompressibility", quality=50)(images, ["", ""], [{}, {}]).scores[0] < size[0]
    with pytest.raises(ValueError, match=r"quality must be in \[1, 100\]"):
        build_reward("jpeg_compressibility", quality=0)


# ---------------------------------------------------------------- weighted sum and config


def world_batch(n: int, seed: int):
    specs = world.sample_specs(n, seed, "train")
    images = torch.stack([world.image_to_tensor(world.render(s, 64, i)) for i, s in enumerate(specs)])
    images[1::2] = quantised(images[1::2].shape, seed)  # some noise, so neither reward is constant
    return images, [s.prompt for s in specs], [s.to_dict() for s in specs]


def test_weighted_sum_is_the_hand_sum() -> None:
    images, prompts, metadata = world_batch(4, 0)
    weights = {"verifiable": 1.0, "jpeg_incompressibility": -0.5}
    out = build_reward("multi", weights=weights, options={"jpeg_incompressibility": {"quality": 80}})(images, prompts, metadata)
    verifiable = build_reward("verifiable")(images, prompts, metadata)
    jpeg = build_reward("jpeg_incompressibility", quality=80)(images, prompts, metadata)
    torch.testing.assert_close(out.scores, verifiable.scores - 0.5 * jpeg.scores)
    assert set(out.details) == {"verifiable", "jpeg_incompressibility"} | {f"verifiable/{k}" for k in verifiable.details}
    assert torch.equal(out.details["jpeg_incompressibility"], jpeg.scores)
    torch.testing.assert_close(out.details["verifiable/background"], verifiable.details["background"], equal_nan=True)


def test_weighted_sum_checks_its_options() -> None:
    with pytest.raises(ValueError, match="at least one reward"):
        build_reward("multi", weights={})
    with pytest.raises(ValueError, match=r"options for 'ocr', which have no weight"):
        build_reward("multi", weights={"verifiable": 1.0}, options={"ocr": {}})
    with pytest.raises(ValueError, match="must be finite"):
        build_reward("multi", weights={"verifiable": math.nan})


def reward_config(**reward):
    return config_from_dict({"reward": reward}).reward


def test_config_builds_single_and_weighted_rewards() -> None:
    single = reward_from_section(reward_config(name="jpeg_compressibility", options={"quality": 70}))
    assert single.quality == 70 and single.sign == -1
    multi = reward_from_section(reward_config(name="multi", weights={"verifiable": 1, "jpeg_incompressibility": 0.5},
                                              options={"jpeg_incompressibility": {"quality": 60}}))
    assert multi.weights == {"verifiable": 1.0, "jpeg_incompressibility": 0.5}
    assert multi.components["jpeg_incompressibility"].quality == 60
    # dotted overrides reach into weights, as into options
    cfg = config_from_dict({}, overrides=["reward.name=multi", "reward.weights.verifiable=1.0", "reward.weights.ocr=0.5"])
    assert cfg.reward.weights == {"verifiable": 1.0, "ocr": 0.5}


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        ({"name": "multi", "weights": {"verifiable": 1.0, "foo": 0.5}}, r"reward\.weights\.foo: unknown reward 'foo'; available: .*pickscore"),
        ({"name": "multi", "weights": {"ocr": math.inf}}, r"reward\.weights\.ocr: input should be a finite number"),
        ({"name": "multi", "weights": {"ocr": "high"}}, r"reward\.weights\.ocr: input should be a valid number"),
        ({"weights": {"ocr": 1.0}}, r"reward\.name: expected multi when weights are given, got 'verifiable'"),
        ({"name": "multi"}, r"reward\.weights: expected at least one reward when name is multi"),
        ({"name": "multi", "weights": {"ocr": 1.0}, "options": {"pickscore": {}}}, r"reward\.options\.pickscore: 'pickscore' has no weight"),
        ({"name": "multi", "weights": {"ocr": 1.0}, "options": {"ocr": 3}}, r"reward\.options\.ocr: expected a mapping"),
    ],
)
def test_config_rejects_bad_weights(reward: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^params: {message}") as info:
        config_from_dict({"reward": reward})
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- registry


def test_registry_lists_the_real_rewards() -> None:
    expected = {"pickscore", "clipscore", "aesthetic", "ocr", "jpeg_compressibility", "jpeg_incompressibility", "multi", "remote"}
    assert expected <= set(available_rewards())
    with pytest.raises(ValueError, match=r"unknown reward 'pick'; available: aesthetic, .*clipscore, .*remote"):
        build_reward("pick")


def test_real_rewards_are_imported_lazily() -> None:
    code = (
        "import sys, torch, tpgrpo.rewards as r\n"
        "heavy = ('transformers', 'rapidocr', 'tpgrpo.rewards.pickscore', 'tpgrpo.rewards.ocr', 'tpgrpo.rewards.remote')\n"
        "assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]\n"
        "r.build_reward('jpeg_compressibility')\n"
        "assert 'transformers' not in sys.modules and 'rapidocr' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
