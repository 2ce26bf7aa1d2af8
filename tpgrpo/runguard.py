"""Guards for a run directory (``<runs_dir>/<name>/``): the configuration it was trained with, and
one training process at a time.

- :func:`run_config` / :func:`write_run_config` record the configuration
  a run trains with (``config.json`` in the run directory: every leaf of
  :meth:`~tpgrpo.config.ExperimentConfig.flat` and its hash).
- :func:`check_resume` refuses to resume a run whose recorded configuration differs from the
  current one in any field that changes the result (anything not in :data:`RESUMABLE_FIELDS`).
- :class:`RunLock` holds an exclusive ``flock`` beside the run directory while a process trains it.

Pure helpers and a lock: no torch, MLflow, Prefect or trainer import, so the command line and the
flows can use them cheaply.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, NamedTuple

from tpgrpo.errors import UserError
from tpgrpo.fileio import atomic_write_text

CONFIG_FILE = "config.json"

#: Fields that may change when a run is resumed without changing what it computes: how long it
#: runs, how often it saves or evaluates, where it logs, and how memory is managed. Entries are
#: dotted names (``train.epochs``) or prefixes ending in ``.`` (``tracking.``). Everything else —
#: the model, data, sampler, credit, advantage, optimiser, LoRA, reward and evaluation settings,
#: ``seed``, and ``pretrain.*`` (it describes the base model at ``model.path``; changing it means
#: the base model is, or will be, rebuilt) — must match to resume. Deliberately NOT here, because
#: they can change the numbers: ``train.micro_batch_size`` / ``sample.micro_batch_size`` /
#: ``train.gradient_accumulation`` (summation order and batch shapes), ``train.mixed_precision``,
#: ``train.gradient_checkpointing`` (recomputation is not guaranteed bit-identical),
#: ``model.dtype``, ``model.max_sequence_length``, and the eval settings other than the two below
#: (they change the reported eval rewards, so history.csv would mix two evaluations).
RESUMABLE_FIELDS: tuple[str, ...] = (
    # The loop runs further or stops earlier; epochs already trained are unchanged.
    "train.epochs",
    "train.time_budget_minutes",
    # When checkpoints are written, not what they hold.
    "train.checkpoint_every",
    # torch's CPU thread count: speed only (set per run, restored after).
    "train.num_threads",
    # When the evaluation runs; it draws its noise from its own generator (seed + prompt index),
    # so it does not consume the training RNG.
    "eval.every",
    # Evaluation noise depends only on the seed and the prompt index, not on how prompts are batched.
    "eval.batch_size",
    # Where metrics are logged.
    "tracking.",
    # Where the run directory lives (a moved runs/ is the same run).
    "runs_dir",
    # Where the text encoders / VAE wait between uses (CPU vs GPU): same weights, same outputs.
    "model.offload_text_encoders",
    "model.offload_vae",
    # Text embeddings cached per distinct prompt instead of recomputed: the same tensors.
    "sample.cache_text_embeddings",
    "sample.text_embedding_cache_size",
)

#: At most this many changed fields are named in a :func:`check_resume` error; the rest are counted.
MAX_NAMED_CHANGES = 5


class ConfigMismatchError(UserError):
    """Resuming a run whose recorded configuration differs in a field that changes the result."""


class RunLockedError(UserError):
    """Another process holds the run's lock (it is training that run now)."""


class RunConfig(NamedTuple):
    """The configuration a run trains with.

    Attributes:
        fields: every leaf of ``cfg.flat()`` under its dotted name, JSON values, keys sorted.
        hash: sha256 (hex) of the canonical JSON of ``fields``; it covers every field, the
            resumable ones included, so two configurations with equal hashes are identical.
    """

    fields: dict[str, Any]
    hash: str


class FieldChange(NamedTuple):
    """A field whose value differs; ``before`` or ``after`` is :data:`ABSENT` when that side
    lacks the field."""

    name: str
    before: Any
    after: Any


class _Absent:
    """The value of a field that one side does not have."""

    def __repr__(self) -> str:
        return "(absent)"


ABSENT: Any = _Absent()


def _canonical_json(fields: Mapping[str, Any]) -> str:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _json_safe(fields: Mapping[str, Any]) -> dict[str, Any]:
    # A JSON round trip: tuples become lists, paths and other objects their str, keys sorted.
    loaded = json.loads(json.dumps(dict(fields), sort_keys=True, default=str))
    return dict(sorted(loaded.items()))


def _make(fields: Mapping[str, Any]) -> RunConfig:
    safe = _json_safe(fields)
    digest = hashlib.sha256(_canonical_json(safe).encode("utf-8")).hexdigest()
    return RunConfig(safe, digest)


def run_config(cfg: Any) -> RunConfig:
    """The :class:`RunConfig` of ``cfg`` (a :class:`~tpgrpo.config.ExperimentConfig`): its
    ``flat()`` leaves, JSON-safe and sorted, and their hash."""
    return _make(cfg.flat())


def result_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The fields that decide what a run computes (all but :data:`RESUMABLE_FIELDS`): what a
    checkpoint records, so two runs of one configuration in two directories (two clones, a
    ``dvc exp`` temp copy, each with its own tracking URI) write identical checkpoints."""
    return {name: value for name, value in fields.items() if not is_resumable(name)}


def is_resumable(name: str) -> bool:
    """Whether the dotted field ``name`` may change on resume (see :data:`RESUMABLE_FIELDS`)."""
    return any(name.startswith(e) if e.endswith(".") else name == e for e in RESUMABLE_FIELDS)


def config_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[FieldChange]:
    """The fields whose values differ between two flat configurations (dotted name -> value),
    sorted by name, ignoring :data:`RESUMABLE_FIELDS`.

    A field present on one side only is a difference (its other side is :data:`ABSENT`), even
    when a newer version added it with a default that reproduces the old behaviour: simple and
    safe, at the cost of asking for ``--restart`` (or a new run name) after such an upgrade.
    Values are compared after a JSON round trip, so ``(1, 2)`` equals ``[1, 2]``.
    """
    before, after = _json_safe(recorded), _json_safe(current)
    changes = []
    for name in sorted(before.keys() | after.keys()):
        if is_resumable(name):
            continue
        old, new = before.get(name, ABSENT), after.get(name, ABSENT)
        if old is ABSENT or new is ABSENT or old != new:
            changes.append(FieldChange(name, old, new))
    return changes


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)  # repr escapes newlines, so the message stays one line
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_changes(changes: list[FieldChange], limit: int = MAX_NAMED_CHANGES) -> str:
    """``credit.mode: 'turning_point' -> 'outcome'; ...`` naming at most ``limit`` changes, then
    ``and N more``."""
    parts = [f"{c.name}: {_short_repr(c.before)} -> {_short_repr(c.after)}" for c in changes[:limit]]
    if len(changes) > limit:
        parts.append(f"and {len(changes) - limit} more")
    return "; ".join(parts)


def check_resume(recorded: Mapping[str, Any], current: Mapping[str, Any], run_dir: str | os.PathLike) -> None:
    """Refuse to resume ``run_dir`` with a configuration that differs from the one it was trained
    with (both flat: dotted name -> value, e.g. ``RunConfig.fields``) in a non-resumable field.

    Raises:
        ConfigMismatchError: one line naming the run directory, the changed fields (at most
            :data:`MAX_NAMED_CHANGES`, then how many more) and the ways out.
    """
    changes = config_differences(recorded, current)
    if changes:
        raise ConfigMismatchError(
            f"{run_dir}: resuming with a different configuration ({describe_changes(changes)}); "
            "pass --restart to start over, or --run-name NAME to train this configuration as a separate run"
        )


def write_run_config(run_dir: str | os.PathLike, rc: RunConfig) -> Path:
    """Write ``rc`` to ``run_dir/config.json`` (``{"fields": ..., "hash": ...}``, keys sorted,
    indent 2) atomically (:func:`tpgrpo.fileio.atomic_write_text`); creates ``run_dir`` if
    needed. Returns the file's path."""
    text = json.dumps({"fields": rc.fields, "hash": rc.hash}, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    return atomic_write_text(Path(run_dir) / CONFIG_FILE, text)


def recorded_config_hash(run_dir: str | os.PathLike) -> str | None:
    """The hash in ``run_dir/config.json`` (the configuration the run trained with); None when
    the file is missing or unreadable."""
    try:
        data = json.loads((Path(run_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = data.get("hash") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def lock_path(runs_dir: str | os.PathLike, name: str) -> Path:
    """The lock file of run ``name``: ``<runs_dir>/.<name>.lock``, beside the run directory."""
    return Path(runs_dir) / f".{name}.lock"


def check_run_name(name: str) -> str:
    """``name`` if it can name a run directory (one path component: not empty, no ``/``, not
    ``.``/``..``, not starting with ``.``), else raise :class:`UserError`."""
    if not name or name in (".", "..") or name.startswith(".") or "/" in name or os.sep in name or "\0" in name:
        raise UserError(f"run name {name!r}: expected a directory name such as tp_grpo (no '/', not starting with '.')")
    return name


class RunLock:
    """An exclusive, non-blocking ``fcntl.flock`` on ``<runs_dir>/.<name>.lock`` while one
    process trains run ``name``::

        with RunLock(cfg.runs_dir, name):
            ...  # clear the run on --restart, check the config, train

    The lock file lies beside the run directory, not inside it, so ``--restart`` can delete the
    run directory while holding it, and a refused process leaves the run directory untouched. The
    kernel releases a ``flock`` when its holder dies (even by SIGKILL), so the lock never gets
    stuck; the file itself stays (deleting it would let two processes lock different files). The
    holder writes its pid, host and start time into the file for the error message of the next.

    A lock belongs to an open file description: a second ``RunLock`` on the same run conflicts
    even in the same process; a child that inherits the descriptor by ``fork`` keeps it held until
    it exits too. In a multi-process run, only the main process should take it. On network file
    systems ``flock`` is only as good as the server's lock support (NFSv4 honours it).

    Raises (on entering / :meth:`acquire`):
        RunLockedError: another open file description holds the lock; one line naming the run,
            and the holder's pid, host and start time when it has written them.
    """

    def __init__(self, runs_dir: str | os.PathLike, name: str) -> None:
        self.runs_dir = Path(runs_dir)
        self.name = check_run_name(name)
        self.path = lock_path(self.runs_dir, self.name)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: this RunLock is already held")
        try:
            if not self.runs_dir.exists():
                self.runs_dir.mkdir(parents=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise UserError(f"{self.runs_dir / self.name}: run directory is not writable ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunLockedError(
                f"{self.runs_dir / self.name}: another training process holds this run ({holder}); "
                "wait for it to finish or stop it"
            ) from None
        try:
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)  # releases the lock
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Release the lock (clearing the holder's details). Calling it again does nothing."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # while still holding it: the next holder writes its own
        except OSError:
            pass
        finally:
            os.close(fd)  # closing the last descriptor of the description releases the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RunLock({str(self.runs_dir)!r}, {self.name!r}, held={self.held})"


def _read_holder(fd: int) -> str:
    """The holder's details from the lock file, as ``pid 1234 on host h, since <time>``; a holder
    that has not written them yet (or wrote something else) is ``holder unknown``."""
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw.decode("utf-8"))
        return f"pid {int(info['pid'])} on host {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
