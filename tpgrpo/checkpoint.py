"""Atomic checkpoints for a bitwise-exact resume, stored as safetensors + JSON only.

A checkpoint is a directory ``<checkpoints>/epoch-000003/``::

    weights.safetensors          trainable weights (LoRA or full)
    ema.safetensors              EMA copy of the trainable weights (optional)
    optimizer.safetensors/.json  optimizer state: its tensors / everything else (optional)
    meta.json                    epoch + the trainer's JSON (step count, history, config, ...)
    manifest.json                world size, byte size and sha256 of every file; written last

Written and fsynced in ``.tmp-epoch-000003/``, published by one ``rename``, then named by the
atomically replaced ``latest`` pointer: a run killed at any moment leaves its newest complete
checkpoint findable::

    tmp = begin_checkpoint(ckpt_dir, epoch)      # main process, then a barrier
    write_main_state(tmp, epoch=epoch, weights=..., ema=..., optimizer_state_dict=..., meta=...)
    commit_checkpoint(tmp, world_size=n)         # main process, after a barrier
    ckpt = load_checkpoint(latest_checkpoint(ckpt_dir), world_size=n)   # resume (None: fresh)

No RNG state is stored: every random number the trainer uses comes from a generator seeded by
(seed, epoch, batch, process). The global generators advance (``sde_step``'s noise-free ODE steps
draw noise they scale by 0) but no value depends on them: the resumed runs of
tests/test_kill_resume.py and tests/test_update.py start with fresh ones and end bitwise equal
to uninterrupted runs. Only safetensors and json touch the disk: loading runs no code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from tpgrpo.errors import CheckpointError

FORMAT_VERSION = 1
_WEIGHTS, _EMA, _META, _MANIFEST, _LATEST = "weights.safetensors", "ema.safetensors", "meta.json", "manifest.json", "latest"
_OPT_TENSORS, _OPT_JSON = "optimizer.safetensors", "optimizer.json"
# What interrupted saves leave, removed by begin_checkpoint(): staging dirs, checkpoints on
# their way out (replaced or pruned), pointer files not yet renamed into place.
_TMP, _TRASH, _POINTER_TMP = ".tmp-", ".trash-", ".latest.tmp-"
_CKPT_RE = re.compile(r"^epoch-(\d{6,})$")


def _encode(value: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    """A state dict as JSON, each tensor moved into ``tensors`` under its path (``state.0.exp_avg``)
    and replaced by ``{"__tensor__": path}``. Tuples (AdamW's ``betas``) and dicts (the optimizer's
    ``state`` has int keys) are tagged to come back with their exact types; floats need nothing
    (json writes the shortest repr, which reads back to the same bits, and NaN/Infinity)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Tensor):
        key = f"{path}#{len(tensors)}" if path in tensors else path  # keys 0 and "0" print alike
        tensors[key] = value
        return {"__tensor__": key}
    if isinstance(value, (tuple, list)):
        items = [_encode(v, f"{path}.{i}".lstrip("."), tensors) for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, Mapping) and all(isinstance(k, (int, str)) for k in value):
        return {"__dict__": [[k, _encode(v, f"{path}.{k}".lstrip("."), tensors)] for k, v in value.items()]}
    raise TypeError(f"state dict entry {path or '<root>'}: a {type(value).__name__} cannot be stored exactly")


def _decode(value: Any, tensors: Mapping[str, Tensor]) -> Any:
    """Inverse of :func:`_encode`; KeyError, ValueError or TypeError on a malformed document."""
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    ((tag, inner),) = value.items()
    if tag == "__tensor__":
        return tensors[inner]
    if tag == "__tuple__":
        return tuple(_decode(v, tensors) for v in inner)
    if tag == "__dict__":
        return {k: _decode(v, tensors) for k, v in inner}
    raise ValueError(f"unknown tag {tag!r}")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _fsync(path: Path) -> None:
    """Flush a file's contents, or a directory's entries (what makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_safetensors(path: Path, tensors: Mapping[str, Tensor]) -> None:
    save_file({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}, str(path), metadata={"format": "pt"})
    _fsync(path)


def _write(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({_one_line(exc)})") from None


def _read_json(path: Path) -> Any:
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


def canonical_safetensors_header(path: str | os.PathLike) -> None:
    """Rewrite a safetensors file's header with its keys sorted, in place.

    safetensors serialises the ``__metadata__`` map in the order of a Rust HashMap, which is
    seeded anew for every map: a file with two or more metadata entries (a diffusers LoRA export:
    ``format`` and the adapter's config) comes out in a different byte order each time, identical
    weights and all. The sorted header has the same length (the same entries, serialised the
    same compact way) and the tensor data is untouched, so every offset still holds.
    """
    with Path(path).open("r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # a serialisation this function does not reproduce: leave the file
            return
        f.seek(8)
        f.write(text + b" " * (size - len(text)))  # safetensors pads its header with spaces


def begin_checkpoint(run_checkpoint_dir: str | os.PathLike, epoch: int) -> Path:
    """Main process: remove what interrupted saves left; return the new, empty staging directory
    ``<run_checkpoint_dir>/.tmp-epoch-NNNNNN``. One run at a time writes into a directory."""
    root = Path(run_checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    for entry in root.iterdir():
        if entry.name.startswith((_TMP, _TRASH)):
            shutil.rmtree(entry)
        elif entry.name.startswith(_POINTER_TMP):
            entry.unlink()
    tmp = root / f"{_TMP}epoch-{epoch:06d}"
    tmp.mkdir()
    return tmp


def write_main_state(
    tmp_dir: str | os.PathLike, *, epoch: int, weights: Mapping[str, Tensor], ema: Mapping[str, Tensor] | None = None,
    optimizer_state_dict: Mapping[str, Any] | None = None, meta: Mapping[str, Any] | None = None,
) -> None:
    """Main process: write the state into the staging directory of ``epoch``.

    Args:
        weights: ``{name: tensor}``, any shapes, dtypes and devices (stored on CPU), no two
            sharing storage; e.g. ``get_peft_model_state_dict(transformer)``.
        ema: EMA weights like ``weights``, or None.
        optimizer_state_dict: a full (not sharded) ``optimizer.state_dict()``, or None; stored
            exactly (AdamW: ``step`` [], ``exp_avg`` and ``exp_avg_sq`` [param shape] per param,
            ``param_groups`` with their ``betas`` tuples).
        meta: the trainer's JSON; tuples come back as lists, non-string keys as strings.
    """
    tmp = Path(tmp_dir)
    if tmp.name != f"{_TMP}epoch-{epoch:06d}":  # a guard against mixing up two saves
        raise ValueError(f"{tmp}: not the staging directory of epoch {epoch}")
    _write_safetensors(tmp / _WEIGHTS, weights)
    if ema is not None:
        _write_safetensors(tmp / _EMA, ema)
    if optimizer_state_dict is not None:
        tensors: dict[str, Tensor] = {}
        doc = {"format": FORMAT_VERSION, "value": _encode(optimizer_state_dict, "", tensors)}
        _write_safetensors(tmp / _OPT_TENSORS, tensors)
        _write(tmp / _OPT_JSON, json.dumps(doc, indent=1))
    # meta.json last: commit_checkpoint() takes its presence to mean this call finished.
    _write(tmp / _META, json.dumps({"format": FORMAT_VERSION, "epoch": epoch, "meta": dict(meta or {})}, indent=1))


def commit_checkpoint(tmp_dir: str | os.PathLike, *, world_size: int, keep: int = 2) -> Path:
    """Main process, after a barrier: publish the staged checkpoint as the latest; returns it.

    Writes ``manifest.json``, renames the staging directory to ``epoch-NNNNNN`` (replacing one of
    that epoch, left by a run resumed further back), replaces the ``latest`` pointer, each step
    fsynced before the next; then keeps the newest ``keep`` >= 1 checkpoints up to this epoch
    (newer ones, of a continuation abandoned for an older checkpoint, stay until redone). A crash
    before the rename leaves the previous checkpoint the latest; one before the pointer moves
    costs an epoch, redone exactly from the pointer's checkpoint. ``world_size``: the number of
    processes, which a resume must match (each process's rows and rollout noise depend on it).
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    tmp = Path(tmp_dir)
    epoch = int(tmp.name.removeprefix(f"{_TMP}epoch-"))  # ValueError: not from begin_checkpoint()
    if not (tmp / _META).is_file():
        raise CheckpointError(f"{tmp / _META}: missing; write_main_state() must finish before commit_checkpoint()")
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir()) if p.name != _MANIFEST}
    manifest = {"format": FORMAT_VERSION, "epoch": epoch, "world_size": world_size, "files": files}
    _write(tmp / _MANIFEST, json.dumps(manifest, indent=1))
    _fsync(tmp)

    root = tmp.parent
    final = root / tmp.name.removeprefix(_TMP)
    replaced = root / f"{_TRASH}{final.name}-{os.getpid()}"
    if final.exists():
        # rename() cannot replace a non-empty directory. The old one moves out of the way first,
        # under a name scans ignore, so no half-deleted checkpoint ever looks complete.
        os.rename(final, replaced)
    os.rename(tmp, final)
    _fsync(root)
    pointer = root / f"{_POINTER_TMP}{os.getpid()}"
    _write(pointer, final.name)
    os.replace(pointer, root / _LATEST)
    _fsync(root)
    shutil.rmtree(replaced, ignore_errors=True)
    for _, old in [c for c in _complete(root) if c[0] <= epoch][:-keep]:
        trash = root / f"{_TRASH}{old.name}-{os.getpid()}"
        try:  # out of the way first, as above
            os.rename(old, trash)
            shutil.rmtree(trash)
        except OSError as exc:  # the new checkpoint is safe already: a failed cleanup only warns
            warnings.warn(f"could not remove old checkpoint {old}: {_one_line(exc)}", stacklevel=2)
    return final


def _complete(root: Path) -> list[tuple[int, Path]]:
    """(epoch, directory) of every complete checkpoint (one with a manifest), oldest first."""
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT_RE.match(p.name)) and (p / _MANIFEST).is_file())


def latest_checkpoint(run_checkpoint_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from, or None when there is none.

    The complete checkpoint the ``latest`` pointer names (newer ones may be left by a continuation
    abandoned for an older checkpoint), else the complete checkpoint with the highest epoch.
    """
    root = Path(run_checkpoint_dir)
    try:
        name = (root / _LATEST).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if _CKPT_RE.match(name) and (root / name / _MANIFEST).is_file():
        return root / name
    found = _complete(root)
    return found[-1][1] if found else None


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A loaded checkpoint, all tensors on CPU: ``weights`` and ``ema`` (None if not saved) as
    given to :func:`write_main_state`, ``{name: tensor}`` with their shapes and dtypes;
    ``optimizer``, the state dict for ``optimizer.load_state_dict`` (or None); ``meta``, the
    trainer's JSON; ``world_size``, the saving run's number of processes."""

    path: Path
    epoch: int
    world_size: int
    weights: dict[str, Tensor]
    ema: dict[str, Tensor] | None
    optimizer: dict | None
    meta: dict


def load_checkpoint(path: str | os.PathLike, *, world_size: int | None = None, verify: bool = True) -> Checkpoint:
    """Load a committed checkpoint, every file's size checked against ``manifest.json`` (and with
    ``verify`` its sha256). ``world_size``: the current number of processes, which must be the
    saving run's (None: not checked).
    Raises :class:`CheckpointError`, one line naming the file, for a missing, incomplete,
    truncated or corrupt checkpoint, or another number of processes."""
    path = Path(path)
    mpath = path / _MANIFEST
    if not mpath.is_file():
        incomplete = f"{mpath}: missing; {path.name} is not a complete checkpoint (interrupted save?)"
        raise CheckpointError(incomplete if path.is_dir() else f"{path}: no such checkpoint directory")
    manifest = _read_json(mpath)
    try:
        if manifest["format"] != FORMAT_VERSION:
            raise ValueError(f"unknown format {manifest['format']!r}, expected {FORMAT_VERSION}")
        saved_world = int(manifest["world_size"])
        files = {name: (int(info["bytes"]), str(info["sha256"])) for name, info in manifest["files"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{mpath}: malformed ({_one_line(exc)})") from None
    for name, (size, digest) in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f}: truncated or changed ({f.stat().st_size} bytes, expected {size})")
        if verify and _sha256(f) != digest:
            raise CheckpointError(f"{f}: corrupt (sha256 does not match manifest.json)")
    if world_size is not None and world_size != saved_world:
        raise CheckpointError(f"{path}: saved by {saved_world} processes, resumed by {world_size}; resume with {saved_world}")

    doc = _read_json(path / _META)
    try:
        epoch, meta = int(doc["epoch"]), dict(doc["meta"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path / _META}: malformed ({_one_line(exc)})") from None
    optimizer = None
    if _OPT_JSON in files:
        opt_doc, opt_tensors = _read_json(path / _OPT_JSON), _read_safetensors(path / _OPT_TENSORS)
        try:
            optimizer = _decode(opt_doc["value"], opt_tensors)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path / _OPT_JSON}: malformed ({_one_line(exc)})") from None
    ema = _read_safetensors(path / _EMA) if _EMA in files else None
    return Checkpoint(path, epoch, saved_world, _read_safetensors(path / _WEIGHTS), ema, optimizer, meta)
