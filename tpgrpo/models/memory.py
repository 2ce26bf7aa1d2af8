"""A memory model of the full-size architectures, measured without allocating them.

What fills a training process's accelerator memory:

- the frozen weights (transformer, text encoders unless offloaded, VAE unless offloaded), counted
  from the architecture in ``model.dtype``;
- the LoRA training state: float32 parameters (mixed precision keeps the trained weights in
  float32), their gradients, AdamW's two moments and the EMA copy: 20 bytes a parameter;
- the update's activations: what autograd keeps from one micro-batch's forward for its backward.

The activations are measured, not estimated: :func:`activation_profile` runs the adapter's
``velocity`` forward of the real architecture on the ``meta`` device (shapes and dtypes, no
memory) and records every tensor autograd saves, deduplicated by storage, parameters excluded.
Attention runs as the fused kernel GPUs use (output and log-sum-exp saved, never the L x L score
matrix). The same routine on a real device gives the same bytes (tests compare a shrunk model on
the CPU with its meta twin), and ``benchmarks/scale.py`` compares the model with the device's own
peak on a GPU.

With gradient checkpointing a transformer block keeps only its inputs and recomputes the rest
during the backward pass, one block at a time, so its figure is: what is saved outside the blocks
+ every block's inputs + the largest block's saved tensors.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Hashable, Iterable, Iterator

import torch
import torch.nn.functional as F

from tpgrpo.models.architectures import Architecture, build_pipeline, build_transformer, lora_size
from tpgrpo.models import load_adapter
from tpgrpo.models.base import ModelAdapter

# Trained LoRA weights in float32: parameter, gradient, AdamW's exp_avg and exp_avg_sq, EMA copy.
LORA_STATE_BYTES_PER_PARAMETER = 5 * 4
GIB = 2**30


@dataclass(frozen=True)
class ActivationProfile:
    """Bytes autograd saves in one forward of ``rows`` rows (CFG doubles a latent's rows).

    saved: all saved activations (deduplicated by storage; weights excluded).
    block_saved: the part saved inside each transformer block, in block order.
    block_inputs: the bytes of each block's tensor inputs (what a checkpointed block keeps).
    """

    rows: int
    saved: int
    block_saved: tuple[int, ...]
    block_inputs: tuple[int, ...]

    @property
    def checkpointed(self) -> int:
        """Saved bytes with gradient checkpointing on every block (see the module docstring)."""
        outside = self.saved - sum(self.block_saved)
        return outside + sum(self.block_inputs) + max(self.block_saved, default=0)


@dataclass(frozen=True)
class WeightBytes:
    """Frozen weights (bytes) per component of a pipeline in one dtype."""

    transformer: int
    text_encoders: int
    vae: int


def weight_bytes(arch: Architecture, dtype: torch.dtype) -> WeightBytes:
    """Parameter and buffer bytes of each component of ``arch`` stored in ``dtype``."""
    pipe = build_pipeline(arch, "meta", dtype, vocabulary=["a"])
    size = torch.finfo(dtype).bits // 8

    def count(module: torch.nn.Module) -> int:
        return size * sum(t.numel() for t in (*module.parameters(), *module.buffers()) if t.is_floating_point())

    encoders = sum(count(m) for n, m in pipe.components.items() if n.startswith("text_encoder") and m is not None)
    return WeightBytes(count(pipe.transformer), encoders, count(pipe.vae))


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Route ``F.scaled_dot_product_attention`` through the fused (flash) kernel's operator for
    the block, so the saved tensors are those of the kernel GPUs run: without it a meta tensor
    takes the unfused path, which saves the full attention matrix."""
    original = F.scaled_dot_product_attention

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or dropout_p or enable_gqa:
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks gradient checkpointing wraps (SD3: joint blocks; FLUX: double- and
    single-stream blocks)."""
    blocks: list[torch.nn.Module] = []
    for name in ("transformer_blocks", "single_transformer_blocks"):
        blocks.extend(getattr(transformer, name, []))
    return blocks


class SavedActivations:
    """Record, for the duration of a ``with`` block, the bytes autograd saves for the backward
    pass: each storage once (views and repeated saves of one tensor share it), the tensors of
    ``exclude`` (weights) not counted. ``section`` attributes what is saved while it is current
    to a named part (e.g. a transformer block).

        with SavedActivations(model.parameters()) as rec:
            loss = model(x).sum()
        rec.total   # bytes kept until loss.backward()
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {t.untyped_storage()._cdata for t in exclude}
        self._saved: dict[int, int] = {}
        self._sections: list[Hashable] = []
        self.by_section: dict[Hashable, int] = {}

    def __enter__(self) -> SavedActivations:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self._saved.values())

    @contextlib.contextmanager
    def section(self, name: Hashable) -> Iterator[None]:
        self._sections.append(name)
        try:
            yield
        finally:
            self._sections.pop()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        # The storage's address in this process (meta tensors have no data pointer): stable
        # while the graph keeps it alive, which it does until the backward pass.
        key = storage._cdata
        if key not in self._excluded and key not in self._saved:
            self._saved[key] = storage.nbytes()
            if self._sections:
                name = self._sections[-1]
                self.by_section[name] = self.by_section.get(name, 0) + storage.nbytes()
        return t


def activation_profile(
    adapter: ModelAdapter, latents: int, resolution: int, guidance_scale: float
) -> ActivationProfile:
    """Measure the saved activations of one ``adapter.velocity`` forward of ``latents`` latents at
    ``resolution`` px (prompt embeddings of the adapter's ``max_sequence_length``), with
    gradients for the trainable parameters. Runs wherever the adapter's transformer lives; on
    the meta device it allocates nothing."""
    transformer = adapter.transformer
    device = next(transformer.parameters()).device
    # Through the adapter's own encoder (on meta: shapes only), so the transformer sees the
    # sequence length and widths training gives it; negatives only where the family uses CFG.
    embeds = adapter.encode_prompts(["a"], guidance_scale).select(torch.zeros(latents, dtype=torch.long))
    x = adapter.prepare_latents(latents, None, resolution, resolution)
    recorder = SavedActivations([*transformer.parameters(), *transformer.buffers()])
    inputs: dict[int, int] = {}
    blocks = _blocks(transformer)
    stack = contextlib.ExitStack()

    def enter(index: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            inputs[index] = sum(a.numel() * a.element_size() for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
            stack.enter_context(recorder.section(index))

        return hook

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(enter(i), with_kwargs=True))
        handles.append(block.register_forward_hook(lambda *_: stack.close()))
    try:
        with torch.enable_grad(), fused_attention(), recorder:
            adapter.velocity(x, torch.full([latents], 500.0, device=device), embeds, guidance_scale)
    finally:
        for handle in handles:
            handle.remove()
    return ActivationProfile(
        latents * (2 if embeds.has_negative else 1),
        recorder.total,
        tuple(recorder.by_section.get(i, 0) for i in range(len(blocks))),
        tuple(inputs.get(i, 0) for i in range(len(blocks))),
    )


@dataclass(frozen=True)
class MemoryModel:
    """Accelerator memory of one training process (bytes), per component.

    ``activations``: the update's saved activations of one micro-batch (``rows`` transformer rows;
    with checkpointing when the settings have it), measured on meta in the model dtype and scaled
    by ``autocast_factor``, the ratio of a mixed-precision (autocast) forward's saved bytes to the
    pure low-precision one, measured on the architecture shrunk by 8 on the CPU.
    ``per_row``: activations per row without checkpointing (the same correction applied).
    """

    weights: WeightBytes
    on_device_weights: int
    lora_parameters: int
    lora_state: int
    rows: int
    activations: int
    per_row: int
    autocast_factor: float

    @property
    def peak(self) -> int:
        """Weights on the device + LoRA state + one micro-batch's saved activations (the update's
        high-water mark; rollouts and VAE decoding hold less at these settings)."""
        return self.on_device_weights + self.lora_state + self.activations


def profile_with_lora(
    arch: Architecture,
    device: str | torch.device,
    dtype: torch.dtype,
    *,
    targets: list[str],
    rank: int,
    latents: int,
    resolution: int,
    guidance_scale: float,
    max_sequence_length: int,
    autocast: bool,
) -> ActivationProfile:
    """:func:`activation_profile` of ``arch`` (random weights on ``device``, frozen, ``dtype``) with a
    LoRA on ``targets``. ``autocast``: as training runs it, float32 LoRA weights under autocast
    to ``dtype`` (a real device only); else everything in ``dtype``."""
    pipe = build_pipeline(arch, device, dtype, vocabulary=["a"])
    transformer = pipe.transformer.requires_grad_(False)
    from peft import LoraConfig

    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.float32 if autocast else dtype)
    adapter = load_adapter(pipe, max_sequence_length=max_sequence_length)
    # Autocast to float32 is no autocast (and CPU autocast refuses that target dtype).
    mixed = autocast and dtype != torch.float32
    context = torch.autocast(torch.device(device).type, dtype=dtype) if mixed else contextlib.nullcontext()
    with context:
        return activation_profile(adapter, latents, resolution, guidance_scale)


def memory_model(
    arch: Architecture,
    *,
    dtype: torch.dtype,
    targets: list[str],
    rank: int,
    micro_batch: int,
    resolution: int,
    guidance_scale: float,
    max_sequence_length: int,
    checkpointing: bool,
    offload_text_encoders: bool,
    offload_vae: bool,
) -> MemoryModel:
    """The :class:`MemoryModel` of training ``arch`` with these settings (a preset's ``model`` and
    ``train`` values), measured without allocating the model."""
    settings = dict(targets=targets, rank=rank, guidance_scale=guidance_scale, max_sequence_length=max_sequence_length)
    full = profile_with_lora(arch, "meta", dtype, latents=micro_batch, resolution=resolution, autocast=False, **settings)
    small = arch.shrink(8)
    plain = profile_with_lora(small, "meta", dtype, latents=2, resolution=256, autocast=False, **settings)
    mixed = profile_with_lora(small, "cpu", dtype, latents=2, resolution=256, autocast=True, **settings)
    factor = mixed.saved / plain.saved
    weights = weight_bytes(arch, dtype)
    on_device = weights.transformer + (0 if offload_text_encoders else weights.text_encoders) + (0 if offload_vae else weights.vae)
    lora = lora_size(build_transformer(arch), targets, rank).parameters
    activations = full.checkpointed if checkpointing else full.saved
    return MemoryModel(
        weights=weights,
        on_device_weights=on_device,
        lora_parameters=lora,
        lora_state=LORA_STATE_BYTES_PER_PARAMETER * lora,
        rows=full.rows,
        activations=round(activations * factor),
        per_row=round(full.saved * factor / full.rows),
        autocast_factor=factor,
    )
