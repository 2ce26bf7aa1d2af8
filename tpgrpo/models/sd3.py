"""Adapter for diffusers' ``StableDiffusion3Pipeline`` (SD3 / SD3.5 and the tiny embedded model).

Every piece mirrors ``StableDiffusion3Pipeline.__call__`` line for line (prompt encoding, noise,
schedule, guided forward, VAE decoding), so an Euler loop over ``velocity`` reproduces the
pipeline's own images.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from tpgrpo.models.base import PipelineAdapter, PromptEmbeds, cfg_enabled


class SD3Adapter(PipelineAdapter[StableDiffusion3Pipeline]):
    """``ModelAdapter`` over a ``StableDiffusion3Pipeline``.

    ``max_sequence_length`` is the T5 token count (the pipeline's argument of that name). Default:
    the T5 tokenizer's ``model_max_length`` capped at the pipeline's 256; without T5 the CLIP
    length, since the pipeline then pads with that many zero tokens. Pass the same value to
    ``pipe(...)`` when comparing against the pipeline.
    """

    # StableDiffusion3Pipeline.__call__'s default; SD3.5's T5 tokenizer allows 512.
    pipeline_max_sequence_length = 256
    # StableDiffusion3Pipeline.__call__'s fallback (FLUX's is 1.15).
    default_max_shift = 1.16

    def _sequence_tokenizer(self) -> PreTrainedTokenizerBase:
        return self.pipe.tokenizer_3 if self.pipe.text_encoder_3 is not None else self.pipe.tokenizer

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], guidance_scale: float) -> PromptEmbeds:
        """prompt_embeds [B, clip_len + max_sequence_length, D] (both CLIPs side by side in the
        features, zero-padded to the T5 width D, then the T5 tokens), pooled [B, P]; negatives
        (the empty prompt, the pipeline's default) only when guidance is on."""
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=cfg_enabled(guidance_scale),
            max_sequence_length=self.max_sequence_length,
        )
        return PromptEmbeds(embeds, pooled, negative, negative_pooled)

    def prepare_latents(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> Tensor:
        """x_T [B, C, H/f, W/f]; with the same generator state ``pipe(..., generator=g)`` draws
        the same noise (prompt encoding draws no random numbers)."""
        height, width = self._image_size(height, width)
        return self.pipe.prepare_latents(
            batch_size,
            self.pipe.transformer.config.in_channels,
            height,
            width,
            self.dtype,
            self.device,
            generator,
        )

    def _image_seq_len(self, height: int | None, width: int | None) -> int:
        height, width = self._image_size(height, width)
        patch = self.pipe.transformer.config.patch_size
        factor = self.pipe.vae_scale_factor
        return (height // factor // patch) * (width // factor // patch)

    def _set_timesteps(
        self, scheduler: FlowMatchEulerDiscreteScheduler, num_steps: int, height: int | None, width: int | None
    ) -> None:
        kwargs: dict[str, float] = {}
        # The pipeline passes mu only with dynamic shifting on (off for SD3.5, which uses a fixed shift).
        if scheduler.config.get("use_dynamic_shifting", None):
            kwargs["mu"] = self._shift(scheduler, height, width)
        scheduler.set_timesteps(num_steps, device=self.device, **kwargs)

    def velocity(
        self,
        latents: Tensor,
        timestep: Tensor,
        embeds: PromptEmbeds,
        guidance_scale: float,
        transformer: torch.nn.Module | None = None,
    ) -> Tensor:
        """Guided velocity [B, C, h, w] in the transformer's dtype.

        With guidance on, unconditional and conditional rows go through ONE forward of 2B rows
        (negatives first, as the pipeline orders them) and are combined as
        ``v_u + g * (v_c - v_u)``. ``timestep``: scalar or [B] (rows may sit at different times).
        ``transformer``: the module to call instead of the pipeline's own, e.g. its
        data-parallel wrapper during the policy update (same weights, synchronised gradients).
        """
        do_cfg = cfg_enabled(guidance_scale)
        if do_cfg and not embeds.has_negative:
            raise ValueError("guidance_scale > 1 needs PromptEmbeds encoded with guidance on")
        latents = latents.to(self.dtype)
        timestep = timestep.to(latents.device).expand(latents.shape[0])
        hidden, context, pooled = latents, embeds.prompt_embeds, embeds.pooled_prompt_embeds
        if do_cfg:
            hidden = torch.cat([latents, latents])
            timestep = torch.cat([timestep, timestep])
            context = torch.cat([embeds.negative_prompt_embeds, context])
            pooled = torch.cat([embeds.negative_pooled_prompt_embeds, pooled])
        velocity = (transformer or self.pipe.transformer)(
            hidden_states=hidden,
            timestep=timestep,
            encoder_hidden_states=context,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        if do_cfg:
            uncond, cond = velocity.chunk(2)
            velocity = uncond + guidance_scale * (cond - uncond)
        return velocity
