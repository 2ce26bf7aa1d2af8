"""PickScore (Kirstain et al., 2023): a CLIP-H model fine-tuned on human preferences (Pick-a-Pic).

score = logit_scale * cos(image embedding, text embedding) / 26, as Flow-GRPO's PickScore reward
(``logit_scale * cos`` is the PickScore reference; Flow-GRPO divides by 26 to bring typical
values, ~21-23, near 1). ``details["raw"]`` is the undivided PickScore that papers report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tpgrpo.rewards import RewardOutput
from tpgrpo.rewards._clip import ClipEncoder
from tpgrpo.rewards._common import check_batch

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
# The PickScore repository pairs its model with the processor of the CLIP-H it was fine-tuned from.
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
FLOW_GRPO_SCALE = 26.0


class PickScore:
    """path: the CLIP model (a local directory or hub id); processor_path: its tokenizer and image
    settings (default: the CLIP-H processor for the PickScore hub id, else ``path``); device,
    dtype: see :class:`ClipEncoder`."""

    def __init__(
        self,
        path: str = PICKSCORE_MODEL,
        processor_path: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
    ) -> None:
        if processor_path is None:
            processor_path = PICKSCORE_PROCESSOR if path == PICKSCORE_MODEL else path
        self.clip = ClipEncoder(path, processor_path, device, dtype)

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> RewardOutput:
        """images float [B, 3, H, W] in [0, 1] -> scores float32 [B], details ``{"raw": [B]}``."""
        check_batch("pickscore", images, prompts, metadata)
        image = self.clip.image_embeds(images)
        text = self.clip.text_embeds(prompts, image.device)
        raw = (self.clip.model.logit_scale.exp().float() * (image * text).sum(-1)).cpu()
        return RewardOutput(scores=raw / FLOW_GRPO_SCALE, details={"raw": raw})
