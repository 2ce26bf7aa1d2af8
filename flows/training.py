"""Prefect flow ``tpgrpo-train``: one variant's GRPO run as a DAG of named tasks per epoch.

A thin shell over :class:`tpgrpo.trainer.Trainer`: :meth:`Trainer.fit` runs the loop, and
:class:`TaskSteps` runs each of its steps as a Prefect task, so a run trained here and one
trained by ``tpgrpo train`` are the same computation. Per epoch N (1-based, as in history.csv
and the MLflow step):

    rollout-epoch-N -> score-epoch-N -> credit-epoch-N -> update-epoch-N
        [-> evaluate-epoch-N on eval epochs] [-> checkpoint-epoch-N]

plus ``evaluate-epoch-0`` (the base model) first and ``finalize`` last. No task retries: the
one retry layer is the remote reward client's, which retries its transport (timeouts, 5xx
answers, failed connections) before a reward call fails; a step that raises fails the run, and the
run resumes from its newest checkpoint when started again.

Large objects (the model, rollouts, advantages) never leave the process: a task returns only
a small summary (its metrics) to Prefect, while the step's value is handed back to the loop
directly. Prefect keeps task return values alive until the flow run ends, so returning
rollouts would hold every epoch's samples in memory. Tasks use ``cache_policy=NO_CACHE`` and
``persist_result=False``: nothing is hashed or pickled.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as current_flow_run

from tpgrpo.config import load_config
from tpgrpo.rundir import run_name as default_run_name

# Prefect attaches its run-log handler to the `tpgrpo` logger (prefect.toml's extra_loggers) but
# leaves its level at the root's WARNING, which would drop the trainer's INFO epoch lines.
logging.getLogger("tpgrpo").setLevel(logging.INFO)

FLOW_NAME = "tpgrpo-train"
DEPLOYMENT_NAME = "train"
# MLflow tag linking a child run to its Prefect flow run (the ablation looks runs up by it).
FLOW_RUN_TAG = "prefect_flow_run_id"
SEED_TAG = "seed"

# The figures of each step its task's log line shows (all of them are in its result and MLflow).
_KEY_METRICS: dict[str, tuple[str, ...]] = {
    "rollout": ("time/rollout_s",),
    "score": ("reward/mean", "reward/std", "skipped/nonfinite"),
    "credit": ("turning/rate", "advantage/abs_mean", "skipped/zero_variance_groups"),
    "update": ("loss/policy", "approx_kl", "clip_fraction", "grad_norm", "time/update_s"),
    "evaluate": ("eval/reward", "eval/heldin_reward", "eval/train_reward"),
}


def _summary(value: Any) -> dict[str, float]:
    """What Prefect sees of a step's result: its metrics, never the tensors (a fresh dict even
    when empty, so Prefect can link the next task to this one)."""
    if hasattr(value, "metrics"):
        return dict(value.metrics)
    if hasattr(value, "seconds"):
        return {"time/rollout_s": value.seconds}
    if hasattr(value, "reward") and hasattr(value, "details"):
        return {"eval/reward": value.reward, **{f"eval/{k}": v for k, v in value.details.items()}}
    return {}


def step_line(label: str, name: str, epoch: int, summary: dict[str, float]) -> str:
    """``tp_grpo seed 3, epoch 4, score: reward/mean 0.6121, reward/std 0.0843``."""
    figures = ", ".join(f"{key} {summary[key]:.4g}" for key in _KEY_METRICS.get(name, ()) if key in summary)
    where = "finalize" if name == "finalize" else f"epoch {epoch}, {name}"
    return f"{label}, {where}" + (f": {figures}" if figures else "")


class TaskSteps:
    """A :data:`tpgrpo.trainer.StepRunner` that runs every step as a named Prefect task, each
    depending on the previous one (so the UI draws the epoch's DAG)."""

    def __init__(self, label: str) -> None:
        self.label = label  # names the run in every task's log line: children share a terminal
        self._upstream: Any = None

    def __call__(self, name: str, epoch: int, fn: Callable[[], Any]) -> Any:
        box: dict[str, Any] = {}

        def body(upstream: Any = None) -> dict[str, float]:
            box["value"] = fn()
            summary = _summary(box["value"])
            get_run_logger().info(step_line(self.label, name, epoch, summary))
            return summary

        run_name = "finalize" if name == "finalize" else f"{name}-epoch-{epoch}"
        step = task(body, name=name, task_run_name=run_name, cache_policy=NO_CACHE, persist_result=False)
        self._upstream = step(self._upstream)
        return box.pop("value")


# --------------------------------------------------------------------------- the flow


def _flow_run_name() -> str:
    """``train-<run name>``: the given run name, else the variant plus ``-seed<N>`` when a seed
    is given."""
    params = current_flow_run.parameters
    if params.get("run_name"):
        return f"train-{params['run_name']}"
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
    run_name: str | None = None,
) -> dict[str, Any]:
    """Fine-tune one variant of params.yaml with GRPO (TP-GRPO, Flow-GRPO, ...).

    Writes ``<runs_dir>/<run name>/`` (checkpoints, history.csv, metrics.json, final weights)
    and logs one MLflow run, nested under ``parent_run_id`` when given. The run name is
    ``run_name``, else the variant, or ``<variant>-seed<N>`` when ``seed`` differs from the params
    file's seed. The run
    resumes from its newest checkpoint (a retried flow run continues where it stopped);
    ``restart`` discards the run directory first, on the first attempt only.

    Args:
        variant: a name under ``variants`` in the params file.
        params_path: the experiment file.
        overrides: dotted overrides (``train.epochs=3``), applied after the variant's.
        parent_run_id: MLflow run to nest this run under (the ablation's parent run).
        seed: overrides ``seed`` (sampling noise, LoRA init, prompt order, eval noise).
        restart: start from scratch instead of resuming.
        run_name: the run's name and directory under ``runs_dir`` (a study names its runs by
            variant, seed and settings).
    """
    from tpgrpo.trainer import train_variant_run

    base = load_config(params_path, variant=variant, overrides=list(overrides))
    name = run_name or default_run_name(variant, seed, base.seed)
    cfg = base if seed is None else load_config(params_path, variant=variant, overrides=[*overrides, f"seed={seed}"])
    tags = {SEED_TAG: str(cfg.seed)}
    if current_flow_run.id:
        tags[FLOW_RUN_TAG] = str(current_flow_run.id)
    outcome = train_variant_run(
        cfg,
        name=name,
        variant=variant,
        # A retried flow run resumes from its checkpoint instead of starting over.
        restart=restart and current_flow_run.run_count <= 1,
        parent_run_id=parent_run_id,
        tags=tags,
        run_step=TaskSteps(f"{variant} seed {cfg.seed}"),
    )
    result = outcome.result
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
        "mlflow_run_id": outcome.run_id,
    }


__all__ = ["TaskSteps", "train_variant"]
