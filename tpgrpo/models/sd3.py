"""Adapter for diffusers' ``StableDiffusion3Pipeline`` (SD3 / SD3.5 and the tiny embedded model).

Every piece mirrors ``StableDiffusion3Pipeline.__call__`` line for line (prompt encoding, noise,
schedule, guided forward, VAE decoding), so an Euler loop over ``velocity`` reproduces the
pipeline's own images.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from torch import Tensor

from tpgrpo.models.base import PromptEmbeds, Schedule, cfg_enabled

# StableDiffusion3Pipeline.__call__'s default; SD3.5's T5 tokenizer allows 512.
_PIPELINE_MAX_SEQUENCE_LENGTH = 256


class SD3Adapter:
    """``ModelAdapter`` over a ``StableDiffusion3Pipeline``.

    ``max_sequence_length`` is the T5 token count (the pipeline's argument of that name). Default:
    the T5 tokenizer's ``model_max_length`` capped at the pipeline's 256; without T5 the CLIP
    length, since the pipeline then pads with that many zero tokens. Pass the same value to
    ``pipe(...)`` when comparing against the pipeline.
    """

    def __init__(self, pipe: StableDiffusion3Pipeline, max_sequence_length: int | None = None):
        self.pipe = pipe
        if max_sequence_length is None:
            tokenizer = pipe.tokenizer_3 if pipe.text_encoder_3 is not None else pipe.tokenizer
            max_sequence_length = min(tokenizer.model_max_length, _PIPELINE_MAX_SEQUENCE_LENGTH)
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

    def _size(self, height: int | None, width: int | None) -> tuple[int, int]:
        default = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return height or default, width or default

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
        height, width = self._size(height, width)
        return self.pipe.prepare_latents(
            batch_size,
            self.pipe.transformer.config.in_channels,
            height,
            width,
            self.dtype,
            self.device,
            generator,
        )

    def timesteps(self, num_steps: int, height: int | None = None, width: int | None = None) -> Schedule:
        """timesteps [N], sigmas [N+1]; a fresh scheduler, so ``pipe.scheduler``'s state is untouched."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        kwargs = {}
        # Same resolution-dependent shift as the pipeline (off for SD3.5, which uses a fixed shift).
        if scheduler.config.get("use_dynamic_shifting", None):
            height, width = self._size(height, width)
            patch = self.pipe.transformer.config.patch_size
            factor = self.pipe.vae_scale_factor
            seq_len = (height // factor // patch) * (width // factor // patch)
            kwargs["mu"] = calculate_shift(
                seq_len,
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        scheduler.set_timesteps(num_steps, device=self.device, **kwargs)
        return Schedule(scheduler.timesteps, scheduler.sigmas)

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

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1] (the pipeline's ``output_type="pt"``)."""
        vae = self.pipe.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(images, output_type="pt")
