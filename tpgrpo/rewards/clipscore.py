"""CLIP score: the cosine similarity of a CLIP model's image and text embeddings, in [-1, 1]."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tpgrpo.rewards import RewardOutput
from tpgrpo.rewards._clip import ClipEncoder
from tpgrpo.rewards._common import check_batch

CLIP_MODEL = "openai/clip-vit-large-patch14"


class ClipScore:
    """path: the CLIP model and processor (a local directory or hub id); processor_path: a separate
    processor (default ``path``); device, dtype: see :class:`ClipEncoder`."""

    def __init__(
        self, path: str = CLIP_MODEL, processor_path: str | None = None, device: str | None = None, dtype: str = "float32"
    ) -> None:
        self.clip = ClipEncoder(path, processor_path, device, dtype)

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> RewardOutput:
        """images float [B, 3, H, W] in [0, 1] -> scores float32 [B] (cosine similarity)."""
        check_batch("clipscore", images, prompts, metadata)
        image = self.clip.image_embeds(images)
        text = self.clip.text_embeds(prompts, image.device)
        return RewardOutput(scores=(image * text).sum(-1).cpu())
