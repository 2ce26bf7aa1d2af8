"""The Prefect flows against a real local Prefect server (``prefect_test_harness``: a server
subprocess on a free 127.0.0.1 port with a temporary database, one per module), on a tiny
workspace: the ablation fan-out, its MLflow parent/child runs, the task DAG of a training run,
the comparison artifacts, failure isolation (and no task retries), the bound on children running
at once on the deployment; and that the task loop trains exactly what ``Trainer.fit`` trains."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from flows.ablation import AblationError, ChildJob, ablation, resolve_variants, run_on_deployment
from flows.training import FLOW_RUN_TAG, SEED_TAG
from tpgrpo.config import load_config
from tpgrpo.rundir import run_name, study_run_name
from tpgrpo.rewards import register_reward

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("rollout", "score", "credit", "update", "evaluate", "checkpoint")


# --------------------------------------------------------------------------- test rewards


def _flaky_reward():
    """The brightness reward, except that its second call raises: with the tiny workspace that
    is the first rollout's scoring (the first call is the base-model evaluation). Nothing
    retries it: the run fails."""
    from tpgrpo.rewards import build_reward

    inner, calls = build_reward("brightness"), [0]

    def score(images, prompts, metadata):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("flaky reward: transient failure")
        return inner(images, prompts, metadata)

    return score


def _broken_reward():
    def score(images, prompts, metadata):
        raise RuntimeError("broken reward: always fails")

    return score


register_reward("flaky", _flaky_reward, overwrite=True)
register_reward("broken", _broken_reward, overwrite=True)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory):
    """A Prefect server for this module; stopped (and its database removed) at teardown."""
    from prefect.settings import PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings(updates={PREFECT_HOME: str(tmp_path_factory.mktemp("prefect-home"))}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory, tiny_pipe) -> Path:
    from tpgrpo.models import save_pipeline
    from tpgrpo.world import write_prompt_sets

    root = tmp_path_factory.mktemp("assets")
    save_pipeline(tiny_pipe, root / "base")
    write_prompt_sets(root / "prompts", n_train=16, n_test=4, seed=0)
    return root


def _workspace(tmp_path: Path, assets: Path, epochs: int = 1) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update(runs_dir=str(tmp_path / "runs"))
    params["ablation"].update(runs_dir=str(tmp_path / "runs"), reports_dir=str(tmp_path / "reports"))
    params["model"].update(path=str(assets / "base"), resolution=32)
    params["data"].update(dir=str(assets / "prompts"))
    params["sample"].update(num_steps=3, window_size=2, batch_size=4, group_size=2, batches_per_epoch=1)
    params["train"].update(epochs=epochs, lora_rank=2)
    # Evaluation scores the training reward on the test prompts only, so the flaky reward's second
    # call is the first scoring.
    params["eval"].update(num_steps=3, every=1, reward=None, heldin_prompts=0)
    params["reward"].update(name="brightness")
    params["tracking"].update(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="flows-test")
    params["variants"].update({"flaky": {"reward.name": "flaky"}, "broken": {"reward.name": "broken"}})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _mlflow_client(uri: str, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    return client, client.get_experiment_by_name(experiment).experiment_id


def _mlflow(tmp_path: Path):
    return _mlflow_client(f"sqlite:///{tmp_path / 'mlflow.db'}", "flows-test")


def _children(client, experiment_id: str, parent_run_id: str) -> dict[str, object]:
    runs = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {run.info.run_name: run for run in runs}


def _task_run_names(flow_run_id: str, expected: set[str], timeout: float = 30.0) -> dict[str, object]:
    """Task runs reach the server as events: poll until the expected ones are recorded."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            by_name = {run.name: run for run in runs if run.state is not None and run.state.is_final()}
            if expected <= set(by_name) or time.monotonic() > deadline:
                return by_name
            time.sleep(0.5)


def _flow_run(flow_run_id: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def _frame(path: Path):
    import pandas as pd

    frame = pd.read_csv(path)
    return frame[[c for c in frame.columns if not c.startswith("time/")]]


# --------------------------------------------------------------------------- fast checks


def test_variant_names_are_checked_before_anything_runs() -> None:
    cfg = load_config(ROOT / "params.yaml")
    assert resolve_variants(cfg, None) == cfg.ablation.variants == [
        "flow_grpo", "incremental", "tp_grpo", "tp_grpo_no_consistent", "tp_grpo_no_first_step", "tp_grpo_no_balance",
        "tp_grpo_published",
    ]
    assert resolve_variants(cfg, ["tp_grpo", "flow_grpo", "tp_grpo"]) == ["tp_grpo", "flow_grpo"]
    with pytest.raises(ValueError, match=r"unknown variant 'tp-grpo'; defined in the params file: flow_grpo, incremental"):
        resolve_variants(cfg, ["flow_grpo", "tp-grpo"])


def test_run_names_keep_runs_variant_for_the_params_seed() -> None:
    assert run_name("tp_grpo", None, 42) == "tp_grpo"
    assert run_name("tp_grpo", 42, 42) == "tp_grpo"
    assert run_name("tp_grpo", 7, 42) == "tp_grpo-seed7"


def test_ablation_form_validates_parameters() -> None:
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(ablation).model_dump()["properties"]
    assert schema["seeds"]["default"] is None
    assert {"items": {"type": "integer"}, "minItems": 1, "type": "array"} in schema["seeds"]["anyOf"]
    assert {"minimum": 1, "type": "integer"} in schema["epochs"]["anyOf"]
    assert {"minimum": 1, "type": "integer"} in schema["max_parallel"]["anyOf"]
    assert "null = the study's" in schema["variants"]["description"]
    assert "null = the default study" in schema["study"]["description"]


def test_failed_children_always_end_failed_under_the_parent(tmp_path: Path) -> None:
    """A crashed child can leave its MLflow run RUNNING, or die before creating one; the
    ablation settles both with the tags it gives them (seed, flow run)."""
    from tpgrpo.tracking import MLflowTracker, settle_child_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = MLflowTracker(uri, "settle", run_name="ablation")
    stuck = MLflowTracker(uri, "settle", run_name="tp_grpo", parent_run_id=parent.run_id, tags={FLOW_RUN_TAG: "run-1"})
    done = MLflowTracker(uri, "settle", run_name="incremental", parent_run_id=parent.run_id, tags={FLOW_RUN_TAG: "run-3"})
    done.finish("FINISHED")

    def settle(name: str, variant: str, seed: int, status: str, flow_run: str, message: str = "") -> str | None:
        return settle_child_run(
            uri, "settle", parent.run_id, run_name=name, variant=variant, status=status, message=message,
            tags={SEED_TAG: str(seed), FLOW_RUN_TAG: flow_run}, key_tag=FLOW_RUN_TAG,
        )

    assert settle("tp_grpo", "tp_grpo", 42, "failed", "run-1", "Crashed") == stuck.run_id
    created_id = settle("flow_grpo-seed7", "flow_grpo", 7, "failed", "run-2", "boom")
    assert settle("incremental", "incremental", 42, "ok", "run-3") == done.run_id
    assert settle("never", "tp_grpo", 1, "ok", "run-4") is None  # a finished child without a run: nothing made up
    assert settle_child_run(None, "settle", parent.run_id, run_name="x", variant="x", status="failed") is None

    client, experiment_id = _mlflow_client(uri, "settle")
    children = _children(client, experiment_id, parent.run_id)
    assert set(children) == {"tp_grpo", "flow_grpo-seed7", "incremental"}
    assert children["tp_grpo"].info.run_id == stuck.run_id and children["tp_grpo"].info.status == "FAILED"
    assert children["tp_grpo"].data.tags["error"] == "Crashed"
    created = children["flow_grpo-seed7"]
    assert created.info.run_id == created_id
    assert created.info.status == "FAILED" and created.data.tags["error"] == "boom"
    assert created.data.tags["variant"] == "flow_grpo" and created.data.tags["seed"] == "7"
    assert created.data.tags[FLOW_RUN_TAG] == "run-2"
    assert children["incremental"].info.status == "FINISHED" and "error" not in children["incremental"].data.tags


# --------------------------------------------------------------------------- against a server


@pytest.mark.slow
def test_deployment_children_run_at_most_max_parallel_at_once(prefect_api, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the deployment, each child holds one of max_parallel task threads until its flow run
    ends (``run_deployment`` blocks): never more unfinished at once, none left out, outcomes in
    job order, a child that could not start or ended Failed listed as failed."""
    import threading
    from types import SimpleNamespace
    from uuid import uuid4

    from prefect import flow
    from prefect.states import Completed, Failed

    import flows.ablation

    lock = threading.Lock()
    running, most, started = [0], [0], []

    def run_deployment(name: str, parameters: dict, flow_run_name: str) -> SimpleNamespace:
        assert name == "tpgrpo-train/train" and flow_run_name == f"train-{parameters['run_name']}"
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            started.append(parameters["run_name"])
        time.sleep(0.5)  # the child flow run trains
        with lock:
            running[0] -= 1
        if parameters["run_name"] == "c":
            raise RuntimeError("deployment deleted")
        state = Failed(message="Flow run encountered an exception: boom") if parameters["run_name"] == "b" else Completed()
        return SimpleNamespace(id=uuid4(), state=state)

    monkeypatch.setattr(flows.ablation, "run_deployment", run_deployment)
    jobs = [ChildJob(name, "tp_grpo", seed, {"run_name": name}) for seed, name in enumerate("abcdef")]

    @flow
    def fan_out(max_parallel: int) -> list:
        return run_on_deployment(jobs, max_parallel)

    outcomes = fan_out(2)
    assert most[0] == 2 and sorted(started) == list("abcdef")
    assert [(o.name, o.seed, o.status) for o in outcomes] == [
        ("a", 0, "ok"), ("b", 1, "failed"), ("c", 2, "failed"), ("d", 3, "ok"), ("e", 4, "ok"), ("f", 5, "ok"),
    ]
    assert outcomes[1].message == "boom" and outcomes[1].flow_run_id is not None
    assert outcomes[2].message == "RuntimeError: deployment deleted" and outcomes[2].flow_run_id is None
    running[0] = most[0] = 0
    fan_out(1)
    assert most[0] == 1


@pytest.mark.slow
def test_ablation_trains_children_and_compares(prefect_api, assets: Path, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    params = _workspace(tmp_path, assets)
    settings = [*load_config(params).ablation.override_list(), "train.epochs=2"]
    names = {v: study_run_name(v, 42, settings) for v in ("flow_grpo", "tp_grpo")}
    reports = tmp_path / "reports"
    state = ablation(
        variants=["flow_grpo", "tp_grpo"],
        seeds=[42],
        epochs=2,
        params_path=str(params),
        reports_dir=str(reports),
        in_process=True,
        return_state=True,
    )
    assert state.is_completed(), state.message
    summary = state.result()
    parent_flow_run_id = str(state.state_details.flow_run_id)

    # MLflow: one parent, one FINISHED child per variant under it.
    client, experiment_id = _mlflow(tmp_path)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags[FLOW_RUN_TAG] == parent_flow_run_id
    children = _children(client, experiment_id, parent.info.run_id)
    assert set(children) == set(names.values())
    children = {v: children[names[v]] for v in names}
    assert all(run.info.status == "FINISHED" for run in children.values())
    assert children["flow_grpo"].data.params["credit.mode"] == "outcome"
    assert children["tp_grpo"].data.tags["variant"] == "tp_grpo"

    # Prefect: the children are Completed subflow runs of the ablation, with the task DAG.
    # The study's overrides (params.yaml: eval.every 2) reach every child: no evaluation at epoch 1.
    assert load_config(params).ablation.overrides["eval.every"] == 2
    expected = {f"{name}-epoch-{e}" for name in TASKS for e in (1, 2)} | {"evaluate-epoch-0", "finalize"}
    expected -= {"evaluate-epoch-1"}
    for name, run in children.items():
        flow_run = _flow_run(run.data.tags[FLOW_RUN_TAG])
        assert flow_run.name == f"train-{names[name]}" and flow_run.state.is_completed()
        assert flow_run.parent_task_run_id is not None  # linked to the ablation as a subflow
        with get_client(sync_client=True) as prefect:
            assert str(prefect.read_task_run(flow_run.parent_task_run_id).flow_run_id) == parent_flow_run_id
        task_runs = _task_run_names(str(flow_run.id), expected)
        assert expected <= set(task_runs) and "evaluate-epoch-1" not in task_runs, sorted(task_runs)
        assert all(task_runs[n].state.is_completed() for n in expected)
        # the DAG: score depends on rollout, credit on score, update on credit
        inputs = {k: {i.id for i in v} for k, v in task_runs["credit-epoch-2"].task_inputs.items()}
        assert task_runs["score-epoch-2"].id in inputs["upstream"]

    # The comparison: files, Prefect artifacts of the ablation run, parent MLflow artifacts.
    text = (reports / "ablation.md").read_text()
    assert "| `flow_grpo` | 1/1 |" in text and "| `tp_grpo` | 1/1 |" in text
    data = json.loads((reports / "ablation.json").read_text())
    assert data["study"] == "ablation" and data["seeds"] == [42] and data["eval_prompts"] == 4
    assert (reports / "ablation_eval_reward.png").stat().st_size > 10_000
    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[parent_flow_run_id]))
        )
    by_key = {a.key: a for a in artifacts}
    table = by_key["tpgrpo-study-ablation"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert [row["variant"] for row in table] == ["flow_grpo", "tp_grpo"]
    metrics = json.loads((tmp_path / "runs" / names["tp_grpo"] / "metrics.json").read_text())
    assert table[1]["final_mean"] == pytest.approx(metrics["eval_reward"], abs=1e-4) and table[1]["seeds_ok"] == 1
    assert "| `tp_grpo` | 1/1 |" in by_key["tpgrpo-study-report-ablation"].data
    assert all(len(repr(v).split(".")[-1]) <= 4 for row in table for v in row.values() if isinstance(v, float))
    assert _flow_run(parent_flow_run_id).name.startswith("study-ablation-")
    assert parent.info.run_name == _flow_run(parent_flow_run_id).name

    # Logs: every task names its run, epoch and figures; the trainer's epoch line reaches the UI.
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    child_flow_run = children["tp_grpo"].data.tags[FLOW_RUN_TAG]
    with get_client(sync_client=True) as prefect:
        logs = [r.message for r in prefect.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[child_flow_run])))]
    assert any(m.startswith("tp_grpo seed 42, epoch 2, score: reward/mean ") for m in logs), logs
    assert any(m.startswith("tp_grpo seed 42, epoch 2, evaluate: eval/reward ") for m in logs), logs
    assert any(m.startswith(f"{names['tp_grpo']} epoch 2/2 | train reward ") for m in logs), logs
    assert sorted(a.path for a in client.list_artifacts(parent.info.run_id, "study")) == [
        "study/ablation.json",
        "study/ablation.md",
        "study/ablation_eval_reward.png",
        "study/ablation_turning_rate_per_step.png",
    ]

    # A named study with the same settings reuses the finished run instead of training it again.
    raw = yaml.safe_load(params.read_text())
    raw["studies"] = {
        "pair": {"variants": ["tp_grpo"], "reference": "tp_grpo", "seeds": [42], "epochs": 2, "overrides": dict(raw["ablation"]["overrides"])}
    }
    params.write_text(yaml.safe_dump(raw))
    before = (tmp_path / "runs" / names["tp_grpo"] / "metrics.json").stat().st_mtime_ns
    again = ablation(study="pair", params_path=str(params), in_process=True)
    assert [(r["name"], r["status"]) for r in again["runs"]] == [(names["tp_grpo"], "ok")]
    assert again["runs"][0]["message"].startswith("reused")
    assert (tmp_path / "runs" / names["tp_grpo"] / "metrics.json").stat().st_mtime_ns == before
    assert "| `tp_grpo` | 1/1 |" in (reports / "pair.md").read_text()

    # The task loop trains exactly what Trainer.fit trains.
    from tpgrpo.trainer import Trainer

    study = load_config(params).ablation.override_list()
    cfg = load_config(params, variant="tp_grpo", overrides=[*study, "train.epochs=2", f"runs_dir={tmp_path / 'fit'}"])
    Trainer(cfg, variant="tp_grpo").fit()
    flow_dir, fit_dir = tmp_path / "runs" / names["tp_grpo"], tmp_path / "fit" / "tp_grpo"
    import pandas as pd

    pd.testing.assert_frame_equal(_frame(flow_dir / "history.csv"), _frame(fit_dir / "history.csv"))
    flow_metrics, fit_metrics = (json.loads((d / "metrics.json").read_text()) for d in (flow_dir, fit_dir))
    flow_metrics.pop("minutes", None), fit_metrics.pop("minutes", None)
    assert flow_metrics == fit_metrics
    assert sorted(p.name for p in (flow_dir / "checkpoints").iterdir()) == sorted(
        p.name for p in (fit_dir / "checkpoints").iterdir()
    )


@pytest.mark.slow
def test_failing_variant_is_isolated_and_nothing_is_retried(prefect_api, assets: Path, tmp_path: Path) -> None:
    params = _workspace(tmp_path, assets)
    reports = tmp_path / "reports"
    state = ablation(
        variants=["broken", "flaky", "flow_grpo"],
        seeds=[42, 7],
        params_path=str(params),
        reports_dir=str(reports),
        in_process=True,
        return_state=True,
    )
    assert state.is_failed()
    with pytest.raises(AblationError):
        state.result()
    settings = load_config(params).ablation.override_list()
    names = {(v, seed): study_run_name(v, seed, settings) for v in ("broken", "flaky", "flow_grpo") for seed in (42, 7)}
    # The scorer's error, wrapped in the RewardError naming epoch and batch when it fails in scoring.
    assert re.search(
        rf"4 of 6 runs failed: {names['broken', 42]}: .*RuntimeError: broken reward: always fails.*; {names['broken', 7]}: "
        rf".*; {names['flaky', 42]}: .*flaky reward: transient failure",
        state.message,
    )

    client, experiment_id = _mlflow(tmp_path)
    (parent,) = client.search_runs([experiment_id], filter_string=f"tags.{FLOW_RUN_TAG} = '{state.state_details.flow_run_id}'")
    assert parent.info.status == "FAILED"
    failed = [names[v, seed] for v in ("broken", "flaky") for seed in (42, 7)]
    assert parent.data.tags["failed_variants"] == ",".join(failed)
    children = _children(client, experiment_id, parent.info.run_id)
    assert {name: run.info.status for name, run in children.items()} == {
        **{name: "FAILED" for name in failed},
        names["flow_grpo", 42]: "FINISHED",
        names["flow_grpo", 7]: "FINISHED",
    }
    assert children[names["flow_grpo", 7]].data.tags["seed"] == "7" and children[names["flow_grpo", 42]].data.tags["seed"] == "42"
    assert (tmp_path / "runs" / names["flow_grpo", 7] / "metrics.json").is_file()

    broken = _flow_run(children[names["broken", 42]].data.tags[FLOW_RUN_TAG])
    assert broken.state.is_failed() and "broken reward" in broken.state.message
    # One retry layer, the remote reward client's: the score task that raised ran once and failed its run.
    for seed in (42, 7):
        name = names["flaky", seed]
        flaky = _flow_run(children[name].data.tags[FLOW_RUN_TAG])
        assert flaky.name == f"train-{name}" and flaky.state.is_failed()
        task_runs = _task_run_names(str(flaky.id), {"score-epoch-1"})
        assert task_runs["score-epoch-1"].state.is_failed() and task_runs["score-epoch-1"].run_count == 1

    study = (reports / "ablation.md").read_text()
    assert "| `broken` | 0/2 | n/a |" in study and "| `flaky` | 0/2 | n/a |" in study and "| `flow_grpo` | 2/2 |" in study
    assert re.search(rf"- `{names['broken', 7]}`: .*broken reward: always fails", study)


@pytest.mark.slow
def test_unknown_variant_fails_the_ablation_naming_it(prefect_api, assets: Path, tmp_path: Path) -> None:
    params = _workspace(tmp_path, assets)
    with pytest.raises(ValueError, match="unknown variant 'tp-grpo'"):
        ablation(variants=["tp-grpo"], params_path=str(params), reports_dir=str(tmp_path / "r"), in_process=True)
    assert not (tmp_path / "mlflow.db").exists()  # nothing started
    with pytest.raises(Exception, match="seeds"):
        ablation(variants=["tp_grpo"], seeds=[], params_path=str(params), in_process=True)
