"""Reward registry: one scorer per module, imported only when built.

    from tpgrpo.rewards import build_reward
    fn = build_reward("verifiable", **options)
    out = fn(images, prompts, metadata)  # images float [B, 3, H, W] in [0, 1]
    out.scores                           # float32 [B]
    out.details                          # {component: float32 [B]}, NaN where not applicable

Entries are ``"module:attribute"`` strings so that heavy scorers (PickScore, OCR) and their
dependencies load only when a config asks for them. The attribute is a factory (a class or a
function) whose keyword arguments are the reward's options; calling it returns a
:class:`RewardFunction`.

Registered: ``verifiable`` (the shape world), ``pickscore``, ``clipscore``, ``aesthetic``,
``ocr``, ``jpeg_compressibility`` / ``jpeg_incompressibility``, ``multi`` (a weighted sum of
others) and ``remote`` (a reward server, see :mod:`tpgrpo.rewards.remote`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from tpgrpo.errors import UnknownRewardError

if TYPE_CHECKING:  # torch loads with the first reward built, not with the config that names it
    import torch

__all__ = ["RewardFunction", "RewardOutput", "UnknownRewardError", "available_rewards", "build_reward", "register_reward"]


@dataclass
class RewardOutput:
    """scores: float32 [B]; details: per-component float32 [B] for logging (NaN: not applicable)."""

    scores: torch.Tensor
    details: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scores.ndim != 1:
            raise ValueError(f"reward scores must have shape [B], got {tuple(self.scores.shape)}")
        for name, value in self.details.items():
            if value.shape != self.scores.shape:
                raise ValueError(f"reward detail {name!r} has shape {tuple(value.shape)}, scores {tuple(self.scores.shape)}")




class RewardFunction(Protocol):
    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> RewardOutput: ...


_REGISTRY: dict[str, str | Callable[..., RewardFunction]] = {
    "verifiable": "tpgrpo.rewards.verifiable:VerifiableReward",
    "verifiable_soft": "tpgrpo.rewards.verifiable:SoftVerifiableReward",
    "pickscore": "tpgrpo.rewards.pickscore:PickScore",
    "clipscore": "tpgrpo.rewards.clipscore:ClipScore",
    "aesthetic": "tpgrpo.rewards.aesthetic:AestheticScore",
    "ocr": "tpgrpo.rewards.ocr:OcrReward",
    "jpeg_compressibility": "tpgrpo.rewards.jpeg:jpeg_compressibility",
    "jpeg_incompressibility": "tpgrpo.rewards.jpeg:jpeg_incompressibility",
    "multi": "tpgrpo.rewards.multi:WeightedSum",
    "remote": "tpgrpo.rewards.remote:RemoteReward",
}


def register_reward(name: str, factory: str | Callable[..., RewardFunction], *, overwrite: bool = False) -> None:
    """Register ``factory`` (a callable or a lazy ``"module:attribute"`` string) under ``name``."""
    if isinstance(factory, str) and factory.count(":") != 1:
        raise ValueError(f"lazy reward factory must look like 'module:attribute', got {factory!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"reward {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = factory


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


def _resolve(name: str) -> Callable[..., RewardFunction]:
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        module_name, attribute = factory.split(":")
        factory = getattr(importlib.import_module(module_name), attribute)
    return factory


def build_reward(name: str, **options: Any) -> RewardFunction:
    """Build the reward registered as ``name`` with ``options`` as keyword arguments."""
    if name not in _REGISTRY:
        raise UnknownRewardError(f"unknown reward {name!r}; available: {', '.join(available_rewards())}")
    factory = _resolve(name)
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        valid = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise TypeError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for reward {name!r}; valid: {', '.join(valid) or 'none'}"
            )
    return factory(**options)


def reward_from_section(section: Any) -> RewardFunction:
    """The reward a reward section of the config describes (``name``, ``options``, ``weights``):
    registry reward ``name`` with ``options`` as keyword arguments, or for ``multi`` the weighted
    sum (:mod:`tpgrpo.rewards.multi`) of ``weights`` with per-reward ``options``."""
    if section.name == "multi":
        return build_reward("multi", weights=dict(section.weights), options=dict(section.options))
    return build_reward(section.name, **section.options)


def metadata_check(*rewards: RewardFunction) -> Callable[[dict[str, Any]], None]:
    """A check of prompt records by each reward's ``check_metadata`` (rewards that read prompt
    metadata define it), so a corrupt prompt set fails when it loads, not mid-training."""
    checks = [c for c in (getattr(r, "check_metadata", None) for r in rewards) if c is not None]

    def check(record: dict[str, Any]) -> None:
        for c in checks:
            c(record)

    return check
