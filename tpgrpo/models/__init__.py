"""Flow-matching text-to-image models behind one small adapter protocol.

    from tpgrpo.models import load_adapter
    adapter = load_adapter("models/base")          # a hub id, or a pipeline object
    embeds = adapter.encode_prompts(prompts, guidance_scale=2.0)
    schedule = adapter.timesteps(10)
    x = adapter.prepare_latents(len(prompts), generator)
    for i, t in enumerate(schedule.timesteps):
        x = x + (schedule.sigmas[i + 1] - schedule.sigmas[i]) * adapter.velocity(x, t, embeds, 2.0)
    images = adapter.decode(x)
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path


class _NoTorchvisionNotice(logging.Filter):
    """This project never installs torchvision (its PyPI build breaks beside the CPU torch), so
    transformers' notice that it falls back to PIL image processors is noise on every import."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionNotice())

import huggingface_hub
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline

from tpgrpo.models.base import (
    ModelAdapter,
    ModelLoadError,
    PromptEmbeds,
    Schedule,
    cfg_enabled,
    check_hub_cache,
    hub_id,
    load_pipeline,
    save_pipeline,
)
from tpgrpo.models.flux import FluxAdapter
from tpgrpo.models.managed import ManagedAdapter
from tpgrpo.models.sd3 import SD3Adapter
from tpgrpo.models.tiny import TinyFluxConfig, TinySD3Config, build_tiny_flux, build_tiny_sd3

# A new model family is one more entry here.
_ADAPTERS: dict[type[DiffusionPipeline], type] = {StableDiffusion3Pipeline: SD3Adapter, FluxPipeline: FluxAdapter}
# The `model.family` name of each supported pipeline class.
FAMILIES: dict[str, type[DiffusionPipeline]] = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}


def check_family(path: str | os.PathLike[str], family: str) -> None:
    """Raise ModelLoadError when the pipeline at ``path`` (a local directory or a hub id, by
    ``hub_id``'s rule) is another family's than ``family`` (a key of ``FAMILIES``). Reads only
    model_index.json — the class ``from_pretrained`` instantiates; for a hub id the one file,
    through the hub's cache — so a mismatch fails before gigabytes of weights load or download.
    A model_index.json that cannot be read (missing, not cached while offline, gated) or names an
    unsupported class passes: loading it reports that."""
    repo_id = hub_id(path)
    try:
        if repo_id is None:
            index = Path(path) / "model_index.json"
        else:
            index = Path(huggingface_hub.hf_hub_download(repo_id, "model_index.json"))
        class_name = json.loads(index.read_text())["_class_name"]
    except (OSError, ValueError, KeyError, TypeError):  # the hub's errors are OSErrors
        return
    actual = next((name for name, cls in FAMILIES.items() if cls.__name__ == class_name), None)
    if actual is not None and actual != family:
        raise ModelLoadError(f"model.family: expected {actual} for {class_name} at {path}, got {family}")


def load_adapter(
    source: str | os.PathLike[str] | DiffusionPipeline,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    max_sequence_length: int | None = None,
) -> ModelAdapter:
    """The adapter for a pipeline object, a pipeline directory or a hub id (loaded with ``load_pipeline``;
    ``dtype`` and ``device`` apply only then). ``max_sequence_length``: T5 tokens per prompt
    (None: the adapter's default). Raises ModelLoadError for unsupported pipelines."""
    pipe = source if isinstance(source, DiffusionPipeline) else load_pipeline(source, dtype, device)
    for pipeline_class, adapter_class in _ADAPTERS.items():
        if isinstance(pipe, pipeline_class):
            return adapter_class(pipe, max_sequence_length)
    supported = ", ".join(c.__name__ for c in _ADAPTERS)
    raise ModelLoadError(f"{type(pipe).__name__} is not supported (supported: {supported})")


__all__ = [
    "FAMILIES",
    "FluxAdapter",
    "ManagedAdapter",
    "ModelAdapter",
    "ModelLoadError",
    "PromptEmbeds",
    "SD3Adapter",
    "Schedule",
    "TinyFluxConfig",
    "TinySD3Config",
    "build_tiny_flux",
    "build_tiny_sd3",
    "cfg_enabled",
    "check_family",
    "check_hub_cache",
    "hub_id",
    "load_adapter",
    "load_pipeline",
    "save_pipeline",
]
