"""The full-size architectures the presets train, built from their published configs.

The values below are facts copied from the published model configs (the ``config.json`` of each
component in ``stabilityai/stable-diffusion-3.5-medium`` and ``black-forest-labs/FLUX.1-dev``), so
the presets' LoRA targets, the memory model and the scale benchmark meet the real module tree
without downloading a byte:

    from tpgrpo.models.architectures import ARCHITECTURES, build_transformer, lora_modules
    arch = ARCHITECTURES["stabilityai/stable-diffusion-3.5-medium"]
    transformer = build_transformer(arch)              # meta device: shapes only, no memory
    names = lora_modules(transformer, ["attn.to_q", "attn.to_k"])

``build_pipeline`` assembles the whole pipeline (text encoders, VAE, scheduler, word-list
tokenizers) with random weights on a real device, for benchmarks; ``shrink`` divides widths and
depths so the same code runs on a CPU.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Literal

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
)

from tpgrpo.models.tiny import build_clip_tokenizer, build_t5_tokenizer


@dataclass(frozen=True)
class ClipSpec:
    """A CLIP text encoder (``CLIPTextConfig`` fields); ``projection_dim`` None: no projection
    head (FLUX's ``CLIPTextModel``, whose pooled output is ``hidden_size`` wide)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str
    projection_dim: int | None = None
    vocab_size: int = 49408
    max_position_embeddings: int = 77

    def build(self, tokenizer: PreTrainedTokenizerBase | None = None) -> torch.nn.Module:
        """The encoder; with ``tokenizer``, its special-token ids (the published config's eos id 2
        selects CLIP's legacy pooling at the highest token id, right only for the published
        vocabulary, where end-of-text is the last token)."""
        ids = {} if tokenizer is None else dict(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        )
        kwargs: dict[str, Any] = dict(
            **ids,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            hidden_act=self.hidden_act,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
        )
        if self.projection_dim is None:
            return CLIPTextModel(CLIPTextConfig(**kwargs))
        return CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=self.projection_dim, **kwargs))

    @property
    def pooled_dim(self) -> int:
        return self.hidden_size if self.projection_dim is None else self.projection_dim

    def shrink(self, factor: int) -> ClipSpec:
        heads = max(1, self.num_attention_heads // factor)
        head_dim = self.hidden_size // self.num_attention_heads
        return replace(
            self,
            hidden_size=heads * head_dim,
            intermediate_size=max(1, self.intermediate_size // factor),
            num_hidden_layers=max(1, self.num_hidden_layers // factor),
            num_attention_heads=heads,
            projection_dim=None if self.projection_dim is None else max(1, self.projection_dim // factor),
        )


@dataclass(frozen=True)
class T5Spec:
    """The T5 v1.1 encoder (``T5Config`` fields)."""

    d_model: int = 4096
    d_ff: int = 10240
    d_kv: int = 64
    num_layers: int = 24
    num_heads: int = 64
    vocab_size: int = 32128
    feed_forward_proj: str = "gated-gelu"

    def build(self) -> torch.nn.Module:
        return T5EncoderModel(
            T5Config(
                d_model=self.d_model,
                d_ff=self.d_ff,
                d_kv=self.d_kv,
                num_layers=self.num_layers,
                num_heads=self.num_heads,
                vocab_size=self.vocab_size,
                feed_forward_proj=self.feed_forward_proj,
                is_encoder_decoder=False,
                use_cache=False,
            )
        )

    def shrink(self, factor: int) -> T5Spec:
        heads = max(1, self.num_heads // factor)
        return replace(
            self,
            d_model=max(1, self.d_model // factor),
            d_ff=max(1, self.d_ff // factor),
            num_layers=max(1, self.num_layers // factor),
            num_heads=heads,
        )


@dataclass(frozen=True)
class VaeSpec:
    """The 16-channel ``AutoencoderKL`` of SD3 / FLUX.1 (8x down-sampling)."""

    scaling_factor: float
    shift_factor: float
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    latent_channels: int = 16

    def build(self) -> AutoencoderKL:
        n = len(self.block_out_channels)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
            latent_channels=self.latent_channels,
            scaling_factor=self.scaling_factor,
            shift_factor=self.shift_factor,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def shrink(self, factor: int) -> VaeSpec:
        groups = max(1, self.norm_num_groups // factor)
        # Every width stays a multiple of the group count (GroupNorm's requirement).
        channels = tuple(max(groups, c // factor // groups * groups) for c in self.block_out_channels)
        return replace(self, block_out_channels=channels, norm_num_groups=groups, layers_per_block=max(1, self.layers_per_block // factor))


@dataclass(frozen=True)
class Architecture:
    """One published text-to-image model: its transformer's config, text encoders, VAE and
    scheduler, with the parameter counts published for it.

    ``transformer``: the keyword arguments of the transformer class. ``published_parameters``:
    the transformer size the model card states (SD3.5-Medium's 2.5 B count its position-embedding
    table, which diffusers keeps as a buffer; see :func:`transformer_size`).
    """

    name: str
    family: Literal["sd3", "flux"]
    transformer: dict[str, Any]
    clips: tuple[ClipSpec, ...]
    t5: T5Spec
    vae: VaeSpec
    scheduler: dict[str, Any]
    published_parameters: float
    # The T5 length the published training code encodes prompts at.
    max_sequence_length: int = 128
    resolution: int = 512
    shrunk_by: int = field(default=1)

    @property
    def transformer_class(self) -> type[torch.nn.Module]:
        return SD3Transformer2DModel if self.family == "sd3" else FluxTransformer2DModel

    @property
    def pipeline_class(self) -> type[DiffusionPipeline]:
        return StableDiffusion3Pipeline if self.family == "sd3" else FluxPipeline

    def shrink(self, factor: int) -> Architecture:
        """The same architecture with attention heads, layer counts and text-encoder / VAE widths
        divided by ``factor`` (at least one of each); head dimensions, patch sizes, channel
        counts and vocabularies stay, so every module name and every shape rule is the full
        model's. ``factor`` 1 returns the architecture itself."""
        if factor < 1:
            raise ValueError(f"shrink: expected a factor >= 1, got {factor}")
        if factor == 1:
            return self
        t = dict(self.transformer)
        t["num_attention_heads"] = max(1, t["num_attention_heads"] // factor)
        # SD3's last block ends its context stream early (no to_add_out): two blocks keep every
        # module kind of the full model, so its LoRA targets still resolve.
        t["num_layers"] = max(2 if self.family == "sd3" else 1, t["num_layers"] // factor)
        clips = tuple(c.shrink(factor) for c in self.clips)
        t5 = self.t5.shrink(factor)
        t["joint_attention_dim"] = t5.d_model
        if self.family == "sd3":
            t["caption_projection_dim"] = t["num_attention_heads"] * t["attention_head_dim"]
            t["pooled_projection_dim"] = sum(c.pooled_dim for c in clips)
            dual = t.get("dual_attention_layers", ())
            t["dual_attention_layers"] = tuple(range(min(t["num_layers"], math.ceil(len(dual) / factor))))
        else:
            t["num_single_layers"] = max(1, t["num_single_layers"] // factor)
            t["pooled_projection_dim"] = clips[0].pooled_dim
        return replace(self, transformer=t, clips=clips, t5=t5, vae=self.vae.shrink(factor), shrunk_by=self.shrunk_by * factor)


# stabilityai/stable-diffusion-3.5-medium: transformer/config.json (MMDiT-X: the first 13 blocks
# add a second, image-only attention), text_encoder (CLIP-L/14), text_encoder_2 (OpenCLIP bigG/14),
# text_encoder_3 (T5 v1.1 XXL), vae/config.json, scheduler (shift 3.0).
SD35_MEDIUM = Architecture(
    name="stabilityai/stable-diffusion-3.5-medium",
    family="sd3",
    transformer=dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
        qk_norm="rms_norm",
    ),
    clips=(
        ClipSpec(768, 3072, 12, 12, "quick_gelu", projection_dim=768),
        ClipSpec(1280, 5120, 32, 20, "gelu", projection_dim=1280),
    ),
    t5=T5Spec(),
    vae=VaeSpec(scaling_factor=1.5305, shift_factor=0.0609),
    scheduler=dict(shift=3.0),
    published_parameters=2.5e9,
)

# black-forest-labs/FLUX.1-dev: transformer/config.json (19 double-stream and 38 single-stream
# blocks, guidance-distilled), text_encoder (CLIP-L/14, pooled output only), text_encoder_2
# (T5 v1.1 XXL), vae/config.json, scheduler (resolution-dependent shift).
FLUX1_DEV = Architecture(
    name="black-forest-labs/FLUX.1-dev",
    family="flux",
    transformer=dict(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
    clips=(ClipSpec(768, 3072, 12, 12, "quick_gelu"),),
    t5=T5Spec(),
    vae=VaeSpec(scaling_factor=0.3611, shift_factor=0.1159),
    scheduler=dict(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    ),
    published_parameters=11.9e9,
)

# Keyed by hub id: the presets' model.path names the same id.
ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (SD35_MEDIUM, FLUX1_DEV)}


def build_transformer(
    arch: Architecture, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """The architecture's transformer, its weights created on ``device`` in ``dtype``.

    On the default ``meta`` device no memory is allocated: every parameter has its shape and
    dtype and nothing else, so the 12 B FLUX transformer builds in a fraction of a second.
    Elsewhere the weights are the class's random initialisation.
    """
    with torch.device(device), _default_dtype(dtype):
        return arch.transformer_class(**arch.transformer).eval()


def build_pipeline(
    arch: Architecture,
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.float32,
    *,
    vocabulary: Iterable[str],
    seed: int = 0,
) -> DiffusionPipeline:
    """The whole pipeline of ``arch`` with random weights on ``device`` in ``dtype``.

    The tokenizers are word-level ones written from ``vocabulary`` (each word one token, as for
    the tiny models), since the published tokenizers cannot be downloaded here; token ids stay
    below the published vocabulary sizes the embeddings are built with. Only the numbers are
    random: module tree, shapes and the cost of every forward are the real model's.
    """
    words = list(dict.fromkeys(vocabulary))
    with tempfile.TemporaryDirectory(prefix="tpgrpo-tok-") as tmp:
        clip_tokenizer = build_clip_tokenizer(words, arch.clips[0].max_position_embeddings, Path(tmp) / "clip")
        t5_tokenizer = build_t5_tokenizer(words, arch.max_sequence_length, Path(tmp) / "t5")
    with torch.random.fork_rng(devices=[]), torch.device(device), _default_dtype(dtype):
        torch.manual_seed(seed)
        clips = [spec.build(clip_tokenizer).eval() for spec in arch.clips]
        t5 = arch.t5.build().eval()
        vae = arch.vae.build().eval()
        transformer = arch.transformer_class(**arch.transformer).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**arch.scheduler)
    if arch.family == "sd3":
        pipe = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=clips[0],
            tokenizer=clip_tokenizer,
            text_encoder_2=clips[1],
            tokenizer_2=clip_tokenizer,
            text_encoder_3=t5,
            tokenizer_3=t5_tokenizer,
        )
    else:
        pipe = FluxPipeline(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=clips[0],
            tokenizer=clip_tokenizer,
            text_encoder_2=t5,
            tokenizer_2=t5_tokenizer,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass(frozen=True)
class TransformerSize:
    """Parameter counts of a transformer: ``parameters`` (what diffusers registers as
    parameters), ``buffers`` (SD3's fixed sin-cos position table), ``total`` both."""

    parameters: int
    buffers: int

    @property
    def total(self) -> int:
        return self.parameters + self.buffers


def transformer_size(transformer: torch.nn.Module) -> TransformerSize:
    return TransformerSize(
        sum(p.numel() for p in transformer.parameters()), sum(b.numel() for b in transformer.buffers())
    )


@dataclass(frozen=True)
class LoraSize:
    """Where a LoRA of rank ``rank`` lands: the matched linear layers and its trainable
    parameters, ``rank * (in + out)`` per layer (no biases)."""

    modules: tuple[str, ...]
    rank: int
    parameters: int


def lora_modules(transformer: torch.nn.Module, targets: Iterable[str]) -> tuple[str, ...]:
    """Names of the modules of ``transformer`` that peft's ``target_modules`` ``targets`` select,
    decided by peft's own matcher (a target matches a module name equal to it or ending in
    ``.<target>``), so the answer is the one ``add_adapter`` acts on. Raises ValueError when a
    target matches nothing, or matches a module LoRA cannot wrap (not a linear layer)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = list(targets)
    config = LoraConfig(target_modules=targets)
    matched = [(n, m) for n, m in transformer.named_modules() if n and check_target_module_exists(config, n)]
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n, _ in matched):
            raise ValueError(f"lora_targets: {target!r} matches no module of {type(transformer).__name__}")
    bad = [n for n, m in matched if not isinstance(m, torch.nn.Linear)]
    if bad:
        raise ValueError(f"lora_targets: {bad[0]} is a {type(transformer.get_submodule(bad[0])).__name__}, not a linear layer")
    return tuple(n for n, _ in matched)


def lora_size(transformer: torch.nn.Module, targets: Iterable[str], rank: int) -> LoraSize:
    """The LoRA of ``rank`` on ``targets`` (:func:`lora_modules`) and its parameter count."""
    names = lora_modules(transformer, targets)
    linears = [transformer.get_submodule(n) for n in names]
    return LoraSize(names, rank, sum(rank * (m.in_features + m.out_features) for m in linears))


class _default_dtype:
    """``torch.set_default_dtype`` for a block: modules built inside create float weights in it."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __enter__(self) -> None:
        self.previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc: object) -> None:
        torch.set_default_dtype(self.previous)
