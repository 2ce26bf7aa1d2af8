"""The ablation study's report: every variant over its seeds.

Reads, for every (variant, seed), ``<runs_dir>/<run name>/metrics.json`` and ``history.csv``
(as the trainer writes them; run names from :func:`run_name`) and writes to ``out_dir``:

- ``study.md``: per variant, the final eval reward (mean ± std over seeds), its gain over the base
  model, the paired difference to the reference variant (same seeds) with a t test, the epochs
  each seed took to reach the reference's final reward, the turning-point rate; then the paired
  difference of every two variants, the per-seed values, and the turning-point rate at each SDE
  step;
- ``study.json``: the same numbers (NaN as null);
- ``study_eval_reward.png``: eval reward against epoch, mean ± std band over seeds;
- ``study_turning_rate_per_step.png``: turning-point rate per SDE step, mean ± std over seeds.

Definitions (all over the seeds whose run finished; a failed run is listed, never averaged):

- final: ``eval_reward`` of metrics.json; delta: final − ``eval_reward_initial`` (the base model
  under the same seed's evaluation noise);
- std: the sample standard deviation (n − 1); none with one seed;
- vs reference (and every pair a, b): the mean and std of final(a, s) − final(b, s) over the
  seeds s both finished; t = mean / (std / √n), and "resolved" when |t| exceeds Student's two-sided 95%
  critical value with n − 1 degrees of freedom;
- epochs to reach: per seed, the first evaluated epoch (0 = the base model) whose eval reward is
  at least the reference's final eval reward on the same seed (same base model evaluation, same
  evaluation noise); none when no evaluation got there. The resolution is ``eval.every``;
- turning-point rate: ``turning/rate`` and ``turning/rate_step_<k>`` of history.csv, averaged
  over epochs, then over seeds; only for variants with ``credit.mode: turning_point`` (the others
  assign no turning points).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from tpgrpo.report import (
    _STEP_COLUMN,
    _atomic_write_text,
    _colors,
    _epoch_axes,
    _figure,
    _no_data,
    _number,
    _read_history,
    _save,
)

MARKDOWN_NAME = "study.md"
JSON_NAME = "study.json"
REWARD_PLOT_NAME = "study_eval_reward.png"
TURNING_PLOT_NAME = "study_turning_rate_per_step.png"
ARTIFACT_DIR = "study"


def run_name(variant: str, seed: int | None, params_seed: int) -> str:
    """A run's name and directory under ``runs_dir``: ``<variant>`` for the params file's seed
    (so ``dvc repro`` and the flows share ``runs/<variant>``), ``<variant>-seed<N>`` otherwise."""
    return variant if seed is None or seed == params_seed else f"{variant}-seed{seed}"


# --------------------------------------------------------------------------- statistics


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n − 1); (None, None) for no values, std None for one."""
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    if n == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def paired_t(differences: Sequence[float]) -> tuple[float | None, bool]:
    """The paired t statistic of ``differences`` and whether it is significant at 5% (two-sided,
    n − 1 degrees of freedom). (None, False) with fewer than two values; an exact, nonzero
    difference on every seed (std 0) is infinitely significant."""
    from scipy.stats import t as student_t

    mean, std = mean_std(differences)
    if mean is None or std is None:
        return None, False
    if std == 0.0:
        return (0.0, False) if mean == 0.0 else (math.copysign(math.inf, mean), True)
    t = mean / (std / math.sqrt(len(differences)))
    return t, abs(t) > float(student_t.ppf(0.975, len(differences) - 1))


def epochs_to_reach(curve: Sequence[tuple[int, float]], target: float) -> int | None:
    """The first epoch of ``curve`` (``(epoch, eval reward)``, in epoch order) whose reward is at
    least ``target``; None when none is."""
    for epoch, value in curve:
        if value >= target:
            return epoch
    return None


@dataclass(frozen=True)
class PairedDifference:
    """``final(a, s) − final(b, s)`` over the seeds s on which both variants finished.

    Attributes:
        a, b: the variants.
        n: the seeds compared.
        mean, std: of the differences (None without seeds; std None with one).
        t, resolved: the paired t statistic and whether it is significant at 5% (two-sided).
        ahead: seeds on which ``a`` finished above ``b``.
    """

    a: str
    b: str
    n: int
    mean: float | None
    std: float | None
    t: float | None
    resolved: bool
    ahead: int


def paired_difference(a: str, a_runs: Sequence["SeedRun"], b: str, b_runs: Sequence["SeedRun"]) -> PairedDifference:
    """The :class:`PairedDifference` of ``a`` minus ``b``, matched by seed."""
    finals = {run.seed: run.final for run in b_runs if run.ok}
    diffs = [run.final - finals[run.seed] for run in a_runs if run.ok and run.seed in finals]
    mean, std = mean_std(diffs)
    t, resolved = paired_t(diffs)
    return PairedDifference(a, b, len(diffs), mean, std, t, resolved, sum(d > 0 for d in diffs))


# --------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class SeedRun:
    """One (variant, seed) as read from its run directory.

    Attributes:
        seed: the seed.
        name: the run name (its directory under ``runs_dir``).
        ok: whether the run finished (metrics.json with an eval reward, and no recorded failure).
        reason: why not, else empty.
        base / final: eval reward before and after training.
        curve: ``(epoch, eval reward)`` of every evaluation, epoch 0 the base model.
        turning_rate: ``turning/rate`` averaged over epochs.
        turning_per_step: ``{k: turning/rate_step_k averaged over epochs}``.
        minutes: the run's training time.
    """

    seed: int
    name: str
    ok: bool
    reason: str = ""
    base: float | None = None
    final: float | None = None
    curve: tuple[tuple[int, float], ...] = ()
    turning_rate: float | None = None
    turning_per_step: dict[int, float] = field(default_factory=dict)
    minutes: float | None = None


def read_seed_run(run_dir: Path, seed: int, failure: str | None = None) -> SeedRun:
    """The :class:`SeedRun` of ``run_dir``; a missing or unreadable metrics.json, or a known
    ``failure``, makes it not ok (never raises)."""
    name = run_dir.name
    if failure is not None:
        return SeedRun(seed, name, False, failure or "failed")
    path = run_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        return SeedRun(seed, name, False, f"no {path}")
    except (OSError, ValueError) as exc:
        return SeedRun(seed, name, False, f"{path}: unreadable ({type(exc).__name__})")
    final = _number(metrics.get("eval_reward")) if isinstance(metrics, dict) else None
    if final is None:
        return SeedRun(seed, name, False, f"{path}: no eval_reward")
    base = _number(metrics.get("eval_reward_initial"))
    history = _read_history(run_dir / "history.csv")
    curve: list[tuple[int, float]] = [] if base is None else [(0, base)]
    turning_rate, per_step = None, {}
    if history is not None:
        if "eval/reward" in history:
            rows = history[history["eval/reward"].notna()]
            curve += [(int(e), float(v)) for e, v in zip(rows["epoch"], rows["eval/reward"])]
        if "turning/rate" in history:
            turning_rate = _number(history["turning/rate"].mean(skipna=True))
        for column in history.columns:
            match = _STEP_COLUMN.match(column)
            value = _number(history[column].mean(skipna=True)) if match else None
            if value is not None:
                per_step[int(match.group(1))] = value
    curve.sort(key=lambda point: point[0])
    return SeedRun(
        seed, name, True, "", base, final, tuple(curve), turning_rate, dict(sorted(per_step.items())),
        _number(metrics.get("minutes")),
    )


# --------------------------------------------------------------------------- one variant


@dataclass(frozen=True)
class VariantSummary:
    """One variant over its seeds (see the module docstring for the definitions).

    Attributes:
        variant: the variant's name.
        runs: every seed's :class:`SeedRun`, in seed order, failed ones included.
        final_mean / final_std, delta_mean / delta_std: over the finished seeds.
        vs_reference_mean / vs_reference_std: the paired difference to the reference (None for
            the reference itself).
        vs_reference_t / resolved: its t statistic, and whether it is significant at 5%.
        wins: finished seeds on which the variant beat the reference, of ``paired`` compared.
        epochs_to_reach: ``{seed: epoch or None}`` for the seeds on which both the variant and the
            reference finished: the epoch the variant first reached the reference's final reward.
        turning_rate_mean: the turning-point rate, mean over seeds.
        turning_per_step_mean / turning_per_step_std: per SDE step k, over seeds.
        minutes_mean: training minutes, mean over seeds.
    """

    variant: str
    runs: tuple[SeedRun, ...]
    final_mean: float | None
    final_std: float | None
    delta_mean: float | None
    delta_std: float | None
    vs_reference_mean: float | None
    vs_reference_std: float | None
    vs_reference_t: float | None
    resolved: bool
    wins: int
    paired: int
    epochs_to_reach: dict[int, int | None]
    turning_rate_mean: float | None
    turning_per_step_mean: dict[int, float]
    turning_per_step_std: dict[int, float | None]
    minutes_mean: float | None

    @property
    def ok_runs(self) -> tuple[SeedRun, ...]:
        return tuple(run for run in self.runs if run.ok)


def summarize(
    variant: str,
    runs: Sequence[SeedRun],
    reference: Sequence[SeedRun] | None,
    *,
    is_reference: bool = False,
    turning_points: bool = True,
) -> VariantSummary:
    """Aggregate one variant's seeds.

    Args:
        variant: its name.
        runs: its runs, one per seed.
        reference: the reference variant's runs (None when the study has no reference): the
            paired difference (not for the reference itself) and epochs to reach.
        is_reference: this variant is the reference.
        turning_points: the variant assigns turning points (``credit.mode: turning_point``); if
            not, its turning-point rates are left empty.
    """
    ok = [run for run in runs if run.ok]
    final_mean, final_std = mean_std([run.final for run in ok])
    deltas = [run.final - run.base for run in ok if run.base is not None]
    delta_mean, delta_std = mean_std(deltas)
    by_seed = {run.seed: run for run in reference or () if run.ok}
    paired = [run for run in ok if run.seed in by_seed]
    vs = paired_difference(variant, [] if is_reference else runs, "reference", reference or ())
    counted = ok if turning_points else []
    steps = sorted({k for run in counted for k in run.turning_per_step})
    per_step = {k: mean_std([run.turning_per_step[k] for run in counted if k in run.turning_per_step]) for k in steps}
    rates = [run.turning_rate for run in counted if run.turning_rate is not None]
    minutes = [run.minutes for run in ok if run.minutes is not None]
    return VariantSummary(
        variant=variant,
        runs=tuple(runs),
        final_mean=final_mean,
        final_std=final_std,
        delta_mean=delta_mean,
        delta_std=delta_std,
        vs_reference_mean=vs.mean,
        vs_reference_std=vs.std,
        vs_reference_t=vs.t,
        resolved=vs.resolved,
        wins=vs.ahead,
        paired=vs.n,
        epochs_to_reach={run.seed: epochs_to_reach(run.curve, by_seed[run.seed].final) for run in paired},
        turning_rate_mean=mean_std(rates)[0],
        turning_per_step_mean={k: v[0] for k, v in per_step.items()},
        turning_per_step_std={k: v[1] for k, v in per_step.items()},
        minutes_mean=mean_std(minutes)[0],
    )


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class StudyReport:
    """What :func:`build_study_report` wrote.

    Attributes:
        summaries: one :class:`VariantSummary` per variant, in input order.
        reference: the reference variant.
        reference_mean: the reference's mean final eval reward (None if none of its seeds finished).
        pairs: the paired difference of every two variants (a listed before b: a − b).
        markdown, markdown_path, json_path, plot_paths: the files.
    """

    summaries: tuple[VariantSummary, ...]
    reference: str
    reference_mean: float | None
    pairs: tuple[PairedDifference, ...]
    markdown: str
    markdown_path: Path
    json_path: Path
    plot_paths: dict[str, Path]

    @property
    def paths(self) -> list[Path]:
        return [self.markdown_path, self.json_path, *self.plot_paths.values()]

    @property
    def failed(self) -> tuple[str, ...]:
        return tuple(run.name for s in self.summaries for run in s.runs if not run.ok)

    def records(self) -> list[dict[str, Any]]:
        """One flat JSON-safe row per variant (the Prefect table artifact)."""
        return [_record(s) for s in self.summaries]


def build_study_report(
    runs_dir: str | Path,
    variants: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | Path,
    *,
    params_seed: int,
    reference: str,
    credit_modes: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    failures: Mapping[str, str] | None = None,
) -> StudyReport:
    """Aggregate the study's runs and write the report (see the module docstring).

    Args:
        runs_dir: the directory of the runs (``<variant>-seed<N>`` or ``<variant>``).
        variants: in the order the table lists them (duplicates dropped).
        seeds: the seeds of the study.
        out_dir: where the files go (created if missing).
        params_seed: the params file's seed (its runs are named ``<variant>``).
        reference: the variant that "vs reference" and "epochs to reach" refer to; when it is
            not among ``variants`` both are left empty.
        credit_modes: each variant's ``credit.mode``; turning-point rates are reported for
            ``turning_point`` variants only (a variant missing here counts as one).
        tracking_uri, parent_run_id: log the files as artifacts (``study/``) of that MLflow run,
            and each variant's mean and std of the final eval reward as its metrics.
        failures: run names known to have failed, with a reason.

    Returns:
        The :class:`StudyReport`. Missing or failed runs never make this raise.
    """
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    failures = dict(failures or {})
    names = list(dict.fromkeys(variants))
    seeds = list(dict.fromkeys(seeds))
    runs = {}
    for variant in names:
        runs[variant] = [
            read_seed_run(runs_dir / run_name(variant, seed, params_seed), seed, failures.get(run_name(variant, seed, params_seed)))
            for seed in seeds
        ]
    reference_runs = runs.get(reference)
    reference_mean = None if reference_runs is None else mean_std([r.final for r in reference_runs if r.ok])[0]
    modes = dict(credit_modes or {})
    summaries = tuple(
        summarize(
            v,
            runs[v],
            reference_runs,
            is_reference=v == reference,
            turning_points=modes.get(v, "turning_point") == "turning_point",
        )
        for v in names
    )
    pairs = tuple(
        paired_difference(a, runs[a], b, runs[b]) for i, a in enumerate(names) for b in names[i + 1 :]
    )
    markdown = _markdown(summaries, pairs, reference if reference_runs is not None else None, seeds, runs_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown_path, json_path = out_dir / MARKDOWN_NAME, out_dir / JSON_NAME
    _atomic_write_text(markdown_path, markdown)
    payload = {
        "reference": reference,
        "reference_mean": reference_mean,
        "seeds": seeds,
        "variants": {s.variant: asdict(s) for s in summaries},
        "paired_differences": [asdict(p) for p in pairs],
    }
    _atomic_write_text(json_path, json.dumps(_json_safe(payload), indent=2, allow_nan=False) + "\n")
    plot_paths = {
        "study_eval_reward": _reward_plot(summaries, reference_mean, reference, out_dir / REWARD_PLOT_NAME),
        "study_turning_rate_per_step": _turning_plot(summaries, out_dir / TURNING_PLOT_NAME),
    }
    report = StudyReport(summaries, reference, reference_mean, pairs, markdown, markdown_path, json_path, plot_paths)
    if tracking_uri and parent_run_id:
        log_study_to_mlflow(report, tracking_uri, parent_run_id)
    return report


# --------------------------------------------------------------------------- markdown and JSON


def _pm(mean: float | None, std: float | None, *, signed: bool = False, digits: int = 3) -> str:
    if mean is None:
        return "n/a"
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text if std is None else f"{text} ± {std:.{digits}f}"


def _epochs_cell(values: Mapping[int, int | None]) -> str:
    if not values:
        return "n/a"
    reached = [v for v in values.values() if v is not None]
    listed = ", ".join("–" if v is None else str(v) for v in values.values())
    return f"{len(reached)}/{len(values)} ({listed})"


def _markdown(
    summaries: Sequence[VariantSummary],
    pairs: Sequence[PairedDifference],
    reference: str | None,
    seeds: Sequence[int],
    runs_dir: Path,
) -> str:
    ref = reference or "(not run)"
    lines = [
        "# Ablation study",
        "",
        f"Runs in `{runs_dir}/`, seeds {', '.join(map(str, seeds))}. Final eval reward: the last "
        "evaluation (test prompts, ODE, EMA weights), mean ± std over seeds; delta: final − base "
        f"model; vs `{ref}`: the paired difference on the same seeds, with Student's t (resolved: "
        f"significant at 5%, two-sided), and the seeds on which the variant is ahead; reached: the seeds "
        f"on which the variant's eval reward got to `{ref}`'s final reward on the same seed, and the "
        "first evaluated epoch that did, per seed (0 = base model, – = never). Turning-point rate: "
        "share of (trajectory, step) pairs, TP-GRPO credit only.",
        "",
        "| variant | seeds | final eval reward | delta | vs " + ref + " | t | resolved | ahead | reached (epoch per seed) | turning-point rate | minutes |",
        "|---|---:|---:|---:|---:|---:|---|---:|---|---:|---:|",
    ]
    for s in summaries:
        is_ref = s.variant == reference
        t = "" if is_ref or s.vs_reference_t is None else f"{s.vs_reference_t:+.2f}"
        cells = [
            f"`{s.variant}`",
            f"{len(s.ok_runs)}/{len(s.runs)}",
            _pm(s.final_mean, s.final_std),
            _pm(s.delta_mean, s.delta_std, signed=True),
            "(reference)" if is_ref else _pm(s.vs_reference_mean, s.vs_reference_std, signed=True),
            t,
            "" if is_ref or s.vs_reference_t is None else ("yes" if s.resolved else "no"),
            "" if is_ref or not s.paired else f"{s.wins}/{s.paired}",
            _epochs_cell(s.epochs_to_reach),
            "n/a" if s.turning_rate_mean is None else f"{s.turning_rate_mean:.3f}",
            "n/a" if s.minutes_mean is None else f"{s.minutes_mean:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    resolved = [s for s in summaries if s.variant != reference and s.resolved]
    unresolved = [s for s in summaries if s.variant != reference and s.vs_reference_t is not None and not s.resolved]
    if reference is not None and (resolved or unresolved):
        lines.append("")
        if resolved:
            parts = [f"`{s.variant}` ({'ahead' if s.vs_reference_mean > 0 else 'behind'})" for s in resolved]
            lines.append(f"Resolved against `{reference}` at 5%: {', '.join(parts)}.")
        else:
            lines.append(f"No variant differs from `{reference}` significantly at 5% with these seeds.")
        if unresolved:
            lines.append(f"Within seed noise: {', '.join(f'`{s.variant}`' for s in unresolved)}.")

    if len(summaries) > 2:
        names = [s.variant for s in summaries]
        by_pair = {(p.a, p.b): p for p in pairs}
        lines += [
            "",
            "Paired differences of the final eval reward, row − column, mean over the seeds both "
            "finished (t; * = significant at 5%):",
            "",
            "| | " + " | ".join(f"`{n}`" for n in names[1:]) + " |",
            "|---|" + "---:|" * (len(names) - 1),
        ]
        for i, row in enumerate(names[:-1]):
            cells = []
            for j, column in enumerate(names[1:], start=1):
                p = by_pair.get((row, column))
                if j <= i:
                    cells.append("")
                elif p is None or p.mean is None:
                    cells.append("n/a")
                else:
                    t = "" if p.t is None else f" ({p.t:+.2f}{'*' if p.resolved else ''})"
                    cells.append(f"{p.mean:+.3f}{t}")
            lines.append(f"| `{row}` | " + " | ".join(cells) + " |")

    lines += ["", "Final eval reward per seed:", ""]
    lines.append("| variant | " + " | ".join(f"seed {seed}" for seed in seeds) + " |")
    lines.append("|---|" + "---:|" * len(seeds))
    for s in summaries:
        cells = ["n/a (failed)" if not run.ok else f"{run.final:.3f}" for run in s.runs]
        lines.append(f"| `{s.variant}` | " + " | ".join(cells) + " |")

    steps = sorted({k for s in summaries for k in s.turning_per_step_mean})
    if steps:
        lines += ["", "Turning-point rate per SDE step k (share of trajectories, mean over epochs and seeds):", ""]
        lines.append("| variant | " + " | ".join(f"k={k}" for k in steps) + " |")
        lines.append("|---|" + "---:|" * len(steps))
        for s in summaries:
            if s.turning_per_step_mean:
                cells = [_pm(s.turning_per_step_mean.get(k), s.turning_per_step_std.get(k)) for k in steps]
                lines.append(f"| `{s.variant}` | " + " | ".join(cells) + " |")

    failed = [(s.variant, run) for s in summaries for run in s.runs if not run.ok]
    if failed:
        lines += ["", "Failed or missing runs (left out of every statistic):", ""]
        lines += [f"- `{run.name}`: {' '.join(run.reason.split())}" for _, run in failed]
    return "\n".join(lines) + "\n"


def _record(s: VariantSummary) -> dict[str, Any]:
    return _json_safe(
        {
            "variant": s.variant,
            "seeds_ok": len(s.ok_runs),
            "seeds": len(s.runs),
            "final_mean": s.final_mean,
            "final_std": s.final_std,
            "delta_mean": s.delta_mean,
            "delta_std": s.delta_std,
            "vs_reference_mean": s.vs_reference_mean,
            "vs_reference_std": s.vs_reference_std,
            "vs_reference_t": s.vs_reference_t,
            "resolved": s.resolved,
            "epochs_to_reach": ", ".join("-" if v is None else str(v) for v in s.epochs_to_reach.values()),
            "turning_rate": s.turning_rate_mean,
            "minutes": s.minutes_mean,
        }
    )


def _json_safe(node: Any) -> Any:
    """Mappings with string keys (seeds, steps), tuples as lists, infinities as strings."""
    if isinstance(node, dict):
        return {str(k): _json_safe(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_json_safe(v) for v in node]
    if isinstance(node, float) and not math.isfinite(node):
        return None if math.isnan(node) else ("inf" if node > 0 else "-inf")
    return node


# --------------------------------------------------------------------------- plots


def mean_curve(runs: Sequence[SeedRun]) -> list[tuple[int, float, float | None]]:
    """``(epoch, mean, std)`` over the finished seeds, at every epoch that all of them evaluated."""
    ok = [dict(run.curve) for run in runs if run.ok]
    if not ok:
        return []
    epochs = sorted(set.intersection(*(set(c) for c in ok)))
    out = []
    for epoch in epochs:
        mean, std = mean_std([c[epoch] for c in ok])
        out.append((epoch, mean, std))
    return out


def _reward_plot(summaries: Sequence[VariantSummary], reference_mean: float | None, reference: str, path: Path) -> Path:
    fig = _figure(8, 4.5)
    ax = fig.subplots()
    ax.set_title("eval reward (test prompts, ODE), mean ± std over seeds")
    drawn = False
    for s, color in zip(summaries, _colors(len(summaries))):
        curve = mean_curve(s.runs)
        if not curve:
            continue
        epochs = [e for e, _, _ in curve]
        means = [m for _, m, _ in curve]
        ax.plot(epochs, means, color=color, marker="o", label=f"{s.variant} (n={len(s.ok_runs)})")
        if all(sd is not None for _, _, sd in curve):
            ax.fill_between(epochs, [m - sd for _, m, sd in curve], [m + sd for _, m, sd in curve], color=color, alpha=0.12)
        drawn = True
    if reference_mean is not None:
        ax.axhline(reference_mean, color="grey", linestyle=":", label=f"{reference} mean final")
    _epoch_axes(ax, drawn, "eval reward")
    return _save(fig, path)


def _turning_plot(summaries: Sequence[VariantSummary], path: Path) -> Path:
    import numpy as np

    with_rates = [s for s in summaries if s.turning_per_step_mean]
    steps = sorted({k for s in with_rates for k in s.turning_per_step_mean})
    fig = _figure(max(6.0, 1.0 + 0.7 * len(steps)), 4)
    ax = fig.subplots()
    ax.set_title("turning-point rate per SDE step (mean ± std over seeds)")
    ax.set_xlabel("SDE step k")
    ax.set_ylabel("share of trajectories")
    if with_rates:
        x = np.arange(len(steps))
        width = 0.8 / len(with_rates)
        colors = dict(zip([s.variant for s in summaries], _colors(len(summaries))))
        for i, s in enumerate(with_rates):
            heights = [s.turning_per_step_mean.get(k, np.nan) for k in steps]
            errors = [s.turning_per_step_std.get(k) or 0.0 for k in steps]
            ax.bar(x + (i - (len(with_rates) - 1) / 2) * width, heights, width, yerr=errors, capsize=2,
                   color=colors[s.variant], label=s.variant)
        ax.set_xticks(x, [str(k) for k in steps])
        ax.legend(fontsize="small")
        ax.grid(axis="y", alpha=0.3)
    else:
        _no_data(ax)
    return _save(fig, path)


# --------------------------------------------------------------------------- MLflow


def log_study_to_mlflow(report: StudyReport, tracking_uri: str, run_id: str) -> None:
    """Log the files as artifacts (``study/``) of ``run_id`` and each variant's
    ``study/<variant>/final_mean`` and ``final_std`` as its metrics (by id, whatever the run's
    status)."""
    import time

    from tpgrpo.tracking import sanitize_name  # sets MLflow's no-telemetry variables first

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=tracking_uri)
    for path in report.paths:
        client.log_artifact(run_id, str(path), artifact_path=ARTIFACT_DIR)
    now = int(time.time() * 1000)
    metrics = []
    for s in report.summaries:
        for key, value in (("final_mean", s.final_mean), ("final_std", s.final_std)):
            if value is not None:
                metrics.append(Metric(sanitize_name(f"study/{s.variant}/{key}"), value, now, 0))
    if metrics:
        client.log_batch(run_id, metrics=metrics)


__all__ = [
    "SeedRun",
    "StudyReport",
    "VariantSummary",
    "PairedDifference",
    "build_study_report",
    "epochs_to_reach",
    "log_study_to_mlflow",
    "mean_curve",
    "mean_std",
    "paired_difference",
    "paired_t",
    "read_seed_run",
    "run_name",
    "summarize",
]
