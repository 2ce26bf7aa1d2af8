"""The ablation comparison: one table and two plots from the variants' run directories.

Reads every variant's run directory, ``<runs_dir>/<variant>/``, with
:func:`tpgrpo.rundir.read_run` (``metrics.json``, ``history.csv`` and, when present, ``eval.json``
from ``tpgrpo evaluate`` of the exported weights), and writes to ``out_dir``:

- ``ablation.md``: a markdown table (variant, status, base reward, final eval reward, delta,
  the per-constraint eval rewards, the exported weights' reward, epochs); failed or missing
  variants are listed as failed with the reason below the table;
- ``ablation.json``: the same table keyed by variant; NaN becomes null. Not a DVC metric: ``dvc
  metrics show`` lists each run's ``summary.json`` instead, one short row per run;
- ``reward_vs_epoch.png``: train reward (rollout mean) and eval reward per epoch, per variant;
- ``turning_rate_per_step.png``: the mean turning-point rate at each SDE step, per variant.

These are DVC outputs, so they hold no wall-clock time: two reports of the same runs are the
same bytes however long the runs took (the markdown says where the times are). Every file is
written atomically. With ``tracking_uri`` and ``parent_run_id`` the files are also logged as
artifacts of that MLflow run (the ablation's parent run), and each finished variant's final eval
reward and delta as metrics of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from tpgrpo.fileio import atomic_write_json, atomic_write_text
from tpgrpo.reporting.plots import StepBars, colors, epoch_axes, figure, save_png, turning_rate_plot
from tpgrpo.rundir import TIMING, RunRecord, number, read_run
from tpgrpo.tracking import log_metrics_to_run, log_to_run

MARKDOWN_NAME = "ablation.md"
JSON_NAME = "ablation.json"
REWARD_PLOT_NAME = "reward_vs_epoch.png"
TURNING_PLOT_NAME = "turning_rate_per_step.png"
ARTIFACT_DIR = "reports"

OK = "ok"
FAILED = "failed"


@dataclass(frozen=True)
class Report:
    """What :func:`build_report` wrote.

    Attributes:
        table: one row per variant (input order). Columns: ``variant``, ``status`` (``ok`` or
            ``failed``), ``reason`` (why it failed, else empty), ``base_reward``, ``eval_reward``,
            ``delta``, one ``eval_<constraint>`` column per constraint, ``exported_reward`` (the
            reward of ``<variant>/final`` as loaded by diffusers; NaN without ``eval.json``; equal
            to ``eval_reward`` when the export is faithful), ``epochs``.
        markdown: the markdown text of ``markdown_path``.
        markdown_path: ``<out_dir>/ablation.md``.
        json_path: ``<out_dir>/ablation.json``.
        plot_paths: ``{"reward_vs_epoch": path, "turning_rate_per_step": path}``.
        failed: the variants listed as failed.
    """

    table: pd.DataFrame
    markdown: str
    markdown_path: Path
    json_path: Path
    plot_paths: dict[str, Path] = field(default_factory=dict)
    failed: tuple[str, ...] = ()

    @property
    def paths(self) -> list[Path]:
        """Every file written: markdown, JSON, plots."""
        return [self.markdown_path, self.json_path, *self.plot_paths.values()]


def build_report(
    runs_dir: str | Path,
    variants: Sequence[str],
    out_dir: str | Path,
    *,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    failures: Mapping[str, str] | None = None,
) -> Report:
    """Compare ``variants`` (run directory names under ``runs_dir``) and write the report.

    Args:
        runs_dir: the directory holding the variants' run directories.
        variants: run names, in the order the table lists them (duplicates are dropped).
        out_dir: where the four files go (created if missing).
        tracking_uri: MLflow tracking URI; with ``parent_run_id``, the files are logged as
            artifacts (under ``reports/``) of that run, which may be running or finished.
        parent_run_id: the MLflow run to attach the report to.
        failures: variants known to have failed in this ablation, with a reason. They are
            listed as failed even when an older ``metrics.json`` is still on disk.

    Returns:
        The :class:`Report`. A variant with no readable ``metrics.json`` is listed as failed;
        nothing about a single variant makes this raise.
    """
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    failures = dict(failures or {})
    names = list(dict.fromkeys(str(v) for v in variants))
    runs = [read_run(runs_dir / name, failures.get(name)) for name in names]
    table = _table(runs)
    markdown = _markdown(table, runs_dir)

    markdown_path = atomic_write_text(out_dir / MARKDOWN_NAME, markdown)
    json_path = atomic_write_json(out_dir / JSON_NAME, _json_table(table))
    finished = [run for run in runs if run.ok]
    plot_paths = {
        "reward_vs_epoch": _reward_plot(finished, out_dir / REWARD_PLOT_NAME),
        "turning_rate_per_step": _turning_plot(finished, out_dir / TURNING_PLOT_NAME),
    }
    report = Report(
        table=table,
        markdown=markdown,
        markdown_path=markdown_path,
        json_path=json_path,
        plot_paths=plot_paths,
        failed=tuple(run.name for run in runs if not run.ok),
    )
    if tracking_uri and parent_run_id:
        log_report_to_mlflow(report, tracking_uri, parent_run_id)
    return report


# --------------------------------------------------------------------------- the table


def _table(runs: Sequence[RunRecord]) -> pd.DataFrame:
    constraints = sorted({f"eval_{k}" for run in runs for k in run.details()})
    rows = []
    for run in runs:
        base, final = run.base_reward, run.reward
        details = run.details()
        epochs = number(run.metrics.get("epochs"))
        row: dict[str, Any] = {
            "variant": run.name,
            "status": OK if run.ok else FAILED,
            "reason": run.reason,
            "base_reward": base,
            "eval_reward": final,
            "delta": None if base is None or final is None else final - base,
            **{name: details.get(name.removeprefix("eval_")) for name in constraints},
            "exported_reward": number(run.metrics.get("exported_reward")),
            "epochs": None if epochs is None else int(epochs),
        }
        rows.append(row)
    columns = ["variant", "status", "reason", "base_reward", "eval_reward", "delta", *constraints, "exported_reward", "epochs"]
    table = pd.DataFrame(rows, columns=columns)
    for name in ["base_reward", "eval_reward", "delta", *constraints, "exported_reward"]:
        table[name] = pd.to_numeric(table[name], errors="coerce").astype("float64")
    table["epochs"] = pd.to_numeric(table["epochs"], errors="coerce").astype("Int64")
    return table


def _markdown(table: pd.DataFrame, runs_dir: Path) -> str:
    constraints = [c for c in table.columns if c.startswith("eval_") and c != "eval_reward"]
    header = ["variant", "status", "base reward", "final eval reward", "delta"]
    header += [c.removeprefix("eval_") for c in constraints] + ["exported weights", "epochs"]
    lines = [
        "# Ablation",
        "",
        f"Final evaluation (ODE sampling, EMA weights) of each variant's run in `{runs_dir}/`; "
        "base reward is the same evaluation before training, delta = final - base; exported weights: "
        "the same evaluation of `final/` loaded with diffusers (`tpgrpo evaluate`).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|",
    ]
    for r in table.to_dict(orient="records"):
        cells = [_escape(r["variant"]), r["status"]]
        cells += [_fmt(r["base_reward"]), _fmt(r["eval_reward"]), _fmt(r["delta"], signed=True)]
        cells += [_fmt(r[c]) for c in constraints] + [_fmt(r["exported_reward"])]
        cells.append("n/a" if pd.isna(r["epochs"]) else str(int(r["epochs"])))
        lines.append("| " + " | ".join(cells) + " |")
    failed = table[table["status"] != OK]
    if len(failed):
        lines += ["", "Failed:", ""]
        lines += [f"- `{name}`: {_escape(reason, table_cell=False)}" for name, reason in zip(failed["variant"], failed["reason"])]
    lines += [
        "",
        "Training times are not in this report, so that it is the same file for every run of a commit: "
        "each run's minutes are MLflow's `summary/minutes` (per epoch `time/*`) and "
        f"`{runs_dir}/<variant>/{TIMING}`.",
    ]
    return "\n".join(lines) + "\n"


def _fmt(value: Any, *, digits: int = 4, signed: bool = False) -> str:
    if value is None or pd.isna(value):
        return "n/a"
    return f"{float(value):+.{digits}f}" if signed else f"{float(value):.{digits}f}"


def _escape(text: Any, *, table_cell: bool = True) -> str:
    text = " ".join(str(text).split())  # one line
    return text.replace("|", "\\|") if table_cell else text


def _json_table(table: pd.DataFrame) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for record in table.to_dict(orient="records"):
        name = record.pop("variant")
        out[name] = {k: _json_value(v) for k, v in record.items()}
    return out


def _json_value(value: Any) -> Any:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    if isinstance(value, str):
        return value
    if float(value).is_integer() and not isinstance(value, float):
        return int(value)
    return float(value)


# --------------------------------------------------------------------------- plots


def _reward_plot(runs: Sequence[RunRecord], path: Path) -> Path:
    fig = figure(11, 4)
    train_ax, eval_ax = fig.subplots(1, 2)
    train_ax.set_title("train reward (rollout mean)")
    eval_ax.set_title("eval reward (test prompts, ODE)")
    any_train = any_eval = False
    for run, color in zip(runs, colors(len(runs))):
        h = run.history
        if h is not None and "reward/mean" in h:
            rows = h[h["reward/mean"].notna()]
            if len(rows):
                train_ax.plot(rows["epoch"], rows["reward/mean"], color=color, marker=".", label=run.name)
                any_train = True
        curve = run.reward_curve()
        if curve:
            epochs, values = zip(*curve)
            eval_ax.plot(epochs, values, color=color, marker="o", linestyle="--", label=run.name)
            any_eval = True
    epoch_axes(train_ax, any_train, "reward")
    epoch_axes(eval_ax, any_eval, "reward")
    return save_png(fig, path)


def _turning_plot(runs: Sequence[RunRecord], path: Path) -> Path:
    rates = {run.name: run.turning_rate_per_step() for run in runs}
    with_rates = [name for name, steps in rates.items() if steps]
    bars = [StepBars(name, color, rates[name]) for name, color in zip(with_rates, colors(len(runs)))]
    return turning_rate_plot(bars, "turning-point rate per SDE step (mean over epochs)", path)


# --------------------------------------------------------------------------- MLflow


def log_report_to_mlflow(report: Report, tracking_uri: str, run_id: str) -> None:
    """Log the report files as artifacts (``reports/``) of ``run_id``, and each finished variant's
    ``<variant>/eval_reward`` and ``<variant>/delta`` as metrics of it, leaving the run's status
    as it is (an ablation's parent run may already be finished)."""
    log_to_run(tracking_uri, run_id, report.paths, artifact_path=ARTIFACT_DIR)
    finished = report.table[report.table["status"] == OK].to_dict(orient="records")
    metrics = {f"{row['variant']}/{key}": row[key] for row in finished for key in ("eval_reward", "delta")}
    log_metrics_to_run(tracking_uri, run_id, metrics)


__all__ = ["Report", "build_report", "log_report_to_mlflow"]
