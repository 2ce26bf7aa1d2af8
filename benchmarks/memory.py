"""The memory model of every preset: accelerator memory per training process, measured on the real
architectures without allocating them (see tpgrpo/models/memory.py for what is measured how).

For each preset: the frozen weights on the device (transformer, text encoders unless offloaded,
VAE), the LoRA (modules, parameters) and its training state, the update's saved activations of
one micro-batch (per row, with and without gradient checkpointing) and the resulting peak.

    python benchmarks/memory.py [--presets configs/presets/*.yaml] [--resolution 512] [--markdown]

Takes about half a minute a preset on a CPU (the autocast correction runs the architecture
shrunk by 8 for real).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tpgrpo.config import load_config  # noqa: E402
from tpgrpo.models.architectures import ARCHITECTURES  # noqa: E402
from tpgrpo.models.memory import GIB, memory_model  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def preset_row(path: Path, resolution: int | None) -> dict[str, str]:
    cfg = load_config(ROOT / "params.yaml", preset=path)
    arch = ARCHITECTURES.get(cfg.model.path)
    if arch is None:
        raise SystemExit(f"{path}: model.path {cfg.model.path!r} is not one of the architectures {sorted(ARCHITECTURES)}")
    m, t = cfg.model, cfg.train
    res = resolution or m.resolution
    settings = dict(
        dtype=DTYPES[m.dtype],
        targets=list(t.lora_targets),
        rank=t.lora_rank,
        micro_batch=t.micro_batch_size,
        resolution=res,
        guidance_scale=cfg.sample.guidance_scale,
        max_sequence_length=m.max_sequence_length,
        offload_text_encoders=m.offload_text_encoders,
        offload_vae=m.offload_vae,
    )
    model = memory_model(arch, checkpointing=t.gradient_checkpointing, **settings)
    other = memory_model(arch, checkpointing=not t.gradient_checkpointing, **settings)
    with_ckpt, without = (model, other) if t.gradient_checkpointing else (other, model)
    w = model.weights
    gb = lambda b: f"{b / GIB:.1f}"  # noqa: E731
    return {
        "preset": path.stem,
        "weights on device (transformer + text encoders + VAE)": (
            f"{gb(w.transformer)} + {gb(w.text_encoders) if not m.offload_text_encoders else '0 (offloaded)'} + "
            f"{gb(w.vae) if not m.offload_vae else '0 (offloaded)'}"
        ),
        "LoRA (parameters, state)": f"r{t.lora_rank}: {model.lora_parameters / 1e6:.1f} M, {gb(model.lora_state)}",
        "update micro-batch (rows)": f"{t.micro_batch_size} ({model.rows})",
        "activations per row": gb(model.per_row),
        "activations, no checkpointing": gb(without.activations),
        "activations, checkpointing": gb(with_ckpt.activations),
        "peak (preset's settings)": f"{gb(model.peak)}{' (checkpointing)' if t.gradient_checkpointing else ''}",
        "autocast factor": f"{model.autocast_factor:.3f}",
        "resolution": str(res),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", type=Path, default=sorted((ROOT / "configs/presets").glob("*.yaml")))
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: the preset's model.resolution)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table (the README's)")
    args = parser.parse_args(argv)
    rows = []
    for path in args.presets:
        rows.append(preset_row(path, args.resolution))
        if not args.markdown:
            print("\n".join(f"{k:>55}: {v}" for k, v in rows[-1].items()) + "\n", flush=True)
    if args.markdown:
        keys = list(rows[0])
        print("| " + " | ".join(keys) + " |")
        print("|" + "---|" * len(keys))
        for row in rows:
            print("| " + " | ".join(row[k] for k in keys) + " |")
    print("GB = 2^30 bytes. Weights: counted from the architecture in model.dtype. LoRA state: float32 parameters, "
          "gradients, AdamW moments, EMA (20 bytes a parameter). Activations: autograd's saved tensors of one update "
          "forward, measured on the meta device, times the autocast factor measured on the architecture shrunk by 8.")


if __name__ == "__main__":
    main()
