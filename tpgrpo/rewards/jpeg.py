"""JPEG (in)compressibility (DDPO): the size of the image saved as JPEG, in kB (1000 bytes).

``jpeg_incompressibility`` rewards large files (detail, texture), ``jpeg_compressibility`` small
ones (its score is the negated size).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from tpgrpo.rewards import RewardOutput
from tpgrpo.rewards._common import check_batch, to_uint8


@dataclass(frozen=True)
class JpegSize:
    """quality: JPEG quality (DDPO: 95); sign: +1 rewards large files, -1 small ones."""

    quality: int = 95
    sign: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.quality <= 100:
            raise ValueError(f"jpeg reward option quality must be in [1, 100], got {self.quality!r}")

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> RewardOutput:
        """images float [B, 3, H, W] in [0, 1] -> scores float32 [B]: sign * size in kB."""
        check_batch("jpeg", images, prompts, metadata)
        sizes = []
        for pixels in to_uint8(images):
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=self.quality)
            sizes.append(buffer.tell() / 1000)
        return RewardOutput(scores=self.sign * torch.tensor(sizes, dtype=torch.float32))


def jpeg_incompressibility(quality: int = 95) -> JpegSize:
    return JpegSize(quality, 1.0)


def jpeg_compressibility(quality: int = 95) -> JpegSize:
    return JpegSize(quality, -1.0)
