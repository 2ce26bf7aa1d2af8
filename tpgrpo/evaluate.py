"""Evaluation: deterministic ODE samples of a prompt set, their reward, and a captioned grid.

The initial noise of prompt i depends only on the seed and i, so evaluations at different epochs,
with different batch sizes or over several processes compare the same samples.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
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


GRID_TILE = 192
"""Smallest side (px) a grid tile is upscaled to: room for a readable caption under each sample."""

_FONT_SIZE, _LINE_HEIGHT = 13, 16
# DejaVu ships with most Linux systems (Debian: fonts-dejavu-core); Pillow finds it by file name
# in the system font directories.
_FONT_FILES = {"regular": "DejaVuSans.ttf", "bold": "DejaVuSans-Bold.ttf"}


def make_grid(
    images: Tensor,
    captions: Sequence[str],
    *,
    scores: Sequence[float] | Tensor | None = None,
    columns: int = 8,
    scale: int | None = None,
    caption_lines: int = 3,
) -> Image.Image:
    """A captioned grid of images [n, 3, H, W] in [0, 1].

    Images are upscaled ``scale`` x by nearest neighbour (default: to at least ``GRID_TILE`` px)
    so small samples stay readable. Under each image: its score (``scores`` [n], in bold, when
    given), then its caption wrapped to ``caption_lines`` lines.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"make_grid: expected images [n, 3, H, W], got shape {tuple(images.shape)}")
    if len(images) == 0 or len(images) != len(captions):
        raise ValueError(f"make_grid: expected as many captions as images (>= 1), got {len(images)} and {len(captions)}")
    if scores is not None and len(scores) != len(images):
        raise ValueError(f"make_grid: expected one score per image ({len(images)}), got {len(scores)}")
    if columns < 1 or caption_lines < 1 or (scale is not None and scale < 1):
        raise ValueError(
            f"make_grid: expected columns, caption_lines and scale >= 1, got {columns}, {caption_lines} and {scale}"
        )
    height, width = images.shape[-2:]
    scale = scale or max(1, math.ceil(GRID_TILE / min(height, width)))
    pad = 4
    tile_w, tile_h = width * scale, height * scale
    text_lines = caption_lines + (scores is not None)
    cell_w, cell_h = tile_w + 2 * pad, tile_h + text_lines * _LINE_HEIGHT + 2 * pad
    cols = min(columns, len(images))
    rows = math.ceil(len(images) / cols)
    canvas = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font, bold = _font("regular", _FONT_SIZE), _font("bold", _FONT_SIZE)
    for i, (array, caption) in enumerate(zip(_to_uint8(images), captions)):
        x, y = (i % cols) * cell_w + pad, (i // cols) * cell_h + pad
        canvas.paste(Image.fromarray(array).resize((tile_w, tile_h), Image.Resampling.NEAREST), (x, y))
        y += tile_h + 1
        if scores is not None:
            draw.text((x, y), f"score {float(scores[i]):.2f}", fill=(0, 0, 0), font=bold)
            y += _LINE_HEIGHT
        for j, line in enumerate(_wrap(draw, caption, font, tile_w, caption_lines)):
            draw.text((x, y + j * _LINE_HEIGHT), line, fill=(0, 0, 0), font=font)
    return canvas


def save_grid(result: EvalResult, path: str | Path, *, columns: int = 8) -> Path:
    """Write the evaluation's sample grid, each sample captioned with its score and prompt, as a
    PNG (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    grid = make_grid(result.images, result.prompts, scores=result.scores[: len(result.images)], columns=columns)
    grid.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def save_images(result: EvalResult, directory: str | Path) -> list[Path]:
    """Write the evaluation's first samples, one PNG each at the model's resolution, as
    ``directory/NN.png`` (NN: the prompt's index in the evaluated set); replaces the directory.

    Pixels are quantised as diffusers' ``numpy_to_pil`` quantises a pipeline's output, so images
    generated with the pipeline from the same noise can be compared file by file.
    """
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = [f"{i:02d}.png" for i in range(len(result.images))]
    for name, array in zip(names, _to_uint8(result.images)):
        Image.fromarray(array).save(tmp / name, format="PNG")
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return [directory / name for name in names]


def _to_uint8(images: Tensor) -> np.ndarray:
    """[n, 3, H, W] in [0, 1] -> uint8 numpy [n, H, W, 3], rounded as diffusers rounds."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _font(style: str, size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype(_FONT_FILES[style], size)
    except OSError:  # DejaVu not installed: Pillow's own font at that size
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
