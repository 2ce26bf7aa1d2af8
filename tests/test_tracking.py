"""tpgrpo.tracking against a real MLflow sqlite store (one database per module: creating the
schema takes a couple of seconds)."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tpgrpo.tracking import (
    MAX_PARAM_VALUE_LENGTH,
    PARENT_RUN_TAG,
    TRUNCATION_MARKER,
    MLflowTracker,
    NullTracker,
    Tracker,
    default_artifact_location,
    finishing,
    flatten_params,
    format_value,
    open_tracker,
    run_tags,
    sanitize_name,
    sqlite_db_path,
)

# MLflow's own SQLAlchemy usage, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")


def test_importing_tracking_does_not_import_mlflow():
    code = "import sys, tpgrpo.tracking; assert 'mlflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

# --------------------------------------------------------------------------- pure helpers


def test_sanitize_name_keeps_valid_names_and_fixes_bad_ones():
    assert sanitize_name("tp_rate/step_3") == "tp_rate/step_3"
    assert sanitize_name("credit.mode") == "credit.mode"
    assert sanitize_name("reward:ocr score") == "reward_ocr score"
    assert sanitize_name("/a//b/./c/") == "a/b/c"
    assert sanitize_name("../up") == "__/up"
    assert sanitize_name("") == "_"
    assert len(sanitize_name("x" * 1000)) == 250


def test_format_value_and_flatten():
    assert format_value(None) == "null"
    assert format_value(True) == "true"
    assert format_value(["to_q", "to_out.0"]) == '["to_q","to_out.0"]'
    assert format_value(3e-4) == "0.0003"
    assert format_value(Path("a/b")) == "a/b"
    assert flatten_params({"credit": {"mode": "outcome", "eta": 1.0}, "reward": {"options": {}}, "seed": 42}) == {
        "credit.mode": "outcome",
        "credit.eta": "1.0",
        "reward.options": "{}",
        "seed": "42",
    }


def test_sqlite_paths_and_artifact_location(tmp_path):
    db = tmp_path / "sub" / "mlflow.db"
    assert sqlite_db_path(f"sqlite:///{db}") == db
    assert sqlite_db_path("http://localhost:5000") is None
    assert sqlite_db_path("sqlite://") is None
    loc = default_artifact_location(f"sqlite:///{db}", "tp grpo/abl")
    assert loc == (tmp_path / "sub" / "mlartifacts" / "tp_grpo_abl").as_uri()
    assert default_artifact_location("http://localhost:5000", "x") is None


# --------------------------------------------------------------------------- the store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(uri, db_dir, client) of one sqlite store shared by this module's tests."""
    from mlflow import MlflowClient

    db_dir = tmp_path_factory.mktemp("store") / "tracking"  # does not exist yet: the tracker creates it
    uri = f"sqlite:///{db_dir / 'mlflow.db'}"
    tracker = MLflowTracker(uri, "warmup")  # creates the schema once
    tracker.finish()
    return uri, db_dir, MlflowClient(tracking_uri=uri)


def _history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_params_land_with_dotted_names_and_long_values_truncated(store, caplog):
    uri, _, client = store
    with MLflowTracker(uri, "params", run_name="p") as tracker:
        long = "x" * (MAX_PARAM_VALUE_LENGTH + 500)
        tracker.log_params(
            {
                "credit.mode": "turning_point",
                "sample.micro_batch_size": None,
                "train.lora_targets": ["to_q", "to_k"],
                "credit.balance": True,
                "model": {"resolution": 64},
                "long.value": long,
                "odd:key": 1,
            }
        )
        # Re-logging the same values is harmless; a changed value is kept as it was, with a warning.
        tracker.log_params({"credit.mode": "turning_point"})
        tracker.log_params({"credit.mode": "outcome", "extra.new": 2})
        assert "credit.mode" in caplog.text
    params = client.get_run(tracker.run_id).data.params
    assert params["credit.mode"] == "turning_point"
    assert params["sample.micro_batch_size"] == "null"
    assert params["train.lora_targets"] == '["to_q","to_k"]'
    assert params["credit.balance"] == "true"
    assert params["model.resolution"] == "64"
    assert params["odd_key"] == "1"
    assert params["extra.new"] == "2"
    assert len(params["long.value"]) == MAX_PARAM_VALUE_LENGTH
    assert params["long.value"].endswith(TRUNCATION_MARKER)


def test_many_params_and_tags_are_batched(store):
    uri, _, client = store
    with MLflowTracker(uri, "params", tags={f"t{i}": str(i) for i in range(150)}) as tracker:
        tracker.log_params({f"p.{i}": i for i in range(250)})
        tracker.set_tags({"note": "x" * 9000})
    run = client.get_run(tracker.run_id)
    assert len([k for k in run.data.params if k.startswith("p.")]) == 250
    assert run.data.tags["t149"] == "149"
    assert run.data.tags["note"].endswith(TRUNCATION_MARKER)


def test_metrics_per_step_and_non_finite_skipped(store):
    uri, _, client = store
    with MLflowTracker(uri, "metrics") as tracker:
        tracker.log_metrics({"loss": 1.0, "tp_rate/step_3": 0.25}, step=0)
        tracker.log_metrics({"loss": float("nan"), "tp_rate/step_3": 0.5, "kl": float("inf")}, step=1)
        tracker.log_metrics({"loss": 0.5, "tp_rate/step_3": 0.75, "reward:ocr": 0.1, "bad": "n/a"}, step=2)
    run_id = tracker.run_id
    assert _history(client, run_id, "loss") == [(0, 1.0), (2, 0.5)]
    assert _history(client, run_id, "tp_rate/step_3") == [(0, 0.25), (1, 0.5), (2, 0.75)]
    assert client.get_metric_history(run_id, "kl") == []
    assert _history(client, run_id, "reward_ocr") == [(2, pytest.approx(0.1))]
    assert "bad" not in client.get_run(run_id).data.metrics


def test_image_and_artifacts_land_beside_the_db_not_in_cwd(store, tmp_path, monkeypatch):
    from PIL import Image

    uri, db_dir, client = store
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    src = tmp_path / "src"
    (src / "ckpt" / "nested").mkdir(parents=True)
    (src / "ckpt" / "weights.safetensors").write_bytes(b"w")
    (src / "ckpt" / "nested" / "state.json").write_text("{}")
    (src / "history.csv").write_text("epoch,reward\n0,0.5\n")

    with MLflowTracker(uri, "artifacts") as tracker:
        tracker.log_image(Image.new("RGB", (8, 8), (255, 0, 0)), "samples/epoch_003.png")
        tracker.log_artifact(src / "history.csv")
        tracker.log_artifact(str(src / "history.csv"), artifact_path="tables")
        tracker.log_artifact(src / "ckpt", artifact_path="checkpoints")
        with pytest.raises(FileNotFoundError):
            tracker.log_artifact(src / "missing.txt")

    run_id = tracker.run_id
    assert tracker.artifact_uri.startswith((db_dir / "mlartifacts" / "artifacts").as_uri() + "/")

    def listing(path=None):
        return sorted(f.path for f in client.list_artifacts(run_id, path))

    assert listing() == ["checkpoints", "history.csv", "samples", "tables"]
    assert listing("samples") == ["samples/epoch_003.png"]
    assert listing("tables") == ["tables/history.csv"]
    assert listing("checkpoints/ckpt") == ["checkpoints/ckpt/nested", "checkpoints/ckpt/weights.safetensors"]
    stored = db_dir / "mlartifacts" / "artifacts" / run_id / "artifacts" / "samples" / "epoch_003.png"
    assert Image.open(stored).getpixel((0, 0)) == (255, 0, 0)
    assert list(elsewhere.iterdir()) == []  # nothing (no ./mlruns) in the working directory


def test_parent_and_child_runs(store, monkeypatch):
    uri, _, client = store
    monkeypatch.setenv("DVC_EXP_NAME", "brave-exp")
    parent = MLflowTracker(uri, "ablation", run_name="ablation", tags=run_tags())
    children = [
        MLflowTracker(uri, "ablation", run_name=v, parent_run_id=parent.run_id, tags=run_tags(v))
        for v in ("flow_grpo", "tp_grpo")
    ]

    # Children log from threads at the same time, as Prefect tasks would.
    def work(tracker):
        for step in range(3):
            tracker.log_metrics({"reward": step / 10}, step=step)
        tracker.finish()

    threads = [threading.Thread(target=work, args=(c,)) for c in children]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    parent.log_metrics({"best_reward": 0.2}, step=0)
    parent.finish()

    exp = client.get_experiment_by_name("ablation")
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.{PARENT_RUN_TAG} = '{parent.run_id}'")
    assert sorted(r.info.run_id for r in found) == sorted(c.run_id for c in children)
    assert sorted(r.data.tags["variant"] for r in found) == ["flow_grpo", "tp_grpo"]
    assert all(r.data.tags["dvc_experiment"] == "brave-exp" for r in found)
    assert all(len(_history(client, r.info.run_id, "reward")) == 3 for r in found)
    assert PARENT_RUN_TAG not in client.get_run(parent.run_id).data.tags


def test_resume_appends_to_the_same_run(store):
    uri, _, client = store
    first = MLflowTracker(uri, "resume", run_name="r")
    first.log_params({"train.epochs": 4})
    first.log_metrics({"reward": 0.1}, step=0)
    first.log_metrics({"reward": 0.2}, step=1)
    first.finish("KILLED")  # e.g. the job was pre-empted
    assert client.get_run(first.run_id).info.status == "KILLED"

    second = MLflowTracker(uri, "resume", run_id=first.run_id, tags={"resumed": "true"})
    assert second.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"
    second.log_params({"train.epochs": 4})  # the trainer logs its params again on resume
    second.log_metrics({"reward": 0.3}, step=2)
    second.log_metrics({"reward": 0.4}, step=3)
    second.finish()
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed"] == "true"
    assert _history(client, first.run_id, "reward") == [(0, 0.1), (1, 0.2), (2, 0.3), (3, 0.4)]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_finish_status_and_context_managers(store):
    uri, _, client = store
    tracker = MLflowTracker(uri, "status")
    tracker.finish("FAILED")
    tracker.finish("FINISHED")  # a second finish is a no-op
    assert client.get_run(tracker.run_id).info.status == "FAILED"
    with pytest.raises(ValueError, match="status"):
        MLflowTracker.finish(tracker, "DONE")  # type: ignore[arg-type]

    with pytest.raises(RuntimeError):
        with MLflowTracker(uri, "status") as failing:
            raise RuntimeError("boom")
    assert client.get_run(failing.run_id).info.status == "FAILED"

    with pytest.raises(KeyboardInterrupt):
        with finishing(MLflowTracker(uri, "status")) as interrupted:
            raise KeyboardInterrupt
    assert client.get_run(interrupted.run_id).info.status == "KILLED"

    with finishing(MLflowTracker(uri, "status")) as ok:
        ok.log_metrics({"x": 1.0}, step=0)
    assert client.get_run(ok.run_id).info.status == "FINISHED"


def test_open_tracker_and_null_tracker(store, tmp_path):
    from PIL import Image

    uri, _, client = store
    null = open_tracker(uri, "open", is_main_process=False)
    assert isinstance(null, NullTracker) and null.run_id is None
    assert isinstance(open_tracker(None, "open", is_main_process=True), NullTracker)
    with null:
        null.log_params({"a.b": None})
        null.log_metrics({"x": math.nan}, step=0)
        null.log_image(Image.new("RGB", (2, 2)), "s.png")
        null.log_artifact(tmp_path / "missing", "x")
        null.set_tags({"k": "v"})
    null.finish("FAILED")
    assert isinstance(null, Tracker)

    real = open_tracker(uri, "open", is_main_process=True, run_name="main", tags={"variant": "tp_grpo"})
    assert isinstance(real, MLflowTracker) and isinstance(real, Tracker)
    real.finish()
    run = client.get_run(real.run_id)
    assert run.info.run_name == "main" and run.data.tags["variant"] == "tp_grpo"


def test_run_tags(monkeypatch, tmp_path):
    from tpgrpo import __version__

    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    outside = tmp_path / "norepo"
    outside.mkdir()
    monkeypatch.chdir(outside)
    assert run_tags() == {"tpgrpo_version": __version__}

    monkeypatch.setenv("DVC_EXP_NAME", "lucid-owls")
    tags = run_tags("flow_grpo")
    assert tags["variant"] == "flow_grpo" and tags["dvc_experiment"] == "lucid-owls"

    repo = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("no git repository with a commit here")
    monkeypatch.chdir(repo)
    monkeypatch.delenv("GIT_CEILING_DIRECTORIES")
    assert run_tags()["git_commit"] == head.stdout.strip()
