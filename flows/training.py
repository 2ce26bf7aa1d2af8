"""Prefect flow ``tpgrpo-train``: one variant's GRPO run as a DAG of named tasks per epoch.

A thin shell over :class:`tpgrpo.trainer.Trainer`: every task calls one trainer step, and the
loop around them mirrors :meth:`Trainer.fit` (same order, same epoch rows, same evaluation and
checkpoint schedule, same outputs), so a run trained here and one trained by ``tpgrpo train``
write the same ``history.csv`` and ``metrics.json``. Per epoch N (1-based, as in history.csv
and the MLflow step):

    rollout-epoch-N -> score-epoch-N -> credit-epoch-N -> update-epoch-N
        [-> evaluate-epoch-N on eval epochs] [-> checkpoint-epoch-N]

plus ``evaluate-epoch-0`` (the base model) first and ``finalize`` last.

Large objects (the model, rollouts, advantages) never leave the process: they live on an
:class:`EpochState` that the tasks read and write, and the tasks return only small metric
dicts. Prefect keeps every task's return value alive until the flow run ends (it links results
to task runs by object id), so returning rollouts would hold every epoch's samples in memory.
Tasks use ``cache_policy=NO_CACHE`` and ``persist_result=False``: nothing is hashed or pickled.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as current_flow_run
from prefect.runtime import task_run as current_task_run

from tpgrpo.config import load_config

if TYPE_CHECKING:  # pragma: no cover
    from tpgrpo.evaluate import EvalResult
    from tpgrpo.trainer import EpochCredit, EpochSamples, EpochScores, Trainer, TrainResult

FLOW_NAME = "tpgrpo-train"
DEPLOYMENT_NAME = "train"
# MLflow tag linking a child run to its Prefect flow run (the ablation looks runs up by it).
FLOW_RUN_TAG = "prefect_flow_run_id"
SEED_TAG = "seed"

_TASK_OPTIONS: dict[str, Any] = dict(cache_policy=NO_CACHE, persist_result=False)


def run_name(variant: str, seed: int | None, params_seed: int) -> str:
    """The run's name and directory under ``runs_dir``: ``<variant>`` for the params file's seed
    (so ``dvc repro`` and the flows share ``runs/<variant>``), ``<variant>-seed<N>`` otherwise."""
    return variant if seed is None or seed == params_seed else f"{variant}-seed{seed}"


class EpochState:
    """The in-process objects of the current epoch; tasks read and replace them.

    A plain class on purpose: Prefect walks dataclasses and collections passed to tasks, but not
    arbitrary objects."""

    __slots__ = ("trainer", "samples", "scores", "credit", "last_eval")

    def __init__(self, trainer: "Trainer") -> None:
        self.trainer = trainer
        self.samples: EpochSamples | None = None
        self.scores: EpochScores | None = None
        self.credit: EpochCredit | None = None
        self.last_eval: EvalResult | None = None


# --------------------------------------------------------------------------- tasks


@task(name="rollout", task_run_name="rollout-epoch-{epoch}", **_TASK_OPTIONS)
def rollout_task(state: EpochState, epoch: int, upstream: Any = None) -> dict[str, float]:
    """Sample the epoch's trajectories (rewards start computing in the background)."""
    state.samples = state.trainer.rollout(epoch - 1)
    return {"time/rollout_s": state.samples.seconds}


@task(
    name="score",
    task_run_name="score-epoch-{epoch}",
    retries=2,
    retry_delay_seconds=[2, 10],
    **_TASK_OPTIONS,
)
def score_task(state: EpochState, epoch: int, upstream: Any = None) -> dict[str, float]:
    """Intermediate-reward scoring: the reward sequences R of the epoch's rollouts. On a retry,
    the batches whose scoring raised are scored again (the rollouts are kept)."""
    assert state.samples is not None
    if current_task_run.run_count > 1:
        _rescore_failed_batches(state.trainer, state.samples)
    state.scores = state.trainer.score(state.samples)
    return dict(state.scores.metrics)


@task(name="credit", task_run_name="credit-epoch-{epoch}", **_TASK_OPTIONS)
def credit_task(state: EpochState, epoch: int, upstream: Any = None) -> dict[str, float]:
    """Turning-point (or outcome / incremental) credit and group-normalised advantages."""
    assert state.samples is not None and state.scores is not None
    state.credit = state.trainer.credit(state.samples, state.scores)
    return dict(state.credit.metrics)


@task(name="update", task_run_name="update-epoch-{epoch}", **_TASK_OPTIONS)
def update_task(state: EpochState, epoch: int, upstream: Any = None) -> dict[str, float]:
    """The clipped-surrogate policy update on the stored transitions; then the epoch's rollouts
    are released."""
    assert state.samples is not None and state.credit is not None
    stats = state.trainer.update(state.samples, state.credit)
    state.samples = state.scores = state.credit = None
    return dict(stats.metrics)


@task(name="evaluate", task_run_name="evaluate-epoch-{epoch}", **_TASK_OPTIONS)
def evaluate_task(state: EpochState, epoch: int, upstream: Any = None) -> dict[str, float]:
    """ODE evaluation on the test prompts with the EMA weights (epoch 0: the base model)."""
    result = state.trainer.evaluate(epoch)
    state.last_eval = result
    return {"eval/reward": result.reward, **{f"eval/{k}": v for k, v in result.details.items()}}


@task(name="checkpoint", task_run_name="checkpoint-epoch-{epoch}", **_TASK_OPTIONS)
def checkpoint_task(state: EpochState, epoch: int, minutes: float, upstream: Any = None) -> None:
    """Atomic checkpoint of weights, EMA, optimizer, RNG and history (exact resume)."""
    state.trainer.save_checkpoint(minutes)


@task(name="finalize", task_run_name="finalize", **_TASK_OPTIONS)
def finalize_task(state: EpochState, result: "TrainResult", upstream: Any = None) -> None:
    """metrics.json, history.csv and the final (EMA) weights; artifacts to the tracker."""
    trainer = state.trainer
    if trainer.is_main:
        trainer._write_outputs(result)  # see the report: wants to become public
    trainer.acc.wait_for_everyone()


# --------------------------------------------------------------------------- the loop


def fit_with_tasks(trainer: "Trainer") -> "TrainResult":
    """:meth:`Trainer.fit`, with each step run as a Prefect task. Keep in step with ``fit``."""
    from tpgrpo.trainer import TrainResult

    t, e = trainer.cfg.train, trainer.cfg.eval
    started = time.perf_counter()
    state = EpochState(trainer)
    trainer.tracker.log_params({**trainer.cfg.flat(), "variant": trainer.variant})
    upstream: Any = None
    if trainer.epoch == 0 and trainer.eval_initial is None:
        upstream = evaluate_task(state, 0)
        trainer.eval_initial = upstream["eval/reward"]
        trainer.tracker.log_metrics({"eval/reward": trainer.eval_initial}, step=0)
    last_eval: EvalResult | None = None
    while trainer.epoch < t.epochs:
        epoch = trainer.epoch + 1
        timing = rollout_task(state, epoch, upstream)
        scores = score_task(state, epoch, timing)
        credit = credit_task(state, epoch, scores)
        update = update_task(state, epoch, credit)
        upstream = update
        trainer.epoch = epoch
        row = {"epoch": float(epoch), **timing} | scores | credit | update
        minutes = trainer.minutes_before + (time.perf_counter() - started) / 60
        out_of_time = t.time_budget_minutes is not None and minutes >= t.time_budget_minutes
        if epoch % e.every == 0 or epoch == t.epochs or out_of_time:
            upstream = evaluate_task(state, epoch, update)
            last_eval = state.last_eval
            row |= upstream
        row["time/minutes"] = minutes
        trainer.history.append(row)
        trainer.tracker.log_metrics(row, step=epoch)
        if epoch % t.checkpoint_every == 0 or epoch == t.epochs or out_of_time:
            checkpoint_task(state, epoch, minutes, upstream)
        if out_of_time:
            break
    if last_eval is None:
        upstream = evaluate_task(state, trainer.epoch, upstream)
        last_eval = state.last_eval
    assert last_eval is not None
    minutes = trainer.minutes_before + (time.perf_counter() - started) / 60
    result = TrainResult(
        run_dir=trainer.run_dir,
        epochs=trainer.epoch,
        eval_reward_initial=trainer.eval_initial,
        eval_reward_final=last_eval.reward,
        eval_details=last_eval.details,
        minutes=minutes,
        history=trainer.history,
    )
    finalize_task(state, result, upstream)
    return result


def _rescore_failed_batches(trainer: "Trainer", samples: "EpochSamples") -> None:
    """Score again, synchronously, the batches whose background scoring raised."""
    for batch in samples.batches:
        if batch.rewards.exception() is None:
            continue
        R, details = trainer._score(batch.rollout, batch.prompts, batch.metadata)  # see the report
        batch.rewards, batch.details = _done(R), _done(details)


def _done(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


# --------------------------------------------------------------------------- the flow


def _flow_run_name() -> str:
    """``train-<variant>``, plus ``-seed<N>`` when a seed is given (the ablation gives one only
    for seeds other than the params file's)."""
    params = current_flow_run.parameters
    seed = params.get("seed")
    return f"train-{params.get('variant')}" + ("" if seed is None else f"-seed{seed}")


@flow(name=FLOW_NAME, flow_run_name=_flow_run_name, persist_result=False)
def train_variant(
    variant: str,
    params_path: str = "params.yaml",
    overrides: list[str] = [],  # noqa: B006 - Prefect copies parameters; shown in the UI form
    parent_run_id: str | None = None,
    seed: int | None = None,
    restart: bool = False,
) -> dict[str, Any]:
    """Fine-tune one variant of params.yaml with GRPO (TP-GRPO, Flow-GRPO, ...).

    Writes ``<runs_dir>/<run name>/`` (checkpoints, history.csv, metrics.json, final weights)
    and logs one MLflow run, nested under ``parent_run_id`` when given. The run name is the
    variant, or ``<variant>-seed<N>`` when ``seed`` differs from the params file's seed. The run
    resumes from its newest checkpoint (a retried flow run continues where it stopped);
    ``restart`` discards the run directory first, on the first attempt only.

    Args:
        variant: a name under ``variants`` in the params file.
        params_path: the experiment file.
        overrides: dotted overrides (``train.epochs=3``), applied after the variant's.
        parent_run_id: MLflow run to nest this run under (the ablation's parent run).
        seed: overrides ``seed`` (sampling noise, LoRA init, prompt order, eval noise).
        restart: start from scratch instead of resuming.
    """
    from accelerate import Accelerator

    from tpgrpo.tracking import finishing, open_tracker, run_tags
    from tpgrpo.trainer import Trainer, previous_run_id

    base = load_config(params_path, variant=variant, overrides=list(overrides))
    name = run_name(variant, seed, base.seed)
    cfg = base if seed is None else load_config(params_path, variant=variant, overrides=[*overrides, f"seed={seed}"])
    acc = Accelerator()
    run_dir = Path(cfg.runs_dir) / name
    if restart and current_flow_run.run_count <= 1 and acc.is_main_process and run_dir.exists():
        shutil.rmtree(run_dir)
    acc.wait_for_everyone()
    tags = {**run_tags(variant), SEED_TAG: str(cfg.seed)}
    if current_flow_run.id:
        tags[FLOW_RUN_TAG] = str(current_flow_run.id)
    tracker = open_tracker(
        cfg.tracking.uri,
        cfg.tracking.experiment,
        is_main_process=acc.is_main_process,
        run_name=name,
        run_id=previous_run_id(run_dir),
        parent_run_id=parent_run_id,
        tags=tags,
    )
    with finishing(tracker):
        trainer = Trainer(cfg, variant=name, tracker=tracker, accelerator=acc)
        try:
            result = fit_with_tasks(trainer)
        finally:
            trainer.executor.shutdown(wait=False, cancel_futures=True)
    return {
        "run_name": name,
        "variant": variant,
        "seed": cfg.seed,
        "run_dir": str(result.run_dir),
        "epochs": result.epochs,
        "eval_reward_initial": result.eval_reward_initial,
        "eval_reward": result.eval_reward_final,
        "eval_details": dict(result.eval_details),
        "minutes": result.minutes,
        "mlflow_run_id": tracker.run_id,
    }


__all__ = ["EpochState", "fit_with_tasks", "run_name", "train_variant"]
