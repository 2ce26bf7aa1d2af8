"""Model-independent parts of the model layer: prompt embeddings, the adapter protocol the
rollout and trainer program against, the base class of the adapters over diffusers' pipelines,
and reading / writing diffusers pipeline directories.

An adapter exposes one flow-matching model as a velocity field ``v(x_t, t | prompt)`` with
classifier-free guidance, plus what is needed around it (noise, schedule, text encoding, VAE
decoding). The rollout owns the sampling loop; adding FLUX means adding an adapter, not touching
the rollout.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Generic, Iterator, NamedTuple, Protocol, Sequence, TypeVar, runtime_checkable

import huggingface_hub
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

# StableDiffusion3Pipeline's calculate_shift is a verbatim copy of this one ("Copied from").
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.utils import logging as diffusers_logging
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
from torch import Tensor
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from tpgrpo.errors import ModelLoadError


@dataclass(frozen=True)
class PromptEmbeds:
    """Text conditioning of a batch of B prompts (field names as diffusers' pipelines use them).

    prompt_embeds: [B, L, D] per-token embeddings.
    pooled_prompt_embeds: [B, P] pooled embeddings.
    negative_prompt_embeds / negative_pooled_prompt_embeds: same shapes, the unconditional
    (negative-prompt) branch of classifier-free guidance; None when guidance is off.
    """

    prompt_embeds: Tensor
    pooled_prompt_embeds: Tensor
    negative_prompt_embeds: Tensor | None = None
    negative_pooled_prompt_embeds: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    @property
    def has_negative(self) -> bool:
        return self.negative_prompt_embeds is not None

    def select(self, index: Tensor) -> PromptEmbeds:
        """Rows ``index`` ([M] long, repeats allowed) of every tensor: [B, ...] -> [M, ...].

        The rollout uses it to give each branch (SDE trajectory, ODE completions) its prompt.
        """
        return PromptEmbeds(
            *(None if t is None else t.index_select(0, index.to(t.device)) for t in self._tensors())
        )

    def _tensors(self) -> tuple[Tensor | None, ...]:
        return (
            self.prompt_embeds,
            self.pooled_prompt_embeds,
            self.negative_prompt_embeds,
            self.negative_pooled_prompt_embeds,
        )


class Schedule(NamedTuple):
    """The sampler's time grid for N steps, as the pipeline's ``scheduler.set_timesteps`` gives it.

    timesteps: [N] model timesteps (sigma * num_train_timesteps), first one noisiest.
    sigmas: [N+1] noise levels, decreasing, sigmas[N] = 0; step i goes sigmas[i] -> sigmas[i+1].
    """

    timesteps: Tensor
    sigmas: Tensor


def cfg_enabled(guidance_scale: float) -> bool:
    """Whether classifier-free guidance runs; diffusers' rule, so scale 1.0 is one plain forward."""
    return guidance_scale > 1.0


@runtime_checkable
class ModelAdapter(Protocol):
    """What the rollout and trainer need from a flow-matching text-to-image model.

    Images are [B, 3, H, W] floats in [0, 1]; latents are [B, C, h, w] in the transformer's
    (scaled) latent space. ``velocity`` keeps autograd, everything else runs without gradients.
    """

    pipe: DiffusionPipeline

    @property
    def transformer(self) -> torch.nn.Module:
        """The denoiser, the module LoRA is applied to."""
        ...

    @property
    def scheduler(self) -> FlowMatchEulerDiscreteScheduler: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's dtype; latents from ``prepare_latents`` and velocities have it."""
        ...

    def encode_prompts(self, prompts: Sequence[str], guidance_scale: float) -> PromptEmbeds:
        """Encode B prompts; the negative branch is encoded only when guidance is on."""
        ...

    def prepare_latents(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> Tensor:
        """x_T: [B, C, h, w] standard normal noise, drawn as the pipeline draws it."""
        ...

    def timesteps(self, num_steps: int, height: int | None = None, width: int | None = None) -> Schedule:
        """The pipeline's schedule for ``num_steps`` (image size matters for dynamic shifting)."""
        ...

    def velocity(
        self,
        latents: Tensor,
        timestep: Tensor,
        embeds: PromptEmbeds,
        guidance_scale: float,
        transformer: torch.nn.Module | None = None,
    ) -> Tensor:
        """Guided velocity [B, C, h, w] at latents [B, C, h, w] and timestep (scalar or [B]);
        ``transformer`` replaces the pipeline's denoiser for this call (a wrapper of it)."""
        ...

    def decode(self, latents: Tensor) -> Tensor:
        """Latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1]."""
        ...


PipelineT = TypeVar("PipelineT", bound=DiffusionPipeline)


class PipelineAdapter(ABC, Generic[PipelineT]):
    """What the ``ModelAdapter`` of every diffusers flow-matching pipeline family shares.

    The pipeline's modules and device, the default ``max_sequence_length``, the image size
    defaults, the schedule's resolution-dependent shift ``mu`` and VAE decoding read the same in
    ``StableDiffusion3Pipeline`` and ``FluxPipeline``. A subclass per family adds what differs:
    ``encode_prompts``, ``prepare_latents`` and ``velocity``, the class constants below and the
    three hooks (the tokenizer that bounds the sequence length, the image token count, and how the
    pipeline sets the scheduler's grid).

    ``max_sequence_length`` is the T5 token count (the pipeline's argument of that name). Default:
    the ``_sequence_tokenizer``'s ``model_max_length`` capped at ``pipeline_max_sequence_length``.
    """

    # The pipeline's own default or upper limit for ``max_sequence_length``.
    pipeline_max_sequence_length: ClassVar[int]
    # The ``max_shift`` the pipeline falls back to when the scheduler config has none.
    default_max_shift: ClassVar[float]

    def __init__(self, pipe: PipelineT, max_sequence_length: int | None = None):
        self.pipe = pipe
        if max_sequence_length is None:
            tokenizer = self._sequence_tokenizer()
            max_sequence_length = min(tokenizer.model_max_length, self.pipeline_max_sequence_length)
        self.max_sequence_length = max_sequence_length

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        return self.pipe.scheduler

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    def timesteps(self, num_steps: int, height: int | None = None, width: int | None = None) -> Schedule:
        """timesteps [N], sigmas [N+1]; a fresh scheduler, so ``pipe.scheduler``'s state is untouched."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        self._set_timesteps(scheduler, num_steps, height, width)
        return Schedule(scheduler.timesteps, scheduler.sigmas)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1] (the pipeline's ``output_type="pt"``)."""
        vae = self.pipe.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(images, output_type="pt")

    def _shift(self, scheduler: FlowMatchEulerDiscreteScheduler, height: int | None, width: int | None) -> float:
        """The schedule's resolution-dependent shift ``mu`` for an image of height x width pixels
        (None: the default size), as the pipeline computes it: linear in the image token count,
        through (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift) of
        ``scheduler``'s config."""
        return calculate_shift(
            self._image_seq_len(height, width),
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", self.default_max_shift),
        )

    def _image_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """Image (H, W) in pixels; a None side is the pipeline's default, ``default_sample_size``
        latents."""
        default = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return height or default, width or default

    @abstractmethod
    def _sequence_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer whose ``model_max_length`` bounds the default ``max_sequence_length``."""

    @abstractmethod
    def _image_seq_len(self, height: int | None, width: int | None) -> int:
        """The transformer's image token count for an image of height x width pixels (None: the
        default size), the count ``_shift`` grows with."""

    @abstractmethod
    def _set_timesteps(
        self, scheduler: FlowMatchEulerDiscreteScheduler, num_steps: int, height: int | None, width: int | None
    ) -> None:
        """Set ``scheduler``'s grid of ``num_steps`` as the pipeline does for a height x width
        image (None: the default size), with ``_shift``'s ``mu`` where the pipeline passes one."""


def save_pipeline(pipe: DiffusionPipeline, path: str | os.PathLike[str]) -> Path:
    """Write ``pipe`` with ``save_pretrained`` (safetensors) to ``path``, atomically.

    The pipeline is written to a temporary sibling directory and renamed into place, so ``path``
    never holds a half-written pipeline; an existing ``path`` is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        with quiet_progress():
            pipe.save_pretrained(tmp, safe_serialization=True)
        if path.exists():
            # rename() cannot replace a non-empty directory: move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            path.rename(old / path.name)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# The project's own base model (``model.path``'s default, written by ``tpgrpo pretrain``): it has
# the shape of a hub id, and before pretraining it does not exist yet, so it is named here to keep
# it off the hub. (models/ imports nothing above it, so it cannot read the config's default.)
BASE_MODEL_PATH = "models/base"
# One part of a hub id: letters, digits, "-", "_" and "."; "-" and "." only inside, as the hub's
# own validation has it (so ".cache/x" is a path).
_HUB_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"{_HUB_NAME}/{_HUB_NAME}")


def hub_id(path: str | os.PathLike[str]) -> str | None:
    """The Hugging Face hub id ``path`` names, or None when it is a local path.

    The rule:

    1. an existing path is local, and so is any path whose first component is an existing
       directory (``data/prompts``, ``runs/x``, existing or not);
    2. ``models/base`` (``BASE_MODEL_PATH``) is local, before ``tpgrpo pretrain`` writes it too;
    3. a ``Path`` (any ``os.PathLike``) is local: only strings are looked up;
    4. a string is a hub id only when it reads ``owner/name``: one ``/``, each part of letters,
       digits, ``-``, ``_`` and ``.`` (``-`` and ``.`` only inside). So ``/abs``, ``./rel``,
       ``../rel``, ``~/x``, ``a/b/c`` and a bare ``name`` are local.

    A local path that does not exist is then reported as a missing directory, never looked up.
    """
    if not isinstance(path, str) or path == BASE_MODEL_PATH or not _HUB_ID.fullmatch(path):
        return None
    # "owner/name" can exist only below an existing directory "owner": one check for rule 1.
    return None if Path(path.partition("/")[0]).is_dir() else path


def load_pipeline(
    path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> DiffusionPipeline:
    """Load a diffusers pipeline from a local directory or a Hugging Face hub id (``hub_id``'s
    rule decides which), as any SD3.5 / FLUX checkpoint is loaded.

    A hub id goes through the hub's cache (``HF_HUB_CACHE``), downloading what is missing with
    the token from ``HF_TOKEN`` or ``hf auth login``; with ``HF_HUB_OFFLINE`` set, only the cache.

    Raises ModelLoadError with a one-line message when a local ``path`` is missing, is not a
    pipeline directory or holds unreadable components (e.g. truncated weights), or a hub id
    cannot be had (not cached while offline, gated, not found).
    """
    repo_id = hub_id(path)
    if repo_id is None:
        path = Path(path)
        if not path.is_dir():
            raise ModelLoadError(f"{path}: no such pipeline directory")
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"{path}: not a diffusers pipeline directory (model_index.json missing)")
    # huggingface_hub's flag, read from HF_HUB_OFFLINE when it is imported and checked by its HTTP
    # layer at every request: the one value that decides whether a download is tried (diffusers
    # loads through huggingface_hub; its own copies of the flag serve telemetry and LoRA loading).
    offline = huggingface_hub.is_offline_mode()
    try:
        # A local directory never turns into a hub lookup; offline, a hub id reads the cache
        # directly instead of warning twice that the hub cannot be reached first.
        with quiet_progress():
            pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype, local_files_only=repo_id is None or offline)
    except Exception as exc:  # the loaders raise many types (OSError, ValueError, SafetensorError...)
        message = f"{path}: cannot load pipeline: {_first_line(exc)}" if repo_id is None else _hub_error(repo_id, exc, offline)
        raise ModelLoadError(message) from exc
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _hub_error(repo_id: str, exc: BaseException, offline: bool) -> str:
    """The one-line reason why loading hub id ``repo_id`` raised ``exc`` (``offline``: whether
    ``HF_HUB_OFFLINE`` is set). diffusers wraps the hub's errors in its own (e.g. an OSError
    raised from the RepositoryNotFoundError of its metadata request), so the cause is looked for
    along the chain."""
    causes = list(_causes(exc))
    if any(isinstance(e, GatedRepoError) for e in causes):
        return (
            f"{repo_id}: gated repo on the Hugging Face hub: accept its licence at https://huggingface.co/{repo_id} "
            "and log in (hf auth login, or HF_TOKEN)"
        )
    if any(isinstance(e, RepositoryNotFoundError) for e in causes):
        return (
            f"{repo_id}: no such repo on the Hugging Face hub, or a private one your token cannot see "
            "(hf auth login, or HF_TOKEN)"
        )
    if offline and any(isinstance(e, LocalEntryNotFoundError) for e in causes):
        return _not_cached(repo_id)
    return f"{repo_id}: cannot load pipeline from the Hugging Face hub: {_first_line(exc)}"


def check_hub_cache(repo_id: str) -> None:
    """Raise the one-line ModelLoadError loading would raise when ``HF_HUB_OFFLINE`` is set and
    hub id ``repo_id`` is not in the cache (its ``model_index.json`` is what is looked for), so a
    command fails before it opens a run; online, or cached, nothing to check."""
    if huggingface_hub.is_offline_mode() and not isinstance(
        huggingface_hub.try_to_load_from_cache(repo_id, "model_index.json"), str
    ):
        raise ModelLoadError(_not_cached(repo_id))


def _not_cached(repo_id: str) -> str:
    return (
        f"{repo_id}: not in the Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE "
        f"is set: download it with `hf download {repo_id}`, or unset HF_HUB_OFFLINE"
    )


def _causes(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc``, then the exception it was raised from (or while handling), and so on."""
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def _first_line(exc: BaseException) -> str:
    detail = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {detail[0] if detail else ''}"


@contextmanager
def quiet_progress() -> Iterator[None]:
    """Silence the per-component / per-shard progress bars of diffusers and transformers, which
    would print a dozen bars for every tiny-model checkpoint; restores the previous setting."""
    libraries = [lib for lib in (diffusers_logging, transformers_logging) if lib.is_progress_bar_enabled()]
    for lib in libraries:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in libraries:
            lib.enable_progress_bar()
