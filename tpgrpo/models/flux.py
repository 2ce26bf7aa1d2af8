"""Adapter for diffusers' ``FluxPipeline`` (FLUX.1-dev / -schnell and the tiny FLUX model).

Every piece mirrors ``FluxPipeline.__call__`` (prompt encoding, noise, schedule, transformer
forward, VAE decoding), so an Euler loop over ``velocity`` reproduces the pipeline's own images.
What differs from SD3 stays inside the adapter, so the rollout and trainer need no FLUX case:

- No classifier-free guidance. FLUX.1-dev is guidance-distilled: the guidance scale enters the
  transformer as its ``guidance`` embedding (when ``transformer.config.guidance_embeds``; schnell
  has none and ignores the scale), one forward per row. ``PromptEmbeds`` never carry a negative
  branch, so the rollout counts one row per latent. (The pipeline's optional "true CFG",
  ``true_cfg_scale`` with a negative prompt, is not supported.)
- Packed latents. The transformer works on 2x2 latent patches packed into a token sequence
  [B, (h/2)(w/2), 4C]. The adapter's latents stay unpacked [B, C, h, w], the layout the VAE
  decodes and the protocol, rollout and trainer describe; ``velocity`` packs on the way in and
  unpacks on the way out. Packing only permutes elements, so no value changes, and the unpacked
  noise is exactly the pipeline's draw before it packs it. ``pipe(latents=...)`` takes the packed
  form: pass ``adapter.pack(x_T)``.
- Position ids: zeros for the text tokens, (0, row, column) for the image tokens, as the
  pipeline builds them, rebuilt per call from the shapes (cheap, and rows of any prompt mix).
- Schedule: the pipeline's ``linspace(1, 1/N, N)`` sigmas, shifted by ``mu`` from the image token
  count (``calculate_shift``), so the schedule depends on the image size.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from tpgrpo.models.base import PipelineAdapter, PromptEmbeds


class FluxAdapter(PipelineAdapter[FluxPipeline]):
    """``ModelAdapter`` over a ``FluxPipeline``.

    ``max_sequence_length`` is the T5 token count (the pipeline's argument of that name). Default:
    the T5 tokenizer's ``model_max_length`` capped at the pipeline's 512. The pipeline itself
    defaults to 512 whatever the tokenizer, so pass the same value to ``pipe(...)`` when comparing
    against it.
    """

    # FluxPipeline's upper limit for max_sequence_length (and FLUX.1's T5 tokenizer length).
    pipeline_max_sequence_length = 512
    # FluxPipeline.__call__'s fallback (SD3's is 1.16).
    default_max_shift = 1.15

    def _sequence_tokenizer(self) -> PreTrainedTokenizerBase:
        return self.pipe.tokenizer_2

    def _latent_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """Image size (None: the pipeline's default) -> latent (h, w), rounded down to even sides
        as the pipeline rounds them for packing."""
        height, width = self._image_size(height, width)
        patch = 2 * self.pipe.vae_scale_factor
        return 2 * (height // patch), 2 * (width // patch)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], guidance_scale: float) -> PromptEmbeds:
        """prompt_embeds [B, max_sequence_length, D] (T5 tokens), pooled [B, P] (CLIP's pooled
        output); no negatives at any ``guidance_scale``: the scale goes into ``velocity``."""
        embeds, pooled, _text_ids = self.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            device=self.device,
            max_sequence_length=self.max_sequence_length,
        )
        return PromptEmbeds(embeds, pooled)

    def prepare_latents(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> Tensor:
        """x_T [B, C, h, w] (unpacked); with the same generator state ``pipe(..., generator=g)``
        draws the same noise (prompt encoding draws no random numbers)."""
        h, w = self._latent_size(height, width)
        f = self.pipe.vae_scale_factor
        packed, _image_ids = self.pipe.prepare_latents(
            batch_size,
            self.pipe.transformer.config.in_channels // 4,
            h * f,
            w * f,
            self.dtype,
            self.device,
            generator,
        )
        return self.unpack(packed, h, w)

    def pack(self, latents: Tensor) -> Tensor:
        """[B, C, h, w] -> [B, (h/2)(w/2), 4C], the pipeline's token layout of 2x2 patches."""
        B, C, h, w = latents.shape
        return self.pipe._pack_latents(latents, B, C, h, w)

    def unpack(self, packed: Tensor, h: int, w: int) -> Tensor:
        """[B, (h/2)(w/2), 4C] -> [B, C, h, w] for latent sides h, w (the inverse of ``pack``)."""
        f = self.pipe.vae_scale_factor
        return self.pipe._unpack_latents(packed, h * f, w * f, f)

    def _image_seq_len(self, height: int | None, width: int | None) -> int:
        h, w = self._latent_size(height, width)
        return (h // 2) * (w // 2)

    def _set_timesteps(
        self, scheduler: FlowMatchEulerDiscreteScheduler, num_steps: int, height: int | None, width: int | None
    ) -> None:
        sigmas = None if scheduler.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        # The pipeline always passes mu; the scheduler only uses it with dynamic shifting on.
        retrieve_timesteps(scheduler, num_steps, self.device, sigmas=sigmas, mu=self._shift(scheduler, height, width))

    def velocity(
        self,
        latents: Tensor,
        timestep: Tensor,
        embeds: PromptEmbeds,
        guidance_scale: float,
        transformer: torch.nn.Module | None = None,
    ) -> Tensor:
        """Velocity [B, C, h, w] in the transformer's dtype, one forward of B rows.

        ``guidance_scale`` is the distilled guidance embedding (ignored by models without one);
        ``embeds``' negatives, if any, are unused. ``timestep``: scalar or [B] (rows may sit at
        different times). ``transformer``: the module to call instead of the pipeline's own, e.g.
        its data-parallel wrapper during the policy update (same weights, synchronised gradients).
        """
        latents = latents.to(self.dtype)
        B, _, h, w = latents.shape
        device = latents.device
        # The pipeline casts the timestep to the latents' dtype before scaling it to [0, 1].
        timestep = timestep.to(device).expand(B).to(latents.dtype) / 1000
        guidance = None
        if self.pipe.transformer.config.guidance_embeds:
            guidance = torch.full([B], guidance_scale, device=device, dtype=torch.float32)
        # Small integer positions, exact in any float dtype; the rotary embedding upcasts them.
        text_ids = torch.zeros(embeds.prompt_embeds.shape[1], 3, device=device, dtype=latents.dtype)
        image_ids = self.pipe._prepare_latent_image_ids(B, h // 2, w // 2, device, latents.dtype)
        packed = (transformer or self.pipe.transformer)(
            hidden_states=self.pack(latents),
            timestep=timestep,
            guidance=guidance,
            pooled_projections=embeds.pooled_prompt_embeds,
            encoder_hidden_states=embeds.prompt_embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return self.unpack(packed, h, w)
