"""The embedded default model: a tiny SD3-architecture pipeline built from config, and a tiny
FLUX-architecture one beside it.

Every component is the real diffusers / transformers class a Stable Diffusion 3.5 checkpoint uses
(``SD3Transformer2DModel``, ``AutoencoderKL``, two ``CLIPTextModelWithProjection``, ``T5EncoderModel``,
``FlowMatchEulerDiscreteScheduler``), or a FLUX.1 checkpoint uses (``FluxTransformer2DModel``,
``AutoencoderKL``, ``CLIPTextModel``, ``T5EncoderModel``, the scheduler with dynamic shifting), only
small and randomly initialised, and the tokenizers are written from a word list by this module.
Nothing is downloaded. After ``save_pipeline`` the directory loads with a plain
``StableDiffusion3Pipeline.from_pretrained(path)`` / ``FluxPipeline.from_pretrained(path)``.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch
from diffusers import (
    AutoencoderKL,
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
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

_CLIP_BOS = "<|startoftext|>"
# Real CLIP uses end-of-text as eos, pad and unk alike; keep that so the tokenizer is a stock one.
_CLIP_EOS = "<|endoftext|>"
_CLIP_WORD_SUFFIX = "</w>"


@dataclass(frozen=True)
class TinyPipelineConfig:
    """Sizes both tiny pipelines share: the images, the VAE and the CLIP and T5 text encoders.

    :class:`TinySD3Config` and :class:`TinyFluxConfig` add their transformer and checks of their
    own (:meth:`_problems`); an inconsistent config raises one ``ValueError`` listing every problem.
    """

    image_size: int = 64

    # Three blocks give the 4x down-sampling (diffusers down-samples between blocks only).
    vae_block_out_channels: tuple[int, ...] = (16, 32, 32)
    vae_layers_per_block: int = 1
    # Groups of 8 channels: one group per channel collapsed all colours in a prototype.
    vae_norm_num_groups: int = 4
    latent_channels: int = 4
    # Placeholders for an untrained VAE; pre-training should measure the latent statistics and
    # write them into the VAE config (the pipeline reads scaling_factor / shift_factor from there).
    vae_scaling_factor: float = 1.0
    vae_shift_factor: float = 0.0

    clip_hidden_size: int = 32
    clip_intermediate_size: int = 64
    clip_num_layers: int = 2
    clip_num_heads: int = 2

    t5_d_model: int = 64
    t5_d_ff: int = 128
    t5_num_layers: int = 1
    t5_num_heads: int = 4

    max_sequence_length: int = 16

    def __post_init__(self) -> None:
        # YAML gives lists; a tuple keeps the frozen config hashable and comparable.
        object.__setattr__(self, "vae_block_out_channels", tuple(self.vae_block_out_channels))
        problems = self._problems()
        if problems:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        """What is inconsistent in the shared sizes; subclasses extend the list with their own."""
        problems = []
        if any(c % self.vae_norm_num_groups for c in self.vae_block_out_channels):
            problems.append(
                f"vae_norm_num_groups={self.vae_norm_num_groups} must divide every vae_block_out_channels "
                f"{self.vae_block_out_channels}"
            )
        if self.clip_hidden_size % self.clip_num_heads:
            problems.append("clip_hidden_size must be a multiple of clip_num_heads")
        if self.t5_d_model % self.t5_num_heads:
            problems.append("t5_d_model must be a multiple of t5_num_heads")
        if self.max_sequence_length < 3:
            problems.append("max_sequence_length must be >= 3 (bos, one word, eos)")
        return problems

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_scale_factor


@dataclass(frozen=True)
class TinySD3Config(TinyPipelineConfig):
    """Sizes of the tiny SD3 pipeline.

    Defaults: 64x64 RGB images, a 4x-down VAE with 4 latent channels (16x16 latents), a 4-layer
    MMDiT with 4 heads x 32 on 2x2 patches (64 image tokens), two 2-layer CLIP encoders of width 32
    and a 1-layer T5 of width 64, all tokenizers and text encoders at 16 positions.
    """

    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    # 2x2 patches of a 16x16 latent give 64 image tokens: each token sees an 8x8 pixel area, fine
    # enough for coloured shapes and 4x cheaper than patch 1 on CPU.
    patch_size: int = 2
    # SD3.5 normalises queries and keys; it also keeps a tiny model's attention logits tame.
    qk_norm: str | None = "rms_norm"

    clip_projection_dim: int = 32

    # SD3's shift 3.0 compensates for 1024px images, where noise hides structure only late; the
    # resolution rule of the SD3 paper gives <= 1 at 64px. 1.0 keeps the sigma grid even, so the
    # SDE window steps of the RL rollouts are of comparable size.
    scheduler_shift: float = 1.0

    def _problems(self) -> list[str]:
        problems = super()._problems()
        if self.image_size % (self.vae_scale_factor * self.patch_size):
            problems.append(
                f"image_size={self.image_size} must be a multiple of VAE factor x patch_size = "
                f"{self.vae_scale_factor * self.patch_size}"
            )
        # SD3 concatenates both CLIP hidden states along features and pads them to the T5 width;
        # a negative pad would silently crop them instead.
        if 2 * self.clip_hidden_size > self.t5_d_model:
            problems.append(
                f"t5_d_model={self.t5_d_model} must be >= 2 * clip_hidden_size = {2 * self.clip_hidden_size}"
            )
        if self.scheduler_shift <= 0 or self.vae_scaling_factor <= 0:
            problems.append("scheduler_shift and vae_scaling_factor must be > 0")
        return problems

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


def build_tiny_sd3(vocabulary: list[str], cfg: TinySD3Config, seed: int) -> StableDiffusion3Pipeline:
    """Build a randomly initialised tiny ``StableDiffusion3Pipeline`` (float32, CPU).

    ``vocabulary`` lists the words prompts are made of; each becomes exactly one token in all three
    tokenizers. The result depends only on (vocabulary, cfg, seed); the global RNG is left as found.
    """
    words = list(dict.fromkeys(vocabulary))
    if not words:
        raise ValueError("build_tiny_sd3: the vocabulary is empty")
    with tempfile.TemporaryDirectory(prefix="tpgrpo-tok-") as tmp:
        clip_tokenizer = build_clip_tokenizer(words, cfg.max_sequence_length, Path(tmp) / "clip")
        t5_tokenizer = build_t5_tokenizer(words, cfg.max_sequence_length, Path(tmp) / "t5")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModelWithProjection(
            _clip_config(cfg, clip_tokenizer, projection_dim=cfg.clip_projection_dim)
        )
        text_encoder_2 = CLIPTextModelWithProjection(
            _clip_config(cfg, clip_tokenizer, projection_dim=cfg.clip_projection_dim)
        )
        text_encoder_3 = T5EncoderModel(_t5_config(cfg, t5_tokenizer))
        vae = _vae(cfg)
        transformer = SD3Transformer2DModel(
            sample_size=cfg.latent_size,
            patch_size=cfg.patch_size,
            in_channels=cfg.latent_channels,
            out_channels=cfg.latent_channels,
            num_layers=cfg.num_layers,
            attention_head_dim=cfg.attention_head_dim,
            num_attention_heads=cfg.num_attention_heads,
            joint_attention_dim=cfg.t5_d_model,
            # The joint attention concatenates text and image tokens: both must be inner_dim wide.
            caption_projection_dim=cfg.inner_dim,
            pooled_projection_dim=2 * cfg.clip_projection_dim,
            pos_embed_max_size=cfg.latent_size // cfg.patch_size,
            qk_norm=cfg.qk_norm,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=cfg.scheduler_shift)

    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer,
    )
    for module in (text_encoder, text_encoder_2, text_encoder_3, vae, transformer):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass(frozen=True)
class TinyFluxConfig(TinyPipelineConfig):
    """Sizes of the tiny FLUX pipeline.

    Defaults: 64x64 RGB images, the tiny SD3's VAE (4x down, 4 latent channels: 16x16 latents,
    packed by the pipeline into 8x8 = 64 tokens of 2x2x4 = 16 features), a FLUX transformer with
    one double-stream and two single-stream blocks of 4 heads x 32, a 2-layer CLIP of width 32
    (only its pooled output is used, as in FLUX) and a 1-layer T5 of width 64, tokenizers and text
    encoders at 16 positions, and FLUX.1-dev's guidance embedding and resolution-dependent shift.
    """

    num_layers: int = 1
    num_single_layers: int = 2
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    # Rotary dimensions per position-id axis (0 for text-to-image, latent row, latent column); they
    # split the head dimension as FLUX.1's (16, 56, 56) splits its 128.
    axes_dims_rope: tuple[int, int, int] = (8, 12, 12)
    # FLUX.1-dev is guidance-distilled: the guidance scale is an input embedding, not a second pass.
    guidance_embeds: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        super().__post_init__()

    def _problems(self) -> list[str]:
        problems = super()._problems()
        # The pipeline packs 2x2 latent patches, so the latent side must be even.
        if self.image_size % (2 * self.vae_scale_factor):
            problems.append(
                f"image_size={self.image_size} must be a multiple of 2 x VAE factor = {2 * self.vae_scale_factor}"
            )
        if len(self.axes_dims_rope) != 3 or sum(self.axes_dims_rope) != self.attention_head_dim:
            problems.append(
                f"axes_dims_rope={self.axes_dims_rope} must be 3 dimensions summing to attention_head_dim="
                f"{self.attention_head_dim}"
            )
        # Rotary embeddings rotate pairs of features.
        if any(d % 2 for d in self.axes_dims_rope):
            problems.append(f"axes_dims_rope={self.axes_dims_rope} must all be even")
        if self.vae_scaling_factor <= 0:
            problems.append("vae_scaling_factor must be > 0")
        return problems


def build_tiny_flux(vocabulary: list[str], cfg: TinyFluxConfig, seed: int) -> FluxPipeline:
    """Build a randomly initialised tiny ``FluxPipeline`` (float32, CPU).

    ``vocabulary`` lists the words prompts are made of; each becomes exactly one token in both
    tokenizers. The result depends only on (vocabulary, cfg, seed); the global RNG is left as found.

    Note: ``FluxPipeline`` hard-codes ``default_sample_size = 128`` latents, so without an explicit
    ``height`` / ``width`` it (and ``FluxAdapter``) samples 128 x 4 = 512 px images from this model.
    """
    words = list(dict.fromkeys(vocabulary))
    if not words:
        raise ValueError("build_tiny_flux: the vocabulary is empty")
    with tempfile.TemporaryDirectory(prefix="tpgrpo-tok-") as tmp:
        clip_tokenizer = build_clip_tokenizer(words, cfg.max_sequence_length, Path(tmp) / "clip")
        t5_tokenizer = build_t5_tokenizer(words, cfg.max_sequence_length, Path(tmp) / "t5")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_clip_config(cfg, clip_tokenizer))
        text_encoder_2 = T5EncoderModel(_t5_config(cfg, t5_tokenizer))
        vae = _vae(cfg)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            # The transformer sees the packed 2x2 patches of the latent channels.
            in_channels=4 * cfg.latent_channels,
            num_layers=cfg.num_layers,
            num_single_layers=cfg.num_single_layers,
            attention_head_dim=cfg.attention_head_dim,
            num_attention_heads=cfg.num_attention_heads,
            joint_attention_dim=cfg.t5_d_model,
            # FLUX pools with CLIPTextModel's pooler output, which is hidden_size wide.
            pooled_projection_dim=cfg.clip_hidden_size,
            guidance_embeds=cfg.guidance_embeds,
            axes_dims_rope=cfg.axes_dims_rope,
        )
    # FLUX.1-dev's scheduler: the shift follows the image token count (mu from calculate_shift).
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    )

    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
    )
    for module in (text_encoder, text_encoder_2, vae, transformer):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _vae(cfg: TinyPipelineConfig) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_block_out_channels),
        block_out_channels=cfg.vae_block_out_channels,
        layers_per_block=cfg.vae_layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.vae_norm_num_groups,
        sample_size=cfg.image_size,
        scaling_factor=cfg.vae_scaling_factor,
        shift_factor=cfg.vae_shift_factor,
        # SD3's and FLUX's VAEs have no 1x1 quant convs either.
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _clip_config(
    cfg: TinyPipelineConfig, tokenizer: CLIPTokenizer, **extra: int
) -> CLIPTextConfig:
    """``extra``: e.g. SD3's ``projection_dim`` (FLUX's plain CLIPTextModel has no projection)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.clip_hidden_size,
        intermediate_size=cfg.clip_intermediate_size,
        num_hidden_layers=cfg.clip_num_layers,
        num_attention_heads=cfg.clip_num_heads,
        max_position_embeddings=cfg.max_sequence_length,
        bos_token_id=tokenizer.bos_token_id,
        # Pooling takes the first eos position; eos_token_id == 2 would switch CLIP to its legacy
        # argmax(input_ids) pooling, which is wrong for a vocabulary with eos not at the end.
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _t5_config(cfg: TinyPipelineConfig, tokenizer: T5Tokenizer) -> T5Config:
    return T5Config(
        vocab_size=len(tokenizer),
        d_model=cfg.t5_d_model,
        d_kv=cfg.t5_d_model // cfg.t5_num_heads,
        d_ff=cfg.t5_d_ff,
        num_layers=cfg.t5_num_layers,
        num_heads=cfg.t5_num_heads,
        # Relative-position buckets sized for 16 positions instead of T5's 512.
        relative_attention_num_buckets=8,
        relative_attention_max_distance=cfg.max_sequence_length,
        dropout_rate=0.0,
        # T5 v1.1 (the SD3 and FLUX text encoder) uses the gated GELU feed-forward.
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_clip_tokenizer(words: list[str], max_length: int, directory: Path) -> CLIPTokenizer:
    """A stock CLIP BPE tokenizer whose merges assemble every vocabulary word into one token.

    A ``merges.txt`` holding only the version line does not give a word-level tokenizer: BPE starts
    from characters and only merges rebuild ``word</w>``, so without merges every multi-letter word
    falls apart into unknown characters. The merges written here chain each word's characters left
    to right; the character and prefix pieces they need join the vocabulary after the words, so
    the words keep the ids 2..n+1. A word outside the vocabulary becomes several tokens, as in
    real CLIP: character/prefix pieces, unk for characters no vocabulary word contains, and
    possibly a vocabulary word it ends with ("zebra" -> ..., "a</w>").
    """
    # The stock tokenizer's own normaliser and pre-tokeniser give the exact symbols BPE sees.
    backend = CLIPTokenizer().backend_tokenizer
    vocab: dict[str, int] = {_CLIP_BOS: 0, _CLIP_EOS: 1}
    pieces_of: dict[str, list[str]] = {}
    for word in words:
        pre_tokens = backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(word))
        if len(pre_tokens) != 1:
            raise ValueError(f"vocabulary word {word!r} is not a single CLIP word (splits into {pre_tokens})")
        symbol = pre_tokens[0][0]
        pieces_of[word] = list(symbol[:-1]) + [symbol[-1] + _CLIP_WORD_SUFFIX]
        vocab.setdefault(symbol + _CLIP_WORD_SUFFIX, len(vocab))

    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        for piece in pieces_of[word]:
            vocab.setdefault(piece, len(vocab))
        # Words are added one after another; new merges rank below all earlier ones, so they
        # only act once the earlier merges are exhausted and cannot change earlier words.
        pieces = _bpe(pieces_of[word], ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1]] + pieces[2:]

    directory.mkdir(parents=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    tokenizer = CLIPTokenizer.from_pretrained(directory, model_max_length=max_length)
    _check_one_token_per_word(tokenizer, words, "CLIP")
    return tokenizer


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges to one word: repeatedly merge the adjacent pair of lowest rank."""
    pieces = list(pieces)
    while len(pieces) > 1:
        rank, i = min((ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(pieces, pieces[1:])))
        if rank == math.inf:
            break
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def build_t5_tokenizer(words: list[str], max_length: int, directory: Path) -> T5Tokenizer:
    """A T5 tokenizer from a SentencePiece word model trained here on the vocabulary.

    SentencePiece's ``word`` model keeps whole words as pieces, so every vocabulary word is one
    token and any other word is unk, matching the CLIP side. T5's fixed special ids
    (pad 0, eos 1, unk 2, no bos) are what ``T5Tokenizer`` hard-codes.
    """
    directory.mkdir(parents=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(words),
        model_prefix=str(directory / "spiece"),
        model_type="word",
        vocab_size=len(words) + 3,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        # Lower-case like CLIP does, so both encoders see the same words.
        normalization_rule_name="nmt_nfkc_cf",
        num_threads=1,
        minloglevel=2,
    )
    # No sentinel <extra_id_*> tokens: they only serve T5's span-corruption pre-training.
    tokenizer = T5Tokenizer.from_pretrained(directory, extra_ids=0, model_max_length=max_length)
    _check_one_token_per_word(tokenizer, words, "T5")
    return tokenizer


def _check_one_token_per_word(tokenizer: CLIPTokenizer | T5Tokenizer, words: list[str], name: str) -> None:
    ids = {w: tokenizer(w, add_special_tokens=False).input_ids for w in words}
    bad = [w for w, i in ids.items() if len(i) != 1 or i[0] == tokenizer.unk_token_id]
    if bad:
        raise ValueError(f"{name} tokenizer: vocabulary words that are not a single known token: {bad[:10]}")
