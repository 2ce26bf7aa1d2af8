"""The ablation comparison: one table and two plots from the variants' run directories.

Reads, for every variant, ``<runs_dir>/<variant>/metrics.json`` (written when a run finishes),
``<runs_dir>/<variant>/history.csv`` (one row per epoch) and, when present,
``<runs_dir>/<variant>/eval.json`` (``tpgrpo evaluate`` of the exported weights), and writes to
``out_dir``:

- ``ablation.md``: a markdown table (variant, status, base reward, final eval reward, delta,
  the per-constraint eval rewards, the exported weights' reward, epochs, minutes); failed or missing variants are listed as
  failed with the reason below the table;
- ``ablation.json``: the same table keyed by variant; NaN becomes null. Not a DVC metric: ``dvc
  metrics show`` lists each run's ``summary.json`` instead, one short row per run;
- ``reward_vs_epoch.png``: train reward (rollout mean) and eval reward per epoch, per variant;
- ``turning_rate_per_step.png``: the mean turning-point rate at each SDE step, per variant.

Pure pandas and matplotlib (Agg, through :class:`matplotlib.figure.Figure`, so no pyplot global
state: safe in threads and Prefect tasks). Every file is written to a temp name and renamed.
With ``tracking_uri`` and ``parent_run_id`` the files are also logged as artifacts of that MLflow
run (the ablation's parent run), and each finished variant's final eval reward and delta as
metrics of it.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

MARKDOWN_NAME = "ablation.md"
JSON_NAME = "ablation.json"
REWARD_PLOT_NAME = "reward_vs_epoch.png"
TURNING_PLOT_NAME = "turning_rate_per_step.png"
ARTIFACT_DIR = "reports"

OK = "ok"
FAILED = "failed"

# metrics.json keys that are not per-constraint eval rewards.
_FIXED_EVAL_KEYS = ("eval_reward", "eval_reward_initial")
_STEP_COLUMN = re.compile(r"^turning/rate_step_(\d+)$")


@dataclass(frozen=True)
class Report:
    """What :func:`build_report` wrote.

    Attributes:
        table: one row per variant (input order). Columns: ``variant``, ``status`` (``ok`` or
            ``failed``), ``reason`` (why it failed, else empty), ``base_reward``, ``eval_reward``,
            ``delta``, one ``eval_<constraint>`` column per constraint, ``exported_reward`` (the
            reward of ``<variant>/final`` as loaded by diffusers; NaN without ``eval.json``; equal
            to ``eval_reward`` when the export is faithful), ``epochs``, ``minutes``.
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


@dataclass
class _Run:
    variant: str
    status: str
    reason: str
    metrics: dict[str, Any]
    history: pd.DataFrame | None


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
        runs_dir: the directory holding ``<variant>/metrics.json`` and ``<variant>/history.csv``.
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
    runs = [_load_run(runs_dir, name, failures.get(name)) for name in names]
    table = _table(runs)
    markdown = _markdown(table, runs_dir)

    out_dir.mkdir(parents=True, exist_ok=True)
    markdown_path = out_dir / MARKDOWN_NAME
    json_path = out_dir / JSON_NAME
    _atomic_write_text(markdown_path, markdown)
    _atomic_write_text(json_path, json.dumps(_json_table(table), indent=2, allow_nan=False) + "\n")
    ok_runs = [run for run in runs if run.status == OK]
    plot_paths = {
        "reward_vs_epoch": _reward_plot(ok_runs, out_dir / REWARD_PLOT_NAME),
        "turning_rate_per_step": _turning_plot(ok_runs, out_dir / TURNING_PLOT_NAME),
    }
    report = Report(
        table=table,
        markdown=markdown,
        markdown_path=markdown_path,
        json_path=json_path,
        plot_paths=plot_paths,
        failed=tuple(run.variant for run in runs if run.status != OK),
    )
    if tracking_uri and parent_run_id:
        log_report_to_mlflow(report, tracking_uri, parent_run_id)
    return report


# --------------------------------------------------------------------------- reading runs


def _load_run(runs_dir: Path, variant: str, failure: str | None) -> _Run:
    run_dir = runs_dir / variant
    history = _read_history(run_dir / "history.csv")
    if failure is not None:
        return _Run(variant, FAILED, failure or "failed", {}, history)
    path = run_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        return _Run(variant, FAILED, f"no {path}", {}, history)
    except (OSError, ValueError) as exc:
        return _Run(variant, FAILED, f"{path}: unreadable ({type(exc).__name__})", {}, history)
    if not isinstance(metrics, dict) or _number(metrics.get("eval_reward")) is None:
        return _Run(variant, FAILED, f"{path}: no eval_reward", {}, history)
    try:
        exported = json.loads((run_dir / "eval.json").read_text())
    except (OSError, ValueError):
        exported = {}
    if isinstance(exported, dict) and _number(exported.get("reward")) is not None:
        metrics = {**metrics, "exported_reward": exported["reward"]}
    return _Run(variant, OK, "", metrics, history)


def _read_history(path: Path) -> pd.DataFrame | None:
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError):
        return None
    if "epoch" not in frame.columns or frame.empty:
        return None
    frame = frame.apply(pd.to_numeric, errors="coerce")
    return frame.sort_values("epoch", kind="stable").reset_index(drop=True)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# --------------------------------------------------------------------------- the table


def _table(runs: list[_Run]) -> pd.DataFrame:
    constraints = sorted(
        {
            k
            for run in runs
            for k in run.metrics
            if k.startswith("eval_") and k not in _FIXED_EVAL_KEYS and not k.endswith("_initial")
        }
    )
    rows = []
    for run in runs:
        m = run.metrics
        base, final = _number(m.get("eval_reward_initial")), _number(m.get("eval_reward"))
        row: dict[str, Any] = {
            "variant": run.variant,
            "status": run.status,
            "reason": run.reason,
            "base_reward": base,
            "eval_reward": final,
            "delta": None if base is None or final is None else final - base,
        }
        for name in constraints:
            row[name] = _number(m.get(name))
        epochs = _number(m.get("epochs"))
        row["exported_reward"] = _number(m.get("exported_reward"))
        row["epochs"] = None if epochs is None else int(epochs)
        row["minutes"] = _number(m.get("minutes"))
        rows.append(row)
    columns = ["variant", "status", "reason", "base_reward", "eval_reward", "delta", *constraints, "exported_reward", "epochs", "minutes"]
    table = pd.DataFrame(rows, columns=columns)
    for name in ["base_reward", "eval_reward", "delta", *constraints, "exported_reward", "minutes"]:
        table[name] = pd.to_numeric(table[name], errors="coerce").astype("float64")
    table["epochs"] = pd.to_numeric(table["epochs"], errors="coerce").astype("Int64")
    return table


def _markdown(table: pd.DataFrame, runs_dir: Path) -> str:
    constraints = [c for c in table.columns if c.startswith("eval_") and c != "eval_reward"]
    header = ["variant", "status", "base reward", "final eval reward", "delta"]
    header += [c.removeprefix("eval_") for c in constraints] + ["exported weights", "epochs", "minutes"]
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
        epochs = r["epochs"]
        cells += ["n/a" if pd.isna(epochs) else str(int(epochs)), _fmt(r["minutes"], digits=2)]
        lines.append("| " + " | ".join(cells) + " |")
    failed = table[table["status"] != OK]
    if len(failed):
        lines += ["", "Failed:", ""]
        lines += [f"- `{name}`: {_escape(reason, table_cell=False)}" for name, reason in zip(failed["variant"], failed["reason"])]
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


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # Agg canvas by default; no pyplot state

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _reward_plot(runs: list[_Run], path: Path) -> Path:
    fig = _figure(11, 4)
    train_ax, eval_ax = fig.subplots(1, 2)
    train_ax.set_title("train reward (rollout mean)")
    eval_ax.set_title("eval reward (test prompts, ODE)")
    any_train = any_eval = False
    for run, color in zip(runs, _colors(len(runs))):
        h = run.history
        if h is not None and "reward/mean" in h:
            rows = h[h["reward/mean"].notna()]
            if len(rows):
                train_ax.plot(rows["epoch"], rows["reward/mean"], color=color, marker=".", label=run.variant)
                any_train = True
        epochs, values = [], []
        base = _number(run.metrics.get("eval_reward_initial"))
        if base is not None:
            epochs.append(0.0)
            values.append(base)
        if h is not None and "eval/reward" in h:
            rows = h[h["eval/reward"].notna()]
            epochs += rows["epoch"].tolist()
            values += rows["eval/reward"].tolist()
        if epochs:
            eval_ax.plot(epochs, values, color=color, marker="o", linestyle="--", label=run.variant)
            any_eval = True
    for ax, has_data in ((train_ax, any_train), (eval_ax, any_eval)):
        _epoch_axes(ax, has_data, "reward")
    return _save(fig, path)


def _turning_plot(runs: list[_Run], path: Path) -> Path:
    import numpy as np

    rates: dict[str, dict[int, float]] = {}
    for run in runs:
        if run.history is None:
            continue
        steps = {}
        for column in run.history.columns:
            match = _STEP_COLUMN.match(column)
            if match:
                value = run.history[column].mean(skipna=True)
                if pd.notna(value):
                    steps[int(match.group(1))] = float(value)
        if steps:
            rates[run.variant] = steps
    fig = _figure(max(6.0, 1.0 + 0.6 * max((len(s) for s in rates.values()), default=5)), 4)
    ax = fig.subplots()
    ax.set_title("turning-point rate per SDE step (mean over epochs)")
    ax.set_xlabel("SDE step k")
    ax.set_ylabel("share of trajectories")
    if rates:
        all_steps = sorted({k for s in rates.values() for k in s})
        x = np.arange(len(all_steps))
        width = 0.8 / len(rates)
        for i, ((name, steps), color) in enumerate(zip(rates.items(), _colors(len(runs)))):
            heights = [steps.get(k, np.nan) for k in all_steps]
            ax.bar(x + (i - (len(rates) - 1) / 2) * width, heights, width, color=color, label=name)
        ax.set_xticks(x, [str(k) for k in all_steps])
        ax.legend(fontsize="small")
        ax.grid(axis="y", alpha=0.3)
    else:
        _no_data(ax)
    return _save(fig, path)


def _epoch_axes(ax, has_data: bool, ylabel: str) -> None:
    """Integer epochs on x, a grid, and a legend (or "no data" when nothing was drawn)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if has_data:
        ax.legend(fontsize="small")
    else:
        _no_data(ax)


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- MLflow


def log_report_to_mlflow(report: Report, tracking_uri: str, run_id: str) -> None:
    """Log the report files as artifacts (``reports/``) of ``run_id``, and each finished variant's
    ``<variant>/eval_reward`` and ``<variant>/delta`` as metrics of it.

    Talks to the run by id through a client, so it neither needs the run to be active nor changes
    its status (an ablation's parent run may already be finished)."""
    # tpgrpo.tracking sets MLflow's no-telemetry variables on import, before mlflow is imported.
    from tpgrpo.tracking import sanitize_name

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=tracking_uri)
    for path in report.paths:
        client.log_artifact(run_id, str(path), artifact_path=ARTIFACT_DIR)
    now = int(time.time() * 1000)
    metrics = []
    for row in report.table[report.table["status"] == OK].to_dict(orient="records"):
        for key in ("eval_reward", "delta"):
            value = _number(row[key])
            if value is not None:
                metrics.append(Metric(sanitize_name(f"{row['variant']}/{key}"), value, now, 0))
    if metrics:
        client.log_batch(run_id, metrics=metrics)


__all__ = ["Report", "build_report", "log_report_to_mlflow"]
