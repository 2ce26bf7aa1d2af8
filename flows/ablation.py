"""Prefect flow ``tpgrpo``: a seeded study, its fan-out and its comparison.

The study is a named entry of the params file's ``studies`` (``study=NAME``), or the default
one, the ``ablation`` section (variants, seeds, epochs, eval size, overrides); ``ablation`` also
says where every study's runs and reports go. The flow's parameters override the study. One
MLflow parent run per study run; every (variant, seed) trains as its own child flow run of
``tpgrpo-train`` (one MLflow child run each, nested under the parent), then a ``compare`` task
writes the study's report (:func:`tpgrpo.reporting.study.build_study_report`: intervals, power,
noise split, per-constraint and held-in results) and publishes it as Prefect artifacts and as
artifacts of the parent MLflow run.

Runs are named ``<variant>-seed<N>-<settings key>``
(:func:`tpgrpo.reporting.study.study_run_name`); a run another study already finished with the
same settings is reused, not trained again (unless ``restart``).

Where the children run:
- when the deployment ``tpgrpo-train/train`` exists and is ready (a ``python -m flows.serve``
  process or a worker of its work pool is polling), each child is a ``train-<run name>`` task
  that runs it on the deployment with ``run_deployment`` and returns when it has ended. The tasks
  run on a :class:`~prefect.task_runners.ThreadPoolTaskRunner` of ``max_parallel`` threads, so at
  most ``max_parallel`` children are unfinished at a time, and the flow waits for all of them;
- otherwise, or with ``in_process=True``, each child runs in this process as a subflow, one
  after the other.

A failing variant does not stop the others: its child flow run ends Failed, its MLflow run
FAILED (created FAILED if it never got that far: :func:`tpgrpo.tracking.settle_child_run`), the
report lists it as failed, and after the comparison the ablation itself ends Failed, naming the
failed variants.

Run directories: ``<ablation.runs_dir>/<run name>``; reports: ``<ablation.reports_dir>/<study>.md``
and ``.json`` with its plots.
"""

from __future__ import annotations

import gc
import json
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from logging import Logger, LoggerAdapter
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.deployments import run_deployment
from prefect.runtime import flow_run as current_flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from flows import require_api
from flows.training import DEPLOYMENT_NAME, FLOW_NAME, FLOW_RUN_TAG, SEED_TAG, train_variant
from tpgrpo.config import DEFAULT_STUDY, ExperimentConfig, load_config
from tpgrpo.reporting.study import build_study_report
from tpgrpo.rundir import is_finished, study_run_name
from tpgrpo.tracking import ChildStatus, settle_child_run

TRAIN_DEPLOYMENT = f"{FLOW_NAME}/{DEPLOYMENT_NAME}"
ABLATION_FLOW_NAME = "tpgrpo"
# Prefect artifact keys of a study's report: <prefix>-<study> (underscores as dashes).
TABLE_ARTIFACT_KEY = "tpgrpo-study"
MARKDOWN_ARTIFACT_KEY = "tpgrpo-study-report"


class AblationError(RuntimeError):
    """Raised at the end of an ablation in which some variants failed (after the comparison)."""


@dataclass(frozen=True)
class ChildJob:
    """One (variant, seed) to train: its run name and the train flow's parameters."""

    name: str
    variant: str
    seed: int
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ChildOutcome:
    """How one (variant, seed) ended."""

    name: str
    variant: str
    seed: int
    status: ChildStatus
    flow_run_id: str | None = None
    mlflow_run_id: str | None = None
    message: str = ""


# --------------------------------------------------------------------------- validation


def resolve_variants(cfg: ExperimentConfig, variants: list[str] | None, study: str | None = None) -> list[str]:
    """The variants to run, in order, without duplicates; None means the study's. Raises
    ValueError naming an unknown variant and the defined ones."""
    if variants is None:
        field = f"studies.{study}" if study not in (None, DEFAULT_STUDY) else DEFAULT_STUDY
        if not cfg.study(study).variants:
            raise ValueError(f"{field}.variants is empty; list the study's variants there or pass `variants`")
        return list(cfg.study(study).variants)
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
    study: str,
    runs_dir: str,
    variants: list[str],
    seeds: list[int],
    settings: list[str],
    reference: str,
    credit_modes: dict[str, str],
    reports_dir: str,
    tracking_uri: str | None,
    parent_run_id: str | None,
    failures: dict[str, str],
    command: str,
) -> dict[str, Any]:
    """The study's report (:func:`tpgrpo.reporting.study.build_study_report`) to ``reports_dir``,
    to the parent MLflow run, and as Prefect table and markdown artifacts."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    report = build_study_report(
        runs_dir,
        variants,
        seeds,
        reports_dir,
        name_of=lambda variant, seed: study_run_name(variant, seed, settings),
        reference=reference,
        study=study,
        credit_modes=credit_modes,
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
        failures=failures,
        command=command,
    )
    key = study.replace("_", "-")
    create_table_artifact(
        table=[{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in report.records()],
        key=f"{TABLE_ARTIFACT_KEY}-{key}",
        description=f"Study {study}: final eval reward per variant, gain and difference to {reference} with 95% intervals",
    )
    # The Prefect UI cannot open local files: the plots are named by where a browser finds them,
    # the MLflow run's artifacts, beside where they lie on disk.
    where = f" and in the artifacts of MLflow run `{parent_run_id}` (`mlflow ui`)" if parent_run_id else ""
    plots = "\n".join(f"- `{p.name}`" for p in report.plot_paths.values())
    create_markdown_artifact(
        markdown=f"{report.markdown}\nPlots, in `{Path(reports_dir)}`{where}:\n\n{plots}\n",
        key=f"{MARKDOWN_ARTIFACT_KEY}-{key}",
        description=f"Study {study} report",
    )
    return {
        "markdown": str(report.markdown_path),
        "json": str(report.json_path),
        "plots": {k: str(v) for k, v in report.plot_paths.items()},
        "failed": list(report.failed),
    }


# --------------------------------------------------------------------------- children


def _train_deployment_ready(logger: Logger | LoggerAdapter) -> bool:
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


def _outcome_from_state(state: State | None, job: ChildJob, flow_run_id: str | None) -> ChildOutcome:
    if state is not None and state.is_completed():
        return ChildOutcome(job.name, job.variant, job.seed, "ok", flow_run_id)
    status: ChildStatus = "cancelled" if state is not None and state.is_cancelled() else "failed"
    message = (state.message if state is not None else None) or f"flow run ended {state.name if state else 'without a state'}"
    message = message.removeprefix("Flow run encountered an exception: ")
    return ChildOutcome(job.name, job.variant, job.seed, status, flow_run_id, message=message)


def _not_started(job: ChildJob, exc: Exception) -> ChildOutcome:
    return ChildOutcome(job.name, job.variant, job.seed, "failed", message=f"{type(exc).__name__}: {exc}")


def _run_in_process(jobs: list[ChildJob], logger: Logger | LoggerAdapter) -> list[ChildOutcome]:
    """The jobs one after the other as subflows of this flow run: one model in memory at a time."""
    outcomes = []
    for job in jobs:
        logger.info("training %s in this process", job.name)
        try:
            state = train_variant(**job.parameters, return_state=True)
        except Exception as exc:  # the subflow could not even start
            outcomes.append(_not_started(job, exc))
            continue
        flow_run_id = state.state_details.flow_run_id
        outcomes.append(_outcome_from_state(state, job, str(flow_run_id) if flow_run_id else None))
        # The finished variant's model and optimizer, before the next one loads (the accelerator's
        # caching allocator hands their memory to the next run in this process).
        gc.collect()
    return outcomes


@task(name="train", task_run_name="train-{job.name}", cache_policy=NO_CACHE, persist_result=False)
def train_on_deployment(job: ChildJob) -> ChildOutcome:
    """Run one job as a flow run of the train deployment (a subflow of this task) and return how
    it ended; ``run_deployment`` returns once the flow run is final."""
    try:
        run = run_deployment(TRAIN_DEPLOYMENT, parameters=job.parameters, flow_run_name=f"train-{job.name}")
    except Exception as exc:
        return _not_started(job, exc)
    get_run_logger().info("%s: flow run %s ended %s", job.name, run.id, run.state.name if run.state else "without a state")
    return _outcome_from_state(run.state, job, str(run.id))


def run_on_deployment(jobs: list[ChildJob], max_parallel: int) -> list[ChildOutcome]:
    """The jobs on the train deployment, at most ``max_parallel`` unfinished at a time: each
    :func:`train_on_deployment` task holds one of the task runner's ``max_parallel`` threads until
    its flow run has ended, and the next job waits for a free thread. Outcomes in job order."""
    with ThreadPoolTaskRunner(max_workers=max_parallel) as runner:
        futures = [runner.submit(train_on_deployment, {"job": job}) for job in jobs]
        return [future.result() for future in futures]


def _settle(cfg: ExperimentConfig, parent_run_id: str | None, outcome: ChildOutcome) -> ChildOutcome:
    """``outcome`` with its MLflow run, made to agree with it (:func:`tpgrpo.tracking.settle_child_run`)."""
    tags = {SEED_TAG: str(outcome.seed)} | ({FLOW_RUN_TAG: outcome.flow_run_id} if outcome.flow_run_id else {})
    run_id = settle_child_run(
        cfg.tracking.uri,
        cfg.tracking.experiment,
        parent_run_id,
        run_name=outcome.name,
        variant=outcome.variant,
        status=outcome.status,
        message=outcome.message,
        tags=tags,
        key_tag=FLOW_RUN_TAG,
    )
    return replace(outcome, mlflow_run_id=run_id)


# --------------------------------------------------------------------------- the flow


def _flow_run_name() -> str:
    """``study-<name>-<MMDD-HHMM>``: the study a run of the deployment belongs to, at a glance."""
    study = current_flow_run.parameters.get("study") or DEFAULT_STUDY
    return f"study-{study}-{datetime.now():%m%d-%H%M}"


@flow(name=ABLATION_FLOW_NAME, flow_run_name=_flow_run_name, persist_result=False)
def ablation(
    study: str | None = None,
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
    """A seeded study of the params file: every (variant, seed) as a child flow run of
    tpgrpo-train, then the comparison over seeds. Every parameter left null takes the study's
    value.

    Returns a summary: the parent MLflow run id, each run's outcome, and the report's files.
    Raises AblationError (the flow run ends Failed) after the comparison when some run failed.

    Args:
        study: a name under `studies` in the params file (headline, options, published,
            paper_hparams, ...); null = the default study, the `ablation` section.
        variants: names under `variants` in the params file; null = the study's.
        seeds: one run per variant and seed; null = the study's.
        epochs: overrides train.epochs for every run (null = the study's epochs).
        params_path: the experiment file (relative to the working directory).
        overrides: dotted overrides for every run, e.g. sample.batch_size=8, applied after
            the study's.
        in_process: train here, one run after the other, even if the tpgrpo-train/train
            deployment is ready.
        restart: discard existing run directories instead of resuming from their checkpoints
            (or reusing them when finished).
        reports_dir: where the report (<study>.md, <study>.json, plots) is written; null =
            ablation.reports_dir.
        max_parallel: training runs at once on the deployment; null = ablation.max_parallel.
    """
    logger = get_run_logger()
    params_file = Path(params_path).resolve()
    base = load_config(params_file)
    spec = base.study(study)
    study_name = study or DEFAULT_STUDY
    shared = base.ablation
    settings = [*spec.override_list(), *overrides]
    settings += [f"train.epochs={epochs}"] if epochs is not None else []
    # The runs' directory first, so that `overrides` can still move it; it does not name runs.
    child_overrides = [f"runs_dir={json.dumps(shared.runs_dir)}", *settings]
    cfg = load_config(params_file, overrides=child_overrides)
    chosen = resolve_variants(cfg, variants, study)
    seed_list = list(dict.fromkeys(seeds if seeds is not None else spec.seeds))
    # Every variant's config must load before anything starts.
    configs = {name: load_config(params_file, variant=name, overrides=child_overrides) for name in chosen}
    modes = {name: c.credit.mode for name, c in configs.items()}
    reports_dir = reports_dir or shared.reports_dir
    max_parallel = max_parallel or shared.max_parallel

    from tpgrpo.tracking import describe_study, finishing, open_tracker, run_tags

    # The run's Source (mlflow.source.name) is this file: the tracker names the flow being run.
    parent_tags = {
        **run_tags(),
        **describe_study(study_name, chosen, seed_list),
        "study": study_name,
        "ablation.variants": ",".join(chosen),
        "ablation.seeds": ",".join(map(str, seed_list)),
    }
    if current_flow_run.id:
        parent_tags[FLOW_RUN_TAG] = str(current_flow_run.id)
    parent = open_tracker(
        cfg.tracking.uri,
        cfg.tracking.experiment,
        is_main_process=True,
        run_name=current_flow_run.name if current_flow_run.id else f"study-{study_name}-local",
        tags=parent_tags,
    )
    with finishing(parent):
        parent.log_params(
            {
                "study": study_name,
                "variants": chosen,
                "seeds": seed_list,
                "settings": settings,
                "params_path": str(params_file),
                "runs_dir": cfg.runs_dir,
            }
        )
        jobs: list[ChildJob] = []
        reused: list[ChildOutcome] = []
        for name in chosen:
            for seed in seed_list:
                run = study_run_name(name, seed, settings)
                if not restart and is_finished(configs[name].model_copy(update={"seed": seed}), Path(configs[name].runs_dir) / run):
                    reused.append(ChildOutcome(run, name, seed, "ok", message="reused: finished with the same settings"))
                    continue
                parameters = {
                    "variant": name,
                    "params_path": str(params_file),
                    "overrides": child_overrides,
                    "parent_run_id": parent.run_id,
                    "seed": seed,
                    "run_name": run,
                    "restart": restart,
                }
                jobs.append(ChildJob(run, name, seed, parameters))
        logger.info(
            "study %s: %d runs to train (%s x seeds %s), %d reused, in %s",
            study_name, len(jobs), ", ".join(chosen), seed_list, len(reused), cfg.runs_dir,
        )
        if not jobs:
            outcomes = []
        elif not in_process and _train_deployment_ready(logger):
            outcomes = run_on_deployment(jobs, max_parallel)
        else:
            outcomes = _run_in_process(jobs, logger)
        outcomes = reused + [_settle(cfg, parent.run_id, outcome) for outcome in outcomes]
        failures = {o.name: o.message or o.status for o in outcomes if o.status != "ok"}
        report = compare_task(
            study_name,
            cfg.runs_dir,
            chosen,
            seed_list,
            settings,
            spec.reference,
            modes,
            reports_dir,
            cfg.tracking.uri if parent.run_id else None,
            parent.run_id,
            failures,
            _command(study, variants, seeds, epochs, overrides),
        )
        summary = {
            "study": study_name,
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


def _command(study: str | None, variants, seeds, epochs, overrides) -> str:
    """The deployment command that runs this study (for the report)."""
    parts = ["prefect deployment run tpgrpo/ablation"]
    if study is not None:
        parts.append(f"--param study={study}")
    for key, value in (("variants", variants), ("seeds", seeds), ("epochs", epochs), ("overrides", overrides or None)):
        if value is not None:
            parts.append(f"--param {key}='{json.dumps(value)}'")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> None:
    """``python -m flows.ablation``: run the ablation flow from this shell (against the Prefect
    API of prefect.toml / PREFECT_API_URL); ``--local`` trains here even if a train deployment
    is ready. Exit status 1 when a run failed, 2 when the Prefect API does not answer."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m flows.ablation", description=main.__doc__)
    parser.add_argument("--study", default=None, metavar="NAME", help="a name under studies (default: the ablation section)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME", help="default: the study's")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, metavar="N", help="default: the study's")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--reports-dir", default=None, help="default: ablation.reports_dir")
    parser.add_argument("--max-parallel", type=int, default=None, metavar="N", help="default: ablation.max_parallel")
    parser.add_argument("--local", action="store_true", help="train in this process")
    parser.add_argument("--restart", action="store_true", help="discard existing run directories")
    args = parser.parse_args(argv)
    from tpgrpo.config import read_yaml_mapping
    from tpgrpo.errors import ConfigError

    # The study's name is checked before anything else; the rest of the file when the flow loads it.
    try:
        defined = list(read_yaml_mapping(args.params, "params").get("studies") or {})
    except ConfigError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        sys.exit(2)
    if args.study not in (None, DEFAULT_STUDY, *defined):
        known = ", ".join([DEFAULT_STUDY, *defined])
        print(f"{parser.prog}: study {args.study!r} is not defined under 'studies' (defined: {known})", file=sys.stderr)
        sys.exit(2)
    require_api(parser.prog)
    state = ablation(
        study=args.study,
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
    print(f"{args.study or DEFAULT_STUDY}: {state.name}" + (f": {state.message}" if state.message and not state.is_completed() else ""))
    sys.exit(0 if state.is_completed() else 1)


__all__ = ["AblationError", "ChildJob", "ChildOutcome", "ablation", "main", "resolve_variants", "run_on_deployment", "train_on_deployment"]


if __name__ == "__main__":
    main()
