"""Pre-train the embedded default: the tiny SD3 pipeline, trained on the synthetic shape world.

    from tpgrpo.pretrain import PretrainConfig, pretrain
    result = pretrain("models/base", PretrainConfig(), seed=0)
    result.reward_base, result.reward_untrained       # evaluation reward on held-out test prompts

Steps (DESIGN.md §3):

1. build the tiny pipeline (:func:`tpgrpo.models.build_tiny_sd3`) over the world's vocabulary;
2. train its VAE as a deterministic auto-encoder (z = the posterior's mode, no KL sampling) with
   MSE + L1, pixels of saturated colours weighted up (the reward reads colours, and a small VAE
   otherwise washes them towards gray); measure the latent mean / std on training images and write
   ``shift_factor = mean``, ``scaling_factor = 1 / std`` into ``vae.config``, the convention the
   pipeline decodes with (``latents / scaling + shift``);
3. pre-encode the training latents ``(z - shift) * scaling`` and the prompts' text embeddings
   (the text encoders stay frozen at their random initialisation, as SD3's stay frozen at theirs);
4. train the ``SD3Transformer2DModel`` with the rectified-flow objective
   (x_t = (1 - sigma) x_0 + sigma eps, target v = eps - x_0, timestep = 1000 sigma as the pipeline
   passes it, logit-normal sigma), dropping captions to the empty prompt's embedding (exactly the
   negative branch the pipeline uses for classifier-free guidance), AdamW, and an EMA of the weights
   (:class:`tpgrpo.ema.WeightEMA`, warm-up decay up to ``ema_decay``) that becomes the saved model;
5. save with :func:`tpgrpo.models.save_pipeline` and reload with a plain
   ``StableDiffusion3Pipeline.from_pretrained``, the path a real SD3.5 checkpoint takes;
6. evaluate the reloaded model and a freshly built untrained one on test prompts (ODE sampler),
   with the settings the training runs evaluate with (``evaluation``: the ``eval`` section; the
   initial noise from ``seed``, as the trainer's from the top-level ``seed``), so the base reward
   is the runs' epoch-0 reward.

Everything draws from generators seeded by ``seed``: the same seed gives the same model on CPU.
The evaluation comes after the model is saved and draws its noise from a generator of its own, so
the evaluation settings and prompts never change the weights.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusion3Pipeline
from torch import Tensor

from tpgrpo import world
from tpgrpo.config import EvalSection, PretrainSection, RewardSection
from tpgrpo.console import progress as progress_bar
from tpgrpo.data import PromptSet
from tpgrpo.ema import WeightEMA
from tpgrpo.evaluate import EvalResult, evaluate_prompts
from tpgrpo.models import TinySD3Config, build_tiny_sd3, load_adapter, save_pipeline
from tpgrpo.models.base import quiet_progress
from tpgrpo.fileio import atomic_write_json
from tpgrpo.rewards import RewardFunction, build_reward, reward_from_section

__all__ = ["PretrainConfig", "PretrainResult", "pretrain", "tiny_config", "encode_text_table", "train_vae", "train_transformer"]


PretrainConfig = PretrainSection


def tiny_config(cfg: PretrainConfig) -> TinySD3Config:
    """The :class:`TinySD3Config` the pretraining settings build."""
    return TinySD3Config(
        image_size=cfg.image_size,
        num_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        attention_head_dim=cfg.attention_head_dim,
        patch_size=cfg.patch_size,
    )


@dataclass(frozen=True)
class PretrainResult:
    """What :func:`pretrain` produced and measured.

    Attributes:
        path: the saved pipeline directory.
        vae_test_mse: per-pixel MSE (images in [0, 1]) of VAE reconstructions of test-prompt images.
        vae_recon_reward: verifiable reward of those reconstructions (the ceiling the VAE allows).
        scaling_factor, shift_factor: the latent statistics written into ``vae.config``.
        reward_base: mean evaluation reward of the trained (reloaded) model on the test prompts.
        reward_untrained: the same evaluation of a freshly built, untrained pipeline.
        reward_details: per-constraint means of the trained model (NaN entries ignored).
        reward_details_untrained: the same for the untrained pipeline.
        seconds_vae, seconds_transformer, seconds_total: wall time of the VAE training, of the
            transformer training, and of the whole call.
        vae_losses, transformer_losses: the loss of every optimisation step.
        transformer_parameters: parameter count of the transformer.
        num_eval_prompts: how many prompts the rewards average over.
        evaluation: the trained model's evaluation (scores and the first samples, for a grid).
    """

    path: Path
    vae_test_mse: float
    vae_recon_reward: float
    scaling_factor: float
    shift_factor: float
    reward_base: float
    reward_untrained: float
    reward_details: dict[str, float]
    reward_details_untrained: dict[str, float]
    seconds_vae: float
    seconds_transformer: float
    seconds_total: float
    transformer_parameters: int
    num_eval_prompts: int
    vae_losses: tuple[float, ...] = field(repr=False, default=())
    transformer_losses: tuple[float, ...] = field(repr=False, default=())
    evaluation: EvalResult | None = field(repr=False, default=None)

    def metrics(self) -> dict[str, Any]:
        """The scalar results as a JSON-ready dict (no loss histories, no images, no wall-clock
        times: they are :meth:`timing`, kept out of the DVC-hashed pipeline directory)."""
        skip = {"vae_losses", "transformer_losses", "evaluation", *TIMING_FIELDS}
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        out["path"] = str(self.path)
        return out


    def timing(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in TIMING_FIELDS}


METRICS_FILE = "pretrain.json"
"""Written into the pipeline directory next to ``model_index.json``: config and metrics."""
TIMING_FILE = "timing.json"
"""The wall-clock seconds, beside it; ``.dvcignore`` keeps it out of the directory's hash, so two
pretrainings of the same commit give the same DVC output."""
TIMING_FIELDS = ("seconds_vae", "seconds_transformer", "seconds_total")


# --------------------------------------------------------------------------------------------
# Data


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _render_dataset(n: int, size: int, seed: int) -> world.TrainingBatch:
    """``n`` train-distribution images as uint8 [n, 3, size, size] (a quarter of float32's memory)."""
    batch = world.sample_training_batch(n, size, np.random.default_rng([seed, 1]))
    return world.TrainingBatch(
        images=(batch.images * 255).round().to(torch.uint8), prompts=batch.prompts, metadata=batch.metadata
    )


def _to_vae_range(images_u8: Tensor) -> Tensor:
    """uint8 [B, 3, H, W] -> float [-1, 1], the VAE's input and output range."""
    return images_u8.float().div_(127.5).sub_(1.0)


# --------------------------------------------------------------------------------------------
# VAE


def _lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _vae_loss(recon: Tensor, target: Tensor, saturation_weight: float) -> Tensor:
    """MSE + L1 per pixel, weighted up where the target is a saturated colour. [B, 3, H, W] in [-1, 1]."""
    chroma = (target.amax(dim=1, keepdim=True) - target.amin(dim=1, keepdim=True)) / 2  # [B, 1, H, W] in [0, 1]
    weight = 1 + saturation_weight * chroma
    err = recon - target
    per_pixel = (err.square() + err.abs()).mean(dim=1, keepdim=True)
    return (weight * per_pixel).sum() / weight.sum()


def train_vae(
    vae: torch.nn.Module,
    images_u8: Tensor,
    cfg: PretrainConfig,
    generator: torch.Generator,
    progress: bool = False,
) -> list[float]:
    """Train ``vae`` in place as a deterministic auto-encoder on ``images_u8`` (uint8 [N, 3, H, W]).

    Returns the loss of every step. The encoder output's mode is decoded directly: sampling the
    posterior would only add noise the transformer later has to model.
    """
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    warmup = min(50, cfg.vae_steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, cfg.vae_steps, warmup, 0.05)
    )
    losses: list[float] = []
    bar = progress_bar(range(cfg.vae_steps), "pretrain vae", enabled=progress)
    for _ in bar:
        idx = torch.randint(0, images_u8.shape[0], (cfg.vae_batch_size,), generator=generator)
        x = _to_vae_range(images_u8[idx])
        z = vae.encode(x).latent_dist.mode()
        recon = vae.decode(z).sample
        loss = _vae_loss(recon, x, cfg.vae_saturation_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    vae.eval()
    return losses


@torch.no_grad()
def _encode_raw(vae: torch.nn.Module, images_u8: Tensor, chunk: int = 256) -> Tensor:
    """Unscaled latent modes [N, C, h, w]."""
    return torch.cat(
        [vae.encode(_to_vae_range(images_u8[i : i + chunk])).latent_dist.mode() for i in range(0, len(images_u8), chunk)]
    )


def set_latent_statistics(vae: torch.nn.Module, raw_latents: Tensor) -> tuple[float, float]:
    """Write ``shift_factor = mean``, ``scaling_factor = 1 / std`` of ``raw_latents`` (scalars over
    all channels, as SD3 does) into ``vae.config``; returns (scaling_factor, shift_factor)."""
    shift = float(raw_latents.mean())
    scaling = float(1.0 / raw_latents.std().clamp_min(1e-6))
    vae.register_to_config(scaling_factor=scaling, shift_factor=shift)
    return scaling, shift


# --------------------------------------------------------------------------------------------
# Transformer


def _zero_init(transformer: torch.nn.Module) -> None:
    """Zero the adaptive-norm modulations and the output projection (DiT's adaLN-Zero): every block
    starts as the identity and the model's first prediction is v = 0, which trains faster and more
    stably than diffusers' default initialisation for a model this small."""
    for name, module in transformer.named_modules():
        if name.endswith(("norm1.linear", "norm1_context.linear", "norm_out.linear")) or name == "proj_out":
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.zeros_(module.weight)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)


@dataclass
class TextTable:
    """Text embeddings of the distinct training prompts; row ``len(prompts)`` is the empty prompt.

    embeds: [P + 1, L, D]; pooled: [P + 1, Q]; index: [N] long, the row of each training image.
    """

    embeds: Tensor
    pooled: Tensor
    index: Tensor

    @property
    def empty_row(self) -> int:
        return self.embeds.shape[0] - 1


@torch.no_grad()
def encode_text_table(pipe: StableDiffusion3Pipeline, prompts: Sequence[str], chunk: int = 512) -> TextTable:
    """Encode each distinct prompt once with the pipeline's (frozen) text encoders."""
    adapter = load_adapter(pipe)
    distinct = list(dict.fromkeys(prompts))
    row = {p: i for i, p in enumerate(distinct)}
    embeds, pooled = [], []
    for i in range(0, len(distinct), chunk):
        e = adapter.encode_prompts(distinct[i : i + chunk], guidance_scale=1.0)
        embeds.append(e.prompt_embeds)
        pooled.append(e.pooled_prompt_embeds)
    # The negative branch the pipeline builds for CFG (negative_prompt defaults to "").
    empty = adapter.encode_prompts([distinct[0] if distinct else "a"], guidance_scale=2.0)
    embeds.append(empty.negative_prompt_embeds)
    pooled.append(empty.negative_pooled_prompt_embeds)
    return TextTable(
        embeds=torch.cat(embeds), pooled=torch.cat(pooled), index=torch.tensor([row[p] for p in prompts])
    )


def _sample_sigmas(n: int, cfg: PretrainConfig, shift: float, generator: torch.Generator) -> Tensor:
    sigma = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=generator))
    if cfg.shift_sigmas and shift != 1.0:
        sigma = shift * sigma / (1 + (shift - 1) * sigma)
    return sigma


def train_transformer(
    transformer: torch.nn.Module,
    latents: Tensor,
    text: TextTable,
    cfg: PretrainConfig,
    generator: torch.Generator,
    *,
    scheduler_shift: float = 1.0,
    num_train_timesteps: int = 1000,
    progress: bool = False,
) -> tuple[dict[str, Tensor], list[float]]:
    """Rectified-flow training of ``transformer`` on scaled latents [N, C, h, w].

    Returns (EMA state dict, loss of every step); ``transformer`` itself ends with the raw weights.
    """
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    decay, no_decay = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.99),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, cfg.transformer_steps, cfg.warmup_steps, cfg.min_lr_ratio)
    )
    ema = WeightEMA(dict(transformer.named_parameters()), decay=cfg.ema_decay)

    losses: list[float] = []
    bar = progress_bar(range(cfg.transformer_steps), "pretrain transformer", enabled=progress)
    for step in bar:
        idx = torch.randint(0, latents.shape[0], (cfg.batch_size,), generator=generator)
        x0 = latents[idx]
        eps = torch.randn(x0.shape, generator=generator)
        sigma = _sample_sigmas(cfg.batch_size, cfg, scheduler_shift, generator)
        rows = text.index[idx]
        drop = torch.rand(cfg.batch_size, generator=generator) < cfg.caption_dropout
        rows = torch.where(drop, torch.full_like(rows, text.empty_row), rows)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * eps
        pred = transformer(
            hidden_states=x_t,
            timestep=sigma * num_train_timesteps,
            encoder_hidden_states=text.embeds[rows],
            pooled_projections=text.pooled[rows],
            return_dict=False,
        )[0]
        loss = F.mse_loss(pred, eps - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        schedule.step()
        ema.update(step)
        losses.append(loss.item())
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    transformer.eval()
    averaged = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    averaged |= {k: v.detach().clone() for k, v in ema.state().items()}
    return averaged, losses


# --------------------------------------------------------------------------------------------
# Evaluation and samples


@torch.no_grad()
def _reconstruction_quality(vae: torch.nn.Module, batch: world.TrainingBatch) -> tuple[float, float]:
    """(per-pixel MSE in [0, 1] units, verifiable reward) of deterministic reconstructions."""
    recon = []
    for i in range(0, len(batch.prompts), 128):
        x = _to_vae_range(batch.images[i : i + 128])
        recon.append(vae.decode(vae.encode(x).latent_dist.mode()).sample)
    images = (torch.cat(recon) / 2 + 0.5).clamp(0, 1)
    target = batch.images.float() / 255
    mse = float(F.mse_loss(images, target))
    score = build_reward("verifiable")(images, batch.prompts, batch.metadata).scores.mean()
    return mse, float(score)


# --------------------------------------------------------------------------------------------
# The whole stage


def _test_records(cfg: PretrainConfig, seed: int, test_prompts: list[dict] | None) -> list[dict[str, Any]]:
    if test_prompts is None:
        return [s.to_dict() for s in world.sample_prompts(cfg.eval_prompts, seed, "test")]
    if not test_prompts:
        raise ValueError("pretrain: test_prompts is empty")
    bad = [i for i, r in enumerate(test_prompts) if not isinstance(r, dict) or "prompt" not in r or "kind" not in r]
    if bad:
        raise ValueError(f"pretrain: test_prompts[{bad[0]}] is not a world prompt record (needs 'prompt' and metadata)")
    return list(test_prompts)


def pretrain(
    out_dir: str | Path,
    cfg: PretrainConfig = PretrainConfig(),
    *,
    seed: int = 0,
    test_prompts: list[dict] | None = None,
    evaluation: EvalSection = EvalSection(),
    training_reward: RewardSection = RewardSection(),
    progress: bool = True,
) -> PretrainResult:
    """Train the tiny SD3 pipeline on the synthetic world, save it to ``out_dir`` and evaluate it.

    ``test_prompts``: world prompt records (``load_prompts`` of ``test.jsonl``) to evaluate on;
    default: ``cfg.eval_prompts`` prompts of the test split. ``evaluation``: the sampler
    (``num_steps``, ``guidance_scale``), ``batch_size`` and reward of the evaluation, exactly as
    the trainer reads them; ``training_reward`` is what it scores when ``evaluation.reward`` is
    None. The initial noise comes from ``seed``, at ``cfg.image_size``. Also writes
    ``out_dir/pretrain.json`` (config, evaluation settings and metrics). Deterministic in
    ``seed`` on CPU.
    """
    records = _test_records(cfg, seed, test_prompts)
    reward = reward_from_section(evaluation.reward or training_reward)
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        result = _pretrain(Path(out_dir), cfg, seed, records, evaluation, reward, progress)
    finally:
        torch.set_num_threads(threads)
    saved = {
        "seed": seed,
        "config": cfg.model_dump(),
        "eval": evaluation.model_dump(),
        "reward": training_reward.model_dump(),
        "metrics": result.metrics(),
    }
    atomic_write_json(result.path / METRICS_FILE, saved, allow_nan=True)
    atomic_write_json(result.path / TIMING_FILE, result.timing())
    return result


def _pretrain(
    out_dir: Path,
    cfg: PretrainConfig,
    seed: int,
    records: list[dict[str, Any]],
    evaluation: EvalSection,
    reward: RewardFunction,
    progress: bool,
) -> PretrainResult:
    t_start = time.perf_counter()
    _seed_everything(seed)
    generator = torch.Generator("cpu").manual_seed(seed)
    model_cfg = tiny_config(cfg)

    pipe = build_tiny_sd3(world.VOCABULARY, model_cfg, seed)
    data = _render_dataset(cfg.num_train_images, cfg.image_size, seed)

    t0 = time.perf_counter()
    vae_losses = train_vae(pipe.vae, data.images, cfg, generator, progress)
    seconds_vae = time.perf_counter() - t0
    raw = _encode_raw(pipe.vae, data.images)
    scaling, shift = set_latent_statistics(pipe.vae, raw)
    latents = (raw - shift) * scaling
    del raw

    test_specs = world.sample_prompts(cfg.vae_test_images, seed + 1, "test")
    test_rng = np.random.default_rng([seed, 2])
    test_batch = world.TrainingBatch(
        images=torch.stack([world.image_to_tensor(world.render(s, cfg.image_size, test_rng)) for s in test_specs])
        .mul(255).round().to(torch.uint8),
        prompts=[s.prompt for s in test_specs],
        metadata=[s.to_dict() for s in test_specs],
    )
    vae_test_mse, vae_recon_reward = _reconstruction_quality(pipe.vae, test_batch)

    text = encode_text_table(pipe, data.prompts)
    transformer = pipe.transformer
    if cfg.zero_init:
        _zero_init(transformer)
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        module.requires_grad_(False)
    t0 = time.perf_counter()
    ema, transformer_losses = train_transformer(
        transformer,
        latents,
        text,
        cfg,
        generator,
        scheduler_shift=float(pipe.scheduler.config.shift),
        num_train_timesteps=int(pipe.scheduler.config.num_train_timesteps),
        progress=progress,
    )
    seconds_transformer = time.perf_counter() - t0
    transformer.load_state_dict(ema)
    transformer.requires_grad_(True)  # a saved model should not carry a training-time freeze
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        module.requires_grad_(True)
    del latents, text, data

    save_pipeline(pipe, out_dir)
    del pipe
    with quiet_progress():
        reloaded = StableDiffusion3Pipeline.from_pretrained(out_dir, local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)

    prompts = PromptSet([r["prompt"] for r in records], records)
    # As the trainer evaluates (noise seed, sampler, batch size, resolution): the base reward is the
    # training runs' epoch-0 evaluation reward.
    eval_kw = dict(
        num_steps=evaluation.num_steps, guidance_scale=evaluation.guidance_scale,
        batch_size=evaluation.batch_size, seed=seed, resolution=cfg.image_size,
    )  # fmt: skip
    base = evaluate_prompts(reloaded, prompts, reward, **eval_kw)
    untrained = evaluate_prompts(build_tiny_sd3(world.VOCABULARY, model_cfg, seed), prompts, reward, **eval_kw)

    return PretrainResult(
        path=out_dir,
        vae_test_mse=vae_test_mse,
        vae_recon_reward=vae_recon_reward,
        scaling_factor=scaling,
        shift_factor=shift,
        reward_base=base.reward,
        reward_untrained=untrained.reward,
        reward_details=base.details,
        reward_details_untrained=untrained.details,
        seconds_vae=seconds_vae,
        seconds_transformer=seconds_transformer,
        seconds_total=time.perf_counter() - t_start,
        transformer_parameters=sum(p.numel() for p in reloaded.transformer.parameters()),
        num_eval_prompts=len(records),
        vae_losses=tuple(vae_losses),
        transformer_losses=tuple(transformer_losses),
        evaluation=base,
    )
