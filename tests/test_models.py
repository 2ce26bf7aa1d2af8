"""Tiny SD3 pipeline built from config, pipeline directory I/O, and the SD3 adapter."""

import os

# Must precede the diffusers / transformers imports: huggingface_hub reads it at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from tpgrpo.models import (
    ModelAdapter,
    ModelLoadError,
    PromptEmbeds,
    SD3Adapter,
    TinySD3Config,
    build_tiny_sd3,
    load_adapter,
    load_pipeline,
    save_pipeline,
)

VOCABULARY = (
    "a an the one two three four red green blue yellow purple orange white black gray circle circles "
    "square squares triangle triangles left right of above below on background and"
).split()
PROMPTS = [
    "a red circle on a blue background",
    "two green squares left of a yellow triangle",
    "three purple triangles",
]
SEQ = 16  # max_sequence_length of the tiny model, passed to every pipeline call


@pytest.fixture(scope="module")
def pipe() -> StableDiffusion3Pipeline:
    return build_tiny_sd3(VOCABULARY, TinySD3Config(image_size=32), seed=0)


@pytest.fixture(scope="module")
def adapter(pipe) -> SD3Adapter:
    return SD3Adapter(pipe)


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory) -> Path:
    return save_pipeline(pipe, tmp_path_factory.mktemp("models") / "base")


def _state(pipe) -> dict[str, torch.Tensor]:
    names = ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"]
    return {f"{n}.{k}": v for n in names for k, v in getattr(pipe, n).state_dict().items()}


def _public(config) -> dict:
    """Config without diffusers' bookkeeping keys (``_use_default_values`` changes on reload)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _run_pipe(pipe, latents=None, generator=None, steps=4, guidance=1.0) -> torch.Tensor:
    return pipe(
        PROMPTS,
        latents=latents,
        generator=generator,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="pt",
        max_sequence_length=SEQ,
    ).images


# --- config and build ---------------------------------------------------------------------


def test_config_rejects_inconsistent_sizes():
    with pytest.raises(ValueError, match="t5_d_model"):
        TinySD3Config(clip_hidden_size=48, t5_d_model=64)
    with pytest.raises(ValueError, match="image_size"):
        TinySD3Config(image_size=36)
    with pytest.raises(ValueError, match="vae_norm_num_groups"):
        TinySD3Config(vae_norm_num_groups=3)
    assert TinySD3Config(vae_block_out_channels=[16, 32, 32]).vae_block_out_channels == (16, 32, 32)


def test_build_is_deterministic_per_seed_and_keeps_global_rng(pipe):
    rng = torch.random.get_rng_state()
    again = build_tiny_sd3(VOCABULARY, TinySD3Config(image_size=32), seed=0)
    assert torch.equal(rng, torch.random.get_rng_state())
    a, b = _state(pipe), _state(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = build_tiny_sd3(VOCABULARY, TinySD3Config(image_size=32), seed=1)
    assert not torch.equal(pipe.transformer.proj_out.weight, other.transformer.proj_out.weight)


def test_default_config_64px_sizes_and_parameter_counts():
    cfg = TinySD3Config()
    big = build_tiny_sd3(VOCABULARY, cfg, seed=0)
    names = ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"]
    counts = {n: sum(p.numel() for p in getattr(big, n).parameters()) for n in names}
    print("tiny SD3 parameter counts:", counts)
    assert 1.5e6 < counts["transformer"] < 3.5e6
    assert 1e5 < counts["vae"] < 5e5
    assert all(1e4 < counts[n] < 1e5 for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
    assert big.default_sample_size * big.vae_scale_factor == cfg.image_size == 64
    ad = SD3Adapter(big)
    x = ad.prepare_latents(2, torch.Generator().manual_seed(0))
    assert x.shape == (2, cfg.latent_channels, cfg.latent_size, cfg.latent_size) == (2, 4, 16, 16)
    assert ad.decode(x).shape == (2, 3, 64, 64)


# --- tokenizers ---------------------------------------------------------------------------


def test_world_vocabulary_fits_the_tiny_model():
    from tpgrpo.world import MAX_PROMPT_WORDS, VOCABULARY as WORLD_VOCABULARY

    cfg = TinySD3Config()
    built = build_tiny_sd3(WORLD_VOCABULARY, cfg, seed=0)  # raises if a word is not one token
    # One token per word plus bos/eos (CLIP) or eos (T5): the longest prompt is never truncated.
    assert MAX_PROMPT_WORDS + 2 <= cfg.max_sequence_length == built.tokenizer_max_length


@pytest.mark.parametrize("name", ["tokenizer", "tokenizer_2", "tokenizer_3"])
def test_every_vocabulary_word_is_one_distinct_token(pipe, name):
    tok = getattr(pipe, name)
    ids = [tok(w, add_special_tokens=False).input_ids for w in VOCABULARY]
    assert all(len(i) == 1 and i[0] != tok.unk_token_id for i in ids)
    assert len({i[0] for i in ids}) == len(VOCABULARY)
    # Case-insensitive, like CLIP.
    assert tok("Red", add_special_tokens=False).input_ids == tok("red", add_special_tokens=False).input_ids


def test_unknown_words_map_to_unk(pipe):
    t5 = pipe.tokenizer_3
    assert t5("zebra", add_special_tokens=False).input_ids == [t5.unk_token_id]
    # CLIP is BPE: a word made of letters no vocabulary word contains is all unk.
    clip = pipe.tokenizer
    absent = next(c for c in "qjzxk" if not any(c in w for w in VOCABULARY))
    assert set(clip(absent * 3, add_special_tokens=False).input_ids) == {clip.unk_token_id}


def test_token_and_embedding_lengths(pipe, adapter):
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        enc = tok(PROMPTS, padding="max_length", max_length=pipe.tokenizer_max_length, truncation=True)
        assert {len(i) for i in enc.input_ids} == {SEQ}
    enc = pipe.tokenizer_3(PROMPTS, padding="max_length", max_length=SEQ, truncation=True)
    assert {len(i) for i in enc.input_ids} == {SEQ}
    assert adapter.max_sequence_length == SEQ
    embeds = adapter.encode_prompts(PROMPTS, guidance_scale=2.0)
    # CLIP tokens then T5 tokens, features padded to the T5 width; pooled = both CLIP projections.
    assert embeds.prompt_embeds.shape == (3, 2 * SEQ, 64)
    assert embeds.pooled_prompt_embeds.shape == (3, 64)
    assert embeds.negative_prompt_embeds.shape == (3, 2 * SEQ, 64)
    assert adapter.encode_prompts(PROMPTS, guidance_scale=1.0).negative_prompt_embeds is None


# --- save / load --------------------------------------------------------------------------


def test_save_then_plain_from_pretrained_gives_identical_pipeline(pipe, saved):
    files = [p.name for p in saved.rglob("*") if p.is_file()]
    assert "model_index.json" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    reloaded = StableDiffusion3Pipeline.from_pretrained(saved)
    reloaded.set_progress_bar_config(disable=True)
    a, b = _state(pipe), _state(reloaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _public(reloaded.scheduler.config) == _public(pipe.scheduler.config)
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        assert getattr(reloaded, name)(PROMPTS).input_ids == getattr(pipe, name)(PROMPTS).input_ids
    assert reloaded.tokenizer_max_length == SEQ
    x_t = SD3Adapter(pipe).prepare_latents(3, torch.Generator().manual_seed(0))
    assert torch.equal(_run_pipe(reloaded, x_t, guidance=2.0), _run_pipe(pipe, x_t, guidance=2.0))


def test_load_pipeline_and_atomic_overwrite(pipe, saved, tmp_path):
    loaded = load_pipeline(saved)
    assert isinstance(loaded, StableDiffusion3Pipeline)
    assert isinstance(load_adapter(saved), SD3Adapter)
    target = tmp_path / "out"
    save_pipeline(pipe, target)
    save_pipeline(loaded, target)  # replaces the existing directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp / backup left behind
    assert (target / "model_index.json").is_file()


def _assert_one_line_error(path: Path, match: str):
    with pytest.raises(ModelLoadError, match=match) as info:
        load_pipeline(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message


def test_load_pipeline_errors_are_one_line(saved, tmp_path):
    _assert_one_line_error(tmp_path / "missing", "no such pipeline directory")
    (tmp_path / "empty").mkdir()
    _assert_one_line_error(tmp_path / "empty", r"not a diffusers pipeline directory \(model_index.json missing\)")
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _assert_one_line_error(broken, "cannot load pipeline")


def test_load_adapter_rejects_unsupported_pipelines():
    class OtherPipeline(DiffusionPipeline):
        pass

    with pytest.raises(ModelLoadError, match="OtherPipeline is not supported"):
        load_adapter(OtherPipeline())


# --- adapter ------------------------------------------------------------------------------


def test_adapter_satisfies_protocol(adapter):
    assert isinstance(adapter, ModelAdapter)
    assert adapter.transformer is adapter.pipe.transformer


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_euler_loop_over_adapter_equals_pipeline(pipe, adapter, guidance):
    steps = 4
    x_t = adapter.prepare_latents(len(PROMPTS), torch.Generator().manual_seed(7))
    embeds = adapter.encode_prompts(PROMPTS, guidance)
    schedule = adapter.timesteps(steps)
    x = x_t
    with torch.no_grad():
        for i, t in enumerate(schedule.timesteps):
            v = adapter.velocity(x, t, embeds, guidance)
            x = x + (schedule.sigmas[i + 1] - schedule.sigmas[i]) * v
    images = adapter.decode(x)
    assert images.shape == (3, 3, 32, 32) and 0.0 <= images.min() and images.max() <= 1.0
    torch.testing.assert_close(images, _run_pipe(pipe, x_t, steps=steps, guidance=guidance), atol=1e-5, rtol=0)
    # prepare_latents draws the pipeline's own noise for the same generator state.
    by_generator = _run_pipe(pipe, generator=torch.Generator().manual_seed(7), steps=steps, guidance=guidance)
    torch.testing.assert_close(images, by_generator, atol=1e-5, rtol=0)


def test_timesteps_match_pipeline_and_leave_scheduler_alone(pipe, adapter):
    _run_pipe(pipe, adapter.prepare_latents(3), steps=5)
    expected = (pipe.scheduler.timesteps.clone(), pipe.scheduler.sigmas.clone())
    schedule = adapter.timesteps(7)
    assert schedule.timesteps.shape == (7,) and schedule.sigmas.shape == (8,)
    assert schedule.sigmas[0] == 1.0 and schedule.sigmas[-1] == 0.0
    assert torch.equal(pipe.scheduler.sigmas, expected[1])  # untouched by adapter.timesteps
    five = adapter.timesteps(5)
    assert torch.equal(five.timesteps, expected[0]) and torch.equal(five.sigmas, expected[1])


def test_dynamic_shift_schedule_matches_pipeline_and_grows_with_the_image(pipe):
    # The tiny SD3 (like SD3.5) has a fixed shift; SD3 checkpoints with dynamic shifting take mu
    # from the image token count, the computation the SD3 and FLUX adapters share.
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256
    )
    dynamic = StableDiffusion3Pipeline(**{**pipe.components, "scheduler": scheduler})
    dynamic.set_progress_bar_config(disable=True)
    adapter = SD3Adapter(dynamic)
    _run_pipe(dynamic, adapter.prepare_latents(3), steps=5)
    schedule = adapter.timesteps(5)
    assert torch.equal(schedule.timesteps, dynamic.scheduler.timesteps)
    assert torch.equal(schedule.sigmas, dynamic.scheduler.sigmas)
    # Four times the image tokens, a larger mu: the same step count is shifted towards noise.
    small, large = adapter.timesteps(3, 32, 32), adapter.timesteps(3, 64, 64)
    assert (large.sigmas[1:-1] > small.sigmas[1:-1]).all()


def test_guided_velocity_is_one_batched_forward_of_both_branches(adapter):
    embeds = adapter.encode_prompts(PROMPTS, guidance_scale=2.5)
    x = adapter.prepare_latents(3, torch.Generator().manual_seed(1))
    t = adapter.timesteps(4).timesteps[1]
    calls = []
    hook = adapter.transformer.register_forward_hook(lambda m, a, kw, out: calls.append(kw["hidden_states"].shape[0]),
                                                     with_kwargs=True)
    try:
        with torch.no_grad():
            guided = adapter.velocity(x, t, embeds, 2.5)
    finally:
        hook.remove()
    assert calls == [6]
    negative = PromptEmbeds(embeds.negative_prompt_embeds, embeds.negative_pooled_prompt_embeds)
    with torch.no_grad():
        cond = adapter.velocity(x, t, embeds, 1.0)
        uncond = adapter.velocity(x, t, negative, 1.0)
    torch.testing.assert_close(guided, uncond + 2.5 * (cond - uncond), atol=1e-5, rtol=1e-5)
    # Per-row timesteps: each row may sit at a different time (lockstep branches).
    ts = adapter.timesteps(4).timesteps[[0, 1, 2]]
    with torch.no_grad():
        rows = adapter.velocity(x, ts, embeds, 2.5)
        for i in range(3):
            single = adapter.velocity(x[i : i + 1], ts[i], embeds.select(torch.tensor([i])), 2.5)
            torch.testing.assert_close(rows[i : i + 1], single, atol=1e-5, rtol=1e-5)


def test_velocity_keeps_autograd(adapter):
    embeds = adapter.encode_prompts(PROMPTS[:1], guidance_scale=2.0)
    x = adapter.prepare_latents(1, torch.Generator().manual_seed(2))
    v = adapter.velocity(x, adapter.timesteps(4).timesteps[0], embeds, 2.0)
    v.square().mean().backward()
    grad = adapter.transformer.proj_out.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    adapter.transformer.zero_grad(set_to_none=True)


def test_select_gathers_rows_of_all_tensors(adapter):
    embeds = adapter.encode_prompts(PROMPTS, guidance_scale=2.0)
    index = torch.tensor([2, 0, 0, 1])
    picked = embeds.select(index)
    assert picked.batch_size == 4
    assert torch.equal(picked.prompt_embeds, embeds.prompt_embeds[index])
    assert torch.equal(picked.pooled_prompt_embeds, embeds.pooled_prompt_embeds[index])
    assert torch.equal(picked.negative_prompt_embeds, embeds.negative_prompt_embeds[index])
    assert torch.equal(picked.negative_pooled_prompt_embeds, embeds.negative_pooled_prompt_embeds[index])
    plain = adapter.encode_prompts(PROMPTS, guidance_scale=1.0).select(index)
    assert plain.negative_prompt_embeds is None and not plain.has_negative
