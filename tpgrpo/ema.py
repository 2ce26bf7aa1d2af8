"""An EMA of named weights: diffusers' ``EMAModel``, stepped on the published cadence.

Decay at optimizer step s (steps taken so far): ``min((1 + s) / (10 + s), decay)`` — the warm-up
of ``EMAModel`` (and of the published Flow-GRPO / TP-GRPO ``EMAModuleWrapper``); one difference:
``EMAModel`` uses decay 0 at s = 0, so a first update then copies the weights (the published
wrapper uses 0.1 there). :meth:`WeightEMA.update` applies an update when ``(s + 1) % every == 0``;
the published training calls it after every training batch, so with gradients accumulated over A
batches an update step is applied A times (to the same weights). Only the shadow weights are
state: s comes from the caller, so a resumed run continues bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
from diffusers.training_utils import EMAModel
from torch import Tensor


class WeightEMA:
    """Shadow copies of ``params`` (name -> parameter), initialised to their current values.

    Args:
        params: the weights to average, by name (their order is kept).
        decay: the maximum decay.
        every: optimizer steps between updates.
    """

    def __init__(self, params: Mapping[str, torch.nn.Parameter], *, decay: float, every: int = 1) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay: expected 0 <= decay < 1, got {decay}")
        if every < 1:
            raise ValueError(f"every: expected >= 1, got {every}")
        self.names = list(params)
        self.params = [params[n] for n in self.names]
        self.every = every
        self._ema = EMAModel(self.params, decay=decay, min_decay=0.0, update_after_step=0, use_ema_warmup=False)

    def decay_at(self, step: int) -> float:
        """The decay an update at optimizer step ``step`` uses."""
        return self._ema.get_decay(step + 1)

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Move the shadow weights towards the current ones when ``(step + 1) % every == 0``;
        ``step``: optimizer steps taken so far. Returns whether it did."""
        if (step + 1) % self.every:
            return False
        # EMAModel counts its own calls; the published decay follows the optimizer's steps.
        self._ema.optimization_step = step
        self._ema.step(self.params)
        return True

    def state(self) -> dict[str, Tensor]:
        """The shadow weights by name (views, not copies)."""
        return dict(zip(self.names, self._ema.shadow_params))

    @torch.no_grad()
    def load(self, state: Mapping[str, Tensor]) -> None:
        """Restore shadow weights saved by :meth:`state`."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} weights (e.g. {missing[0]})")
        for name, shadow in zip(self.names, self._ema.shadow_params):
            shadow.copy_(state[name])

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The shadow weights in place of the trained ones; the trained ones restored bit for bit."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, shadow in zip(self.params, self._ema.shadow_params):
                p.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.params, saved):
                    p.copy_(value)
