"""Pre-train the embedded default: the tiny SD3 pipeline, trained on the synthetic shape world.

    from tpgrpo.pretrain import PretrainConfig, pretrain
    result = pretrain("models/base", PretrainConfig(), seed=0)
    result.reward_base, result.reward_untrained       # verifiable reward on held-out test prompts

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
   that becomes the saved model;
5. save with :func:`tpgrpo.models.save_pipeline` and reload with a plain
   ``StableDiffusion3Pipeline.from_pretrained``, the path a real SD3.5 checkpoint takes;
6. evaluate the reloaded model and a freshly built untrained one on test prompts (ODE sampler).

Everything draws from generators seeded by ``seed``: the same seed gives the same model on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusion3Pipeline
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from tqdm.auto import tqdm

from tpgrpo import world
from tpgrpo.models import TinySD3Config, build_tiny_sd3, load_adapter, save_pipeline
from tpgrpo.models.base import _quiet_progress
from tpgrpo.rewards import build_reward
from tpgrpo.rollout import RolloutConfig, as_adapter, rollout

__all__ = ["PretrainConfig", "PretrainResult", "pretrain", "sample_grid", "evaluate_reward", "encode_text_table", "train_vae", "train_transformer"]


@dataclass(frozen=True)
class PretrainConfig:
    """Every knob of :func:`pretrain` (plain types, so it maps 1:1 onto ``params.yaml``).

    Model size (passed to :class:`TinySD3Config`): ``image_size``, ``num_layers``,
    ``num_attention_heads``, ``attention_head_dim``, ``patch_size``.

    Data: ``num_train_images`` images of the train distribution are rendered once, encoded once
    and reused every epoch (encoding a fresh batch through the VAE every step would cost more than
    the transformer step it feeds).

    VAE: ``vae_steps`` AdamW steps of ``vae_batch_size`` images at ``vae_lr`` (cosine decay),
    loss ``mse + l1`` per pixel, weighted ``1 + vae_saturation_weight * chroma`` (chroma = max - min
    channel, in [0, 1]); ``vae_test_images`` images of test prompts measure ``vae_test_mse``.

    Transformer: ``transformer_steps`` AdamW steps of ``batch_size`` at ``lr`` (linear warm-up over
    ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr``), ``weight_decay``, gradient norm
    clipped at ``grad_clip`` (0: off); sigma = sigmoid(N(``logit_mean``, ``logit_std``)), shifted
    like the scheduler when ``shift_sigmas``; ``caption_dropout`` of the captions replaced by the
    empty prompt; EMA with ``ema_decay`` (warmed up as (1 + n) / (10 + n)).

    ``num_threads``: torch CPU threads during the call (restored afterwards); 0 leaves torch's
    setting alone. On a 2-core box whose other core is busy, 2 threads made the small convolutions
    of the VAE ~10x slower than 1 thread (the threads wait on each other), so 1 is the safe choice
    on shared machines.

    Evaluation: ``eval_prompts`` test prompts (drawn with ``eval_seed``, fixed across model seeds)
    unless ``pretrain`` gets ``test_prompts``; ``eval_steps`` ODE steps at ``eval_guidance_scale``.
    """

    image_size: int = 32
    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    patch_size: int = 2

    num_train_images: int = 8192

    vae_steps: int = 1500
    vae_batch_size: int = 32
    vae_lr: float = 2e-3
    vae_saturation_weight: float = 2.0
    vae_test_images: int = 256

    transformer_steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift_sigmas: bool = True
    caption_dropout: float = 0.1
    ema_decay: float = 0.995
    zero_init: bool = True

    eval_prompts: int = 128
    eval_seed: int = 0
    eval_steps: int = 10
    eval_guidance_scale: float = 2.0
    eval_batch_size: int = 64

    num_threads: int = 0

    def __post_init__(self) -> None:
        positive_ints = (
            "image_size", "num_layers", "num_attention_heads", "attention_head_dim", "patch_size",
            "num_train_images", "vae_steps", "vae_batch_size", "vae_test_images", "transformer_steps",
            "batch_size", "eval_prompts", "eval_steps", "eval_batch_size",
        )  # fmt: skip
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PretrainConfig.{name}: expected an int >= 1, got {value!r}")
        for name in ("warmup_steps", "eval_seed", "num_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"PretrainConfig.{name}: expected an int >= 0, got {value!r}")
        for name in ("vae_lr", "lr", "logit_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"PretrainConfig.{name}: expected a number > 0, got {value!r}")
        for name in ("vae_saturation_weight", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"PretrainConfig.{name}: expected a number >= 0, got {value!r}")
        for name in ("caption_dropout", "min_lr_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"PretrainConfig.{name}: expected a number in [0, 1], got {value!r}")
        if not isinstance(self.ema_decay, (int, float)) or not 0 <= self.ema_decay < 1:
            raise ValueError(f"PretrainConfig.ema_decay: expected a number in [0, 1), got {self.ema_decay!r}")
        if not isinstance(self.logit_mean, (int, float)) or not math.isfinite(self.logit_mean):
            raise ValueError(f"PretrainConfig.logit_mean: expected a finite number, got {self.logit_mean!r}")
        if not isinstance(self.eval_guidance_scale, (int, float)) or self.eval_guidance_scale < 1:
            raise ValueError(
                f"PretrainConfig.eval_guidance_scale: expected a number >= 1, got {self.eval_guidance_scale!r}"
            )
        try:
            self.model_config()
        except ValueError as err:
            raise ValueError(f"PretrainConfig: model sizes rejected: {err}") from None

    def model_config(self) -> TinySD3Config:
        """The :class:`TinySD3Config` this config builds."""
        return TinySD3Config(
            image_size=self.image_size,
            num_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            attention_head_dim=self.attention_head_dim,
            patch_size=self.patch_size,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PretrainResult:
    """What :func:`pretrain` produced and measured.

    Attributes:
        path: the saved pipeline directory.
        vae_test_mse: per-pixel MSE (images in [0, 1]) of VAE reconstructions of test-prompt images.
        vae_recon_reward: verifiable reward of those reconstructions (the ceiling the VAE allows).
        scaling_factor, shift_factor: the latent statistics written into ``vae.config``.
        reward_base: mean verifiable reward of the trained (reloaded) model on the test prompts.
        reward_untrained: the same evaluation of a freshly built, untrained pipeline.
        reward_details: per-constraint means of the trained model (NaN entries ignored).
        reward_details_untrained: the same for the untrained pipeline.
        seconds_vae, seconds_transformer, seconds_total: wall time of the VAE training, of the
            transformer training, and of the whole call.
        vae_losses, transformer_losses: the loss of every optimisation step.
        transformer_parameters: parameter count of the transformer.
        num_eval_prompts: how many prompts the rewards average over.
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

    def metrics(self) -> dict[str, Any]:
        """The scalar results as a JSON-ready dict (no loss histories)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("vae_losses", "transformer_losses")}
        out["path"] = str(self.path)
        return out


METRICS_FILE = "pretrain.json"
"""Written into the pipeline directory next to ``model_index.json``: config and metrics."""


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
    bar = tqdm(range(cfg.vae_steps), desc="vae", disable=not progress, leave=False)
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
    ema = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    ema_keys = [k for k, v in transformer.named_parameters()]
    named = dict(transformer.named_parameters())

    losses: list[float] = []
    bar = tqdm(range(cfg.transformer_steps), desc="transformer", disable=not progress, leave=False)
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
        d = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k in ema_keys:
                ema[k].lerp_(named[k].detach(), 1 - d)
        losses.append(loss.item())
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    transformer.eval()
    return ema, losses


# --------------------------------------------------------------------------------------------
# Evaluation and samples


@dataclass(frozen=True)
class RewardSummary:
    mean: float
    details: dict[str, float]
    scores: Tensor = field(repr=False)


def _summarise(scores: Tensor, details: dict[str, list[Tensor]]) -> RewardSummary:
    means = {}
    for name, parts in details.items():
        values = torch.cat(parts)
        values = values[~torch.isnan(values)]
        means[name] = float(values.mean()) if values.numel() else float("nan")
    return RewardSummary(mean=float(scores.mean()), details=means, scores=scores)


@torch.no_grad()
def evaluate_reward(
    model: object,
    records: Sequence[dict[str, Any]],
    *,
    num_steps: int = 10,
    guidance_scale: float = 2.0,
    seed: int = 0,
    batch_size: int = 64,
) -> RewardSummary:
    """Verifiable reward of ODE samples of ``model`` (pipeline, directory or adapter) for prompt
    records (dicts with ``prompt`` and world metadata); one sample per prompt, noise from ``seed``."""
    reward = build_reward("verifiable")
    adapter = as_adapter(model)
    generator = torch.Generator("cpu").manual_seed(seed)
    rcfg = RolloutConfig(
        num_steps=num_steps, window_size=1, noise_level=0.0, guidance_scale=guidance_scale, completions=False
    )
    scores, details = [], {}
    for i in range(0, len(records), batch_size):
        chunk = list(records[i : i + batch_size])
        prompts = [r["prompt"] for r in chunk]
        images = rollout(adapter, prompts, rcfg, generator=generator).images
        out = reward(images, prompts, chunk)
        scores.append(out.scores)
        for name, value in out.details.items():
            details.setdefault(name, []).append(value)
    return _summarise(torch.cat(scores), details)


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


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font only
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int, max_lines: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = textwrap.shorten(lines[-1] + " ...", width=max(4, len(lines[-1])), placeholder="...")
    return lines


def sample_grid(
    pipe_or_adapter: object,
    prompts: Sequence[str],
    path: str | Path,
    *,
    num_steps: int = 10,
    guidance_scale: float = 2.0,
    seed: int = 0,
    columns: int = 8,
    scale: int | None = None,
    caption_lines: int = 3,
) -> Path:
    """Write a PNG grid of one ODE sample per prompt, with the prompt printed under each image.

    Images are upscaled ``scale``x by nearest neighbour (default: the smallest factor that makes
    them at least 128 px wide). Layout: ``columns`` cells per row (fewer if there are fewer
    prompts), each ``S + 2 * pad`` wide and ``S + caption + 2 * pad`` high with S = image side x
    scale, pad = 4 and caption = ``caption_lines`` x 12 px; so the PNG is
    ``min(columns, n) * (S + 8)`` by ``ceil(n / columns) * (S + 12 * caption_lines + 8)`` pixels.
    """
    if not prompts:
        raise ValueError("sample_grid: prompts is empty")
    if columns < 1:
        raise ValueError(f"sample_grid: columns must be >= 1, got {columns}")
    adapter = as_adapter(pipe_or_adapter)
    rcfg = RolloutConfig(
        num_steps=num_steps, window_size=1, noise_level=0.0, guidance_scale=guidance_scale, completions=False
    )
    generator = torch.Generator("cpu").manual_seed(seed)
    images = rollout(adapter, list(prompts), rcfg, generator=generator).images
    side = images.shape[-1]
    scale = scale or max(1, math.ceil(128 / side))
    if scale < 1:
        raise ValueError(f"sample_grid: scale must be >= 1, got {scale}")
    pad, line_height = 4, 12
    cell_w, img_s = side * scale + 2 * pad, side * scale
    cell_h = img_s + caption_lines * line_height + 2 * pad
    cols = min(columns, len(prompts))
    rows = math.ceil(len(prompts) / cols)
    canvas = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(10)
    arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i, (array, prompt) in enumerate(zip(arrays, prompts)):
        x, y = (i % cols) * cell_w + pad, (i // cols) * cell_h + pad
        tile = Image.fromarray(array).resize((img_s, img_s), Image.Resampling.NEAREST)
        canvas.paste(tile, (x, y))
        for j, line in enumerate(_wrap(draw, prompt, font, img_s, caption_lines)):
            draw.text((x, y + img_s + 1 + j * line_height), line, fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


# --------------------------------------------------------------------------------------------
# The whole stage


def _test_records(cfg: PretrainConfig, test_prompts: list[dict] | None) -> list[dict[str, Any]]:
    if test_prompts is None:
        return [s.to_dict() for s in world.sample_prompts(cfg.eval_prompts, cfg.eval_seed, "test")]
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
    progress: bool = True,
) -> PretrainResult:
    """Train the tiny SD3 pipeline on the synthetic world, save it to ``out_dir`` and evaluate it.

    ``test_prompts``: world prompt records (``load_prompts`` of ``test.jsonl``) to evaluate on;
    default: ``cfg.eval_prompts`` prompts of the test split. Also writes ``out_dir/pretrain.json``
    (config and metrics). Deterministic in ``seed`` on CPU.
    """
    if not isinstance(cfg, PretrainConfig):
        raise TypeError(f"pretrain: cfg must be a PretrainConfig, got {type(cfg).__name__}")
    records = _test_records(cfg, test_prompts)
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _pretrain(Path(out_dir), cfg, seed, records, progress)
    finally:
        torch.set_num_threads(threads)


def _pretrain(
    out_dir: Path, cfg: PretrainConfig, seed: int, records: list[dict[str, Any]], progress: bool
) -> PretrainResult:
    t_start = time.perf_counter()
    _seed_everything(seed)
    generator = torch.Generator("cpu").manual_seed(seed)
    model_cfg = cfg.model_config()

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
    with _quiet_progress():
        reloaded = StableDiffusion3Pipeline.from_pretrained(out_dir, local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)

    eval_kw = dict(
        num_steps=cfg.eval_steps, guidance_scale=cfg.eval_guidance_scale, seed=cfg.eval_seed,
        batch_size=cfg.eval_batch_size,
    )  # fmt: skip
    base = evaluate_reward(reloaded, records, **eval_kw)
    untrained = evaluate_reward(build_tiny_sd3(world.VOCABULARY, model_cfg, seed), records, **eval_kw)

    result = PretrainResult(
        path=out_dir,
        vae_test_mse=vae_test_mse,
        vae_recon_reward=vae_recon_reward,
        scaling_factor=scaling,
        shift_factor=shift,
        reward_base=base.mean,
        reward_untrained=untrained.mean,
        reward_details=base.details,
        reward_details_untrained=untrained.details,
        seconds_vae=seconds_vae,
        seconds_transformer=seconds_transformer,
        seconds_total=time.perf_counter() - t_start,
        transformer_parameters=sum(p.numel() for p in reloaded.transformer.parameters()),
        num_eval_prompts=len(records),
        vae_losses=tuple(vae_losses),
        transformer_losses=tuple(transformer_losses),
    )
    (out_dir / METRICS_FILE).write_text(
        json.dumps({"seed": seed, "config": cfg.to_dict(), "metrics": result.metrics()}, indent=2) + "\n",
        encoding="utf-8",
    )
    return result
