"""What a run prints: one line per epoch, progress bars on a terminal, periodic lines elsewhere.

Everything goes through the ``tpgrpo`` logger, so the same lines reach a terminal, a redirected
log file (``dvc repro > log``) and, as a Prefect extra logger (``prefect.toml``), the flow run's
logs. A progress bar redraws one line with carriage returns; written to a file, that is a single
line of every update glued together, so off a terminal progress is a plain line every few
percent instead.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, Generic, Iterable, Iterator, Mapping, Sequence, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

log = logging.getLogger("tpgrpo")


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each line (pytest and notebooks
    replace it), not to the stream of the moment the handler was made."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure() -> None:
    """Print the ``tpgrpo`` logger's INFO lines, bare, to stderr. Only the command line calls it;
    library users and Prefect choose their own handlers."""
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def is_terminal() -> bool:
    """Whether stderr, where progress goes, is a terminal (not a log file or captured output)."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress(items: Sequence[T], desc: str, *, enabled: bool = True, lines: int = 10) -> Iterable[T]:
    """``items`` with progress: a tqdm bar on a terminal, else about ``lines`` log lines
    (``vae: 300/1000 (30%), 42 s, loss=0.0123``); ``enabled=False`` (a process other than the
    main one) shows nothing. Both kinds take ``set_postfix(name=value)`` for the latest figures."""
    if is_terminal() or not enabled:
        return tqdm(items, desc=desc, disable=not enabled, leave=False)
    return _LineProgress(items, desc, lines)


class _LineProgress(Generic[T]):
    def __init__(self, items: Sequence[T], desc: str, lines: int):
        self.items, self.desc = items, desc
        self.every = max(1, math.ceil(len(items) / max(1, lines)))
        self.postfix: dict[str, Any] = {}

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = values

    def __iter__(self) -> Iterator[T]:
        started, total = time.perf_counter(), len(self.items)
        for done, item in enumerate(self.items, start=1):
            yield item
            if done % self.every == 0 or done == total:
                extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
                log.info(f"{self.desc}: {done}/{total} ({100 * done // total}%), {time.perf_counter() - started:.0f} s{extra}")


def epoch_line(name: str, epoch: int, epochs: int, row: Mapping[str, float], eval_initial: float | None) -> str:
    """The one line a training epoch prints, from its history row: the training reward of its
    rollouts, the evaluation (when the epoch evaluated) against the base model's, the share of
    turning points, and where the time went."""
    parts = [f"{name} epoch {epoch}/{epochs}"]
    if "reward/mean" in row:
        parts.append(f"train reward {row['reward/mean']:.3f}")
    if "eval/reward" in row:
        change = "" if eval_initial is None else f" ({row['eval/reward'] - eval_initial:+.4f} vs base)"
        parts.append(f"eval reward {row['eval/reward']:.4f}{change}")
    if "turning/rate" in row:
        parts.append(f"turning points {100 * row['turning/rate']:.1f}%")
    seconds = [f"{row[key]:.1f} s {label}" for key, label in (("time/rollout_s", "rollout"), ("time/update_s", "update")) if key in row]
    if seconds:
        parts.append(", ".join(seconds))
    if "time/minutes" in row:
        parts.append(f"{row['time/minutes']:.1f} min")
    return " | ".join(parts)


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 epoch``, ``3 epochs``; ``many`` for the irregular (``batch``, ``batches``)."""
    return f"{n} {word}" if n == 1 else f"{n} {many or word + 's'}"
