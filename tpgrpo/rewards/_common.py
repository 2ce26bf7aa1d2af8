"""Helpers shared by the scorers: input checks and the uint8 conversion the reference code uses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def check_batch(name: str, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]) -> int:
    """Validate a reward call's inputs (images float [B, 3, H, W]); return B."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} reward: expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
    batch = images.shape[0]
    if len(prompts) != batch or len(metadata) != batch:
        raise ValueError(f"{name} reward: got {batch} images, {len(prompts)} prompts and {len(metadata)} metadata entries")
    return batch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images float [B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3] (RGB), rounded as Flow-GRPO and
    DDPO do before handing images to PIL-based scorers."""
    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()
