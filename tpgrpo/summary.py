"""What a finished run came to, in five numbers with the same names for every run.

``runs/<name>/summary.json`` (the pipeline's DVC metric) holds them; MLflow shows three of them,
with the run's minutes, as the ``summary/*`` key metrics (:func:`tpgrpo.tracking.key_metrics`).
Wall-clock time is not among them: it differs between two runs of the same commit, and every DVC
output is byte-identical between two such runs.
"""

from __future__ import annotations

import math
from typing import Iterable

KEYS = ("base_reward", "reward", "delta", "heldin_reward", "turning_rate")


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def run_summary(
    reward: float | None,
    base_reward: float | None,
    turning_rates: Iterable[float | None],
    heldin_reward: float | None = None,
) -> dict[str, float | None]:
    """The :data:`KEYS` of a run: its final evaluation reward, the base model's (epoch 0), their
    difference, the final held-in reward, the share of SDE steps credited as turning points
    averaged over the epochs (0 under credit modes without turning points, which log it as 0);
    None where the run has no such number (no base-model evaluation, a
    non-finite value)."""
    final, base = _finite(reward), _finite(base_reward)
    rates = [r for r in (_finite(r) for r in turning_rates) if r is not None]
    return {
        "base_reward": base,
        "reward": final,
        "delta": None if final is None or base is None else final - base,
        "heldin_reward": _finite(heldin_reward),
        "turning_rate": sum(rates) / len(rates) if rates else None,
    }
