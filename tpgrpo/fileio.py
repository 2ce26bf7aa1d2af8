"""Atomic file writes, the project's one way to replace a file, and YAML values read as the
params file reads them.

A reader (a resumed run, ``dvc``, the report) sees the old file or the new one, never half of
one: the text goes to a temporary file beside the target, is flushed to disk, and is renamed
over it. Imports only the standard library and PyYAML, so every layer may use it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import yaml


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-4`` (no dot) as a string; as a config value it is always a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """Parse YAML the way params files, ``--set`` overrides and reward options are read."""
    return yaml.load(text, Loader=_Loader)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Replace ``path`` with what ``write(tmp)`` writes to a temporary path beside it (a figure's
    ``savefig``, a tensor file); creates the parent directory. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike[str], doc: Any, *, sort_keys: bool = False, allow_nan: bool = False) -> Path:
    """Replace ``path`` with ``doc`` as indented JSON and a final newline. NaN and infinities are
    refused (``ValueError``) unless ``allow_nan``: strict JSON readers reject them."""
    return atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=sort_keys, allow_nan=allow_nan) + "\n")


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be fsynced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
