"""LAION aesthetic score: the improved aesthetic predictor (an MLP on unit-norm CLIP ViT-L/14 image
embeddings, trained on SAC + LOGOS + AVA ratings, 1-10 scale), as DDPO and Flow-GRPO use it.

The head's weights are not on the hub as a model repository: pass the original
``sac+logos+ava1-l14-linearMSE.pth`` (github.com/christophschuhmann/improved-aesthetic-predictor)
or a safetensors copy of its state dict as ``head_path``. A ``.pth`` is read with
``torch.load(weights_only=True)``, which refuses anything but tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tpgrpo.rewards import RewardOutput
from tpgrpo.rewards._clip import ClipEncoder
from tpgrpo.rewards._common import check_batch

CLIP_MODEL = "openai/clip-vit-large-patch14"


class AestheticHead(nn.Module):
    """The predictor's MLP; module names match the original state dict (``layers.0.weight``, ...).
    Embeddings float [B, D] -> scores float [B, 1]."""

    def __init__(self, embed_dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


def load_head(path: str | Path) -> AestheticHead:
    """Read the head's state dict from ``.safetensors`` or ``.pth`` (tensors only) into eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: aesthetic head weights not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if "layers.0.weight" not in state:
        raise ValueError(f"{path}: not an aesthetic predictor state dict (no 'layers.0.weight')")
    head = AestheticHead(state["layers.0.weight"].shape[1])
    try:
        head.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{path}: state dict does not fit the aesthetic predictor MLP: {str(exc).splitlines()[0]}") from None
    return head.eval().requires_grad_(False)


class AestheticScore:
    """head_path: the predictor's weights (required); clip_path: CLIP ViT-L/14 model and processor
    (a local directory or hub id); device, dtype: see :class:`ClipEncoder`."""

    def __init__(
        self, head_path: str | None = None, clip_path: str = CLIP_MODEL, device: str | None = None, dtype: str = "float32"
    ) -> None:
        if head_path is None:
            raise ValueError(
                "aesthetic reward: option head_path is required (sac+logos+ava1-l14-linearMSE.pth or a safetensors copy)"
            )
        self.head = load_head(head_path)
        self.clip = ClipEncoder(clip_path, None, device, dtype)
        embed_dim = self.clip.model.config.projection_dim
        if self.head.layers[0].in_features != embed_dim:
            raise ValueError(
                f"aesthetic reward: head {head_path} expects {self.head.layers[0].in_features}-d embeddings, "
                f"CLIP {clip_path} gives {embed_dim}"
            )

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> RewardOutput:
        """images float [B, 3, H, W] in [0, 1] -> scores float32 [B] (prompts are not used)."""
        check_batch("aesthetic", images, prompts, metadata)
        embeds = self.clip.image_embeds(images)
        with torch.no_grad():
            scores = self.head.to(embeds.device)(embeds)[:, 0]
        return RewardOutput(scores=scores.cpu())
