"""Lockstep vs sequential TP-GRPO rollouts: wall time, transformer forwards, peak memory.

Two settings of the paper, on tiny models:

- ``sd3``: 10 steps, SDE window of 9 from the first step, CFG (two rows per latent), on the
  embedded model (``models/base`` when it exists, else a freshly built one of the same
  architecture);
- ``flux``: 6 steps, window of 5 from the first step, FLUX.1-dev's distilled guidance (one row
  per latent), on a randomly initialised tiny FLUX (``build_tiny_flux``, 64 px by default).

Wall time: one subprocess per setting warms both modes up, then alternates them for
``--repeats`` rounds, so a change in a shared machine's load hits both modes alike; each mode's
seconds are its best round (on a loaded machine a round can take many times its cost), and the
ratio is that of the best rounds. Peak memory: each (setting, mode)
runs once more in its own subprocess, so the peak is that mode's; on CUDA it is
``torch.cuda.max_memory_allocated``, on CPU the process's peak resident set size.

    python benchmarks/rollout.py [--settings sd3 flux] [--batch 8] [--repeats 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

MODES = ("lockstep", "sequential")
SETTINGS = ("sd3", "flux")
# (num_steps, window_size) of each setting; the window starts at the first step.
STEPS = {"sd3": (10, 9), "flux": (6, 5)}


def _setup(setting: str, args: argparse.Namespace):
    """(adapter, prompts, rollout config) of a setting, in this process."""
    import torch

    from tpgrpo.models import TinyFluxConfig, TinySD3Config, build_tiny_flux, build_tiny_sd3, load_adapter
    from tpgrpo.rollout import RolloutConfig
    from tpgrpo.world import VOCABULARY, sample_prompts

    torch.set_num_threads(args.threads)
    size = None
    if setting == "flux":
        # FluxPipeline's default size would be 512 px for this VAE: ask for the model's own.
        size = args.flux_size
        adapter = load_adapter(build_tiny_flux(VOCABULARY, TinyFluxConfig(image_size=size), seed=0).to(args.device))
    elif Path(args.model).is_dir():
        adapter = load_adapter(args.model, device=args.device)
    else:
        adapter = load_adapter(build_tiny_sd3(VOCABULARY, TinySD3Config(), seed=0).to(args.device))
    prompts = [spec.prompt for spec in sample_prompts(args.batch, seed=0, split="train")]
    num_steps, window = STEPS[setting]
    cfg = RolloutConfig(
        num_steps=num_steps, window_start=0, window_size=window, noise_level=0.7, sampler="cps",
        guidance_scale=args.flux_guidance if setting == "flux" else args.guidance_scale, completions=True,
        micro_batch_size=args.micro_batch, height=size, width=size,
    )
    return adapter, prompts, cfg


def _sample(mode: str, adapter, prompts, cfg, seed: int, device: str):
    import torch

    from tpgrpo.rollout import rollout, rollout_sequential

    fn = rollout if mode == "lockstep" else rollout_sequential
    ro = fn(adapter, prompts, cfg, generator=torch.Generator(device).manual_seed(seed))
    if device == "cuda":
        torch.cuda.synchronize()
    return ro


def _time(setting: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    adapter, prompts, cfg = _setup(setting, args)
    for mode in MODES:
        _sample(mode, adapter, prompts, cfg, 0, args.device)  # warm-up
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    for r in range(args.repeats):
        for mode in MODES:
            start = time.perf_counter()
            _sample(mode, adapter, prompts, cfg, r, args.device)
            seconds[mode].append(time.perf_counter() - start)
    queue.put({"seconds": {m: min(t) for m, t in seconds.items()}, "rounds": seconds})


def _memory(setting: str, mode: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    import torch

    adapter, prompts, cfg = _setup(setting, args)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ro = _sample(mode, adapter, prompts, cfg, 0, args.device)
    if args.device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"passes": ro.stats.passes, "rows": ro.stats.rows, "peak_mb": peak_mb})


def _in_subprocess(target, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--model", default="models/base", help="the sd3 setting's pipeline")
    parser.add_argument("--batch", type=int, default=8, help="trajectories per rollout")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--guidance-scale", type=float, default=4.5, help="CFG of the sd3 setting")
    parser.add_argument("--flux-guidance", type=float, default=3.5, help="distilled guidance of the flux setting")
    parser.add_argument("--flux-size", type=int, default=64, help="image side of the tiny FLUX, pixels")
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    results = {}
    for setting in args.settings:
        timing = _in_subprocess(_time, setting, args)
        results[setting] = {"rounds": timing["rounds"]}
        for mode in MODES:
            results[setting][mode] = {
                "mode": mode, "seconds": timing["seconds"][mode], **_in_subprocess(_memory, setting, mode, args)
            }

    for setting in args.settings:
        lock, seq = results[setting]["lockstep"], results[setting]["sequential"]
        num_steps, window = STEPS[setting]
        if setting == "flux":
            model, guidance = f"tiny FLUX {args.flux_size}px", f"guidance={args.flux_guidance} (distilled)"
        else:
            model, guidance = args.model, f"cfg={args.guidance_scale}"
        print(f"[{setting}] model={model} batch={args.batch} steps={num_steps} window={window} {guidance} "
              f"device={args.device} (best of {args.repeats} alternated rounds)")
        print(f"{'mode':<11} {'seconds':>8} {'forwards':>9} {'rows':>7} {'peak MB':>8}")
        for r in (lock, seq):
            print(f"{r['mode']:<11} {r['seconds']:>8.2f} {r['passes']:>9d} {r['rows']:>7d} {r['peak_mb']:>8.0f}")
        print(f"sequential/lockstep: time x{seq['seconds'] / lock['seconds']:.2f}, "
              f"forwards x{seq['passes'] / lock['passes']:.2f}, rows x{seq['rows'] / lock['rows']:.2f}, "
              f"peak memory x{seq['peak_mb'] / lock['peak_mb']:.2f}")
    print(json.dumps(results), file=sys.stderr)


if __name__ == "__main__":
    main()
