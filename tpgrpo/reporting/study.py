"""A seeded study's report: every variant over its seeds, with intervals and power.

Reads, for every (variant, seed), the run directory the trainer wrote, with
:func:`tpgrpo.rundir.read_run` (``metrics.json``, ``history.csv``, ``timing.csv``) and its
per-prompt scores (``eval_scores/epoch_<N>.csv``), and writes to ``out_dir``, named after the
study:

- ``<study>.md``: per variant, the final eval reward, its gain over the base model and the paired
  difference to the reference variant, each with its 95% interval; the smallest difference the
  seeds can detect (80% power); the evaluation's noise and the seeds' noise; epochs to reach the
  reference; held-in vs held-out prompts; the training reward of the evaluation images;
  per-constraint gains and differences; every pair of variants; the per-seed values;
- ``<study>.json``: the same numbers (NaN as null), with ``study``, ``seeds`` and
  ``eval_prompts`` at the top;
- ``<study>_eval_reward.png``: eval reward against epoch, mean ± std band over seeds;
- ``<study>_turning_rate_per_step.png``: turning-point rate per SDE step, mean ± std over seeds.

Definitions (all over the seeds whose run finished; a failed run is listed, never averaged):

- final: ``eval_reward`` of metrics.json; gain: final − ``eval_reward_initial`` (the base model
  under the same seed's evaluation noise), a paired difference like the others;
- a paired difference of a and b: final(a, s) − final(b, s) over the seeds both finished, with
  the estimate of :func:`tpgrpo.reporting.stats.paired_estimate`: mean, Student's t 95% interval
  (n − 1 df), p value, the detectable effect at 80% power, and the split of its spread into the
  evaluation's noise (bootstrap over the test prompts of each seed's per-prompt differences) and
  the seeds';
- epochs to reach: per seed, the first evaluated epoch (0 = the base model) whose eval reward is
  at least the reference's final eval reward on the same seed; none when no evaluation got there;
- held-in: the evaluation reward on ``eval.heldin_prompts`` train prompts, when the runs
  evaluated them; train reward: the training reward of the evaluation's images;
- turning-point rate: ``turning/rate`` and ``turning/rate_step_<k>`` of history.csv, averaged
  over epochs, then over seeds; only for variants with ``credit.mode: turning_point``;
- minutes: each run's training time from its ``timing.csv``. The study's files are not DVC
  outputs, so they may hold wall-clock time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from tpgrpo.config import DEFAULT_STUDY
from tpgrpo.fileio import atomic_write_json, atomic_write_text
from tpgrpo.reporting.plots import StepBars, colors, epoch_axes, figure, save_png, turning_rate_plot
from tpgrpo.reporting.stats import PairedEstimate, bootstrap_variance, mean_std, paired_estimate, seeds_for_half_width
from tpgrpo.rundir import read_eval_scores, read_run
from tpgrpo.tracking import log_metrics_to_run, log_to_run

ARTIFACT_DIR = "study"
# Per-constraint components of the verifiable reward, in the order the report lists them.
CONSTRAINTS = ("color", "count", "shape", "position", "background")


def study_files(out_dir: Path, study: str) -> dict[str, Path]:
    """The files a study's report writes: markdown, json and the two plots."""
    return {
        "markdown": out_dir / f"{study}.md",
        "json": out_dir / f"{study}.json",
        "eval_reward": out_dir / f"{study}_eval_reward.png",
        "turning_rate_per_step": out_dir / f"{study}_turning_rate_per_step.png",
    }


# --------------------------------------------------------------------------- statistics


def epochs_to_reach(curve: Sequence[tuple[int, float]], target: float) -> int | None:
    """The first epoch of ``curve`` (``(epoch, eval reward)``, in epoch order) whose reward is at
    least ``target``; None when none is."""
    for epoch, value in curve:
        if value >= target:
            return epoch
    return None


@dataclass(frozen=True)
class PairedDifference:
    """``value(a, s) − value(b, s)`` over the seeds s on which both finished.

    Attributes:
        a, b: what is compared (variant names, or a variant and its base model).
        estimate: the :class:`~tpgrpo.reporting.stats.PairedEstimate` (interval, power, noise split).
        ahead: seeds on which ``a`` finished above ``b``.
        differences: ``{seed: difference}``.
    """

    a: str
    b: str
    estimate: PairedEstimate
    ahead: int
    differences: dict[int, float] = field(default_factory=dict)


class Paired(NamedTuple):
    """One seed's values of the two sides of a :class:`PairedDifference`.

    Attributes:
        seed: the seed.
        a, b: the two values.
        per_prompt: the per-prompt differences a − b of the evaluation, or None.
    """

    seed: int
    a: float
    b: float
    per_prompt: Sequence[float] | None = None


def paired_difference(a: str, b: str, pairs: Sequence[Paired]) -> PairedDifference:
    """The :class:`PairedDifference` of one :class:`Paired` row per seed. The evaluation's noise
    is split off only when every row has per-prompt differences."""
    diffs = {p.seed: p.a - p.b for p in pairs}
    variances = None
    if pairs and all(p.per_prompt is not None and len(p.per_prompt) for p in pairs):
        variances = [bootstrap_variance(p.per_prompt, seed=p.seed) for p in pairs]
    estimate = paired_estimate(list(diffs.values()), variances)
    return PairedDifference(a, b, estimate, sum(d > 0 for d in diffs.values()), diffs)


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
        details / details_initial: the other ``eval_*`` metrics after and before training
            (per-constraint means, ``heldin_reward``, ``train_reward``).
        scores / base_scores: per-prompt eval rewards of the final and the base evaluation
            (``eval_scores/epoch_<N>.csv``); None when the run did not write them.
        curve: ``(epoch, eval reward)`` of every evaluation, epoch 0 the base model.
        turning_rate: ``turning/rate`` averaged over epochs.
        turning_per_step: ``{k: turning/rate_step_k averaged over epochs}``.
        minutes: the run's training time (``timing.csv``).
    """

    seed: int
    name: str
    ok: bool
    reason: str = ""
    base: float | None = None
    final: float | None = None
    details: dict[str, float] = field(default_factory=dict)
    details_initial: dict[str, float] = field(default_factory=dict)
    scores: tuple[float, ...] | None = field(default=None, repr=False)
    base_scores: tuple[float, ...] | None = field(default=None, repr=False)
    curve: tuple[tuple[int, float], ...] = ()
    turning_rate: float | None = None
    turning_per_step: dict[int, float] = field(default_factory=dict)
    minutes: float | None = None

    @property
    def eval_prompts(self) -> int | None:
        """How many test prompts the final evaluation scored (None when unknown)."""
        return None if self.scores is None else len(self.scores)


def read_seed_run(run_dir: Path, seed: int, failure: str | None = None) -> SeedRun:
    """The :class:`SeedRun` of ``run_dir`` (:func:`tpgrpo.rundir.read_run`); a missing or
    unreadable metrics.json, or a known ``failure``, makes it not ok (never raises)."""
    record = read_run(run_dir, failure)
    if not record.ok:
        return SeedRun(seed, record.name, False, record.reason)
    epochs = record.metrics.get("epochs")
    return SeedRun(
        seed=seed,
        name=record.name,
        ok=True,
        base=record.base_reward,
        final=record.reward,
        details=record.details(),
        details_initial=record.details(initial=True),
        scores=read_eval_scores(run_dir, epochs) if isinstance(epochs, int) else None,
        base_scores=read_eval_scores(run_dir, 0),
        curve=tuple(record.reward_curve()),
        turning_rate=record.turning_rate(),
        turning_per_step=dict(sorted(record.turning_rate_per_step().items())),
        minutes=record.minutes,
    )


def _per_prompt(a: tuple[float, ...] | None, b: tuple[float, ...] | None) -> list[float] | None:
    if a is None or b is None or len(a) != len(b):
        return None
    return [x - y for x, y in zip(a, b)]


# --------------------------------------------------------------------------- one variant


@dataclass(frozen=True)
class VariantSummary:
    """One variant over its seeds (see the module docstring for the definitions).

    Attributes:
        variant: the variant's name.
        runs: every seed's :class:`SeedRun`, in seed order, failed ones included.
        final_mean / final_std: the final eval reward over the finished seeds.
        gain: final − base model, paired by seed.
        vs_reference: the paired difference to the reference (None for the reference itself,
            and when the study has no reference).
        epochs_to_reach: ``{seed: epoch or None}`` for the seeds on which both the variant and the
            reference finished: the epoch the variant first reached the reference's final reward.
        extra_gains: final − base of the other metrics both evaluations have (per-constraint
            means, ``heldin_reward``, ``train_reward``), paired by seed.
        extra_vs_reference: the same metrics' paired difference to the reference.
        turning_rate_mean: the turning-point rate, mean over seeds.
        turning_per_step_mean / turning_per_step_std: per SDE step k, over seeds.
        minutes_mean: training minutes, mean over seeds.
    """

    variant: str
    runs: tuple[SeedRun, ...]
    final_mean: float | None
    final_std: float | None
    gain: PairedDifference
    vs_reference: PairedDifference | None
    epochs_to_reach: dict[int, int | None]
    extra_gains: dict[str, PairedDifference]
    extra_vs_reference: dict[str, PairedDifference]
    turning_rate_mean: float | None
    turning_per_step_mean: dict[int, float]
    turning_per_step_std: dict[int, float | None]
    minutes_mean: float | None

    @property
    def ok_runs(self) -> tuple[SeedRun, ...]:
        return tuple(run for run in self.runs if run.ok)


def _final_difference(a: str, a_runs: Sequence[SeedRun], b: str, b_runs: Sequence[SeedRun]) -> PairedDifference:
    by_seed = {run.seed: run for run in b_runs if run.ok}
    rows = [
        Paired(run.seed, run.final, by_seed[run.seed].final, _per_prompt(run.scores, by_seed[run.seed].scores))
        for run in a_runs
        if run.ok and run.seed in by_seed
    ]
    return paired_difference(a, b, rows)


def _extra_keys(runs: Sequence[SeedRun]) -> list[str]:
    keys = {k for run in runs if run.ok for k in run.details}
    order = [*CONSTRAINTS, "heldin_reward", "train_reward"]
    return [k for k in order if k in keys] + sorted(keys - set(order))


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
    gain = paired_difference(
        variant,
        "base model",
        [Paired(r.seed, r.final, r.base, _per_prompt(r.scores, r.base_scores)) for r in ok if r.base is not None],
    )
    compare = reference is not None and not is_reference
    by_seed = {run.seed: run for run in reference or () if run.ok}
    vs = _final_difference(variant, runs, "reference", reference) if compare else None
    extra_gains, extra_vs = {}, {}
    for key in _extra_keys(runs):
        rows = [Paired(r.seed, r.details[key], r.details_initial[key]) for r in ok if key in r.details and key in r.details_initial]
        if rows:
            extra_gains[key] = paired_difference(variant, "base model", rows)
        if compare:
            rows = [
                Paired(r.seed, r.details[key], by_seed[r.seed].details[key])
                for r in ok
                if r.seed in by_seed and key in r.details and key in by_seed[r.seed].details
            ]
            if rows:
                extra_vs[key] = paired_difference(variant, "reference", rows)
    counted = ok if turning_points else []
    steps = sorted({k for run in counted for k in run.turning_per_step})
    per_step = {k: mean_std([run.turning_per_step[k] for run in counted if k in run.turning_per_step]) for k in steps}
    rates = [run.turning_rate for run in counted if run.turning_rate is not None]
    minutes = [run.minutes for run in ok if run.minutes is not None]
    paired = [run for run in ok if run.seed in by_seed]
    return VariantSummary(
        variant=variant,
        runs=tuple(runs),
        final_mean=final_mean,
        final_std=final_std,
        gain=gain,
        vs_reference=vs,
        epochs_to_reach={run.seed: epochs_to_reach(run.curve, by_seed[run.seed].final) for run in paired},
        extra_gains=extra_gains,
        extra_vs_reference=extra_vs,
        turning_rate_mean=mean_std(rates).mean,
        turning_per_step_mean={k: v.mean for k, v in per_step.items()},
        turning_per_step_std={k: v.std for k, v in per_step.items()},
        minutes_mean=mean_std(minutes).mean,
    )


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class StudyReport:
    """What :func:`build_study_report` wrote.

    Attributes:
        study: the study's name.
        summaries: one :class:`VariantSummary` per variant, in input order.
        reference: the reference variant.
        reference_mean: the reference's mean final eval reward (None if none of its seeds finished).
        pairs: the paired difference of every two variants (a listed before b: a − b).
        eval_prompts: test prompts of the final evaluations (None when unknown or mixed).
        markdown, markdown_path, json_path, plot_paths: the files.
    """

    study: str
    summaries: tuple[VariantSummary, ...]
    reference: str
    reference_mean: float | None
    pairs: tuple[PairedDifference, ...]
    eval_prompts: int | None
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
    name_of: Callable[[str, int], str],
    reference: str,
    study: str = DEFAULT_STUDY,
    credit_modes: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    failures: Mapping[str, str] | None = None,
    command: str | None = None,
) -> StudyReport:
    """Aggregate the study's runs and write the report (see the module docstring).

    Args:
        runs_dir: the directory of the runs.
        variants: in the order the table lists them (duplicates dropped).
        seeds: the seeds of the study.
        out_dir: where the files go (created if missing).
        name_of: the run name (directory under ``runs_dir``) of a (variant, seed).
        reference: the variant that "vs reference" and "epochs to reach" refer to; when it is
            not among ``variants`` both are left empty.
        study: the study's name (names the files).
        credit_modes: each variant's ``credit.mode``; turning-point rates are reported for
            ``turning_point`` variants only (a variant missing here counts as one).
        tracking_uri, parent_run_id: log the files as artifacts (``study/``) of that MLflow run,
            and each variant's mean and std of the final eval reward as its metrics.
        failures: run names known to have failed, with a reason.
        command: the command that runs the study (quoted in the report).

    Returns:
        The :class:`StudyReport`. Missing or failed runs never make this raise.
    """
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    failures = dict(failures or {})
    names = list(dict.fromkeys(variants))
    seeds = list(dict.fromkeys(seeds))
    runs = {
        variant: [read_seed_run(runs_dir / name_of(variant, seed), seed, failures.get(name_of(variant, seed))) for seed in seeds]
        for variant in names
    }
    reference_runs = runs.get(reference)
    reference_mean = None if reference_runs is None else mean_std([r.final for r in reference_runs if r.ok]).mean
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
    pairs = tuple(_final_difference(a, runs[a], b, runs[b]) for i, a in enumerate(names) for b in names[i + 1 :])
    sizes = {run.eval_prompts for rs in runs.values() for run in rs if run.ok}
    eval_prompts = sizes.pop() if len(sizes) == 1 else None
    files = study_files(out_dir, study)
    markdown = _markdown(
        study, summaries, pairs, reference if reference_runs is not None else None, seeds, runs_dir, eval_prompts, command
    )
    atomic_write_text(files["markdown"], markdown)
    payload = {
        "study": study,
        "command": command,
        "seeds": seeds,
        "eval_prompts": eval_prompts,
        "reference": reference,
        "reference_mean": reference_mean,
        "variants": {s.variant: _variant_json(s) for s in summaries},
        "paired_differences": [_pair_json(p) for p in pairs],
    }
    atomic_write_json(files["json"], _json_safe(payload))
    plot_paths = {
        f"{study}_eval_reward": _reward_plot(summaries, reference_mean, reference, files["eval_reward"]),
        f"{study}_turning_rate_per_step": _turning_plot(summaries, files["turning_rate_per_step"]),
    }
    report = StudyReport(
        study, summaries, reference, reference_mean, pairs, eval_prompts, markdown, files["markdown"], files["json"], plot_paths
    )
    if tracking_uri and parent_run_id:
        log_study_to_mlflow(report, tracking_uri, parent_run_id)
    return report


# --------------------------------------------------------------------------- markdown and JSON


def _pm(mean: float | None, std: float | None, *, signed: bool = False, digits: int = 3) -> str:
    if mean is None:
        return "n/a"
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text if std is None else f"{text} ± {std:.{digits}f}"


def _ci(p: PairedDifference | None, digits: int = 3) -> str:
    """``+0.012 [−0.003, +0.027]``; the mean alone with one seed."""
    if p is None or p.estimate.mean is None:
        return "n/a"
    e = p.estimate
    text = f"{e.mean:+.{digits}f}"
    return text if e.ci_low is None else f"{text} [{e.ci_low:+.{digits}f}, {e.ci_high:+.{digits}f}]"


def _epochs_cell(values: Mapping[int, int | None]) -> str:
    if not values:
        return "n/a"
    reached = [v for v in values.values() if v is not None]
    listed = ", ".join("–" if v is None else str(v) for v in values.values())
    return f"{len(reached)}/{len(values)} ({listed})"


def _power_sentence(a: str, b: str, p: PairedDifference, eval_prompts: int | None) -> str:
    e = p.estimate
    if e.mean is None:
        return f"- `{a}` − `{b}`: no seed finished both."
    if e.ci_low is None:
        return f"- `{a}` − `{b}`: {e.mean:+.4f} from one seed; no interval."
    verdict = "resolved: the interval excludes 0" if p.estimate.resolved else "not resolved: the interval contains 0"
    text = (
        f"- `{a}` − `{b}`: {e.mean:+.4f}, 95% interval [{e.ci_low:+.4f}, {e.ci_high:+.4f}] (±{e.half_width:.4f}, "
        f"n = {e.n}, p = {e.p_value:.3g}; {verdict}); `{a}` ahead on {p.ahead}/{e.n} seeds. "
        f"Smallest true difference these seeds detect with 80% power: {e.detectable:.4f}. "
        f"One seed's difference varies with sd {e.std:.4f}"
    )
    if e.eval_std is not None:
        prompts = f"{eval_prompts} test prompts" if eval_prompts else "the test prompts"
        text += f": evaluation {e.eval_std:.4f} (bootstrap over {prompts}), seeds {e.seed_std:.4f}"
    needed = seeds_for_half_width(e.std, 0.01)
    text += f". A ±0.01 interval would take {needed} seeds at this spread." if needed else "."
    return text


def _markdown(
    study: str,
    summaries: Sequence[VariantSummary],
    pairs: Sequence[PairedDifference],
    reference: str | None,
    seeds: Sequence[int],
    runs_dir: Path,
    eval_prompts: int | None,
    command: str | None,
) -> str:
    ref = reference or "(not run)"
    prompts = f"{eval_prompts} held-out test prompts" if eval_prompts else "the held-out test prompts"
    lines = [f"# Study `{study}`", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [
        f"Runs in `{_display(runs_dir)}/`, seeds {', '.join(map(str, seeds))}. Final: the last evaluation "
        f"(strict eval reward on {prompts}, ODE, EMA weights), mean ± std over seeds. Gain: final − "
        "base model on the same seed. vs `" + ref + "`: the paired difference on the same seeds. "
        "Brackets: 95% intervals (Student's t, n − 1 df). Detectable: the smallest true difference "
        "to the reference that these seeds detect with 80% power (two-sided, 5%). Reached: seeds on "
        f"which the variant's eval reward got to `{ref}`'s final reward, and the first evaluated "
        "epoch that did (0 = base model, – = never). Turning-point rate: share of (trajectory, "
        "step) pairs, TP-GRPO credit only.",
        "",
        f"| variant | seeds | final | gain over base | vs {ref} | p | detectable | ahead | reached (epoch per seed) | turning-point rate | minutes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for s in summaries:
        vs = s.vs_reference
        e = vs.estimate if vs is not None else None
        cells = [
            f"`{s.variant}`",
            f"{len(s.ok_runs)}/{len(s.runs)}",
            _pm(s.final_mean, s.final_std),
            _ci(s.gain),
            "(reference)" if s.variant == reference else _ci(vs),
            "" if e is None or e.p_value is None else f"{e.p_value:.3g}",
            "" if e is None or e.detectable is None else f"{e.detectable:.3f}",
            "" if vs is None or not e.n else f"{vs.ahead}/{e.n}",
            _epochs_cell(s.epochs_to_reach),
            "n/a" if s.turning_rate_mean is None else f"{s.turning_rate_mean:.3f}",
            "n/a" if s.minutes_mean is None else f"{s.minutes_mean:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")

    compared = [s for s in summaries if s.vs_reference is not None]
    if compared:
        lines += ["", f"Against `{ref}`, with the power of this study:", ""]
        lines += [_power_sentence(s.variant, ref, s.vs_reference, eval_prompts) for s in compared]

    extra = [k for k in ("heldin_reward", "train_reward") if any(k in s.extra_gains for s in summaries)]
    if extra:
        labels = {"heldin_reward": "held-in (train prompts)", "train_reward": "training reward of the eval images"}
        lines += [
            "",
            "Gain over the base model where it is measured: held-out test prompts (the eval reward), "
            "held-in train prompts (same reward, prompts RL trained on) and the training reward "
            "(graded) of the test images:",
            "",
            "| variant | held-out | " + " | ".join(labels[k] for k in extra) + " |",
            "|---|---:|" + "---:|" * len(extra),
        ]
        for s in summaries:
            lines.append(f"| `{s.variant}` | {_ci(s.gain)} | " + " | ".join(_ci(s.extra_gains.get(k)) for k in extra) + " |")

    constraints = [c for c in CONSTRAINTS if any(c in s.extra_gains for s in summaries)]
    if constraints:
        lines += [
            "",
            "Per constraint (share of prompts whose constraint holds): gain over the base model, and "
            f"the paired difference to `{ref}`:",
            "",
            "| variant | " + " | ".join(f"{c} gain" for c in constraints) + " | " + " | ".join(f"{c} vs {ref}" for c in constraints) + " |",
            "|---|" + "---:|" * (2 * len(constraints)),
        ]
        for s in summaries:
            gains = [_ci(s.extra_gains.get(c)) for c in constraints]
            diffs = ["" if s.variant == reference else _ci(s.extra_vs_reference.get(c)) for c in constraints]
            lines.append(f"| `{s.variant}` | " + " | ".join(gains + diffs) + " |")

    if len(summaries) > 2:
        names = [s.variant for s in summaries]
        by_pair = {(p.a, p.b): p for p in pairs}
        lines += [
            "",
            "Paired differences of the final eval reward, row − column, over the seeds both finished "
            "[95% interval]:",
            "",
            "| | " + " | ".join(f"`{n}`" for n in names[1:]) + " |",
            "|---|" + "---:|" * (len(names) - 1),
        ]
        for i, row in enumerate(names[:-1]):
            cells = ["" if j <= i else _ci(by_pair.get((row, column))) for j, column in enumerate(names[1:], start=1)]
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


def _display(path: Path) -> str:
    """``path`` relative to the working directory when it lies under it (reports are committed)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _pair_json(p: PairedDifference) -> dict[str, Any]:
    return {"a": p.a, "b": p.b, **asdict(p.estimate), "resolved": p.estimate.resolved, "ahead": p.ahead, "differences": p.differences}


def _variant_json(s: VariantSummary) -> dict[str, Any]:
    return {
        "final_mean": s.final_mean,
        "final_std": s.final_std,
        "gain": _pair_json(s.gain),
        "vs_reference": None if s.vs_reference is None else _pair_json(s.vs_reference),
        "epochs_to_reach": s.epochs_to_reach,
        "gains": {k: _pair_json(v) for k, v in s.extra_gains.items()},
        "vs_reference_by_metric": {k: _pair_json(v) for k, v in s.extra_vs_reference.items()},
        "turning_rate_mean": s.turning_rate_mean,
        "turning_per_step_mean": s.turning_per_step_mean,
        "turning_per_step_std": s.turning_per_step_std,
        "minutes_mean": s.minutes_mean,
        "runs": [
            {k: v for k, v in asdict(run).items() if k not in ("scores", "base_scores")} | {"eval_prompts": run.eval_prompts}
            for run in s.runs
        ],
    }


def _record(s: VariantSummary) -> dict[str, Any]:
    vs = s.vs_reference.estimate if s.vs_reference is not None else None
    return _json_safe(
        {
            "variant": s.variant,
            "seeds_ok": len(s.ok_runs),
            "seeds": len(s.runs),
            "final_mean": _round(s.final_mean),
            "final_std": _round(s.final_std),
            "gain": _round(s.gain.estimate.mean),
            "gain_ci": _ci(s.gain),
            "vs_reference": _round(vs.mean if vs else None),
            "vs_reference_ci": _ci(s.vs_reference) if vs else "",
            "detectable": _round(vs.detectable if vs else None),
            "epochs_to_reach": ", ".join("-" if v is None else str(v) for v in s.epochs_to_reach.values()),
            "turning_rate": _round(s.turning_rate_mean),
            "minutes": _round(s.minutes_mean, 2),
        }
    )


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


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


class CurvePoint(NamedTuple):
    """One epoch of :func:`mean_curve`: the eval reward's mean and std over seeds (std None
    with one seed)."""

    epoch: int
    mean: float
    std: float | None


def mean_curve(runs: Sequence[SeedRun]) -> list[CurvePoint]:
    """The eval reward over the finished seeds at every epoch that all of them evaluated."""
    ok = [dict(run.curve) for run in runs if run.ok]
    if not ok:
        return []
    epochs = sorted(set.intersection(*(set(c) for c in ok)))
    return [CurvePoint(epoch, *mean_std([c[epoch] for c in ok])) for epoch in epochs]


def _reward_plot(summaries: Sequence[VariantSummary], reference_mean: float | None, reference: str, path: Path) -> Path:
    fig = figure(8, 4.5)
    ax = fig.subplots()
    ax.set_title("eval reward (test prompts, ODE), mean ± std over seeds")
    drawn = False
    for s, color in zip(summaries, colors(len(summaries))):
        curve = mean_curve(s.runs)
        if not curve:
            continue
        epochs = [p.epoch for p in curve]
        ax.plot(epochs, [p.mean for p in curve], color=color, marker="o", label=f"{s.variant} (n={len(s.ok_runs)})")
        if all(p.std is not None for p in curve):
            ax.fill_between(epochs, [p.mean - p.std for p in curve], [p.mean + p.std for p in curve], color=color, alpha=0.12)
        drawn = True
    if reference_mean is not None:
        ax.axhline(reference_mean, color="grey", linestyle=":", label=f"{reference} mean final")
    epoch_axes(ax, drawn, "eval reward")
    return save_png(fig, path)


def _turning_plot(summaries: Sequence[VariantSummary], path: Path) -> Path:
    by_variant = dict(zip([s.variant for s in summaries], colors(len(summaries))))
    bars = [
        StepBars(
            s.variant,
            by_variant[s.variant],
            s.turning_per_step_mean,
            {k: std or 0.0 for k, std in s.turning_per_step_std.items()},
        )
        for s in summaries
        if s.turning_per_step_mean
    ]
    return turning_rate_plot(bars, "turning-point rate per SDE step (mean ± std over seeds)", path)


# --------------------------------------------------------------------------- MLflow


def log_study_to_mlflow(report: StudyReport, tracking_uri: str, run_id: str) -> None:
    """Log the files as artifacts (``study/``) of ``run_id`` and each variant's
    ``study/<variant>/final_mean`` and ``final_std`` as its metrics (by id, whatever the run's
    status)."""
    log_to_run(tracking_uri, run_id, report.paths, artifact_path=ARTIFACT_DIR)
    metrics = {}
    for s in report.summaries:
        metrics |= {f"study/{s.variant}/final_mean": s.final_mean, f"study/{s.variant}/final_std": s.final_std}
    log_metrics_to_run(tracking_uri, run_id, metrics)


__all__ = [
    "CurvePoint",
    "Paired",
    "PairedDifference",
    "SeedRun",
    "StudyReport",
    "VariantSummary",
    "build_study_report",
    "epochs_to_reach",
    "log_study_to_mlflow",
    "mean_curve",
    "paired_difference",
    "read_seed_run",
    "study_files",
    "summarize",
]
