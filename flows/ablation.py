"""Prefect flow ``tpgrpo``: the ablation study, its fan-out and its comparison.

The study is the params file's ``ablation`` section (variants, seeds, overrides, where runs and
reports go); the flow's parameters override it. One MLflow parent run per ablation; every
(variant, seed) trains as its own child flow run of ``tpgrpo-train`` (one MLflow child run each,
nested under the parent), then a ``compare`` task writes the study's report
(:func:`tpgrpo.study.build_study_report`: mean and spread over seeds, epochs to reach the
reference, turning-point rates) and the table of every run (:func:`tpgrpo.report.build_report`),
and publishes them as Prefect artifacts and as artifacts of the parent MLflow run.

Where the children run:
- when the deployment ``tpgrpo-train/train`` exists and is ready (a ``python -m flows.serve``
  process or a worker of its work pool is polling), the children are submitted with
  ``run_deployment``, at most ``max_parallel`` unfinished at a time, and the flow waits for all
  of them;
- otherwise, or with ``in_process=True``, each child runs in this process as a subflow, one
  after the other.

A failing variant does not stop the others: its child flow run ends Failed, its MLflow run
FAILED (created FAILED if it never got that far), the report lists it as failed, and after the
comparison the ablation itself ends Failed, naming the failed variants.

Run directories: ``<ablation.runs_dir>/<variant>-seed<N>``, or ``<variant>`` for the params
file's own seed (:func:`tpgrpo.study.run_name`).
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as current_flow_run
from pydantic import Field

from flows import require_api
from flows.training import DEPLOYMENT_NAME, FLOW_NAME, FLOW_RUN_TAG, SEED_TAG, train_variant
from tpgrpo.config import ExperimentConfig, load_config
from tpgrpo.study import run_name

TRAIN_DEPLOYMENT = f"{FLOW_NAME}/{DEPLOYMENT_NAME}"
ABLATION_FLOW_NAME = "tpgrpo"
TABLE_ARTIFACT_KEY = "tpgrpo-ablation"
MARKDOWN_ARTIFACT_KEY = "tpgrpo-ablation-report"
POLL_SECONDS = 5.0


class AblationError(RuntimeError):
    """Raised at the end of an ablation in which some variants failed (after the comparison)."""


@dataclass
class ChildOutcome:
    """How one (variant, seed) ended."""

    name: str
    variant: str
    seed: int
    status: str  # "ok" | "failed" | "cancelled"
    flow_run_id: str | None = None
    mlflow_run_id: str | None = None
    message: str = ""


# --------------------------------------------------------------------------- validation


def resolve_variants(cfg: ExperimentConfig, variants: list[str] | None) -> list[str]:
    """The variants to run, in order, without duplicates; None means the study's
    (``ablation.variants``). Raises ValueError naming an unknown variant and the defined ones."""
    if variants is None:
        if not cfg.ablation.variants:
            raise ValueError("ablation.variants is empty; list the study's variants there or pass `variants`")
        return list(cfg.ablation.variants)
    chosen = list(dict.fromkeys(variants))
    if not chosen:
        raise ValueError("variants: expected at least one variant name")
    defined = list(cfg.variants)
    for name in chosen:
        if name not in cfg.variants:
            raise ValueError(f"unknown variant {name!r}; defined in the params file: {', '.join(defined) or 'none'}")
    return chosen


# --------------------------------------------------------------------------- the comparison


@task(name="compare", task_run_name="compare", cache_policy=NO_CACHE, persist_result=False)
def compare_task(
    runs_dir: str,
    variants: list[str],
    seeds: list[int],
    params_seed: int,
    reference: str,
    credit_modes: dict[str, str],
    reports_dir: str,
    tracking_uri: str | None,
    parent_run_id: str | None,
    failures: dict[str, str],
) -> dict[str, Any]:
    """The study's report (:func:`tpgrpo.study.build_study_report`: mean and spread over seeds)
    and the table of every run (:func:`tpgrpo.report.build_report`) to ``reports_dir``, to the
    parent MLflow run, and as Prefect table and markdown artifacts."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from tpgrpo.report import build_report
    from tpgrpo.study import build_study_report

    names = [run_name(v, s, params_seed) for v in variants for s in seeds]
    runs = build_report(
        runs_dir, names, reports_dir, tracking_uri=tracking_uri, parent_run_id=parent_run_id, failures=failures
    )
    study = build_study_report(
        runs_dir,
        variants,
        seeds,
        reports_dir,
        params_seed=params_seed,
        reference=reference,
        credit_modes=credit_modes,
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
        failures=failures,
    )
    create_table_artifact(
        table=study.records(),
        key=TABLE_ARTIFACT_KEY,
        description="TP-GRPO ablation: final eval reward per variant, mean and std over seeds",
    )
    plots = "\n".join(f"- `{p}`" for p in [*study.plot_paths.values(), *runs.plot_paths.values()])
    create_markdown_artifact(
        markdown=f"{study.markdown}\n{runs.markdown}\nPlots:\n\n{plots}\n",
        key=MARKDOWN_ARTIFACT_KEY,
        description="TP-GRPO ablation report",
    )
    return {
        "markdown": str(study.markdown_path),
        "json": str(study.json_path),
        "runs_markdown": str(runs.markdown_path),
        "plots": {k: str(v) for k, v in {**runs.plot_paths, **study.plot_paths}.items()},
        "failed": list(runs.failed),
    }


# --------------------------------------------------------------------------- children


def _train_deployment_ready(logger) -> bool:
    """Whether the ``tpgrpo-train/train`` deployment exists, is not paused (``serve`` pauses its
    deployments when it stops) and something polled for its runs recently (status READY)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import DeploymentStatus
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(TRAIN_DEPLOYMENT)
    except ObjectNotFound:
        logger.info("no deployment %s: training the variants in this process", TRAIN_DEPLOYMENT)
        return False
    if deployment.paused:
        logger.warning("deployment %s is paused (its serve process stopped?): training in this process", TRAIN_DEPLOYMENT)
        return False
    if deployment.status != DeploymentStatus.READY:
        logger.warning(
            "deployment %s is %s (no serve process or worker is polling): training in this process",
            TRAIN_DEPLOYMENT,
            deployment.status.value if deployment.status else "not ready",
        )
        return False
    return True


def _outcome_from_state(state, name: str, variant: str, seed: int, flow_run_id: str | None) -> ChildOutcome:
    if state is not None and state.is_completed():
        return ChildOutcome(name, variant, seed, "ok", flow_run_id)
    status = "cancelled" if state is not None and state.is_cancelled() else "failed"
    message = (state.message if state is not None else None) or f"flow run ended {state.name if state else 'without a state'}"
    message = message.removeprefix("Flow run encountered an exception: ")
    return ChildOutcome(name, variant, seed, status, flow_run_id, message=message)


def _run_in_process(jobs: list[dict[str, Any]], logger) -> list[ChildOutcome]:
    outcomes = []
    for job in jobs:
        params = job["parameters"]
        logger.info("training %s in this process", job["name"])
        try:
            state = train_variant(**params, return_state=True)
        except Exception as exc:  # the subflow could not even start
            outcomes.append(ChildOutcome(job["name"], params["variant"], job["seed"], "failed", message=f"{type(exc).__name__}: {exc}"))
            continue
        flow_run_id = state.state_details.flow_run_id
        outcomes.append(
            _outcome_from_state(state, job["name"], params["variant"], job["seed"], str(flow_run_id) if flow_run_id else None)
        )
        gc.collect()  # the finished variant's model and optimizer, before the next one loads
        _empty_accelerator_cache()
    return outcomes


def _run_on_deployment(jobs: list[dict[str, Any]], logger, max_parallel: int) -> list[ChildOutcome]:
    """Submit the jobs to the train deployment, at most ``max_parallel`` unfinished at a time,
    and wait for all of them."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    pending = list(jobs)
    running: dict[str, tuple[dict[str, Any], Any]] = {}
    outcomes: dict[str, ChildOutcome] = {}
    with get_client(sync_client=True) as client:
        while len(outcomes) < len(jobs):
            while pending and len(running) < max_parallel:
                job = pending.pop(0)
                params = job["parameters"]
                try:
                    run = run_deployment(TRAIN_DEPLOYMENT, parameters=params, flow_run_name=f"train-{job['name']}", timeout=0)
                except Exception as exc:
                    outcomes[job["name"]] = ChildOutcome(
                        job["name"], params["variant"], job["seed"], "failed", message=f"{type(exc).__name__}: {exc}"
                    )
                    continue
                logger.info("submitted %s as flow run %s", job["name"], run.id)
                running[job["name"]] = (job, run.id)
            for name, (job, flow_run_id) in list(running.items()):
                run = client.read_flow_run(flow_run_id)
                if run.state is not None and run.state.is_final():
                    outcomes[name] = _outcome_from_state(run.state, name, job["parameters"]["variant"], job["seed"], str(flow_run_id))
                    logger.info("%s: %s (%d of %d done)", name, run.state.name, len(outcomes), len(jobs))
                    del running[name]
            if running:
                time.sleep(POLL_SECONDS)
    return [outcomes[job["name"]] for job in jobs]


def _empty_accelerator_cache() -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- MLflow


def _settle_mlflow(cfg: ExperimentConfig, parent_run_id: str | None, outcome: ChildOutcome) -> None:
    """Make the child's MLflow run agree with its Prefect outcome: a failed child whose run is
    still RUNNING (a crashed worker) is set FAILED, one that never created a run gets a FAILED
    run, so every (variant, seed) of the ablation shows up under the parent."""
    from tpgrpo.tracking import MLflowTracker, run_tags  # sets MLflow's no-telemetry variables first

    if not cfg.tracking.uri or parent_run_id is None:
        return
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = []
    if experiment is not None and outcome.flow_run_id:
        runs = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.{FLOW_RUN_TAG} = '{outcome.flow_run_id}'",
            max_results=10,
        )
    if runs:
        run = runs[0]
        outcome.mlflow_run_id = run.info.run_id
        if outcome.status != "ok":
            client.set_tag(run.info.run_id, "error", outcome.message[:5000])
            if run.info.status in ("RUNNING", "SCHEDULED"):
                client.set_terminated(run.info.run_id, status="KILLED" if outcome.status == "cancelled" else "FAILED")
        return
    if outcome.status == "ok":
        return
    tags = {**run_tags(outcome.variant), SEED_TAG: str(outcome.seed), "error": outcome.message[:5000]}
    if outcome.flow_run_id:
        tags[FLOW_RUN_TAG] = outcome.flow_run_id
    failed = MLflowTracker(
        cfg.tracking.uri, cfg.tracking.experiment, run_name=outcome.name, parent_run_id=parent_run_id, tags=tags
    )
    failed.finish("KILLED" if outcome.status == "cancelled" else "FAILED")
    outcome.mlflow_run_id = failed.run_id


# --------------------------------------------------------------------------- the flow


@flow(name=ABLATION_FLOW_NAME, persist_result=False)
def ablation(
    variants: list[str] | None = None,
    seeds: Annotated[list[int] | None, Field(min_length=1)] = None,
    epochs: Annotated[int | None, Field(ge=1)] = None,
    params_path: Annotated[str, Field(min_length=1)] = "params.yaml",
    overrides: list[str] = [],  # noqa: B006 - Prefect copies parameters
    in_process: bool = False,
    restart: bool = False,
    reports_dir: Annotated[str | None, Field(min_length=1)] = None,
    max_parallel: Annotated[int | None, Field(ge=1)] = None,
) -> dict[str, Any]:
    """The ablation study of the params file's `ablation` section: every (variant, seed) as a
    child flow run of tpgrpo-train, then the comparison over seeds. Every parameter left null
    takes the `ablation` section's value.

    Returns a summary: the parent MLflow run id, each run's outcome, and the report's files.
    Raises AblationError (the flow run ends Failed) after the comparison when some run failed.

    Args:
        variants: names under `variants` in the params file; null = ablation.variants
            (flow_grpo, incremental, tp_grpo and tp_grpo without each of its options).
        seeds: one run per variant and seed; null = ablation.seeds.
        epochs: overrides train.epochs for every run.
        params_path: the experiment file (relative to the working directory).
        overrides: dotted overrides for every run, e.g. sample.batch_size=8, applied after
            ablation.overrides.
        in_process: train here, one run after the other, even if the tpgrpo-train/train
            deployment is ready.
        restart: discard existing run directories instead of resuming from their checkpoints.
        reports_dir: where the comparison (study.md, study.json, runs.md, plots) is written;
            null = ablation.reports_dir.
        max_parallel: training runs at once on the deployment; null = ablation.max_parallel.
    """
    logger = get_run_logger()
    params_file = Path(params_path).resolve()
    study = load_config(params_file).ablation
    # The study's own directory first, so that `overrides` can still move it.
    child_overrides = [f"runs_dir={json.dumps(study.runs_dir)}", *study.override_list(), *overrides]
    child_overrides += [f"train.epochs={epochs}"] if epochs is not None else []
    cfg = load_config(params_file, overrides=child_overrides)
    chosen = resolve_variants(cfg, variants)
    seed_list = list(dict.fromkeys(seeds if seeds is not None else study.seeds))
    # Every variant's config must load before anything starts.
    modes = {name: load_config(params_file, variant=name, overrides=child_overrides).credit.mode for name in chosen}
    reports_dir = reports_dir or study.reports_dir
    max_parallel = max_parallel or study.max_parallel

    from tpgrpo.tracking import finishing, open_tracker, run_tags

    flow_run_name = current_flow_run.name or "local"
    parent_tags = {**run_tags(), "ablation.variants": ",".join(chosen), "ablation.seeds": ",".join(map(str, seed_list))}
    if current_flow_run.id:
        parent_tags[FLOW_RUN_TAG] = str(current_flow_run.id)
    parent = open_tracker(
        cfg.tracking.uri,
        cfg.tracking.experiment,
        is_main_process=True,
        run_name=f"ablation-{flow_run_name}",
        tags=parent_tags,
    )
    with finishing(parent):
        parent.log_params(
            {
                "variants": chosen,
                "seeds": seed_list,
                "epochs": epochs,
                "overrides": child_overrides,
                "params_path": str(params_file),
                "runs_dir": cfg.runs_dir,
            }
        )
        jobs = []
        for name in chosen:
            for seed in seed_list:
                jobs.append(
                    {
                        "name": run_name(name, seed, cfg.seed),
                        "seed": seed,
                        "parameters": {
                            "variant": name,
                            "params_path": str(params_file),
                            "overrides": child_overrides,
                            "parent_run_id": parent.run_id,
                            # None for the params file's seed: run name, directory and flow
                            # run name are then plain <variant>, as with `tpgrpo train`.
                            "seed": None if seed == cfg.seed else seed,
                            "restart": restart,
                        },
                    }
                )
        logger.info("%d runs: %s x seeds %s, in %s", len(jobs), ", ".join(chosen), seed_list, cfg.runs_dir)
        if not in_process and _train_deployment_ready(logger):
            outcomes = _run_on_deployment(jobs, logger, max_parallel)
        else:
            outcomes = _run_in_process(jobs, logger)
        for outcome in outcomes:
            _settle_mlflow(cfg, parent.run_id, outcome)
        failures = {o.name: o.message or o.status for o in outcomes if o.status != "ok"}
        report = compare_task(
            cfg.runs_dir,
            chosen,
            seed_list,
            cfg.seed,
            cfg.ablation.reference,
            modes,
            reports_dir,
            cfg.tracking.uri if parent.run_id else None,
            parent.run_id,
            failures,
        )
        summary = {
            "parent_run_id": parent.run_id,
            "runs": [asdict(o) for o in outcomes],
            "report": report,
        }
        if failures:
            parent.set_tags({"failed_variants": ",".join(failures)})
            raise AblationError(
                f"{len(failures)} of {len(outcomes)} runs failed: "
                + "; ".join(f"{name}: {message}" for name, message in failures.items())
            )
    return summary


def main(argv: list[str] | None = None) -> None:
    """``python -m flows.ablation``: run the ablation flow from this shell (against the Prefect
    API of prefect.toml / PREFECT_API_URL); ``--local`` trains here even if a train deployment
    is ready. Exit status 1 when a run failed, 2 when the Prefect API does not answer."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m flows.ablation", description=main.__doc__)
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME", help="default: ablation.variants")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, metavar="N", help="default: ablation.seeds")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--reports-dir", default=None, help="default: ablation.reports_dir")
    parser.add_argument("--max-parallel", type=int, default=None, metavar="N", help="default: ablation.max_parallel")
    parser.add_argument("--local", action="store_true", help="train in this process")
    parser.add_argument("--restart", action="store_true", help="discard existing run directories")
    args = parser.parse_args(argv)
    require_api(parser.prog)
    state = ablation(
        variants=args.variants,
        seeds=args.seeds,
        epochs=args.epochs,
        params_path=args.params,
        overrides=args.overrides,
        in_process=args.local,
        restart=args.restart,
        reports_dir=args.reports_dir,
        max_parallel=args.max_parallel,
        return_state=True,
    )
    print(f"ablation: {state.name}" + (f": {state.message}" if state.message and not state.is_completed() else ""))
    sys.exit(0 if state.is_completed() else 1)


__all__ = ["AblationError", "ChildOutcome", "ablation", "main", "resolve_variants"]


if __name__ == "__main__":
    main()
