"""Atomic checkpoints and bitwise-exact resume, stored as safetensors + JSON only.

A checkpoint is a directory ``<run_checkpoint_dir>/epoch-000003/``::

    weights.safetensors          trainable weights (LoRA or full), rank 0
    ema.safetensors              EMA copy of the trainable weights (optional), rank 0
    optimizer.safetensors/.json  optimizer state: tensors / everything else (optional), rank 0
    state-<name>.safetensors/.json  other state dicts, e.g. an LR scheduler (optional), rank 0
    meta.json                    epoch + the trainer's own JSON (global step, sampler position, ...)
    rng-rank<r>.safetensors/.json   RNG states of process r, one pair per rank
    manifest.json                world size, byte size and sha256 of every file; written last

Writing is a small protocol so that a run killed at any moment leaves the newest *complete*
checkpoint findable (files go to ``.tmp-epoch-000003/``, which becomes ``epoch-000003/`` by one
``rename`` after everything is on disk; the ``latest`` pointer is replaced atomically after that)::

    if is_main: tmp = begin_checkpoint(ckpt_dir, epoch)     # clears leftovers of crashed saves
    barrier()
    tmp = tmp_dir_for(ckpt_dir, epoch)                      # same path on every rank
    write_rank_state(tmp, rank, capture_rng_state())        # every rank
    if is_main: write_main_state(tmp, epoch=epoch, weights=..., ema=..., optimizer_state_dict=..., meta=...)
    barrier()
    if is_main: commit_checkpoint(tmp, world_size=world_size, keep=2)
    barrier()                                               # nobody races ahead into the next save

One process: :func:`save_checkpoint` does all of it. Resume::

    path = latest_checkpoint(ckpt_dir)                      # None: start fresh
    ckpt = load_checkpoint(path, rank=rank, world_size=world_size)
    ... rebuild model/optimizer, load ckpt.weights / ckpt.ema / ckpt.optimizer, read ckpt.meta ...
    restore_rng_state(ckpt.rng)                             # last: building things draws numbers

Only ``safetensors.torch.save_file`` / ``load_file`` and ``json`` touch the disk, so loading a
checkpoint from an untrusted source cannot execute code (DESIGN.md §4).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from tpgrpo.errors import CheckpointError

__all__ = [
    "RNGState",
    "capture_rng_state",
    "restore_rng_state",
    "EncodedState",
    "optimizer_state_to_tensors",
    "optimizer_state_from_tensors",
    "Checkpoint",
    "checkpoint_dir_name",
    "tmp_dir_for",
    "begin_checkpoint",
    "write_rank_state",
    "write_main_state",
    "commit_checkpoint",
    "save_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
]

FORMAT_VERSION = 1

WEIGHTS_FILE = "weights.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_TENSORS_FILE = "optimizer.safetensors"
OPTIMIZER_JSON_FILE = "optimizer.json"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"

_CKPT_PREFIX = "epoch-"
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_POINTER_TMP_PREFIX = ".latest.tmp-"
_CKPT_RE = re.compile(r"^epoch-(\d{6,})$")
_TMP_RE = re.compile(r"^\.tmp-epoch-(\d{6,})$")
_EXTRA_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def _rng_files(rank: int) -> tuple[str, str]:
    return f"rng-rank{rank}.safetensors", f"rng-rank{rank}.json"


def _extra_files(name: str) -> tuple[str, str]:
    return f"state-{name}.safetensors", f"state-{name}.json"


# --------------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RNGState:
    """Every global random number generator of one process, plus optional named generators.

    Attributes:
        torch_cpu: ``torch.get_rng_state()``, uint8 ``[5056]``.
        torch_cuda: ``torch.cuda.get_rng_state_all()``, one uint8 tensor per visible device;
            empty when CUDA was never initialised in this process (nothing drew from it yet).
        numpy: ``np.random.get_state()``: ``("MT19937", key uint32 [624], pos int,
            has_gauss int, cached_gaussian float)``.
        python: ``random.getstate()``: ``(version int, internal tuple of 625 ints,
            gauss_next float | None)``.
        generators: ``{name: generator.get_state()}`` for the explicit ``torch.Generator`` objects
            passed to :func:`capture_rng_state` (uint8 tensors; CPU or CUDA generators).
    """

    torch_cpu: Tensor
    torch_cuda: tuple[Tensor, ...]
    numpy: tuple
    python: tuple
    generators: dict[str, Tensor] = field(default_factory=dict)


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> RNGState:
    """Snapshot this process's RNGs (copies: drawing afterwards does not change the snapshot).

    Args:
        generators: explicit generators the trainer draws from (e.g. ``{"sampler": g}``); their
            states are stored by name and restored by :func:`restore_rng_state`.
    """
    # Only an initialised CUDA can have been drawn from; get_rng_state_all() would otherwise
    # create a context on every visible GPU of a process that never meant to use them.
    cuda: tuple[Tensor, ...] = ()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = tuple(s.clone() for s in torch.cuda.get_rng_state_all())
    np_state = np.random.get_state(legacy=True)
    if not isinstance(np_state, tuple):  # a non-MT19937 global bit generator: no legacy tuple
        raise TypeError(f"numpy's global RNG must be MT19937 to be checkpointed, got {np_state!r:.60}")
    name, key, pos, has_gauss, cached = np_state
    return RNGState(
        torch_cpu=torch.get_rng_state().clone(),
        torch_cuda=cuda,
        numpy=(str(name), np.array(key, dtype=np.uint32, copy=True), int(pos), int(has_gauss), float(cached)),
        python=random.getstate(),
        generators={n: g.get_state().clone() for n, g in (generators or {}).items()},
    )


def restore_rng_state(state: RNGState, generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Put every RNG (and each named generator in ``generators``) back to ``state``.

    Raises :class:`CheckpointError` when a generator name was not saved. CUDA states are
    restored for the devices both runs have; a different device count only warns, since
    resuming on other hardware is legitimate even though it cannot be bitwise exact.
    """
    torch.set_rng_state(state.torch_cpu)
    if state.torch_cuda:
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have != len(state.torch_cuda):
            warnings.warn(
                f"checkpoint has CUDA RNG states for {len(state.torch_cuda)} devices, this process sees "
                f"{have}; restoring {min(have, len(state.torch_cuda))} (the resumed run is not bitwise exact)",
                stacklevel=2,
            )
        for device, s in enumerate(state.torch_cuda[:have]):
            torch.cuda.set_rng_state(s, device)
    np.random.set_state(state.numpy)
    random.setstate(state.python)
    for n, g in (generators or {}).items():
        if n not in state.generators:
            raise CheckpointError(f"RNG state has no generator {n!r} (saved: {sorted(state.generators)})")
        g.set_state(state.generators[n])


def _rng_to_files(state: RNGState) -> tuple[dict[str, Tensor], dict]:
    tensors = {"torch_cpu": state.torch_cpu}
    for i, s in enumerate(state.torch_cuda):
        tensors[f"cuda.{i}"] = s
    name, key, pos, has_gauss, cached = state.numpy
    # int64 holds every uint32 exactly and is a dtype every safetensors reader knows.
    tensors["numpy_key"] = torch.from_numpy(np.asarray(key, dtype=np.uint32).astype(np.int64))
    for n, s in state.generators.items():
        tensors[f"generator.{n}"] = s
    version, internal, gauss_next = state.python
    doc = {
        "format": FORMAT_VERSION,
        "cuda_devices": len(state.torch_cuda),
        "generators": list(state.generators),
        "numpy": {"name": name, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        # Python's json writes the shortest repr of a float, which parses back to the same bits.
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    return tensors, doc


def _rng_from_files(tensors: Mapping[str, Tensor], doc: Mapping) -> RNGState:
    np_doc, py_doc = doc["numpy"], doc["python"]
    key = tensors["numpy_key"].numpy().astype(np.uint32)
    gauss_next = py_doc["gauss_next"]
    return RNGState(
        torch_cpu=tensors["torch_cpu"],
        torch_cuda=tuple(tensors[f"cuda.{i}"] for i in range(int(doc["cuda_devices"]))),
        numpy=(str(np_doc["name"]), key, int(np_doc["pos"]), int(np_doc["has_gauss"]), float(np_doc["cached_gaussian"])),
        python=(int(py_doc["version"]), tuple(int(v) for v in py_doc["internal"]), None if gauss_next is None else float(gauss_next)),
        generators={n: tensors[f"generator.{n}"] for n in doc["generators"]},
    )


# --------------------------------------------------------------------------------------------
# State dicts (optimizer, scheduler, ...) as tensors + JSON
# --------------------------------------------------------------------------------------------


class EncodedState(NamedTuple):
    """A state dict split for storage.

    Attributes:
        tensors: every tensor of the state dict, by its path (e.g. ``"state.0.exp_avg"``), on CPU,
            contiguous, ready for ``safetensors.torch.save_file``.
        meta: JSON-serialisable structure of everything else, with ``{"__tensor__": key}`` where a
            tensor was; tuples, non-string dict keys and non-finite floats are tagged so they
            come back with their exact types and values.
    """

    tensors: dict[str, Tensor]
    meta: dict


def optimizer_state_to_tensors(state_dict: Mapping[str, Any]) -> EncodedState:
    """Split a state dict (``torch.optim`` optimizer, LR scheduler, ...) into tensors + JSON.

    Exact for ``torch.optim.AdamW``: the ``step`` tensors, ``exp_avg``/``exp_avg_sq`` (any dtype),
    ``param_groups`` with their ``betas`` tuples, ``None`` and ``bool`` entries and int ``params``
    indices. Raises ``TypeError`` naming the entry for a value that has no exact representation
    (an arbitrary object, e.g. a lambda in a scheduler's state).
    """
    tensors: dict[str, Tensor] = {}
    encoded = _encode(state_dict, "", tensors)
    return EncodedState(tensors=_as_saveable(tensors), meta={"format": FORMAT_VERSION, "value": encoded})


def optimizer_state_from_tensors(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> dict:
    """Inverse of :func:`optimizer_state_to_tensors`; the result feeds ``optimizer.load_state_dict``.

    Raises :class:`CheckpointError` when ``meta`` is malformed or names a missing tensor.
    """
    try:
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"unknown format {meta.get('format')!r} (expected {FORMAT_VERSION})")
        return _decode(meta["value"], tensors)
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"malformed state: {_one_line(exc)}") from None


_TAGS = ("__tensor__", "__tuple__", "__dict__", "__float__")


def _encode(value: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    # bool before int: bool is an int subclass and must come back as a bool.
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        # json.dumps would write NaN/Infinity (not JSON); float.hex is exact for every float.
        return float(value) if math.isfinite(value) else {"__float__": float(value).hex()}
    if isinstance(value, Tensor):
        key = path or "value"
        if key in tensors:  # two dict keys that print the same (0 and "0"): keep both
            key = f"{key}#{len(tensors)}"
        tensors[key] = value
        return {"__tensor__": key}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}".lstrip("."), tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}.{i}".lstrip("."), tensors) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        items = []
        for k, v in value.items():
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise TypeError(f"state dict entry {path or '<root>'}: key {k!r} of type {type(k).__name__} cannot be stored")
            items.append([_encode(k, path, {}), _encode(v, f"{path}.{k}".lstrip("."), tensors)])
        return {"__dict__": items}
    raise TypeError(f"state dict entry {path or '<root>'}: a {type(value).__name__} cannot be stored exactly")


def _decode(value: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if len(value) != 1 or next(iter(value)) not in _TAGS:
            raise ValueError(f"unexpected object {str(value)[:60]}")
        tag, inner = next(iter(value.items()))
        if tag == "__tensor__":
            if inner not in tensors:
                raise KeyError(f"tensor {inner!r} is missing")
            return tensors[inner]
        if tag == "__tuple__":
            return tuple(_decode(v, tensors) for v in inner)
        if tag == "__float__":
            return float.fromhex(inner)
        return {_decode(k, tensors): _decode(v, tensors) for k, v in inner}
    return value


def _as_saveable(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors, no two sharing storage (safetensors refuses shared or
    tied tensors; a copy is only made where one is needed, so big weights are not duplicated)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out[name] = t
    return out


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _one_line(exc: BaseException | str) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _fsync(path: Path, *, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms cannot open a directory; the rename is still atomic
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _write_safetensors(path: Path, tensors: Mapping[str, Tensor]) -> None:
    save_file(_as_saveable(tensors), str(path), metadata={"format": "pt"})
    _fsync(path)


def canonical_safetensors_header(path: str | os.PathLike) -> None:
    """Rewrite a safetensors file's header with its keys sorted, in place.

    safetensors serialises the ``__metadata__`` map in the order of a Rust HashMap, which is
    seeded anew for every map: a file with two or more metadata entries (a diffusers LoRA export:
    ``format`` and the adapter's config) comes out in a different byte order each time, identical
    weights and all. The sorted header has the same length (the same entries, serialised the
    same compact way) and the tensor data is untouched, so every offset still holds.
    """
    path = Path(path)
    with path.open("r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        raw = f.read(size)
        header = json.loads(raw)
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # a serialisation this function does not reproduce: leave the file
            return
        f.seek(8)
        f.write(text + b" " * (size - len(text)))  # safetensors pads its header with spaces


def _write_json(path: Path, doc: Any, *, allow_nan: bool = False) -> None:
    text = json.dumps(doc, allow_nan=allow_nan, indent=1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({_one_line(exc)})") from None


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON ({_one_line(exc)})") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _check_epoch(epoch: int) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    return epoch


def checkpoint_dir_name(epoch: int) -> str:
    """``epoch-000003``: zero-padded so names sort like epochs (more digits past 999999)."""
    return f"{_CKPT_PREFIX}{_check_epoch(epoch):06d}"


def tmp_dir_for(run_checkpoint_dir: str | os.PathLike, epoch: int) -> Path:
    """The staging directory of ``epoch`` (what :func:`begin_checkpoint` returns), for ranks other than 0."""
    return Path(run_checkpoint_dir) / f"{_TMP_PREFIX}{checkpoint_dir_name(epoch)}"


def begin_checkpoint(run_checkpoint_dir: str | os.PathLike, epoch: int) -> Path:
    """Start saving ``epoch``: remove leftovers of interrupted saves, create the staging dir.

    Rank 0 only, followed by a barrier before other ranks write (it deletes ``.tmp-*`` dirs).
    One run writes into a ``run_checkpoint_dir`` at a time.

    Returns:
        the empty staging directory ``<run_checkpoint_dir>/.tmp-epoch-NNNNNN``.
    """
    root = Path(run_checkpoint_dir)
    tmp = tmp_dir_for(root, epoch)
    root.mkdir(parents=True, exist_ok=True)
    for entry in root.iterdir():
        if entry.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)) and entry.is_dir():
            shutil.rmtree(entry)
        elif entry.name.startswith(_POINTER_TMP_PREFIX):
            entry.unlink(missing_ok=True)
    tmp.mkdir()
    return tmp




def _staging_epoch(tmp_dir: Path) -> int:
    m = _TMP_RE.match(tmp_dir.name)
    if m is None:
        raise ValueError(f"{tmp_dir}: not a staging directory from begin_checkpoint() (expected .tmp-epoch-NNNNNN)")
    if not tmp_dir.is_dir():
        raise CheckpointError(f"{tmp_dir}: missing; call begin_checkpoint() on rank 0 (then a barrier) first")
    return int(m.group(1))


def write_rank_state(tmp_dir: str | os.PathLike, rank: int, rng: RNGState) -> None:
    """Every rank: write its RNG state as ``rng-rank<rank>.safetensors`` + ``.json``."""
    tmp = Path(tmp_dir)
    _staging_epoch(tmp)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be an int >= 0, got {rank!r}")
    tensors, doc = _rng_to_files(rng)
    st_name, json_name = _rng_files(rank)
    _write_safetensors(tmp / st_name, tensors)
    _write_json(tmp / json_name, doc)


def write_main_state(
    tmp_dir: str | os.PathLike,
    *,
    epoch: int,
    weights: Mapping[str, Tensor],
    ema: Mapping[str, Tensor] | None = None,
    optimizer_state_dict: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    extra_states: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Rank 0: write weights, EMA, optimizer, other state dicts and ``meta``.

    Args:
        epoch: must match the staging directory (a guard against mixing up two saves).
        weights: ``{name: tensor}``, e.g. ``get_peft_model_state_dict(transformer)``; any dtype,
            any device (copied to CPU); tied tensors are stored once each.
        ema: EMA weights ``{name: tensor}``, or None.
        optimizer_state_dict: a full (not sharded) ``optimizer.state_dict()``, or None. Under
            FSDP / ZeRO gather it to a full state dict first.
        meta: the trainer's JSON (global step, sampler position, tracking run id, history rows).
            Plain JSON: tuples come back as lists, non-string keys as strings; NaN/Infinity are
            written the way Python's json writes and reads them.
        extra_states: more state dicts by name (``[A-Za-z0-9_-]+``), e.g. ``{"scheduler":
            scheduler.state_dict()}``, stored like the optimizer's.
    """
    tmp = Path(tmp_dir)
    staged = _staging_epoch(tmp)
    if _check_epoch(epoch) != staged:
        raise ValueError(f"epoch {epoch} does not match the staging directory {tmp.name}")
    meta = dict(meta or {})
    try:
        json.dumps(meta, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint meta is not JSON-serialisable: {_one_line(exc)}") from None
    for name in extra_states or {}:
        if not _EXTRA_NAME_RE.match(name):
            raise ValueError(f"extra state name {name!r}: use letters, digits, '_' and '-' only")

    _write_safetensors(tmp / WEIGHTS_FILE, weights)
    if ema is not None:
        _write_safetensors(tmp / EMA_FILE, ema)
    if optimizer_state_dict is not None:
        enc = optimizer_state_to_tensors(optimizer_state_dict)
        _write_safetensors(tmp / OPTIMIZER_TENSORS_FILE, enc.tensors)
        _write_json(tmp / OPTIMIZER_JSON_FILE, enc.meta)
    for name, state in (extra_states or {}).items():
        enc = optimizer_state_to_tensors(state)
        st_name, json_name = _extra_files(name)
        _write_safetensors(tmp / st_name, enc.tensors)
        _write_json(tmp / json_name, enc.meta)
    # meta.json last: commit_checkpoint() takes its presence to mean write_main_state finished.
    _write_json(
        tmp / META_FILE,
        {
            "format": FORMAT_VERSION,
            "epoch": epoch,
            "has_ema": ema is not None,
            "has_optimizer": optimizer_state_dict is not None,
            "extra_states": list(extra_states or {}),
            "meta": meta,
        },
        allow_nan=True,
    )


def commit_checkpoint(tmp_dir: str | os.PathLike, *, world_size: int | None = None, keep: int | None = 2) -> Path:
    """Rank 0, after a barrier: make the staged checkpoint the latest one.

    Checks that the main state and the RNG state of ranks ``0..world_size-1`` are all there,
    writes ``manifest.json`` (sizes + sha256; its presence marks a complete checkpoint), renames
    the staging dir to ``epoch-NNNNNN`` (replacing an older one of that epoch, e.g. from a run
    resumed further back), then replaces the ``latest`` pointer atomically. A crash before the
    rename leaves the previous checkpoint as the latest; one between the rename and the pointer
    update costs one epoch of work at most (resuming from the older pointer redoes it exactly).

    Args:
        world_size: number of processes that called :func:`write_rank_state`; every one of
            ranks ``0..world_size-1`` must have. None infers it from the files (ranks
            ``0..n-1`` without gaps); passing ``accelerator.num_processes`` is stricter.
        keep: keep the newest ``keep`` checkpoints (counting this one) of epochs up to this one;
            None keeps all. Newer checkpoints (left by a run that was resumed from an older one)
            are left alone: they get replaced when the run reaches their epochs.

    Returns:
        the committed checkpoint directory.
    """
    tmp = Path(tmp_dir)
    epoch = _staging_epoch(tmp)
    if world_size is None:
        ranks = {int(m.group(1)) for p in tmp.iterdir() if (m := re.match(r"^rng-rank(\d+)\.json$", p.name))}
        world_size = max(ranks, default=-1) + 1 or 1  # gaps and a missing rank 0 fail below
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be None or an int >= 1, got {keep!r}")
    if not (tmp / META_FILE).is_file():
        raise CheckpointError(f"{tmp / META_FILE}: missing; rank 0 must call write_main_state() before commit_checkpoint()")
    for r in range(world_size):
        for name in _rng_files(r):
            if not (tmp / name).is_file():
                raise CheckpointError(f"{tmp / name}: missing; every rank must call write_rank_state() before the barrier and commit_checkpoint()")
    stray = sorted(p.name for p in tmp.glob("rng-rank*.json") if p.name not in {_rng_files(r)[1] for r in range(world_size)})
    if stray:
        raise CheckpointError(f"{tmp}: RNG states of more ranks than world_size={world_size} ({', '.join(stray)})")

    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(tmp.iterdir())
        if p.is_file() and p.name != MANIFEST_FILE
    }
    _write_json(tmp / MANIFEST_FILE, {"format": FORMAT_VERSION, "epoch": epoch, "world_size": world_size, "files": files})
    _fsync(tmp, directory=True)

    root = tmp.parent
    final = root / checkpoint_dir_name(epoch)
    trash = None
    if final.exists():
        # rename() cannot replace a non-empty directory; move the old one out of the way under a
        # name scans ignore, so no moment exists where a half-deleted dir looks complete.
        trash = root / f"{_TRASH_PREFIX}{final.name}-{os.getpid()}"
        os.rename(final, trash)
    os.rename(tmp, final)
    _fsync(root, directory=True)
    _write_pointer(root, final.name)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    if keep is not None:
        _prune(root, keep=keep, upto_epoch=epoch)
    return final




def _write_pointer(root: Path, name: str) -> None:
    tmp = root / f"{_POINTER_TMP_PREFIX}{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST_FILE)
    _fsync(root, directory=True)


def _prune(root: Path, *, keep: int, upto_epoch: int) -> None:
    older = [(e, p) for e, p in _complete(root) if e <= upto_epoch]
    for _, path in older[:-keep]:
        try:
            trash = root / f"{_TRASH_PREFIX}{path.name}-{os.getpid()}"
            os.rename(path, trash)
            shutil.rmtree(trash)
        except OSError as exc:  # the new checkpoint is safe already; a failed cleanup must not fail the save
            warnings.warn(f"could not remove old checkpoint {path}: {_one_line(exc)}", stacklevel=3)


def save_checkpoint(
    run_checkpoint_dir: str | os.PathLike,
    *,
    epoch: int,
    weights: Mapping[str, Tensor],
    ema: Mapping[str, Tensor] | None = None,
    optimizer_state_dict: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    extra_states: Mapping[str, Mapping[str, Any]] | None = None,
    rng: RNGState | None = None,
    keep: int | None = 2,
) -> Path:
    """One process: :func:`begin_checkpoint`, :func:`write_rank_state` (``rng`` or the current RNG
    state), :func:`write_main_state`, :func:`commit_checkpoint`. Returns the committed directory."""
    tmp = begin_checkpoint(run_checkpoint_dir, epoch)
    write_rank_state(tmp, 0, rng if rng is not None else capture_rng_state())
    write_main_state(
        tmp, epoch=epoch, weights=weights, ema=ema, optimizer_state_dict=optimizer_state_dict, meta=meta, extra_states=extra_states
    )
    return commit_checkpoint(tmp, world_size=1, keep=keep)


# --------------------------------------------------------------------------------------------
# Finding and loading
# --------------------------------------------------------------------------------------------


def _complete(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _CKPT_RE.match(entry.name)
        if m and (entry / MANIFEST_FILE).is_file():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def list_checkpoints(run_checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (those with a manifest), oldest epoch first; staging dirs excluded."""
    return [p for _, p in _complete(Path(run_checkpoint_dir))]


def latest_checkpoint(run_checkpoint_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from, or None when there is none.

    The ``latest`` pointer wins when it names a complete checkpoint (after a resume from an older
    checkpoint, newer dirs of the abandoned continuation may still exist); when it is missing,
    garbage or dangling, the complete checkpoint with the highest epoch.
    """
    root = Path(run_checkpoint_dir)
    try:
        name = (root / LATEST_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if _CKPT_RE.match(name) and (root / name / MANIFEST_FILE).is_file():
        return root / name
    found = _complete(root)
    return found[-1][1] if found else None


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A loaded checkpoint (all tensors on CPU).

    Attributes:
        path: the checkpoint directory.
        epoch: the epoch it was saved at (as passed to :func:`begin_checkpoint`).
        world_size: number of processes of the run that saved it.
        weights: ``{name: tensor}`` as passed to :func:`write_main_state`.
        ema: EMA weights, or None if none were saved.
        optimizer: the optimizer state dict for ``optimizer.load_state_dict``, or None.
        extra_states: ``{name: state dict}`` (e.g. ``"scheduler"``), empty if none.
        meta: the trainer's JSON as saved.
        rng: this rank's RNG state, or None when loaded with ``rng=False``.
    """

    path: Path
    epoch: int
    world_size: int
    weights: dict[str, Tensor]
    ema: dict[str, Tensor] | None
    optimizer: dict | None
    extra_states: dict[str, dict]
    meta: dict
    rng: RNGState | None


def _verify_manifest(path: Path, manifest: Any, *, checksums: bool) -> int:
    mpath = path / MANIFEST_FILE
    try:
        if manifest["format"] != FORMAT_VERSION:
            raise CheckpointError(f"{mpath}: unknown format {manifest['format']!r} (expected {FORMAT_VERSION})")
        world_size = int(manifest["world_size"])
        files = dict(manifest["files"])
        sizes = {name: int(info["bytes"]) for name, info in files.items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{mpath}: malformed manifest ({_one_line(exc)})") from None
    for name, size in sizes.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        actual = f.stat().st_size
        if actual != size:
            raise CheckpointError(f"{f}: truncated or changed ({actual} bytes, expected {size})")
        if checksums and files[name].get("sha256") and _sha256(f) != files[name]["sha256"]:
            raise CheckpointError(f"{f}: corrupt (sha256 does not match manifest.json)")
    return world_size


def load_checkpoint(
    path: str | os.PathLike,
    rank: int = 0,
    *,
    world_size: int | None = None,
    rng: bool = True,
    verify: bool = True,
) -> Checkpoint:
    """Load a committed checkpoint for process ``rank``.

    Every file's size is checked against ``manifest.json``; with ``verify`` its sha256 too.

    Args:
        rank: whose RNG state to load.
        world_size: the current number of processes; a mismatch with the saving run is an
            error (RNG streams would not line up). None skips the check.
        rng: False skips the RNG state (and the rank checks), e.g. to resume on a different
            number of processes, knowingly not bitwise exact, or to evaluate.
        verify: also compare sha256 checksums (reads every file once more).

    Raises:
        CheckpointError: one line naming the file, for a missing, incomplete, truncated or corrupt
            checkpoint, or a rank / world-size mismatch.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not (path / MANIFEST_FILE).is_file():
        raise CheckpointError(f"{path / MANIFEST_FILE}: missing; {path.name} is not a complete checkpoint (interrupted save?)")
    saved_world = _verify_manifest(path, _read_json(path / MANIFEST_FILE), checksums=verify)
    if rng:
        if world_size is not None and world_size != saved_world:
            raise CheckpointError(
                f"{path}: saved by {saved_world} processes, resuming with {world_size}; "
                f"resume with {saved_world} processes (or load with rng=False, not bitwise exact)"
            )
        if not 0 <= rank < saved_world:
            raise CheckpointError(
                f"{path / _rng_files(rank)[0]}: no RNG state for rank {rank}; the checkpoint was saved by {saved_world} processes"
            )

    doc = _read_json(path / META_FILE)
    try:
        epoch = int(doc["epoch"])
        has_ema, has_opt = bool(doc["has_ema"]), bool(doc["has_optimizer"])
        extra_names = list(doc["extra_states"])
        meta = dict(doc["meta"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path / META_FILE}: malformed ({_one_line(exc)})") from None

    def state(st_name: str, json_name: str) -> dict:
        tensors = _read_safetensors(path / st_name)
        try:
            return optimizer_state_from_tensors(tensors, _read_json(path / json_name))
        except CheckpointError as exc:
            raise CheckpointError(f"{path / json_name}: {exc}") from None

    rng_state = None
    if rng:
        st_name, json_name = _rng_files(rank)
        tensors, rdoc = _read_safetensors(path / st_name), _read_json(path / json_name)
        try:
            rng_state = _rng_from_files(tensors, rdoc)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path / json_name}: malformed RNG state ({_one_line(exc)})") from None

    return Checkpoint(
        path=path,
        epoch=epoch,
        world_size=saved_world,
        weights=_read_safetensors(path / WEIGHTS_FILE),
        ema=_read_safetensors(path / EMA_FILE) if has_ema else None,
        optimizer=state(OPTIMIZER_TENSORS_FILE, OPTIMIZER_JSON_FILE) if has_opt else None,
        extra_states={n: state(*_extra_files(n)) for n in extra_names},
        meta=meta,
        rng=rng_state,
    )
