"""What the MLflow UI shows of this project, against real MLflow sqlite stores: the experiment's
kind, description and key-metrics view, run descriptions naming both rewards, the key metrics,
the per-constraint evaluation at step 0, the runs' source, and the helpers around them."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tpgrpo.errors import TrackingError
from tpgrpo.summary import KEYS as SUMMARY_KEYS
from tpgrpo.summary import run_summary
from tpgrpo.tracking import (
    EVAL_REWARD_TAG,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    KEY_METRICS,
    KEY_METRICS_VIEW,
    NOTE_TAG,
    SAVED_VIEW_TAG_PREFIX,
    SOURCE_NAME_TAG,
    TRAIN_REWARD_TAG,
    MLflowTracker,
    describe_run,
    describe_store,
    describe_study,
    entry_point,
    key_metrics,
    key_metrics_view,
    log_to_run,
    ui_url,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import trainer_config  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

VIEW_TAG = SAVED_VIEW_TAG_PREFIX + KEY_METRICS_VIEW
PARAMS = {
    "variant": "tp_grpo",
    "credit.mode": "turning_point",
    "train.epochs": "10",
    "seed": "42",
    "reward.name": "verifiable_soft",
    "eval.reward.name": "verifiable",
    "eval.every": "5",
    "eval.heldin_prompts": "128",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(uri, client) of one sqlite store shared by this module's tests."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('ui') / 'mlflow.db'}"
    MLflowTracker(uri, "warmup").finish()  # creates the schema once
    return uri, MlflowClient(tracking_uri=uri)


def _view(tags):
    envelope = json.loads(tags[VIEW_TAG])
    return envelope, json.loads(envelope["state"])


# --------------------------------------------------------------------------- the experiment


def test_a_new_experiment_opens_as_model_training_with_the_key_metrics_view(store):
    uri, client = store
    MLflowTracker(uri, "fresh").finish()
    tags = client.get_experiment_by_name("fresh").tags
    assert tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    assert "Model training" in tags[NOTE_TAG] and "Key metrics" in tags[NOTE_TAG]
    # The envelope the UI parses: a string name, a number createdAt, the state as JSON text.
    envelope, state = _view(tags)
    assert envelope["name"] == "Key metrics" and isinstance(envelope["createdAt"], int)
    assert state == key_metrics_view()
    assert state["selectedColumns"][:4] == [f"metrics.`{k}`" for k in KEY_METRICS]
    assert "params.`credit.mode`" in state["selectedColumns"] and f"tags.`{EVAL_REWARD_TAG}`" in state["selectedColumns"]
    # Order and widths cover the chosen columns; "duration" keeps its place before them.
    assert state["columnOrder"] == ["duration", *state["selectedColumns"]]
    assert set(state["columnWidths"]) == set(state["selectedColumns"])
    assert state["columnWidths"]["metrics.`summary/eval_reward_change`"] == 8 * len("summary/eval_reward_change") + 24


def test_an_existing_experiment_gets_what_it_lacks_and_keeps_what_it_has(store):
    uri, client = store
    bare = client.create_experiment("bare")
    owned = client.create_experiment("owned", tags={EXPERIMENT_KIND_TAG: "finetuning", NOTE_TAG: "mine"})
    stale = json.dumps({"name": "Key metrics", "createdAt": 1, "updatedAt": 1, "state": json.dumps({"selectedColumns": []})})
    client.set_experiment_tag(owned, VIEW_TAG, stale)

    MLflowTracker(uri, "bare").finish()
    MLflowTracker(uri, "owned").finish()
    bare_tags, owned_tags = client.get_experiment(bare).tags, client.get_experiment(owned).tags
    assert bare_tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert NOTE_TAG in bare_tags and _view(bare_tags)[1] == key_metrics_view()
    assert owned_tags[EXPERIMENT_KIND_TAG] == "finetuning" and owned_tags[NOTE_TAG] == "mine"
    assert _view(owned_tags)[1] == key_metrics_view()  # an outdated view is brought up to date


def test_a_tag_that_cannot_be_written_does_not_stop_the_run(store, monkeypatch, caplog):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri, client = store
    client.create_experiment("locked")

    def refuse(self, experiment_id, key, value):
        raise MlflowException("database is locked")

    monkeypatch.setattr(MlflowClient, "set_experiment_tag", refuse)
    tracker = MLflowTracker(uri, "locked")
    tracker.finish()
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert "could not set tag" in caplog.text


def test_the_installed_ui_reads_the_tags_and_parameters_we_write():
    """The names come from MLflow's UI bundle, not from a documented API: an MLflow upgrade that
    renames them fails here."""
    import mlflow

    bundle = "".join(p.read_text(errors="replace") for p in (Path(mlflow.__file__).parent / "server/js/build/static/js").glob("*.js"))
    for needle in (SAVED_VIEW_TAG_PREFIX, '"viewStateShareKey"', f'"{EXPERIMENT_KIND_TAG}"', EXPERIMENT_KIND,
                   '"workflowType"', "machine_learning", "selectedColumns", "columnWidths", "note.content"):
        assert needle in bundle, needle


def test_ui_url_opens_the_runs_with_the_key_metrics_view(store):
    uri, client = store
    MLflowTracker(uri, "linked").finish()
    experiment_id = client.get_experiment_by_name("linked").experiment_id
    assert ui_url(uri, "linked", "http://127.0.0.1:5000/") == (
        f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey=key-metrics"
    )
    assert ui_url(uri, "no-such-experiment") is None


# --------------------------------------------------------------------------- runs


def test_run_description_names_both_rewards_and_what_the_key_metrics_mean():
    tags = describe_run(PARAMS)
    note = tags[NOTE_TAG]
    assert tags[TRAIN_REWARD_TAG] == "verifiable_soft" and tags[EVAL_REWARD_TAG] == "verifiable"
    assert note.startswith("**tp_grpo**, credit mode `turning_point`, 10 epochs, seed 42.")
    assert "`reward/*`: the **training reward** `verifiable_soft` (graded" in note
    assert "`eval/*`: the **evaluation reward** `verifiable` (strict" in note
    assert "every 5 epochs" in note and "step 0 is the base model" in note
    assert "`eval/train_reward`" in note and "`eval/heldin_reward`" in note
    assert all(f"`{key}`" in note for key in KEY_METRICS)
    assert "Result:" not in note and "`history.csv`" in note
    assert "`history.csv`" not in describe_run(PARAMS, artifacts=False)[NOTE_TAG]

    summary = {"summary/eval_reward": 0.5277, "summary/eval_reward_change": 0.046, "summary/minutes": 4.6}
    assert "Result: evaluation reward **0.5277**; **+0.0460** from the base model; 4.6 minutes." in describe_run(PARAMS, summary)[NOTE_TAG]


def test_run_description_when_evaluation_uses_the_training_reward():
    params = {**PARAMS, "reward.name": "multi", "reward.weights": '{"pickscore":1.0,"ocr":0.5}', "eval.heldin_prompts": "0"}
    del params["eval.reward.name"]
    params["eval.reward"] = "null"
    tags = describe_run(params)
    assert tags[TRAIN_REWARD_TAG] == tags[EVAL_REWARD_TAG] == "multi (ocr 0.5, pickscore 1)"
    assert "(the training reward)" in tags[NOTE_TAG]
    assert "`eval/train_reward`" not in tags[NOTE_TAG] and "`eval/heldin_reward`" not in tags[NOTE_TAG]


def test_run_summary_and_key_metrics_by_hand():
    # 0.55 - 0.5 = 0.05; turning rates (0.1 + 0.2 + 0.3) / 3 = 0.2, NaN and None skipped.
    rates = [0.1, float("nan"), 0.2, None, 0.3]
    summary = run_summary(0.55, 0.5, rates, heldin_reward=0.61)
    assert list(summary) == list(SUMMARY_KEYS)
    assert summary == pytest.approx(
        {"base_reward": 0.5, "reward": 0.55, "delta": 0.05, "heldin_reward": 0.61, "turning_rate": 0.2}
    )
    # Rounded for the runs table: 4 digits, minutes 1 (4.56 -> 4.6).
    assert key_metrics(summary, 4.56) == {
        "summary/eval_reward": 0.55,
        "summary/eval_reward_change": 0.05,
        "summary/turning_rate": 0.2,
        "summary/minutes": 4.6,
    }
    # No base evaluation: no change; no finite turning rate, no held-in evaluation: None.
    bare = run_summary(0.123456, None, [float("nan")])
    assert bare == {"base_reward": None, "reward": 0.123456, "delta": None, "heldin_reward": None, "turning_rate": None}
    assert key_metrics(bare, 1.0) == {"summary/eval_reward": 0.1235, "summary/minutes": 1.0}
    # Flow-GRPO logs a turning rate of 0 every epoch: none of its steps is credited as one.
    assert run_summary(0.5, 0.4, [0.0, 0.0])["turning_rate"] == 0.0


def test_study_description():
    note = describe_study("headline", ["flow_grpo", "tp_grpo"], [1, 2])[NOTE_TAG]
    assert note.startswith("**Study headline**: variants flow_grpo, tp_grpo x seeds 1, 2.")
    assert "child run" in note and "study/<variant>/final_mean" in note


def test_a_trained_run_is_described_summarised_and_evaluated_per_constraint_from_step_0(store, trainer_workspace):
    """One epoch of the tiny trainer on the brightness reward, evaluated with the verifiable
    reward (per-constraint details): what a user finds on the run's page."""
    from tpgrpo.trainer import Trainer

    uri, client = store
    cfg = trainer_config(trainer_workspace, "runs-ui", {"train": {"epochs": 1}, "eval": {"reward": {"name": "verifiable"}}})
    with MLflowTracker(uri, "trained", run_name="tp_grpo") as tracker:
        result = Trainer(cfg, variant="tp_grpo", tracker=tracker).fit()
    run = client.get_run(tracker.run_id)

    note = run.data.tags[NOTE_TAG]
    assert run.data.tags[TRAIN_REWARD_TAG] == "brightness" and run.data.tags[EVAL_REWARD_TAG] == "verifiable"
    assert "**training reward** `brightness`" in note and "**evaluation reward** `verifiable`" in note
    assert "Result: evaluation reward" in note

    # Every per-constraint evaluation metric has the base model's value at step 0, as eval/reward.
    details = result.eval_details_initial
    constraints = sorted(k for k, v in details.items() if k not in ("train_reward", "heldin_reward") and math.isfinite(v))
    assert {"color", "count", "shape"} <= set(constraints)
    for name in ["reward", "train_reward", *constraints]:
        steps = {m.step: m.value for m in client.get_metric_history(tracker.run_id, f"eval/{name}")}
        expected = result.eval_reward_initial if name == "reward" else result.eval_details_initial[name]
        assert steps[0] == pytest.approx(expected), name
        assert sorted(steps) == [0, 1], name

    summary = {k: v for k, v in run.data.metrics.items() if k.startswith("summary/")}
    assert summary["summary/eval_reward"] == round(result.eval_reward_final, 4)
    assert summary["summary/eval_reward_change"] == round(result.eval_reward_final - result.eval_reward_initial, 4)
    assert summary["summary/turning_rate"] == round(result.history[0]["turning/rate"], 4)
    assert [m.step for m in client.get_metric_history(tracker.run_id, "summary/eval_reward")] == [1]

    def listing(path=None):
        return sorted(a.path for a in client.list_artifacts(tracker.run_id, path))

    assert {"metrics.json", "history.csv", "samples", "eval_scores", "final"} <= set(listing())
    assert listing("samples") == ["samples/epoch_0000.png", "samples/epoch_0001.png"]
    assert listing("eval_scores") == ["eval_scores/epoch_0000.csv", "eval_scores/epoch_0001.csv"]
    assert run.data.tags[SOURCE_NAME_TAG] == entry_point()


def test_entry_point_names_the_project_file_or_the_command(monkeypatch):
    root = Path(__file__).resolve().parents[1]
    monkeypatch.setattr(sys, "argv", [str(root / "benchmarks" / "epoch_cost.py")])
    assert entry_point() == "benchmarks/epoch_cost.py"
    monkeypatch.setattr(sys, "argv", [str(root / ".venv" / "bin" / "tpgrpo"), "train"])
    assert entry_point() == "tpgrpo"
    monkeypatch.setattr(sys, "argv", ["/usr/lib/python3/site-packages/pytest/__main__.py"])
    assert entry_point() == "pytest"
    monkeypatch.setattr(sys, "argv", ["-c"])
    assert entry_point() == "python"


def test_entry_point_inside_a_prefect_flow_is_the_flow_file(monkeypatch):
    """Under a Prefect worker sys.argv[0] is Prefect's engine.py; the flow being run is the source."""
    from prefect.context import FlowRunContext

    from flows.ablation import ablation
    from flows.training import train_variant

    monkeypatch.setattr(sys, "argv", ["/somewhere/prefect/engine.py"])
    assert entry_point() == "engine.py"  # no flow running
    for flow, source in ((ablation, "flows/ablation.py"), (train_variant, "flows/training.py")):
        monkeypatch.setattr(FlowRunContext, "get", classmethod(lambda cls, flow=flow: SimpleNamespace(flow=flow)))
        assert entry_point() == source


def test_a_new_run_records_its_source(store, monkeypatch):
    uri, client = store
    root = Path(__file__).resolve().parents[1]
    monkeypatch.setattr(sys, "argv", [str(root / "flows" / "ablation.py")])
    with MLflowTracker(uri, "source") as tracker:
        pass
    assert client.get_run(tracker.run_id).data.tags[SOURCE_NAME_TAG] == "flows/ablation.py"


# --------------------------------------------------------------------------- existing stores


def _old_run(client, experiment_id, mode, status="FINISHED", base=True):
    """A run as the trainer logged it before descriptions and key metrics; step 2 evaluated
    twice (a resumed run), the later value logged first."""
    from mlflow.entities import Metric, Param

    run = client.create_run(experiment_id, run_name=f"old-{mode}")
    params = [Param(k, v) for k, v in {**PARAMS, "credit.mode": mode}.items()]
    metrics = [Metric("eval/reward", 0.40, 0, 0)] if base else [Metric("eval/reward", 0.42, 0, 1)]
    metrics += [Metric("eval/reward", 0.45, 2, 2), Metric("eval/reward", 0.50, 1, 2)]
    rates = (0.1, 0.3) if mode == "turning_point" else (0.0, 0.0)  # other modes log 0
    metrics += [Metric("turning/rate", r, 0, s) for s, r in zip((1, 2), rates)]
    metrics += [Metric("time/minutes", m, 0, s) for s, m in ((1, 1.0), (2, 2.04))]
    client.log_batch(run.info.run_id, metrics=metrics, params=params)
    client.set_terminated(run.info.run_id, status=status)
    return run.info.run_id


def test_describe_store_fixes_runs_logged_before(store):
    uri, client = store
    experiment_id = client.create_experiment("old")
    tp, outcome = _old_run(client, experiment_id, "turning_point"), _old_run(client, experiment_id, "outcome")
    failed = _old_run(client, experiment_id, "turning_point", status="FAILED")
    no_base = _old_run(client, experiment_id, "turning_point", base=False)
    parent = client.create_run(experiment_id, run_name="study").info.run_id  # no credit.mode: not a training run

    assert describe_store(uri, "old") == 4
    assert _view(client.get_experiment(experiment_id).tags)[1] == key_metrics_view()
    # The last eval/reward of step 2 (the later of two), the change from step 0, the mean turning rate.
    assert {k: v for k, v in client.get_run(tp).data.metrics.items() if k.startswith("summary/")} == {
        "summary/eval_reward": 0.45,
        "summary/eval_reward_change": 0.05,
        "summary/turning_rate": 0.2,
        "summary/minutes": 2.0,
    }
    assert client.get_run(outcome).data.metrics["summary/turning_rate"] == 0.0
    assert "summary/eval_reward_change" not in client.get_run(no_base).data.metrics
    assert client.get_run(no_base).data.metrics["summary/eval_reward"] == 0.45
    assert "Result: evaluation reward **0.4500**" in client.get_run(tp).data.tags[NOTE_TAG]
    assert not any(k.startswith("summary/") for k in client.get_run(failed).data.metrics)
    assert NOTE_TAG in client.get_run(failed).data.tags
    assert NOTE_TAG not in client.get_run(parent).data.tags
    assert describe_store(uri, "old") == 0  # nothing left to do
    with pytest.raises(TrackingError, match="no experiment 'missing'"):
        describe_store(uri, "missing")


def test_log_to_run_adds_files_and_leaves_the_run_finished(store, tmp_path):
    uri, client = store
    with MLflowTracker(uri, "evaluated") as tracker:
        pass
    (tmp_path / "eval.json").write_text("{}")
    (tmp_path / "eval.png").write_bytes(b"png")
    assert log_to_run(uri, tracker.run_id, [tmp_path / "eval.json", tmp_path / "eval.png"], "evaluate")
    assert sorted(a.path for a in client.list_artifacts(tracker.run_id, "evaluate")) == ["evaluate/eval.json", "evaluate/eval.png"]
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert not log_to_run(None, tracker.run_id, [tmp_path / "eval.json"])
    assert not log_to_run(uri, None, [tmp_path / "eval.json"])
    with pytest.raises(TrackingError, match="no MLflow run 0123"):
        log_to_run(uri, "0123", [tmp_path / "eval.json"])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        log_to_run(uri, tracker.run_id, [tmp_path / "missing.json"])
