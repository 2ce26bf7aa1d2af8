"""The policy a run trains: the base pipeline behind its adapter, the trainable weights (LoRA or the
whole transformer), the frozen reference for the KL term, the optimizer and the EMA; and the
export of the trained weights in the format diffusers loads.
"""

from __future__ import annotations

import copy
import shutil
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from torch import Tensor

from tpgrpo.checkpoint import canonical_safetensors_header
from tpgrpo.config import ExperimentConfig
from tpgrpo.ema import WeightEMA
from tpgrpo.errors import ModelLoadError, UserError
from tpgrpo.models import ManagedAdapter, ModelAdapter, check_family, load_adapter

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Policy:
    """Attributes:
    adapter: the base pipeline's :class:`ManagedAdapter` (its transformer carries the LoRA).
    transformer: the pipeline's transformer; ``ddp_transformer`` the same wrapped by accelerate.
    trainable: name -> parameter of what the optimizer updates.
    reference: a frozen copy of the transformer under full fine-tuning with a KL term; None when
        the base model is the LoRA switched off (or there is no KL term).
    optimizer: AdamW over ``trainable``, wrapped by accelerate.
    ema: the EMA of ``trainable``, or None.
    """

    adapter: ManagedAdapter
    transformer: torch.nn.Module
    ddp_transformer: torch.nn.Module
    trainable: dict[str, torch.nn.Parameter]
    reference: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    ema: WeightEMA | None
    lora: bool

    @contextmanager
    def reference_model(self) -> Iterator[torch.nn.Module]:
        """The base model: LoRA switched off, or the frozen copy under full fine-tuning."""
        if self.reference is not None:
            yield self.reference
            return
        self.transformer.disable_adapters()
        try:
            yield self.transformer
        finally:
            self.transformer.enable_adapters()

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Swap the EMA weights in (evaluation, export), and restore the trained ones bit for bit."""
        with self.ema.swapped_in() if self.ema is not None else nullcontext():
            yield

    def trainable_state(self, ema: bool = False) -> dict[str, Tensor]:
        """CPU copies of the trainable weights (or of their EMA), by name."""
        source = self.ema.state() if (ema and self.ema is not None) else {n: p.detach() for n, p in self.trainable.items()}
        return {n: t.detach().to("cpu", copy=True).contiguous() for n, t in source.items()}

    @property
    def inner_optimizer(self) -> torch.optim.Optimizer:
        # accelerate wraps the optimizer; its state dict is the wrapped one's.
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def save_final_weights(self, path: Path) -> Path:
        """The EMA weights in the format diffusers loads: LoRA layers for ``pipe.load_lora_weights``,
        or a whole ``transformer/`` under full fine-tuning. Written to a temp dir, then renamed."""
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with self.ema_weights():
            if not self.lora:
                self.transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
            else:
                from peft.utils import get_peft_model_state_dict

                type(self.adapter.pipe).save_lora_weights(
                    tmp,
                    transformer_lora_layers=get_peft_model_state_dict(self.transformer),
                    # The LoRA config (alpha above all) travels in the file: without it diffusers
                    # assumes alpha = rank and applies the update at rank / alpha of its strength.
                    transformer_lora_adapter_metadata=lora_metadata(self.transformer.peft_config["default"].to_dict()),
                )
                canonical_safetensors_header(tmp / "pytorch_lora_weights.safetensors")
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
        return path


def build_policy(cfg: ExperimentConfig, acc: Accelerator, adapter: ManagedAdapter | None = None) -> Policy:
    """Load the base model (or take ``adapter``, e.g. a benchmark's in-memory pipeline behind
    :func:`managed_adapter`), add the LoRA (``train.lora_rank``; None: train the whole
    transformer), and set up the optimizer and the EMA. The LoRA's initialisation draws from
    ``seed``, the same on every process."""
    t = cfg.train
    torch.manual_seed(cfg.seed)
    if adapter is None:
        adapter = load_model(cfg, acc.device)
    for module in adapter.pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    transformer = adapter.pipe.transformer
    reference = None
    if t.lora_rank is None:
        transformer.requires_grad_(True)
        if t.kl_beta > 0:
            reference = copy.deepcopy(transformer).requires_grad_(False).eval()
    else:
        from peft import LoraConfig

        transformer.add_adapter(
            LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, init_lora_weights="gaussian", target_modules=list(t.lora_targets))
        )
    trainable = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    if not trainable:
        raise UserError(f"train.lora_targets: no module of the transformer matches {t.lora_targets}")
    if acc.mixed_precision != "no":
        from diffusers.training_utils import cast_training_params

        # Autocast computes in low precision; the weights it updates stay float32, or small
        # AdamW steps would round away in a bfloat16 model.
        cast_training_params(transformer, torch.float32)
    if t.gradient_checkpointing:
        # Only forwards with autograd on recompute; rollouts and evaluation run as before.
        transformer.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(
        list(trainable.values()), lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay
    )
    ddp_transformer, optimizer = acc.prepare(transformer, optimizer)
    ema = WeightEMA(trainable, decay=t.ema_decay, every=t.ema_every) if t.ema_decay is not None else None
    return Policy(adapter, transformer, ddp_transformer, trainable, reference, optimizer, ema, lora=t.lora_rank is not None)


def load_model(cfg: ExperimentConfig, device: str | torch.device) -> ManagedAdapter:
    """The base model of ``cfg.model`` (a local pipeline directory or a hub id, see
    :func:`tpgrpo.models.hub_id`) on ``device``, in ``model.dtype``, behind a
    :class:`ManagedAdapter`: prompts encoded one distinct prompt at a time, with the memory options
    (``model.offload_*``, ``sample.cache_text_embeddings``) applied.

    Raises:
        ModelLoadError: naming ``model.family`` (checked before any weights load) or
            ``model.path`` (missing, not a pipeline directory, unreadable; a hub id not cached
            while offline, gated or not found).
    """
    m = cfg.model
    check_family(m.path, m.family)
    offload = m.offload_text_encoders or m.offload_vae
    try:
        # Loaded into CPU memory when offloading, so the offloaded modules never occupy the
        # accelerator, not even while loading.
        adapter = load_adapter(
            m.path, dtype=_DTYPES[m.dtype], device="cpu" if offload else device, max_sequence_length=m.max_sequence_length
        )
    except ModelLoadError as exc:
        raise ModelLoadError(f"model.path: {exc}") from None
    return managed_adapter(cfg, adapter, device)


def lora_metadata(config: dict[str, Any]) -> dict[str, Any]:
    """A LoRA config as the exported file's metadata, with its sets (peft keeps
    ``target_modules`` as one) as sorted lists: a set's order changes with each process's string
    hashing, which would give identical weights a new file, and a new DVC hash, on every run."""
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}


def managed_adapter(cfg: ExperimentConfig, adapter: ModelAdapter, device: str | torch.device) -> ManagedAdapter:
    """``adapter`` behind a :class:`ManagedAdapter` on ``device`` with ``cfg``'s memory options
    (``model.offload_*``, ``sample.cache_text_embeddings``)."""
    m, s = cfg.model, cfg.sample
    return ManagedAdapter(
        adapter,
        device,
        cache_size=s.text_embedding_cache_size if s.cache_text_embeddings else None,
        offload_text_encoders=m.offload_text_encoders,
        offload_vae=m.offload_vae,
    )
