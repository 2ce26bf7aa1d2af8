"""The figures' common parts: a figure, its colours, epoch axes, the turning-point bar chart and
an atomic PNG write.

matplotlib through :class:`matplotlib.figure.Figure` (the Agg canvas), never pyplot: no global
state, so reports can be drawn in threads and Prefect tasks. PNGs carry no date, so a figure
drawn twice from the same numbers is the same file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from tpgrpo.fileio import atomic_write

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# An RGBA colour as matplotlib's colormaps return it.
Color = tuple[float, float, float, float]


def figure(width: float, height: float) -> Figure:
    """A ``width`` × ``height`` inch figure at 100 dpi with constrained layout."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def colors(n: int) -> list[Color]:
    """``n`` colours of the tab10 cycle, so the i-th variant has the same colour in every plot."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def epoch_axes(ax: Axes, has_data: bool, ylabel: str) -> None:
    """Integer epochs on x, a grid, and a legend (or "no data" when nothing was drawn)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if has_data:
        ax.legend(fontsize="small")
    else:
        no_data(ax)


def no_data(ax: Axes) -> None:
    """Say so in the middle of an empty plot."""
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")


@dataclass(frozen=True)
class StepBars:
    """One variant's bars in :func:`turning_rate_plot`.

    Attributes:
        label: the legend entry.
        color: its colour.
        rates: SDE step k (1-based) -> turning-point rate.
        errors: SDE step k -> the error bar's half-height; empty for none.
    """

    label: str
    color: Color
    rates: Mapping[int, float]
    errors: Mapping[int, float] = field(default_factory=dict)


def turning_rate_plot(bars: Sequence[StepBars], title: str, path: Path) -> Path:
    """Grouped bars of the turning-point rate at each SDE step, one bar per variant, to ``path``
    (a PNG; "no data" without bars)."""
    import numpy as np

    steps = sorted({k for b in bars for k in b.rates})
    fig = figure(max(6.0, 1.0 + 0.7 * len(steps)), 4)
    ax = fig.subplots()
    ax.set_title(title)
    ax.set_xlabel("SDE step k")
    ax.set_ylabel("share of trajectories")
    if not bars:
        no_data(ax)
        return save_png(fig, path)
    x = np.arange(len(steps))
    width = 0.8 / len(bars)
    for i, b in enumerate(bars):
        options: dict[str, Any] = {"yerr": [b.errors.get(k, 0.0) for k in steps], "capsize": 2} if b.errors else {}
        heights = [b.rates.get(k, np.nan) for k in steps]
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, heights, width, color=b.color, label=b.label, **options)
    ax.set_xticks(x, [str(k) for k in steps])
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return save_png(fig, path)


def save_png(fig: Figure, path: Path) -> Path:
    """Write ``fig`` to ``path`` as a PNG, atomically (a reader never sees half a file)."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


__all__ = ["StepBars", "colors", "epoch_axes", "figure", "no_data", "save_png", "turning_rate_plot"]
