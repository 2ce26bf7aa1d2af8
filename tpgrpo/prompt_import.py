"""Prompt sets in the field's formats, imported as ``train.jsonl`` / ``test.jsonl`` (the format
:func:`tpgrpo.data.load_prompts` reads).

A source directory holds one of the two layouts of the Flow-GRPO / TP-GRPO repositories:

- ``text``: ``train.txt`` / ``test.txt``, one prompt a line (PickScore, OCR, DrawBench). A line
  becomes ``{"prompt": ...}``, plus ``{"text": ...}`` when the prompt quotes the text to render:
  the OCR target, extracted as the OCR reward extracts it (:func:`tpgrpo.data.quoted_text`).
- ``geneval``: ``train_metadata.jsonl`` / ``test_metadata.jsonl``, one JSON object a line with a
  ``prompt`` and what a GenEval server reads (``tag``, ``include``, ``exclude``, ...); each record
  is kept whole.

Both splits are read and checked before anything is written, so a malformed file leaves the
output directory as it was. Every failure is a one-line
:class:`~tpgrpo.errors.PromptFileError` naming the file (and line).
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tpgrpo.data import parse_record, quoted_text
from tpgrpo.errors import PromptFileError
from tpgrpo.fileio import atomic_write_text

Record = dict[str, Any]


def text_record(line: str) -> Record:
    """One line of a ``.txt`` prompt set. Stripped on both sides, as Flow-GRPO's
    ``TextPromptDataset`` reads it, so the model sees the prompts it was trained on there."""
    prompt = line.strip()
    text = quoted_text(prompt)
    return {"prompt": prompt, "text": text} if text else {"prompt": prompt}


@dataclass(frozen=True)
class SourceFormat:
    """A layout of a source directory: its two file names and how one non-blank line becomes a record."""

    name: str
    train: str
    test: str
    parse: Callable[[str], Record]

    @property
    def files(self) -> str:
        return f"{self.train} + {self.test}"


TEXT = SourceFormat("text", "train.txt", "test.txt", text_record)
# GenEval records are jsonl prompt records, kept whole (the reward server reads their metadata).
GENEVAL = SourceFormat("geneval", "train_metadata.jsonl", "test_metadata.jsonl", parse_record)
FORMATS = (TEXT, GENEVAL)


def detect_format(source: str | Path) -> SourceFormat:
    """The one format whose files ``source`` holds: both files of exactly one pair."""
    source = Path(source)
    if not source.is_dir():
        raise PromptFileError(f"{source}: prompt-set directory not found")
    expected = " or ".join(f.files for f in FORMATS)
    present = [f for f in FORMATS if (source / f.train).exists() or (source / f.test).exists()]
    if not present:
        raise PromptFileError(f"{source}: no prompt set found, expected {expected}")
    if len(present) > 1:
        both = " and ".join(f"a {f.name} ({f.files})" for f in present)
        raise PromptFileError(f"{source}: holds both {both} prompt set; keep one")
    fmt = present[0]
    for name in (fmt.train, fmt.test):
        if not (source / name).is_file():
            raise PromptFileError(f"{source}: {name} not found (a {fmt.name} prompt set is {fmt.files})")
    return fmt


def read_records(path: Path, parse: Callable[[str], Record]) -> list[Record]:
    """The records of one source file, blank lines skipped; a malformed line fails naming
    ``path:line``. Lines are decoded one by one, so a non-UTF-8 byte is placed too."""
    records = []
    # utf-8-sig's BOM: editors on Windows write one; it is not part of the first prompt.
    raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    for lineno, chunk in enumerate(raw.split(b"\n"), start=1):
        try:
            line = chunk.decode("utf-8")
        except UnicodeDecodeError:
            raise PromptFileError(f"{path}:{lineno}: not UTF-8 text") from None
        if "\0" in line:
            raise PromptFileError(f"{path}:{lineno}: NUL byte (a binary file?)")
        if not line.strip():
            continue
        try:
            records.append(parse(line))
        except ValueError as err:
            raise PromptFileError(f"{path}:{lineno}: {err}") from None
    if not records:
        raise PromptFileError(f"{path}: no prompts (the file is empty)")
    return records


@dataclass(frozen=True)
class SplitSummary:
    """One imported split. ``duplicates``: records whose prompt repeats an earlier one (kept: each
    is sampled as a group of its own)."""

    path: Path
    prompts: int
    with_text: int
    duplicates: int


def summarise(path: Path, records: list[Record]) -> SplitSummary:
    return SplitSummary(
        path=path,
        prompts=len(records),
        with_text=sum(isinstance(r.get("text"), str) for r in records),
        duplicates=len(records) - len({r["prompt"] for r in records}),
    )


@dataclass(frozen=True)
class ImportResult:
    format: SourceFormat
    train: SplitSummary
    test: SplitSummary


def to_jsonl(records: list[Record]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def import_prompt_set(source: str | Path, out_dir: str | Path) -> ImportResult:
    """Write ``out_dir/train.jsonl`` and ``out_dir/test.jsonl`` from the prompt set in ``source``."""
    source, out_dir = Path(source), Path(out_dir)
    fmt = detect_format(source)
    train = read_records(source / fmt.train, fmt.parse)
    test = read_records(source / fmt.test, fmt.parse)
    # Both texts exist before either file is replaced: a failure above leaves the old pair whole.
    texts = {"train.jsonl": to_jsonl(train), "test.jsonl": to_jsonl(test)}
    paths = {name: atomic_write_text(out_dir / name, text) for name, text in texts.items()}
    return ImportResult(
        format=fmt,
        train=summarise(paths["train.jsonl"], train),
        test=summarise(paths["test.jsonl"], test),
    )
