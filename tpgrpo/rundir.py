"""A run directory, ``<runs_dir>/<name>``: what its files are called, the one place that writes
and reads them, and a run's lifecycle with its lock and its tracker run.

Files (the trainer writes them on the main process):

- ``history.csv``: one row per epoch, every logged figure but wall-clock times;
- ``metrics.json``: the final and the base model's evaluation rewards, per constraint;
- ``summary.json``: :func:`tpgrpo.summary.run_summary` (the pipeline's DVC metric);
- ``eval_scores/epoch_<N>.csv``: each evaluation's per-prompt scores;
- ``timing.csv``: seconds per epoch and phase; ``tracking.json``: the MLflow run to continue on
  resume. These two differ between two runs of the same commit, so they are not DVC outputs and
  nothing above writes time or run ids anywhere else: every DVC output of a run is byte-identical
  between two runs (``.dvcignore`` keeps them out of the hashed ``runs`` directory);
- ``config.json`` (:mod:`tpgrpo.runguard`), ``checkpoints/``, ``samples/``, ``final/``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import shutil
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from tpgrpo.errors import TrackingError, UserError
from tpgrpo.fileio import atomic_write_json, atomic_write_text
from tpgrpo.runguard import RunLock, check_resume, recorded_config_hash, run_config
from tpgrpo.tracking import MissingRunError, Tracker, finishing, open_tracker, run_tags

if TYPE_CHECKING:
    import pandas as pd

    from tpgrpo.config import ExperimentConfig

HISTORY = "history.csv"
METRICS = "metrics.json"
SUMMARY = "summary.json"
TIMING = "timing.csv"
TRACKING = "tracking.json"
EVAL_SCORES = "eval_scores"
CHECKPOINTS = "checkpoints"
# history rows carry wall-clock figures under this prefix; they go to timing.csv and the tracker.
TIME_PREFIX = "time/"
_STEP_COLUMN = re.compile(r"^turning/rate_step_(\d+)$")


# ----------------------------------------------------------------------------------------- naming


def settings_key(settings: Sequence[str]) -> str:
    """A short hash of a study's run settings (``KEY=VALUE`` strings): the value each key ends
    with, keys sorted, so the order they are listed in does not matter."""
    final = dict(item.partition("=")[::2] for item in settings)
    return hashlib.sha256("\n".join(f"{k}={final[k]}" for k in sorted(final)).encode()).hexdigest()[:8]


def study_run_name(variant: str, seed: int, settings: Sequence[str]) -> str:
    """A study run's name and directory under ``ablation.runs_dir``:
    ``<variant>-seed<N>-<settings key>``. Studies that run a variant on a seed with the same
    settings name the same run, so it trains once."""
    return f"{variant}-seed{seed}-{settings_key(settings)}"


def run_name(variant: str, seed: int | None, params_seed: int) -> str:
    """A run's name and directory under ``runs_dir``: ``<variant>`` for the params file's seed
    (so ``dvc repro`` and the flows share ``runs/<variant>``), ``<variant>-seed<N>`` otherwise."""
    return variant if seed is None or seed == params_seed else f"{variant}-seed{seed}"


# ---------------------------------------------------------------------------------------- writing


def check_writable(run_dir: Path) -> None:
    """Refuse (one line) a run directory that cannot be written, before any model loads; the
    directories made for the probe are removed again, so a run refused later leaves no trace."""
    created = [d for d in (run_dir, *run_dir.parents) if not d.exists()]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{run_dir}: run directory is not writable ({exc.strerror})") from None
    for directory in created:
        directory.rmdir()


def _csv(rows: Sequence[Mapping[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_history(run_dir: Path, history: Sequence[Mapping[str, float]]) -> None:
    """``history.csv`` from the epoch rows (their ``time/*`` figures left out) and ``timing.csv``
    from the epoch and those figures."""
    atomic_write_text(run_dir / HISTORY, _csv([without_timing(row) for row in history]))
    timing = [{"epoch": row["epoch"], **{k: v for k, v in row.items() if k.startswith(TIME_PREFIX)}} for row in history]
    atomic_write_text(run_dir / TIMING, _csv(timing))


def without_timing(row: Mapping[str, float]) -> dict[str, float]:
    """An epoch row without its wall-clock figures (what checkpoints and history.csv keep)."""
    return {k: v for k, v in row.items() if not k.startswith(TIME_PREFIX)}


def write_metrics(run_dir: Path, metrics: Mapping[str, Any], summary: Mapping[str, float | None]) -> None:
    """``metrics.json`` (keys sorted) and ``summary.json``."""
    atomic_write_json(run_dir / METRICS, dict(metrics), sort_keys=True, allow_nan=True)
    atomic_write_json(run_dir / SUMMARY, dict(summary))


def write_eval_scores(run_dir: Path, epoch: int, prompts: Sequence[str], scores: Sequence[float], extra: Mapping[str, Sequence[float]]) -> Path:
    """``eval_scores/epoch_<N>.csv``: one row per evaluated prompt in prompt order: its index in
    the prompt file, the prompt, its score and the extra rewards' scores (the study's bootstrap
    over prompts reads them)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["index", "prompt", "reward", *extra])
    for i, prompt in enumerate(prompts):
        writer.writerow([i, prompt, f"{float(scores[i]):.9g}", *(f"{float(v[i]):.9g}" for v in extra.values())])
    return atomic_write_text(run_dir / EVAL_SCORES / f"epoch_{epoch:04d}.csv", buffer.getvalue())


def write_run_id(run_dir: Path, run_id: str | None) -> None:
    """``tracking.json``: the tracker run a resume from this directory's checkpoints continues."""
    if run_id is not None:
        atomic_write_json(run_dir / TRACKING, {"run_id": run_id})


def read_run_id(run_dir: Path) -> str | None:
    """The tracker run recorded in ``tracking.json``; None when there is none (a new run, or
    checkpoints restored by ``dvc checkout``, which then log to a new run)."""
    try:
        value = json.loads((run_dir / TRACKING).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def restore_timing(run_dir: Path, history: Sequence[Mapping[str, float]]) -> list[dict[str, float]]:
    """``history`` (rows of a checkpoint) with their ``time/*`` figures from ``timing.csv`` put
    back, matched by epoch; rows without a recorded time stay without one."""
    frame = _read_csv(run_dir / TIMING)
    times: dict[float, dict[str, float]] = {}
    if frame is not None:
        for record in frame.to_dict("records"):
            times[float(record["epoch"])] = {k: float(v) for k, v in record.items() if k != "epoch" and not _missing(v)}
    return [{**row, **times.get(float(row["epoch"]), {})} for row in history]


# ---------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class RunRecord:
    """What a run directory says about its run, for the report and the study.

    Attributes:
        name: the run directory's name.
        ok: whether it finished (a readable ``metrics.json`` with ``eval_reward``).
        reason: why not, in one line; "" when ok.
        metrics: ``metrics.json``, plus ``exported_reward`` from ``eval.json`` when present.
        history: ``history.csv`` as numbers sorted by epoch, or None.
        minutes: the run's wall-clock minutes from ``timing.csv``, or None.
    """

    name: str
    ok: bool
    reason: str
    metrics: dict[str, Any] = field(default_factory=dict)
    history: pd.DataFrame | None = None
    minutes: float | None = None

    @property
    def reward(self) -> float | None:
        return number(self.metrics.get("eval_reward"))

    @property
    def base_reward(self) -> float | None:
        return number(self.metrics.get("eval_reward_initial"))

    def details(self, initial: bool = False) -> dict[str, float]:
        """The per-constraint (and other) evaluation figures of ``metrics.json`` by name: the final
        ones, or with ``initial`` the base model's."""
        out = {}
        for key, value in self.metrics.items():
            value = number(value)
            if not key.startswith("eval_") or key in ("eval_reward", "eval_reward_initial") or value is None:
                continue
            if key.endswith("_initial") == initial:
                out[key.removeprefix("eval_").removesuffix("_initial")] = value
        return out

    def reward_curve(self) -> list[tuple[int, float]]:
        """(epoch, evaluation reward) from the base model (epoch 0) on, sorted by epoch."""
        curve = [] if self.base_reward is None else [(0, self.base_reward)]
        if self.history is not None and "eval/reward" in self.history:
            rows = self.history[self.history["eval/reward"].notna()]
            curve += [(int(e), float(v)) for e, v in zip(rows["epoch"], rows["eval/reward"])]
        return sorted(curve, key=lambda point: point[0])

    def turning_rate(self) -> float | None:
        """The share of SDE steps credited as turning points, averaged over the epochs."""
        if self.history is None or "turning/rate" not in self.history:
            return None
        return number(self.history["turning/rate"].mean(skipna=True))

    def turning_rate_per_step(self) -> dict[int, float]:
        """Window step (1-based) -> its turning-point rate averaged over the epochs."""
        out = {}
        for column in [] if self.history is None else self.history.columns:
            match = _STEP_COLUMN.match(column)
            value = number(self.history[column].mean(skipna=True)) if match else None
            if value is not None:
                out[int(match.group(1))] = value
        return out


def read_run(run_dir: Path, failure: str | None = None) -> RunRecord:
    """The :class:`RunRecord` of ``run_dir``; a known ``failure`` (say, of its orchestrator task), a
    missing or unreadable ``metrics.json`` make it not ok. Never raises."""
    history = read_history(run_dir)
    minutes = _read_minutes(run_dir)
    if failure is not None:
        return RunRecord(run_dir.name, False, failure or "failed", {}, history, minutes)
    path = run_dir / METRICS
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        return RunRecord(run_dir.name, False, f"no {path}", {}, history, minutes)
    except (OSError, ValueError) as exc:
        return RunRecord(run_dir.name, False, f"{path}: unreadable ({type(exc).__name__})", {}, history, minutes)
    if not isinstance(metrics, dict) or number(metrics.get("eval_reward")) is None:
        return RunRecord(run_dir.name, False, f"{path}: no eval_reward", {}, history, minutes)
    try:
        exported = json.loads((run_dir / "eval.json").read_text())
    except (OSError, ValueError):
        exported = {}
    if isinstance(exported, dict) and number(exported.get("reward")) is not None:
        metrics = {**metrics, "exported_reward": exported["reward"]}
    return RunRecord(run_dir.name, True, "", metrics, history, minutes)


def read_eval_scores(run_dir: Path, epoch: int) -> tuple[float, ...] | None:
    """The per-prompt evaluation rewards of ``eval_scores/epoch_<N>.csv`` in prompt order; None
    when missing or unreadable."""
    try:
        with (run_dir / EVAL_SCORES / f"epoch_{epoch:04d}.csv").open(newline="") as f:
            return tuple(float(row["reward"]) for row in csv.DictReader(f))
    except (OSError, KeyError, ValueError):
        return None


def read_history(run_dir: Path) -> pd.DataFrame | None:
    """``history.csv`` as numbers, sorted by epoch; None when missing, unreadable or empty."""
    frame = _read_csv(run_dir / HISTORY)
    if frame is None or "epoch" not in frame.columns or frame.empty:
        return None
    import pandas as pd

    frame = frame.apply(pd.to_numeric, errors="coerce")
    return frame.sort_values("epoch", kind="stable").reset_index(drop=True)


def _read_minutes(run_dir: Path) -> float | None:
    frame = _read_csv(run_dir / TIMING)
    if frame is None or f"{TIME_PREFIX}minutes" not in frame.columns or frame.empty:
        return None
    return number(frame[f"{TIME_PREFIX}minutes"].iloc[-1])


def _read_csv(path: Path) -> pd.DataFrame | None:
    import pandas as pd

    try:
        return pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError):
        return None


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def number(value: Any) -> float | None:
    """``value`` as a finite float; None for anything else (bools, text, NaN, missing)."""
    if isinstance(value, bool):
        return None
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


# -------------------------------------------------------------------------------------- lifecycle


def check_resumable(cfg: ExperimentConfig, run_dir: Path) -> None:
    """Refuse (:class:`~tpgrpo.runguard.ConfigMismatchError`, one line) to continue the newest
    checkpoint of ``run_dir`` with a configuration that changes its result."""
    # Imported here: the readers above serve `tpgrpo report`, which needs no torch.
    from tpgrpo.checkpoint import latest_checkpoint, load_checkpoint

    path = latest_checkpoint(run_dir / CHECKPOINTS)
    if path is None:
        return
    recorded = load_checkpoint(path, verify=False).meta.get("config")
    if recorded is not None:
        check_resume(recorded, run_config(cfg).fields, run_dir)


def is_finished(cfg: ExperimentConfig, run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished run of exactly ``cfg`` (its metrics.json for
    ``train.epochs`` and its recorded configuration), so a study can reuse it."""
    record = read_run(run_dir)
    if not record.ok or record.metrics.get("epochs") != cfg.train.epochs:
        return False
    return recorded_config_hash(run_dir) == run_config(cfg).hash


@contextmanager
def tracked_run(
    cfg: ExperimentConfig,
    *,
    name: str,
    variant: str,
    is_main: bool,
    restart: bool = False,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    barrier: Callable[[], None] = lambda: None,
) -> Iterator[Tracker]:
    """A run's lifecycle around its training: hold its lock (main process; the lock sits beside
    the run directory, so a restart can clear the directory while holding it), clear it on
    ``restart``, refuse a resume with a changed configuration before the tracker reopens (and would
    mark FAILED) the run it belongs to, open or continue the tracker run, and close it FINISHED
    (FAILED on an exception, KILLED on Ctrl-C).

    Processes other than the main one get a tracker that records nothing; ``barrier`` (the
    accelerator's ``wait_for_everyone``) holds them until the main process has cleared the
    directory.
    """
    from tpgrpo.checkpoint import latest_checkpoint

    run_dir = Path(cfg.runs_dir) / name
    with RunLock(cfg.runs_dir, name) if is_main else nullcontext():
        if restart and is_main and run_dir.exists():
            shutil.rmtree(run_dir)
        barrier()
        check_resumable(cfg, run_dir)
        previous = read_run_id(run_dir) if latest_checkpoint(run_dir / CHECKPOINTS) else None
        try:
            tracker = open_tracker(
                cfg.tracking.uri,
                cfg.tracking.experiment,
                is_main_process=is_main,
                run_name=name,
                run_id=previous,
                parent_run_id=parent_run_id,
                tags={**run_tags(variant), **(tags or {})},
            )
        except MissingRunError as exc:
            raise TrackingError(
                f"{run_dir}: its MLflow run {exc.run_id} is not in {exc.uri} (another tracking.uri, or a deleted "
                "store); set tracking.uri to the store it was logged to, or pass --restart to train it again"
            ) from None
        with finishing(tracker):
            yield tracker
