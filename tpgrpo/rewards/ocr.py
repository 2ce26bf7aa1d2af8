"""Text-rendering accuracy by OCR (RapidOCR, ONNX models shipped in its wheel), as Flow-GRPO's
OCR reward.

The target is ``metadata["text"]`` when given, else the text between double quotes in the prompt
(``"..."`` or ``“...”``; several quoted spans are joined). Target and recognised text (all
detected lines joined) are compared lowercased with whitespace removed:
score = 1 - min(d, n) / n, with n the target's length and d the Levenshtein distance, and
d = 0 when the target occurs inside the recognised text (Flow-GRPO's rule: extra text on the
image is not penalised). No target or nothing recognised scores 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tpgrpo.data import quoted_text
from tpgrpo.rewards import RewardOutput
from tpgrpo.rewards._common import check_batch, to_uint8

_SPACE = re.compile(r"\s+")

# Flow-GRPO runs PaddleOCR without the angle classifier: rendered text is upright.
_DEFAULT_PARAMS = {"Global.use_cls": False, "Global.log_level": "error"}


def target_text(prompt: str, metadata: dict[str, Any]) -> str:
    """The text an image should show: ``metadata["text"]``, else the prompt's quoted text ('' if none)."""
    if isinstance(metadata.get("text"), str):
        return metadata["text"]
    return quoted_text(prompt)


def normalise(text: str) -> str:
    return _SPACE.sub("", text).lower()


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions each cost 1)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def text_score(recognised: str, target: str) -> float:
    """1 - normalised edit distance of the normalised texts, in [0, 1]; 0 for an empty target."""
    recognised, target = normalise(recognised), normalise(target)
    if not target:
        return 0.0
    distance = 0 if target in recognised else min(edit_distance(recognised, target), len(target))
    return 1.0 - distance / len(target)


class OcrReward:
    """params: RapidOCR settings merged over the defaults (angle classifier off, quiet logs), e.g.
    ``{"EngineConfig.onnxruntime.use_cuda": true}`` with onnxruntime-gpu installed. The engine is
    built once, here."""

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        from rapidocr import RapidOCR

        self.engine = RapidOCR(params={**_DEFAULT_PARAMS, **(params or {})})

    def recognise(self, image: np.ndarray) -> str:
        """uint8 RGB [H, W, 3] -> all recognised text, joined ('' when nothing is found)."""
        # An ndarray is taken as OpenCV's BGR.
        result = self.engine(np.ascontiguousarray(image[..., ::-1]))
        texts = getattr(result, "txts", None) if result is not None else None
        return "".join(t for t in texts or () if t)

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> RewardOutput:
        """images float [B, 3, H, W] in [0, 1] -> scores float32 [B] in [0, 1]."""
        check_batch("ocr", images, prompts, metadata)
        pixels = to_uint8(images)
        scores = []
        for image, prompt, meta in zip(pixels, prompts, metadata):
            target = target_text(prompt, meta)
            scores.append(text_score(self.recognise(image), target) if normalise(target) else 0.0)
        return RewardOutput(scores=torch.tensor(scores, dtype=torch.float32))
