"""A weighted sum of registry rewards.

    build_reward("multi", weights={"pickscore": 1.0, "ocr": 0.5}, options={"pickscore": {"path": ...}})

scores = sum_n weight_n * scores_n (NaN when any component is NaN, so the row is skipped rather
than scored on part of its reward). ``details`` holds each component's scores under its name
and the component's own details as ``<name>/<key>``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tpgrpo.rewards import RewardFunction, RewardOutput, build_reward


class WeightedSum:
    """weights: {reward name: weight}, at least one, finite; options: {reward name: its options}
    for some of those names (the others are built with their defaults)."""

    def __init__(self, weights: Mapping[str, float], options: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        options = dict(options or {})
        if not weights:
            raise ValueError("multi reward: weights must name at least one reward")
        for name, weight in weights.items():
            if not math.isfinite(weight):
                raise ValueError(f"multi reward: weight of {name!r} must be finite, got {weight!r}")
        stray = sorted(set(options) - set(weights))
        if stray:
            raise ValueError(f"multi reward: options for {', '.join(map(repr, stray))}, which have no weight")
        self.weights = dict(weights)
        self.components: dict[str, RewardFunction] = {
            name: build_reward(name, **options.get(name, {})) for name in self.weights
        }

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> RewardOutput:
        """images float [B, 3, H, W] in [0, 1] -> the weighted sum float32 [B] and every
        component's scores and details, [B] each."""
        total = torch.zeros(images.shape[0], dtype=torch.float32)
        details: dict[str, torch.Tensor] = {}
        for name, fn in self.components.items():
            out = fn(images, prompts, metadata)
            scores = out.scores.detach().to("cpu", torch.float32)
            total = total + self.weights[name] * scores
            details[name] = scores
            for key, value in out.details.items():
                details[f"{name}/{key}"] = value.detach().to("cpu", torch.float32)
        return RewardOutput(scores=total, details=details)
