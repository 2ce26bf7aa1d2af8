"""Experiment tracking: MLflow behind a small protocol.

The trainer only sees :class:`Tracker`. The main process gets an :class:`MLflowTracker`, every
other process (and runs without a tracking URI) a :class:`NullTracker`; :func:`open_tracker`
makes that choice.

:class:`MLflowTracker` talks to :class:`mlflow.MlflowClient` with explicit run ids and never
touches MLflow's global "active run", so several trackers (an ablation's parent run and its child
runs) can live in one process, in threads or in Prefect tasks.

MLflow is imported lazily: importing it takes over a second and the ``tpgrpo`` command must
stay fast.

Artifact store. With a sqlite backend MLflow's default artifact root is ``./mlruns`` relative to
the *current directory*, so ``dvc exp`` temp copies and runs started from different directories
would scatter artifacts. When this module creates an experiment in a sqlite store it pins the
experiment's artifact location to ``<directory of the db>/mlartifacts/<experiment slug>`` as an
absolute ``file://`` URI. Experiments that already exist keep the location they were created with.

The MLflow UI. Opening a run (:class:`MLflowTracker`) also readies its experiment for MLflow's
web UI (:func:`prepare_experiment`): the experiment kind, a description, and the saved view
"Key metrics" (a runs table with the :data:`KEY_METRICS` columns), each set when missing. These
follow the UI of mlflow 3.17: its JavaScript reads saved views from the experiment tags
``mlflow.sharedViewState.<id>`` and opens one with ``?viewStateShareKey=<id>``; whether an
experiment opens on its runs or on GenAI traces follows the sidebar switch (``workflowType``,
kept in the browser, ``genai`` by default) or the URL's ``workflowType``, not the experiment
tag ``mlflow.experimentKind``, which is set all the same for versions that read it.
:func:`ui_url` is the address that opens the key-metrics view. A training run is described by
:func:`describe_run` and summarised by :func:`key_metrics`; :func:`describe_store` does both for
runs logged before these existed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Mapping, Protocol, runtime_checkable
from urllib.parse import unquote

from tpgrpo.errors import TrackingError
from tpgrpo.summary import run_summary

if TYPE_CHECKING:  # pragma: no cover
    import PIL.Image
    from mlflow import MlflowClient

# MLflow reads these when it is imported; it wants "true", not "1".
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

_log = logging.getLogger(__name__)

Status = Literal["FINISHED", "FAILED", "KILLED"]
_STATUSES = ("FINISHED", "FAILED", "KILLED")
# How a child run (one training run of an ablation) ended, as its orchestrator saw it.
ChildStatus = Literal["ok", "failed", "cancelled"]
ERROR_TAG = "error"  # why a child run failed (settle_child_run)

# MLflow's limits (mlflow.utils.validation); copied so that formatting values needs no import.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
_PARAMS_TAGS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
TRUNCATION_MARKER = "...[truncated]"

# MLflow accepts word characters, '/', '.', '-', ' ' (and ':' except on Windows); ':' is replaced
# too so that names are valid wherever the store is read or written.
_BAD_NAME_CHARS = re.compile(r"[^\w/.\- ]")

PARENT_RUN_TAG = "mlflow.parentRunId"
ARTIFACTS_DIRNAME = "mlartifacts"

# Tags the MLflow UI reads (mlflow.utils.mlflow_tags and the UI's JavaScript).
NOTE_TAG = "mlflow.note.content"  # the description of a run or an experiment (markdown)
SOURCE_NAME_TAG = "mlflow.source.name"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # "Machine learning", not "GenAI apps & agents"
SAVED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
KEY_METRICS_VIEW = "key-metrics"
TRAIN_REWARD_TAG = "train_reward"
EVAL_REWARD_TAG = "eval_reward"

# What a training run comes down to, logged once when it ends (at its last epoch), rounded so the
# runs table shows them whole; the full values are in eval/reward and time/minutes.
KEY_METRICS: dict[str, str] = {
    "summary/eval_reward": "the final `eval/reward`",
    "summary/eval_reward_change": "the final `eval/reward` minus the base model's (step 0)",
    "summary/turning_rate": "`turning/rate` (the share of rollout steps credited as turning points; 0 without turning-point credit) averaged over epochs",
    "summary/minutes": "training time in minutes",
}
_KEY_METRIC_DIGITS = {"summary/minutes": 1}

# One-line glosses of the shape world's rewards for run descriptions.
_REWARD_GLOSS = {
    "verifiable": "strict: the fraction of the prompt's constraints met, GenEval-style",
    "verifiable_soft": "graded: partial credit per constraint",
}


# --------------------------------------------------------------------------- the protocol


@runtime_checkable
class Tracker(Protocol):
    """What the trainer logs through. Implementations must accept any input without raising
    for values MLflow would reject (long values, NaN metrics, odd names)."""

    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log hyper-parameters under dotted names (``credit.mode``); nested mappings are
        flattened to dotted names, values are stringified (None -> ``null``, lists -> JSON)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalar metrics at ``step``; non-finite values are skipped."""

    def log_image(self, image: "PIL.Image.Image", name: str) -> None:
        """Log an image as the artifact file ``name`` (e.g. ``samples/epoch_003.png``)."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file or a directory (which lands as ``<artifact_path>/<dir name>/...``)."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set run tags (values stringified)."""

    def finish(self, status: Status = "FINISHED") -> None:
        """End the run with ``status``. Calling it again does nothing."""


class _ContextMixin:
    """``with tracker:`` finishes the run: FINISHED, FAILED on an exception, KILLED on Ctrl-C."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(_status_for(exc_type))  # type: ignore[attr-defined]


def _status_for(exc_type: type[BaseException] | None) -> Status:
    if exc_type is None:
        return "FINISHED"
    if issubclass(exc_type, KeyboardInterrupt):
        return "KILLED"
    return "FAILED"


class NullTracker(_ContextMixin):
    """Accepts every call and records nothing (non-main processes, tracking switched off)."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_image(self, image: "PIL.Image.Image", name: str) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def finish(self, status: Status = "FINISHED") -> None:
        pass

    def __repr__(self) -> str:
        return "NullTracker()"


@contextmanager
def finishing(tracker: Tracker) -> Iterator[Tracker]:
    """Context manager for any :class:`Tracker`: finish FINISHED on success, FAILED on an
    exception, KILLED on KeyboardInterrupt (the exception propagates)."""
    try:
        yield tracker
    except BaseException as exc:
        tracker.finish(_status_for(type(exc)))
        raise
    tracker.finish("FINISHED")


# --------------------------------------------------------------------------- value formatting


def sanitize_name(name: str) -> str:
    """Make ``name`` a valid MLflow metric/param/tag name.

    Characters outside ``[\\w/.\\- ]`` become ``_``; the name must also be a normalised relative
    path (MLflow may store it as a file), so empty, ``.`` and ``..`` segments are dropped or
    replaced. ``tp_rate/step_3`` and ``credit.mode`` pass unchanged.
    """
    name = _BAD_NAME_CHARS.sub("_", str(name))[:MAX_KEY_LENGTH]
    parts = [("__" if part == ".." else part) for part in name.split("/") if part not in ("", ".")]
    return "/".join(parts) or "_"


def truncate(value: str, limit: int) -> str:
    """``value`` cut to at most ``limit`` characters, ending with :data:`TRUNCATION_MARKER`."""
    if len(value) <= limit:
        return value
    return value[: limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


def format_value(value: Any) -> str:
    """A parameter value as text, close to how it reads in params.yaml: None -> ``null``,
    booleans -> ``true``/``false``, lists/tuples/mappings -> compact JSON."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset, Mapping)):
        if isinstance(value, (set, frozenset)):
            value = sorted(value, key=str)
        return json.dumps(value, separators=(",", ":"), default=str, ensure_ascii=False)
    if isinstance(value, Path):
        return value.as_posix()
    return str(value)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings -> ``{"section.key": "text"}``; an empty mapping stays one value (``{}``)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = format_value(value)
    return flat


def _finite(value: Any) -> float | None:
    try:
        value = float(value)  # also 0-d tensors and numpy scalars
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _artifact_subpath(name: str) -> str:
    """A relative artifact path: no leading '/', no '.'/'..' segments."""
    parts = [p for p in str(name).replace("\\", "/").split("/") if p not in ("", ".", "..")]
    if not parts:
        raise ValueError(f"artifact name {name!r}: expected a relative file path such as 'samples/epoch_003.png'")
    return "/".join(parts)


# --------------------------------------------------------------------------- tags


def _git_commit(cwd: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def run_tags(variant: str | None = None) -> dict[str, str]:
    """Tags that identify where a run came from.

    - ``variant``: the ablation variant, when given;
    - ``git_commit``: ``git rev-parse HEAD`` of the current directory, absent outside a repository;
    - ``dvc_experiment``: the experiment name DVC exports as ``DVC_EXP_NAME`` during
      ``dvc exp run`` (and ``dvc_baseline_rev`` from ``DVC_EXP_BASELINE_REV``), absent otherwise;
    - ``tpgrpo_version``.
    """
    from tpgrpo import __version__

    tags: dict[str, str] = {"tpgrpo_version": __version__}
    if variant is not None:
        tags["variant"] = str(variant)
    commit = _git_commit()
    if commit:
        tags["git_commit"] = commit
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc_baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    return tags


# --------------------------------------------------------------------------- MLflow


def _import_mlflow():
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # A new sqlite store announces its schema creation at INFO on stderr, which the tpgrpo
    # command keeps for problems (its errors are one line).
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    import mlflow  # noqa: F401

    return mlflow


def sqlite_db_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (absolute), or None for other URIs / in-memory."""
    if not uri.startswith("sqlite:"):
        return None
    rest = uri[len("sqlite:") :]
    if not rest.startswith("///"):
        return None  # sqlite:// or sqlite://:memory: style: no file
    path = unquote(rest[3:].split("?", 1)[0])
    if not path or path == ":memory:":
        return None
    return Path(path).expanduser().resolve()


def default_artifact_location(uri: str, experiment: str) -> str | None:
    """``file:///<db dir>/mlartifacts/<experiment slug>`` for a sqlite store, else None (the
    tracking server or MLflow decides)."""
    db = sqlite_db_path(uri)
    if db is None:
        return None
    slug = re.sub(r"[^\w.\-]+", "_", experiment).strip("._") or "experiment"
    return (db.parent / ARTIFACTS_DIRNAME / slug).as_uri()


class MissingRunError(TrackingError):
    """The run to resume is not in the store (another ``tracking.uri``, a deleted database)."""

    def __init__(self, run_id: str, uri: str):
        self.run_id, self.uri = run_id, uri
        super().__init__(f"MLflow run {run_id} is not in {uri}")


class MLflowTracker(_ContextMixin):
    """One MLflow run, addressed by id through its own :class:`mlflow.MlflowClient`.

    Args:
        uri: the tracking URI (``sqlite:////abs/path/mlflow.db``, ``http://host:5000``, ...).
            For sqlite the database's directory is created if missing; TrackingError when the
            database cannot be written there.
        experiment: experiment name; created if missing (see the module doc for its artifacts).
        run_name: display name of a new run.
        parent_run_id: make the new run a child of this run (tag ``mlflow.parentRunId``).
        run_id: resume this existing run instead of creating one; it is set back to RUNNING.
        tags: extra tags for the run (e.g. :func:`run_tags`).
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        *,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        _import_mlflow()
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self.uri = uri
        self.experiment = experiment
        db = sqlite_db_path(uri)
        if db is not None:
            _check_writable_db(uri, db)
        self.client: MlflowClient = MlflowClient(tracking_uri=uri)
        self._finished = False

        all_tags = {k: format_value(v) for k, v in (tags or {}).items()}
        if "git_commit" in all_tags:
            all_tags.setdefault("mlflow.source.git.commit", all_tags["git_commit"])
        if parent_run_id is not None:
            all_tags[PARENT_RUN_TAG] = parent_run_id

        if run_id is not None:
            try:
                run = self.client.get_run(run_id)
            except MlflowException:
                raise MissingRunError(run_id, uri) from None
            self.run_id: str | None = run.info.run_id
            self.experiment_id = run.info.experiment_id
            self.client.update_run(run_id, status="RUNNING")
            if run_name is not None and run_name != run.info.run_name:
                self.client.update_run(run_id, name=run_name)
            self.set_tags(all_tags)
            self.resumed = True
        else:
            self.experiment_id = self._get_or_create_experiment(experiment)
            all_tags.setdefault("mlflow.user", _user())
            all_tags.setdefault(SOURCE_NAME_TAG, entry_point())
            all_tags.setdefault("mlflow.source.type", "LOCAL")
            # create_run takes at most a batch of tags; the rest go in through set_tags.
            first = dict(list(all_tags.items())[:_PARAMS_TAGS_PER_BATCH])
            run = self.client.create_run(
                self.experiment_id,
                tags={sanitize_name(k): truncate(v, MAX_TAG_VALUE_LENGTH) for k, v in first.items()},
                run_name=run_name,
            )
            self.run_id = run.info.run_id
            self.set_tags({k: v for k, v in all_tags.items() if k not in first})
            self.resumed = False
        self.artifact_uri: str = run.info.artifact_uri

    # -- setup

    def _get_or_create_experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self.client.create_experiment(
                    name, artifact_location=default_artifact_location(self.uri, name), tags=experiment_tags()
                )
            except MlflowException as err:  # another process created it in the meantime
                if getattr(err, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage != "active":
            raise RuntimeError(
                f"MLflow experiment {name!r} is deleted; restore it (`mlflow experiments restore "
                f"--experiment-id {exp.experiment_id}`) or choose another tracking.experiment"
            )
        prepare_experiment(self.client, exp)
        return exp.experiment_id

    # -- the protocol

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat: dict[str, str] = {}
        for key, value in flatten_params(params).items():
            name = sanitize_name(key)
            if name != key:
                _log.debug("param %r logged as %r", key, name)
            flat[name] = truncate(value, MAX_PARAM_VALUE_LENGTH)
        if not flat:
            return
        # MLflow params are immutable: re-logging the same value is fine, a different value
        # fails the whole batch. Compare against what the run has (matters when resuming).
        existing = self.client.get_run(self.run_id).data.params
        changed = sorted(k for k, v in flat.items() if k in existing and existing[k] != v)
        if changed:
            _log.warning(
                "run %s already has different values for params %s; keeping the logged values",
                self.run_id,
                ", ".join(changed),
            )
        entries = [Param(k, v) for k, v in flat.items() if k not in existing]
        for i in range(0, len(entries), _PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=entries[i : i + _PARAMS_TAGS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        entries: dict[str, Any] = {}
        skipped = []
        for key, value in metrics.items():
            number = _finite(value)
            if number is None:
                skipped.append(key)
                continue
            entries[sanitize_name(key)] = Metric(sanitize_name(key), number, timestamp, int(step))
        if skipped:
            _log.debug("step %s: skipped non-finite or non-numeric metrics %s", step, skipped)
        batch = list(entries.values())
        for i in range(0, len(batch), _METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[i : i + _METRICS_PER_BATCH])

    def log_image(self, image: "PIL.Image.Image", name: str) -> None:
        self.client.log_image(self.run_id, image, artifact_file=_artifact_subpath(name))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        dest = _artifact_subpath(artifact_path) if artifact_path else None
        if path.is_dir():
            sub = f"{dest}/{path.resolve().name}" if dest else path.resolve().name
            self.client.log_artifacts(self.run_id, str(path), artifact_path=sub)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path=dest)
        else:
            raise FileNotFoundError(f"log_artifact: {path} is neither a file nor a directory")

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        entries = {
            sanitize_name(k): RunTag(sanitize_name(k), truncate(format_value(v), MAX_TAG_VALUE_LENGTH))
            for k, v in tags.items()
        }
        batch = list(entries.values())
        for i in range(0, len(batch), _PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=batch[i : i + _PARAMS_TAGS_PER_BATCH])

    def finish(self, status: Status = "FINISHED") -> None:
        if status not in _STATUSES:
            raise ValueError(f"status: expected one of {_STATUSES}, got {status!r}")
        if self._finished:
            return
        self.client.set_terminated(self.run_id, status=status)
        self._finished = True

    def __repr__(self) -> str:
        return f"MLflowTracker(uri={self.uri!r}, experiment={self.experiment!r}, run_id={self.run_id!r})"


# --------------------------------------------------------------------------- the MLflow UI


_PROJECT_ROOT = Path(__file__).resolve().parents[1]


def entry_point() -> str:
    """What started this run, for MLflow's Source column (tag ``mlflow.source.name``).

    Inside a Prefect flow run: the flow's file (``flows/ablation.py``, ``flows/training.py``),
    since under a Prefect worker ``sys.argv[0]`` is Prefect's own engine. Otherwise the script or
    command: a Python file of this project as its path from the project root
    (``benchmarks/epoch_cost.py``), anything else by its file name (``tpgrpo``, ``pytest``).
    """
    path = _prefect_flow_file() or (sys.argv[0] if sys.argv else "")
    if not path or path.startswith("-"):  # python -c / an interactive session
        return "python"
    file = Path(path).resolve()
    name = file.parent.name if file.name == "__main__.py" else file.name  # python -m <package>
    try:
        relative = file.relative_to(_PROJECT_ROOT)
    except ValueError:
        return name
    # The project's virtual environment (its console scripts, site-packages) is not the project.
    if file.suffix != ".py" or "site-packages" in relative.parts or any(p.startswith(".") for p in relative.parts):
        return name
    return relative.as_posix()


def _prefect_flow_file() -> str | None:
    if "prefect" not in sys.modules:  # no flow can be running; importing Prefect takes seconds
        return None
    import inspect

    from prefect.context import FlowRunContext

    flow = getattr(FlowRunContext.get(), "flow", None)
    fn = getattr(flow, "fn", None)
    if fn is None:
        return None
    try:
        return inspect.getsourcefile(fn)
    except TypeError:  # a builtin or a function made at run time
        return None


def _column(kind: str, key: str) -> str:
    """A runs-table column as the UI names it: ``metrics.`eval/reward```."""
    return f"{kind}.`{key}`"


def key_metrics_view() -> dict[str, Any]:
    """The runs-table state of the "Key metrics" view: after the run's duration the
    :data:`KEY_METRICS` columns in their order, then the credit mode, seed and epochs, the
    variant and the two reward names, each wide enough for its name; other settings keep the
    UI's defaults."""
    keys = [("metrics", k) for k in KEY_METRICS]
    keys += [("params", k) for k in ("credit.mode", "seed", "train.epochs")]
    keys += [("tags", k) for k in ("variant", TRAIN_REWARD_TAG, EVAL_REWARD_TAG)]
    columns = [_column(kind, key) for kind, key in keys]
    # The table's order and widths apply to the columns listed; the others would move to the
    # end, so "duration" (the column's id in the UI) keeps its place.
    widths = {_column(kind, key): max(110, 8 * len(key) + 24) for kind, key in keys}
    return {"selectedColumns": columns, "columnOrder": ["duration", *columns], "columnWidths": widths}


def _saved_view(name: str, state: Mapping[str, Any], created_ms: int) -> str:
    # The UI's envelope: {name, createdAt, updatedAt, state}; state is the JSON text of the view.
    return json.dumps({"name": name, "createdAt": created_ms, "updatedAt": created_ms, "state": json.dumps(state)})


_EXPERIMENT_NOTE = (
    "Model-training runs (GRPO / TurningPoint-GRPO fine-tuning): if MLflow shows GenAI traces, "
    "switch the sidebar to **Model training**; in Runs, the view **Key metrics** shows what each "
    "run came to (`summary/*`). `reward/*`: the training reward of the SDE rollouts; `eval/*`: "
    "the evaluation reward of ODE samples of the test prompts (step 0: the base model). Each "
    "run's description names both rewards."
)


def experiment_tags() -> dict[str, str]:
    """The experiment tags that set up the MLflow UI: kind, description, the key-metrics view."""
    return {
        EXPERIMENT_KIND_TAG: EXPERIMENT_KIND,
        NOTE_TAG: _EXPERIMENT_NOTE,
        SAVED_VIEW_TAG_PREFIX + KEY_METRICS_VIEW: _saved_view("Key metrics", key_metrics_view(), int(time.time() * 1000)),
    }


def prepare_experiment(client: "MlflowClient", experiment: Any) -> None:
    """Give an existing experiment the tags of :func:`experiment_tags` it lacks; a kind or a
    description set by someone else is kept, the key-metrics view is brought up to date. A tag
    that cannot be written (a read-only store, a concurrent writer) is logged and skipped: the
    run does not depend on it."""
    from mlflow.exceptions import MlflowException

    have = dict(experiment.tags or {})
    wanted = experiment_tags()
    view_tag = SAVED_VIEW_TAG_PREFIX + KEY_METRICS_VIEW
    missing = {k: v for k, v in wanted.items() if k not in have}
    if view_tag in have and _view_state(have[view_tag]) != key_metrics_view():
        missing[view_tag] = wanted[view_tag]
    for key, value in missing.items():
        try:
            client.set_experiment_tag(experiment.experiment_id, key, value)
        except MlflowException as err:
            _log.warning("MLflow experiment %s: could not set tag %s (%s)", experiment.experiment_id, key, err)


def _view_state(envelope: str) -> Any:
    try:
        return json.loads(json.loads(envelope)["state"])
    except (ValueError, KeyError, TypeError):
        return None


def ui_url(uri: str, experiment: str, base: str = "http://127.0.0.1:5000") -> str | None:
    """The address of the experiment's runs in ``mlflow ui`` (at ``base``), with the
    key-metrics view and the "Model training" side of the UI; None when the store has no
    such experiment."""
    _import_mlflow()
    from mlflow import MlflowClient

    exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
    if exp is None:
        return None
    return (
        f"{base.rstrip('/')}/#/experiments/{exp.experiment_id}/runs"
        f"?workflowType=machine_learning&viewStateShareKey={KEY_METRICS_VIEW}"
    )


def _param(params: Mapping[str, Any], key: str) -> str | None:
    if key not in params:
        return None
    value = format_value(params[key])
    return None if value == "null" else value


def _reward_name(params: Mapping[str, Any], prefix: str) -> str | None:
    name = _param(params, f"{prefix}.name")
    if name == "multi":
        weights = json.loads(_param(params, f"{prefix}.weights") or "{}")
        return "multi (" + ", ".join(f"{k} {v:g}" for k, v in sorted(weights.items())) + ")"
    return name


def _reward_text(name: str) -> str:
    gloss = _REWARD_GLOSS.get(name)
    return f"`{name}` ({gloss})" if gloss else f"`{name}`"


def describe_run(
    params: Mapping[str, Any], summary: Mapping[str, float] | None = None, *, artifacts: bool = True
) -> dict[str, str]:
    """Tags that make a training run readable in the MLflow UI, from its parameters (the dotted
    names of params.yaml and ``variant``, as the trainer logs them; values as logged or raw):

    - ``mlflow.note.content``, the run's description: variant, credit mode, epochs and seed,
      which reward ``reward/*`` and ``eval/*`` measure, and what the key metrics mean;
    - ``train_reward`` / ``eval_reward``: the two rewards' names.

    Parameters it does not find are left out of the text. ``summary``: the run's
    :func:`key_metrics` once it has them, stated under the first line; ``artifacts``: list the
    files the trainer logs (False for runs logged before it logged them all).
    """
    train = _reward_name(params, "reward") or "?"
    evaluation = _reward_name(params, "eval.reward") or train
    head = [f"**{_param(params, 'variant') or 'run'}**"]
    if _param(params, "credit.mode"):
        head.append(f"credit mode `{_param(params, 'credit.mode')}`")
    if _param(params, "train.epochs"):
        head.append(f"{_param(params, 'train.epochs')} epochs")
    if _param(params, "seed"):
        head.append(f"seed {_param(params, 'seed')}")
    every = _param(params, "eval.every")
    eval_line = (
        f"- `eval/*`: the **evaluation reward** {_reward_text(evaluation)}"
        + (" (the training reward)" if evaluation == train else "")
        + " of deterministic ODE samples of the test prompts with the EMA weights"
        + (f", every {every} epochs and after the last" if every else "")
        + "; step 0 is the base model. `eval/reward` is its mean, `eval/<constraint>` its parts"
    )
    if evaluation != train:
        eval_line += ", `eval/train_reward` the training reward of the same images"
    if (_param(params, "eval.heldin_prompts") or "0") != "0":
        eval_line += ", `eval/heldin_reward` the evaluation reward on the first train prompts"
    lines = [", ".join(head) + "."]
    if summary:
        lines += ["", "Result: " + "; ".join(_summary_text(summary)) + "."]
    lines += [
        "",
        "Two rewards, two metric families:",
        f"- `reward/*`: the **training reward** {_reward_text(train)} of the SDE rollouts the policy "
        "is trained on, per epoch; `reward/mean` is its mean.",
        eval_line + ".",
        "",
        "Key metrics, logged when training ends (rounded):",
        *(f"- `{key}`: {meaning}" for key, meaning in KEY_METRICS.items()),
    ]
    if artifacts:
        lines += [
            "",
            "Artifacts: `history.csv` (every metric per epoch), `metrics.json` (the final and the base "
            "model's evaluation), `samples/` (each evaluation's images), `eval_scores/` (each "
            "evaluation's per-prompt scores), `final/` (the trained weights).",
        ]
    return {NOTE_TAG: "\n".join(lines), TRAIN_REWARD_TAG: train, EVAL_REWARD_TAG: evaluation}


def _summary_text(summary: Mapping[str, float]) -> list[str]:
    parts = []
    if "summary/eval_reward" in summary:
        parts.append(f"evaluation reward **{summary['summary/eval_reward']:.4f}**")
    if "summary/eval_reward_change" in summary:
        parts.append(f"**{summary['summary/eval_reward_change']:+.4f}** from the base model")
    if "summary/turning_rate" in summary:
        parts.append(f"turning rate {summary['summary/turning_rate']:.4f}")
    if "summary/minutes" in summary:
        parts.append(f"{summary['summary/minutes']:.1f} minutes")
    return parts


def key_metrics(summary: Mapping[str, float | None], minutes: float | None) -> dict[str, float]:
    """The :data:`KEY_METRICS` of a finished run, from its :func:`tpgrpo.summary.run_summary` and
    its wall-clock ``minutes``, rounded; those the run has no value for are left out."""
    values = {
        "summary/eval_reward": summary.get("reward"),
        "summary/eval_reward_change": summary.get("delta"),
        "summary/turning_rate": summary.get("turning_rate"),
        "summary/minutes": minutes,
    }
    return {k: round(v, _KEY_METRIC_DIGITS.get(k, 4)) for k, v in values.items() if v is not None}


def describe_study(study: str, variants: Sequence[str], seeds: Sequence[int]) -> dict[str, str]:
    """The description of an ablation's parent run."""
    note = (
        f"**Study {study}**: variants {', '.join(variants)} x seeds {', '.join(map(str, seeds))}. "
        "Each training run is a child run of this one (expand this row in the runs table); "
        "the comparison over seeds (report, plots) lands in this run's `study/` artifacts and its "
        "metrics `study/<variant>/final_mean` and `final_std` (the final evaluation reward over seeds)."
    )
    return {NOTE_TAG: note}


def describe_store(uri: str, experiment: str) -> int:
    """Bring an existing store up to date with what runs log now: the experiment's UI tags
    (:func:`prepare_experiment`), and for every training run (one with a ``credit.mode``
    parameter) the tags of :func:`describe_run` where it has no description, and for a finished
    run without them its :data:`KEY_METRICS`, computed from its metric history. Returns the
    number of runs changed; TrackingError when the experiment does not exist."""
    _import_mlflow()
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise TrackingError(f"tracking.experiment: no experiment {experiment!r} in {uri}")
    prepare_experiment(client, exp)
    changed = 0
    for run in _all_runs(client, exp.experiment_id):
        params = run.data.params
        if "credit.mode" not in params:
            continue
        metrics = []
        if run.info.status == "FINISHED" and not any(k in run.data.metrics for k in KEY_METRICS):
            metrics = _key_metrics_from_history(client, run)
        summary = {m.key: m.value for m in metrics} or {k: v for k, v in run.data.metrics.items() if k in KEY_METRICS}
        described = describe_run(params, summary, artifacts=False)
        tags = [] if NOTE_TAG in run.data.tags else [RunTag(k, v) for k, v in described.items()]
        if tags or metrics:
            client.log_batch(run.info.run_id, metrics=metrics, tags=tags)
            changed += 1
    return changed


def _all_runs(client: "MlflowClient", experiment_id: str) -> Iterator[Any]:
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=500, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _key_metrics_from_history(client: "MlflowClient", run: Any) -> list[Any]:
    from mlflow.entities import Metric

    run_id = run.info.run_id

    def history(key: str) -> list[Any]:
        return sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))

    evals, minutes = history("eval/reward"), history("time/minutes")
    if not evals or not minutes:
        return []
    base = evals[0].value if evals[0].step == 0 else None
    rates = [m.value for m in history("turning/rate")]
    values = key_metrics(run_summary(evals[-1].value, base, rates), minutes[-1].value)
    step = max(evals[-1].step, minutes[-1].step)
    return [Metric(k, v, minutes[-1].timestamp, step) for k, v in values.items()]


def log_to_run(uri: str | None, run_id: str | None, paths: Sequence[str | Path], artifact_path: str | None = None) -> bool:
    """Log files into an existing run as artifacts, leaving its status as it is (unlike resuming
    it with :class:`MLflowTracker`): e.g. what ``tpgrpo evaluate`` writes next to a trained run.
    Does nothing and returns False without a tracking URI or run id; TrackingError when the run
    does not exist in the store, FileNotFoundError for a missing file."""
    if not uri or not run_id:
        return False
    _import_mlflow()
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        raise TrackingError(f"tracking.uri: {uri} has no MLflow run {run_id}; expected the run that trained it") from None
    files = [Path(p) for p in paths]
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"log_to_run: {file} is not a file")
    dest = _artifact_subpath(artifact_path) if artifact_path else None
    for file in files:
        client.log_artifact(run_id, str(file), artifact_path=dest)
    return True


def log_metrics_to_run(uri: str | None, run_id: str | None, metrics: Mapping[str, float | None], step: int = 0) -> bool:
    """Log ``metrics`` at ``step`` into an existing run, leaving its status as it is (like
    :func:`log_to_run`): e.g. a report's figures on an ablation's parent run, which may have
    finished. Names are made valid; None and non-finite values are left out. Does nothing and
    returns False without a tracking URI or run id."""
    if not uri or not run_id:
        return False
    _import_mlflow()
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    timestamp = int(time.time() * 1000)
    values = {sanitize_name(key): _finite(value) for key, value in metrics.items()}
    batch = [Metric(key, value, timestamp, int(step)) for key, value in values.items() if value is not None]
    client = MlflowClient(tracking_uri=uri)
    for i in range(0, len(batch), _METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=batch[i : i + _METRICS_PER_BATCH])
    return True


def settle_child_run(
    uri: str | None,
    experiment: str,
    parent_run_id: str | None,
    *,
    run_name: str,
    variant: str,
    status: ChildStatus,
    message: str = "",
    tags: Mapping[str, str] | None = None,
    key_tag: str | None = None,
) -> str | None:
    """Make a child run under ``parent_run_id`` agree with how its orchestrator says it ended, so
    that every child of an ablation shows up under the parent with its true status. Returns the
    child's MLflow run id; None when it has none, and without a tracking URI or parent run.

    The child is the run of ``experiment`` whose tag ``key_tag`` has the value ``tags[key_tag]``
    (the orchestrator's id for it, which the run logged). One that did not end ``ok`` gets the
    tag ``error`` (``message``) and, still RUNNING or SCHEDULED (a crashed worker never closed
    it), ends FAILED (KILLED when ``cancelled``). When there is no such run (the child died before
    creating one), a failed child gets a new run under the parent, named ``run_name``, with
    :func:`run_tags` of ``variant``, ``tags`` and the error, ended FAILED (KILLED)."""
    if not uri or parent_run_id is None:
        return None
    _import_mlflow()
    from mlflow import MlflowClient

    tags = dict(tags or {})
    end: Status = "KILLED" if status == "cancelled" else "FAILED"
    client = MlflowClient(tracking_uri=uri)
    found = []
    exp = client.get_experiment_by_name(experiment) if key_tag in tags else None
    if exp is not None:
        found = client.search_runs([exp.experiment_id], filter_string=f"tags.{key_tag} = '{tags[key_tag]}'", max_results=1)
    if found:
        run = found[0].info
        if status != "ok":
            client.set_tag(run.run_id, ERROR_TAG, truncate(message, MAX_TAG_VALUE_LENGTH))
            if run.status in ("RUNNING", "SCHEDULED"):
                client.set_terminated(run.run_id, status=end)
        return run.run_id
    if status == "ok":
        return None
    created = MLflowTracker(
        uri, experiment, run_name=run_name, parent_run_id=parent_run_id, tags={**run_tags(variant), **tags, ERROR_TAG: message}
    )
    created.finish(end)
    return created.run_id


def _check_writable_db(uri: str, db: Path) -> None:
    """Create the sqlite database's directory and file, or raise TrackingError in one line:
    MLflow itself retries opening an unwritable database for minutes, then raises a
    multi-line SQLAlchemy error."""
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(db, "ab"):  # an empty file is a valid new sqlite database
            pass
    except OSError as exc:
        raise TrackingError(
            f"tracking.uri: {uri}: cannot write the MLflow database {db} ({exc.filename}: {exc.strerror}); "
            "expected a writable file path or a tracking server URL"
        ) from None


def _user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # no user database entry (containers)
        return "unknown"


def open_tracker(uri: str | None, experiment: str, *, is_main_process: bool, **kwargs: Any) -> Tracker:
    """An :class:`MLflowTracker` on the main process when ``uri`` is set, else a
    :class:`NullTracker`. ``kwargs`` go to :class:`MLflowTracker` (run_name, parent_run_id,
    run_id, tags)."""
    if not is_main_process or not uri:
        return NullTracker()
    return MLflowTracker(uri, experiment, **kwargs)


__all__ = [
    "ChildStatus",
    "KEY_METRICS",
    "MLflowTracker",
    "MissingRunError",
    "NullTracker",
    "Tracker",
    "default_artifact_location",
    "describe_run",
    "describe_store",
    "describe_study",
    "entry_point",
    "experiment_tags",
    "finishing",
    "flatten_params",
    "format_value",
    "key_metrics",
    "key_metrics_view",
    "log_metrics_to_run",
    "log_to_run",
    "open_tracker",
    "prepare_experiment",
    "run_tags",
    "sanitize_name",
    "settle_child_run",
    "sqlite_db_path",
    "ui_url",
]
