"""Evaluation: deterministic ODE samples of a prompt set, their reward, and a captioned grid.

The initial noise of prompt i depends only on the seed and i, so evaluations at different epochs,
with different batch sizes or over several processes compare the same samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from tpgrpo.data import PromptSet
from tpgrpo.rewards import RewardFunction
from tpgrpo.rollout import RolloutConfig, as_adapter, rollout

GRID_IMAGES = 16


@dataclass(frozen=True)
class EvalResult:
    """Reward of the evaluated prompts.

    Attributes:
        reward: mean score.
        details: mean of each reward component over the prompts it applies to.
        scores: [n] per-prompt scores (gathered over processes, in prompt order).
        images: [m, 3, H, W] the first m <= 16 samples (for grids), on the main process.
        prompts: their prompts.
        extra: mean score of each of ``extra_rewards`` on the same images.
        extra_scores: [n] per-prompt scores of each of ``extra_rewards``.
    """

    reward: float
    details: dict[str, float]
    scores: Tensor = field(repr=False)
    images: Tensor = field(repr=False)
    prompts: list[str] = field(repr=False)
    extra: dict[str, float] = field(default_factory=dict)
    extra_scores: dict[str, Tensor] = field(default_factory=dict, repr=False)


@torch.no_grad()
def evaluate_prompts(
    model: object,
    prompts: PromptSet,
    reward_fn: RewardFunction,
    *,
    num_steps: int,
    guidance_scale: float,
    batch_size: int,
    seed: int,
    resolution: int | None = None,
    accelerator: Any | None = None,
    extra_rewards: Mapping[str, RewardFunction] | None = None,
) -> EvalResult:
    """One ODE sample per prompt, scored by ``reward_fn``.

    Args:
        model: a pipeline, a pipeline directory or a model adapter.
        prompts: the prompts and their metadata.
        reward_fn: a registry reward.
        num_steps, guidance_scale: the sampler.
        batch_size: prompts per rollout.
        seed: seed of the initial noise.
        resolution: image side; None = the model's default.
        accelerator: when given, prompts are split over its processes and results gathered.
        extra_rewards: more rewards to score the same images with (e.g. the training reward
            beside the evaluation's), by name.
    """
    if len(prompts) == 0:
        raise ValueError("evaluate_prompts: the prompt set is empty")
    adapter = as_adapter(model)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    n = len(prompts)
    per = math.ceil(n / world)
    # Padding with prompt 0 keeps every process's batch count equal; padded rows are dropped.
    indices = [i if i < n else 0 for i in range(rank * per, (rank + 1) * per)]
    noise = adapter.prepare_latents(n, torch.Generator("cpu").manual_seed(seed), resolution, resolution)
    rcfg = RolloutConfig(
        num_steps=num_steps,
        window_size=1,
        noise_level=0.0,
        guidance_scale=guidance_scale,
        completions=False,
        height=resolution,
        width=resolution,
    )
    extra_rewards = dict(extra_rewards or {})
    scores, details, images = [], {}, []
    extra: dict[str, list[Tensor]] = {name: [] for name in extra_rewards}
    for start in range(0, per, batch_size):
        chunk = indices[start : start + batch_size]
        part = prompts.take(chunk)
        out_images = rollout(adapter, part.prompts, rcfg, latents=noise[chunk]).images
        out = reward_fn(out_images, part.prompts, part.metadata)
        scores.append(out.scores.float())
        for name, fn in extra_rewards.items():
            extra[name].append(fn(out_images, part.prompts, part.metadata).scores.float())
        for name, value in out.details.items():
            details.setdefault(name, []).append(value.float())
        if sum(len(x) for x in images) < GRID_IMAGES:
            images.append(out_images[:GRID_IMAGES].cpu())
    all_scores = _gather(accelerator, torch.cat(scores))[:n]
    means = {}
    for name, parts in details.items():
        values = _gather(accelerator, torch.cat(parts))[:n]
        values = values[torch.isfinite(values)]
        means[name] = float(values.mean()) if values.numel() else math.nan
    extra_scores = {name: _gather(accelerator, torch.cat(parts))[:n].cpu() for name, parts in extra.items()}
    grid_images = torch.cat(images)[: min(GRID_IMAGES, n)]
    return EvalResult(
        reward=float(all_scores.mean()),
        details=means,
        scores=all_scores.cpu(),
        images=grid_images,
        prompts=prompts.prompts[: len(grid_images)],
        extra={name: float(v.mean()) for name, v in extra_scores.items()},
        extra_scores=extra_scores,
    )


def _gather(accelerator: Any | None, values: Tensor) -> Tensor:
    if accelerator is None or accelerator.num_processes == 1:
        return values
    return accelerator.gather(values.to(accelerator.device)).cpu()


def make_grid(
    images: Tensor,
    captions: Sequence[str],
    *,
    columns: int = 8,
    scale: int | None = None,
    caption_lines: int = 3,
) -> Image.Image:
    """A captioned grid of images [n, 3, H, W] in [0, 1].

    Images are upscaled ``scale`` x by nearest neighbour (default: to at least 128 px) so small
    samples stay readable; each caption is wrapped to ``caption_lines`` lines under its image.
    """
    if len(images) == 0 or len(images) != len(captions):
        raise ValueError(f"make_grid: expected as many captions as images (>= 1), got {len(images)} and {len(captions)}")
    side = images.shape[-1]
    scale = scale or max(1, math.ceil(128 / side))
    pad, line_height = 4, 12
    tile = side * scale
    cell_w, cell_h = tile + 2 * pad, tile + caption_lines * line_height + 2 * pad
    cols = min(columns, len(images))
    rows = math.ceil(len(images) / cols)
    canvas = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(10)
    arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i, (array, caption) in enumerate(zip(arrays, captions)):
        x, y = (i % cols) * cell_w + pad, (i // cols) * cell_h + pad
        canvas.paste(Image.fromarray(array).resize((tile, tile), Image.Resampling.NEAREST), (x, y))
        for j, line in enumerate(_wrap(draw, caption, font, tile, caption_lines)):
            draw.text((x, y + tile + 1 + j * line_height), line, fill=(0, 0, 0), font=font)
    return canvas


def save_grid(result: EvalResult, path: str | Path, *, columns: int = 8) -> Path:
    """Write the evaluation's sample grid as a PNG (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    make_grid(result.images, result.prompts, columns=columns).save(tmp, format="PNG")
    tmp.replace(path)
    return path


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed bitmap font
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
        lines[-1] = lines[-1] + "..."
    return lines
