"""Prompt sets, their file format, and the GRPO group sampler.

Each epoch draws ``batches_per_epoch`` global batches of ``batch_size`` rows. Every prompt drawn
in an epoch is distinct and appears exactly ``group_size`` times (its group), and the rows of a
global batch are shuffled before they are split over processes, so a group usually straddles
processes; advantages are therefore computed on the gathered batch. The draw depends only on
``(seed, epoch)``: every process computes the same plan without communicating, and a resumed
run continues exactly where it stopped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from tpgrpo.errors import ConfigError, PromptFileError

RecordCheck = Callable[[Mapping[str, Any]], Any]

# The OCR target inside a prompt: a straight or a curly double-quoted span (Flow-GRPO's OCR prompts).
_QUOTED = re.compile(r'"([^"]*)"|“([^”]*)”')


def quoted_text(prompt: str) -> str:
    """The text between double quotes in ``prompt`` (``"..."`` or ``“...”``; several spans are
    joined; '' if none): what an OCR prompt asks the image to show. One definition for the OCR
    reward and the prompt-set importer, so an imported ``text`` is the reward's own target."""
    return "".join(a or b for a, b in _QUOTED.findall(prompt))


@dataclass(frozen=True)
class PromptSet:
    """Prompts with the metadata their reward needs (``metadata[i]`` belongs to ``prompts[i]``)."""

    prompts: list[str]
    metadata: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, index: list[int]) -> "PromptSet":
        return PromptSet([self.prompts[i] for i in index], [self.metadata[i] for i in index])


def parse_record(line: str) -> dict[str, Any]:
    """One line of a jsonl prompt set: a JSON object with a non-empty string ``prompt``, returned
    whole. ``ValueError`` (its message without the place) when it is not."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("missing or empty string field 'prompt'")
    return record


def load_prompts(path: str | Path, check: RecordCheck | None = None) -> list[dict[str, Any]]:
    """Read a jsonl prompt set: one JSON object per line, each with a non-empty string ``prompt``.

    Blank lines are skipped. ``check(record)`` (a reward's metadata check, e.g.
    :func:`tpgrpo.world.check_record`) may refuse a record with ``ValueError``. Every failure is a
    one-line :class:`~tpgrpo.errors.PromptFileError` naming the file and line. Returns the records
    as parsed.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: prompt file not found")
    records: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = parse_record(line)
                if check is not None:
                    check(record)
            except ValueError as err:
                raise PromptFileError(f"{path}:{lineno}: {err}") from None
            records.append(record)
    if not records:
        raise PromptFileError(f"{path}: prompt file is empty")
    return records


def load_prompt_set(path: str | Path, check: RecordCheck | None = None) -> PromptSet:
    """Read a jsonl prompt set (:func:`load_prompts`)."""
    records = load_prompts(path, check)
    return PromptSet([r["prompt"] for r in records], records)


@dataclass(frozen=True)
class GroupPlan:
    """Sizes of the sampling plan, validated against the dataset and the process count."""

    batch_size: int
    group_size: int
    batches_per_epoch: int
    num_processes: int

    def __post_init__(self) -> None:
        # batch_size % group_size is checked by the config schema; the process count is only
        # known at run time.
        if self.batch_size % self.num_processes:
            raise ConfigError(
                f"sample.batch_size: expected a multiple of the number of processes ({self.num_processes}), "
                f"got {self.batch_size}"
            )

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.num_processes

    @property
    def prompts_per_epoch(self) -> int:
        return self.batch_size // self.group_size * self.batches_per_epoch


def epoch_batches(plan: GroupPlan, num_prompts: int, *, seed: int, epoch: int) -> list[torch.Tensor]:
    """The global batches of one epoch.

    Args:
        plan: sampling sizes.
        num_prompts: size of the prompt set.
        seed: experiment seed.
        epoch: epoch index (0-based).

    Returns:
        ``batches_per_epoch`` long tensors of shape [batch_size], prompt indices.
    """
    if plan.prompts_per_epoch > num_prompts:
        raise ConfigError(
            f"sample: an epoch needs {plan.prompts_per_epoch} distinct prompts "
            f"(batch_size / group_size * batches_per_epoch) but the prompt set has {num_prompts}"
        )
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    chosen = torch.randperm(num_prompts, generator=g)[: plan.prompts_per_epoch]
    per_batch = plan.batch_size // plan.group_size
    batches = []
    for b in range(plan.batches_per_epoch):
        rows = chosen[b * per_batch : (b + 1) * per_batch].repeat_interleave(plan.group_size)
        batches.append(rows[torch.randperm(plan.batch_size, generator=g)])
    return batches

