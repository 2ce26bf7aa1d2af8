"""The FLUX adapter on a tiny FluxPipeline: save/reload, the rollout against diffusers' own
pipeline, lockstep against the sequential reference, LoRA gradients and log-prob replays."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline

from tpgrpo.models import (
    FluxAdapter,
    ModelAdapter,
    TinyFluxConfig,
    build_tiny_flux,
    load_adapter,
    load_pipeline,
    save_pipeline,
)
from tpgrpo.rollout import RolloutConfig, rollout, rollout_sequential
from tpgrpo.sde import sde_step
from tpgrpo.world import VOCABULARY

PROMPTS = ["a red circle", "two blue squares", "a red circle"]
SIZE = 32  # pixels; FluxPipeline's own default would be 512 for this 4x-down VAE
SEQ = 16  # max_sequence_length of the tiny model, passed to every pipeline call
GUIDANCE = 3.5


@pytest.fixture(scope="session")
def flux_pipe() -> FluxPipeline:
    return build_tiny_flux(VOCABULARY, TinyFluxConfig(image_size=SIZE), seed=0)


@pytest.fixture(scope="session")
def flux_adapter(flux_pipe) -> FluxAdapter:
    return FluxAdapter(flux_pipe)


@pytest.fixture(scope="session")
def flux_saved(flux_pipe, tmp_path_factory) -> Path:
    return save_pipeline(flux_pipe, tmp_path_factory.mktemp("flux") / "base")


def _x_T(adapter: FluxAdapter, n: int, seed: int = 0) -> torch.Tensor:
    return adapter.prepare_latents(n, torch.Generator().manual_seed(seed), SIZE, SIZE)


def _packed(x: torch.Tensor) -> torch.Tensor:
    """The pipeline's own packing, so the comparison does not go through the adapter's."""
    B, C, h, w = x.shape
    return FluxPipeline._pack_latents(x, B, C, h, w)


def _run_pipe(pipe, prompts, latents=None, generator=None, steps=6, guidance=GUIDANCE, size=SIZE) -> torch.Tensor:
    return pipe(
        prompts,
        latents=None if latents is None else _packed(latents),
        generator=generator,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="pt",
        height=size,
        width=size,
        max_sequence_length=SEQ,
    ).images


def _state(pipe) -> dict[str, torch.Tensor]:
    names = ["transformer", "vae", "text_encoder", "text_encoder_2"]
    return {f"{n}.{k}": v for n in names for k, v in getattr(pipe, n).state_dict().items()}


def _public(config) -> dict:
    """Config without diffusers' bookkeeping keys (``_use_default_values`` changes on reload)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


# --- config, build, save / load -----------------------------------------------------------


def test_config_rejects_inconsistent_sizes():
    with pytest.raises(ValueError, match="image_size"):
        TinyFluxConfig(image_size=36)  # latent side 9 cannot be packed into 2x2 patches
    with pytest.raises(ValueError, match="axes_dims_rope"):
        TinyFluxConfig(attention_head_dim=16)  # (8, 12, 12) no longer splits the head
    with pytest.raises(ValueError, match="even"):
        TinyFluxConfig(axes_dims_rope=(6, 13, 13))
    assert TinyFluxConfig(axes_dims_rope=[8, 12, 12]).axes_dims_rope == (8, 12, 12)


def test_save_then_plain_from_pretrained_gives_identical_pipeline(flux_pipe, flux_adapter, flux_saved):
    files = [p.name for p in flux_saved.rglob("*") if p.is_file()]
    assert "model_index.json" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    reloaded = FluxPipeline.from_pretrained(flux_saved)
    reloaded.set_progress_bar_config(disable=True)
    a, b = _state(flux_pipe), _state(reloaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _public(reloaded.scheduler.config) == _public(flux_pipe.scheduler.config)
    assert reloaded.transformer.config.guidance_embeds
    for name in ("tokenizer", "tokenizer_2"):
        assert getattr(reloaded, name)(PROMPTS).input_ids == getattr(flux_pipe, name)(PROMPTS).input_ids
    x_T = _x_T(flux_adapter, 2)
    assert torch.equal(_run_pipe(reloaded, PROMPTS[:2], x_T, steps=3), _run_pipe(flux_pipe, PROMPTS[:2], x_T, steps=3))
    assert isinstance(load_pipeline(flux_saved), FluxPipeline)
    assert isinstance(load_adapter(flux_saved), FluxAdapter)


# --- adapter ------------------------------------------------------------------------------


def test_adapter_shapes_and_no_negative_branch(flux_pipe, flux_adapter):
    assert isinstance(flux_adapter, ModelAdapter) and isinstance(load_adapter(flux_pipe), FluxAdapter)
    assert flux_adapter.max_sequence_length == SEQ
    embeds = flux_adapter.encode_prompts(PROMPTS, guidance_scale=GUIDANCE)
    assert embeds.prompt_embeds.shape == (3, SEQ, 64) and embeds.pooled_prompt_embeds.shape == (3, 32)
    assert not embeds.has_negative
    x = _x_T(flux_adapter, 3)
    assert x.shape == (3, 4, 8, 8)
    assert torch.equal(flux_adapter.pack(x), _packed(x)) and _packed(x).shape == (3, 16, 16)
    assert torch.equal(flux_adapter.unpack(_packed(x), 8, 8), x)
    # Per-row timesteps: each row may sit at a different time (lockstep branches).
    ts = flux_adapter.timesteps(4, SIZE, SIZE).timesteps[[0, 1, 2]]
    with torch.no_grad():
        rows = flux_adapter.velocity(x, ts, embeds, GUIDANCE)
        for i in range(3):
            single = flux_adapter.velocity(x[i : i + 1], ts[i], embeds.select(torch.tensor([i])), GUIDANCE)
            torch.testing.assert_close(rows[i : i + 1], single, atol=1e-5, rtol=1e-5)


def test_timesteps_shift_with_the_image_size_like_the_pipeline(flux_pipe, flux_adapter):
    for size, steps in ((SIZE, 6), (2 * SIZE, 3)):
        _run_pipe(flux_pipe, PROMPTS[:1], steps=steps, size=size, generator=torch.Generator().manual_seed(0))
        schedule = flux_adapter.timesteps(steps, size, size)
        assert torch.equal(schedule.timesteps, flux_pipe.scheduler.timesteps)
        assert torch.equal(schedule.sigmas, flux_pipe.scheduler.sigmas)
    # Four times the image tokens, a larger mu: the same step count is shifted towards noise.
    small, large = flux_adapter.timesteps(3, SIZE, SIZE), flux_adapter.timesteps(3, 2 * SIZE, 2 * SIZE)
    assert (large.sigmas[1:-1] > small.sigmas[1:-1]).all()


# --- rollout ------------------------------------------------------------------------------


def test_noise_level_zero_rollout_equals_the_flux_pipeline(flux_pipe, flux_adapter):
    cfg = RolloutConfig(
        num_steps=6, window_start=0, window_size=5, noise_level=0.0, guidance_scale=GUIDANCE, completions=True,
        height=SIZE, width=SIZE,
    )
    x_T = _x_T(flux_adapter, 2, seed=4)
    ro = rollout(flux_pipe, PROMPTS[:2], cfg, latents=x_T)
    expected = _run_pipe(flux_pipe, PROMPTS[:2], x_T)
    torch.testing.assert_close(ro.images, expected, rtol=0, atol=1e-5)
    # Without noise every completion is the same ODE image.
    for k in range(cfg.window_size + 1):
        torch.testing.assert_close(ro.completion_images[:, k], expected, rtol=0, atol=1e-5)
    assert torch.equal(ro.log_probs, torch.zeros(2, 5))
    # The comparison can fail: the guidance embedding changes the image.
    assert (_run_pipe(flux_pipe, PROMPTS[:2], x_T, guidance=1.0) - expected).abs().max() > 1e-3
    # No CFG doubling: one transformer row per branch row, one forward per step.
    completion_rows = sum(cfg.num_steps - k - 1 for k in range(cfg.window_size)) * 2
    assert ro.stats.rows == cfg.num_steps * 2 + completion_rows and ro.stats.passes == cfg.num_steps
    # prepare_latents draws the pipeline's own noise for the same generator state.
    by_generator = _run_pipe(flux_pipe, PROMPTS[:2], generator=torch.Generator().manual_seed(4))
    drawn = rollout(flux_pipe, PROMPTS[:2], dataclasses.replace(cfg, completions=False),
                    generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(drawn.images, by_generator, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "cfg",
    [
        RolloutConfig(num_steps=5, window_start=0, window_size=4, sampler="cps", guidance_scale=GUIDANCE,
                      height=SIZE, width=SIZE),
        RolloutConfig(num_steps=5, window_start=1, window_size=3, sampler="sde", guidance_scale=GUIDANCE,
                      micro_batch_size=4, height=SIZE, width=SIZE),
    ],
    ids=["cps-s0", "sde-s1-microbatch"],
)
def test_lockstep_equals_sequential_on_flux(flux_pipe, flux_adapter, cfg: RolloutConfig):
    x_T = _x_T(flux_adapter, len(PROMPTS))
    a = rollout(flux_pipe, PROMPTS, cfg, latents=x_T, generator=torch.Generator().manual_seed(1))
    b = rollout_sequential(flux_pipe, PROMPTS, cfg, latents=x_T, generator=torch.Generator().manual_seed(1))
    B, W = len(PROMPTS), cfg.window_size
    assert a.completion_images.shape == (B, W + 1, 3, SIZE, SIZE)
    assert a.latents.shape == (B, W + 1, 4, 8, 8) and a.log_probs.shape == (B, W)
    torch.testing.assert_close(a.completion_images, b.completion_images, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.log_probs, b.log_probs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.images, a.completion_images[:, W])
    # The SDE window moved the trajectory off the pure-ODE image.
    assert (a.images - a.completion_images[:, 0]).abs().max() > 1e-3


def test_stored_transitions_replay_to_the_same_log_probs(flux_pipe, flux_adapter):
    cfg = RolloutConfig(num_steps=5, window_start=1, window_size=3, sampler="sde", noise_level=0.7,
                        guidance_scale=GUIDANCE, completions=False, height=SIZE, width=SIZE)
    ro = rollout(flux_pipe, PROMPTS, cfg, generator=torch.Generator().manual_seed(5))
    for k in range(cfg.window_size):
        with torch.no_grad():
            v = flux_adapter.velocity(ro.latents[:, k], ro.timesteps[k], ro.embeds, cfg.guidance_scale)
        step = sde_step(v, ro.latents[:, k], ro.sigmas, int(ro.step_indices[k]), noise_level=0.7, sampler="sde",
                        prev_sample=ro.latents[:, k + 1])
        torch.testing.assert_close(step.log_prob, ro.log_probs[:, k], rtol=1e-4, atol=1e-4)


# --- LoRA ---------------------------------------------------------------------------------


def test_lora_gets_gradients_through_velocity(flux_pipe, flux_adapter):
    from peft import LoraConfig

    # A copy, so the session's pipeline keeps its plain transformer; frozen first, as the trainer does.
    lora = copy.deepcopy(flux_pipe.transformer).requires_grad_(False)
    lora.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    trainable = {n: p for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # Both the double-stream and the single-stream blocks carry adapters.
    assert any(n.startswith("transformer_blocks.") for n in trainable)
    assert any(n.startswith("single_transformer_blocks.") for n in trainable)

    embeds = flux_adapter.encode_prompts(PROMPTS[:2], GUIDANCE)
    x = _x_T(flux_adapter, 2, seed=2)
    t = flux_adapter.timesteps(4, SIZE, SIZE).timesteps[1]

    def gradients() -> dict[str, torch.Tensor]:
        lora.zero_grad(set_to_none=True)
        v = flux_adapter.velocity(x, t, embeds, GUIDANCE, transformer=lora)
        assert v.shape == x.shape and v.requires_grad
        v.square().mean().backward()
        return {n: p.grad for n, p in trainable.items()}

    # peft's "gaussian" init zeroes lora_B, so at first only lora_B sees a gradient (as in training).
    first = gradients()
    assert all(g is not None and g.abs().sum() > 0 for n, g in first.items() if "lora_B" in n)
    with torch.no_grad():
        for n, p in trainable.items():
            if "lora_B" in n:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(0))
    zero = [n for n, g in gradients().items() if g is None or g.abs().sum() == 0]
    assert not zero, f"LoRA parameters without gradient: {zero[:5]}"
    assert flux_pipe.transformer.proj_out.weight.grad is None


# --- trainer ------------------------------------------------------------------------------


def test_trainer_runs_unchanged_on_flux(flux_saved, tmp_path):
    from tpgrpo.config import config_from_dict
    from tpgrpo.trainer import Trainer
    from tpgrpo.world import write_prompt_sets

    write_prompt_sets(tmp_path / "prompts", n_train=8, n_test=2, seed=0)
    cfg = config_from_dict({
        "seed": 3,
        "runs_dir": str(tmp_path / "runs"),
        "model": {"path": str(flux_saved), "family": "flux", "resolution": SIZE},
        "data": {"dir": str(tmp_path / "prompts")},
        "sample": {"num_steps": 3, "window_start": 0, "window_size": 2, "guidance_scale": GUIDANCE,
                   "batch_size": 4, "group_size": 2, "batches_per_epoch": 1},
        "train": {"epochs": 1, "learning_rate": 1e-2, "lora_rank": 2, "kl_beta": 0.1},
        "eval": {"every": 1, "num_steps": 2, "batch_size": 2},
        "reward": {"name": "brightness"},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    })
    trainer = Trainer(cfg, variant="tp_grpo")
    before = {k: v.clone() for k, v in trainer.policy.trainable_state().items()}
    assert trainer.fit().epochs == 1
    after = trainer.policy.trainable_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # The exported LoRA loads into a plain FluxPipeline, as diffusers users load it.
    pipe = FluxPipeline.from_pretrained(flux_saved)
    pipe.load_lora_weights(tmp_path / "runs" / "tp_grpo" / "final")
    assert pipe.get_list_adapters() == {"transformer": ["default_0"]}
