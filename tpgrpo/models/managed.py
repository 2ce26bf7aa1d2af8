"""A model adapter whose prompt encoding and module placement are managed, for large models.

:class:`ManagedAdapter` wraps any :class:`~tpgrpo.models.base.ModelAdapter` and changes two things.

Prompt encoding, one distinct prompt at a time. A batch's prompts are deduplicated (a GRPO group
repeats its prompt ``group_size`` times) and each distinct prompt is encoded alone, as a batch
of one. Text encoders' kernels may round differently with the batch size (the tiny SD3's pooled
CLIP embedding differs by ~5e-7 between batch sizes on CPU), so encoding each prompt alone makes
its embedding independent of the prompts that share its batch. That is what makes the optional
cache exact: the embeddings of up to ``cache_size`` distinct prompts are kept in CPU memory
(least recently used dropped), and a hit returns exactly what encoding would have returned, so
rollouts with and without the cache are identical and a resumed run (empty cache) matches an
uninterrupted one bit for bit. The text encoders are frozen, so an entry never goes stale.

Offloading. ``offload_text_encoders`` / ``offload_vae`` keep those modules in CPU memory and move
them to the model's device only while they encode / decode. The text encoders of SD3.5 and FLUX
(T5-XXL alone has 4.7 B parameters) outweigh SD3.5-Medium's transformer; with the cache they move
only for prompts not seen before. On a CPU-only machine the moves are no-ops.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import fields
from typing import Iterator, Sequence

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from torch import Tensor

from tpgrpo.models.base import ModelAdapter, PromptEmbeds, Schedule, cfg_enabled

_FIELDS = [f.name for f in fields(PromptEmbeds)]


class ManagedAdapter:
    """``ModelAdapter`` over another adapter (see the module docstring).

    Args:
        inner: the model's adapter; its pipeline may sit on any device.
        device: where the model runs; every module that is not offloaded is moved there.
        cache_size: distinct prompts whose embeddings are kept; None = no cache.
        offload_text_encoders: keep the pipeline's ``text_encoder*`` modules in CPU memory.
        offload_vae: keep the VAE in CPU memory.
    """

    def __init__(
        self,
        inner: ModelAdapter,
        device: str | torch.device,
        *,
        cache_size: int | None = None,
        offload_text_encoders: bool = False,
        offload_vae: bool = False,
    ) -> None:
        if cache_size is not None and cache_size < 1:
            raise ValueError(f"cache_size: expected >= 1 or None, got {cache_size}")
        self.inner = inner
        self.pipe: DiffusionPipeline = inner.pipe
        modules = {n: m for n, m in inner.pipe.components.items() if isinstance(m, torch.nn.Module)}
        offloaded = {n for n in modules if n.startswith("text_encoder")} if offload_text_encoders else set()
        if offload_vae and "vae" in modules:
            offloaded.add("vae")
        for name, module in modules.items():
            module.to("cpu" if name in offloaded else device)
        self._text_encoders = [m for n, m in modules.items() if n in offloaded and n != "vae"]
        self._vae = [modules["vae"]] if "vae" in offloaded else []
        # Asked once: diffusers finds it by walking every module's hooks, ~10 ms a call on a CPU,
        # which added up to a quarter of an evaluation's time.
        self._device = inner.device
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, bool], PromptEmbeds] = OrderedDict()
        self._last_negative: tuple[Tensor, Tensor | None] | None = None

    @property
    def transformer(self) -> torch.nn.Module:
        return self.inner.transformer

    @property
    def scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        return self.inner.scheduler

    @property
    def device(self) -> torch.device:
        # The pipeline reports its accelerator even while the offloaded modules sit on the CPU.
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], guidance_scale: float) -> PromptEmbeds:
        """The inner adapter's embeddings of B prompts ([B, ...] per field, on ``device``), each
        distinct prompt encoded alone or taken from the cache."""
        guided = cfg_enabled(guidance_scale)
        distinct = list(dict.fromkeys(prompts))
        found: dict[str, PromptEmbeds | None] = {p: self._lookup((p, guided)) for p in distinct}
        missing = [p for p in distinct if found[p] is None]
        if missing:
            with self._on_device(self._text_encoders):
                for prompt in missing:
                    embeds = self.inner.encode_prompts([prompt], guidance_scale)
                    found[prompt] = embeds if self.cache_size is None else self._store((prompt, guided), embeds)
        position = {p: i for i, p in enumerate(distinct)}
        index = torch.tensor([position[p] for p in prompts], device=self.device)
        columns = {}
        for name in _FIELDS:
            parts = [getattr(found[p], name) for p in distinct]
            if parts[0] is None:  # the negative branch with guidance off, for every prompt alike
                columns[name] = None
            else:
                columns[name] = torch.cat([t.to(self.device) for t in parts]).index_select(0, index)
        return PromptEmbeds(**columns)

    def prepare_latents(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> Tensor:
        return self.inner.prepare_latents(batch_size, generator, height, width)

    def timesteps(self, num_steps: int, height: int | None = None, width: int | None = None) -> Schedule:
        return self.inner.timesteps(num_steps, height, width)

    def velocity(
        self,
        latents: Tensor,
        timestep: Tensor,
        embeds: PromptEmbeds,
        guidance_scale: float,
        transformer: torch.nn.Module | None = None,
    ) -> Tensor:
        return self.inner.velocity(latents, timestep, embeds, guidance_scale, transformer=transformer)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1], the VAE on the device meanwhile."""
        with self._on_device(self._vae):
            return self.inner.decode(latents)

    def _lookup(self, key: tuple[str, bool]) -> PromptEmbeds | None:
        entry = self._cache.get(key)
        if entry is not None:
            self._cache.move_to_end(key)
        return entry

    def _store(self, key: tuple[str, bool], embeds: PromptEmbeds) -> PromptEmbeds:
        """Keep one prompt's embeddings ([1, ...] per field) in CPU memory and return them."""
        row = {n: None if getattr(embeds, n) is None else getattr(embeds, n).to("cpu", copy=True) for n in _FIELDS}
        negative = (row["negative_prompt_embeds"], row["negative_pooled_prompt_embeds"])
        if negative[0] is not None:
            # The negative branch is the same empty prompt for every prompt (SD3): store it once
            # for as long as it repeats, which halves the cache.
            last = self._last_negative
            if last is not None and all(_same(a, b) for a, b in zip(negative, last)):
                row["negative_prompt_embeds"], row["negative_pooled_prompt_embeds"] = last
            else:
                self._last_negative = negative
        entry = self._cache[key] = PromptEmbeds(**row)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return entry

    @contextmanager
    def _on_device(self, modules: list[torch.nn.Module]) -> Iterator[None]:
        """Move ``modules`` (kept in CPU memory) to the model's device for the block's duration."""
        device = self.device
        for module in modules:
            module.to(device)
        try:
            yield
        finally:
            for module in modules:
                module.to("cpu")


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
