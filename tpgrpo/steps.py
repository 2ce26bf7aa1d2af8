"""The named results the steps of an epoch hand each other (:class:`tpgrpo.trainer.Trainer`), and
what a finished run returns."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from tpgrpo.rollout import Rollout
from tpgrpo.summary import run_summary


@dataclass(frozen=True)
class BatchScores:
    """R [B_local, W+1]: the reward sequence with completions, otherwise the final reward repeated
    (Flow-GRPO sees only the outcome); ``details``: the final images' reward components [B_local]."""

    R: Tensor
    details: dict[str, Tensor]


@dataclass
class BatchSamples:
    """One rollout batch of this process, its scoring under way in the background.

    ``indices``: [B] long, the prompt indices of the whole global batch (every process's rows, in
    gather order): the group keys."""

    prompts: list[str]
    metadata: list[dict[str, Any]]
    indices: Tensor
    rollout: Rollout
    scores: Future  # resolves to BatchScores


@dataclass
class EpochSamples:
    epoch: int
    batches: list[BatchSamples]
    seconds: float


@dataclass
class EpochScores:
    """R [B_local, W+1] per batch, and which rows have finite rewards."""

    R: list[Tensor]
    valid: list[Tensor]
    metrics: dict[str, float]


@dataclass
class EpochCredit:
    """Advantages [B_local, W] and kept rows [B_local] per batch; ``active[b]`` says whether any
    process kept a row of batch b (the same on every process)."""

    advantages: list[Tensor]
    keep: list[Tensor]
    active: list[bool]
    metrics: dict[str, float]


@dataclass
class UpdateStats:
    metrics: dict[str, float]


@dataclass(frozen=True)
class EpochEval:
    """One evaluation of the run's (EMA) weights: ``reward``, the mean evaluation reward on the
    test prompts; ``details``, everything else logged as ``eval/<name>``: per-constraint means,
    ``train_reward`` (the training reward of the same images, when the evaluation's differs),
    ``heldin_reward`` (on ``eval.heldin_prompts`` train prompts, when > 0)."""

    reward: float
    details: dict[str, float]


@dataclass
class TrainResult:
    run_dir: Path
    epochs: int
    eval_reward_initial: float | None
    eval_reward_final: float
    eval_details: dict[str, float]
    minutes: float
    history: list[dict[str, float]] = field(repr=False)
    eval_details_initial: dict[str, float] = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, float | None]:
        """The run's summary numbers (:func:`tpgrpo.summary.run_summary`)."""
        rates = [row.get("turning/rate") for row in self.history]
        return run_summary(self.eval_reward_final, self.eval_reward_initial, rates, self.eval_details.get("heldin_reward"))

    @property
    def metrics(self) -> dict[str, Any]:
        """``metrics.json``: the final and the base model's evaluation figures."""
        return {
            "eval_reward": self.eval_reward_final,
            "eval_reward_initial": self.eval_reward_initial,
            "epochs": self.epochs,
            **{f"eval_{k}": v for k, v in self.eval_details.items()},
            **{f"eval_{k}_initial": v for k, v in self.eval_details_initial.items()},
        }


@dataclass(frozen=True)
class RunOutcome:
    """A finished run: the trainer's result, the tracker run and whether this is the main process."""

    result: TrainResult
    run_id: str | None
    is_main: bool
