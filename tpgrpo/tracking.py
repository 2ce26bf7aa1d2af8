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
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Mapping, Protocol, runtime_checkable
from urllib.parse import unquote

from tpgrpo.errors import TrackingError

if TYPE_CHECKING:  # pragma: no cover
    import PIL.Image
    from mlflow import MlflowClient

# MLflow reads these when it is imported; it wants "true", not "1".
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

_log = logging.getLogger(__name__)

Status = Literal["FINISHED", "FAILED", "KILLED"]
_STATUSES = ("FINISHED", "FAILED", "KILLED")

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
            run = self.client.get_run(run_id)  # raises if the run does not exist
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
            all_tags.setdefault("mlflow.source.name", os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python")
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
                return self.client.create_experiment(name, artifact_location=default_artifact_location(self.uri, name))
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
    "MLflowTracker",
    "NullTracker",
    "Tracker",
    "default_artifact_location",
    "finishing",
    "flatten_params",
    "format_value",
    "open_tracker",
    "run_tags",
    "sanitize_name",
    "sqlite_db_path",
]
