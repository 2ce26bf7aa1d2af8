"""Lockstep vs sequential TP-GRPO rollouts: wall time, transformer forwards, peak memory.

The paper's SD3 setting (10 steps, SDE window of 9 from the first step, CFG) on the embedded
tiny model (``models/base`` when it exists, else a freshly built one of the same architecture).
Each mode runs in its own subprocess so peak memory is per mode; on CUDA the peak is
``torch.cuda.max_memory_allocated``, on CPU the process's peak resident set size.

    python benchmarks/rollout.py [--batch 8] [--repeats 3] [--device cpu|cuda] [--model models/base]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

MODES = ("lockstep", "sequential")


def _measure(mode: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    import torch

    from tpgrpo.models import TinySD3Config, build_tiny_sd3, load_adapter
    from tpgrpo.rollout import RolloutConfig, rollout, rollout_sequential
    from tpgrpo.world import VOCABULARY, sample_prompts

    torch.set_num_threads(args.threads)
    if Path(args.model).is_dir():
        adapter = load_adapter(args.model, device=args.device)
    else:
        adapter = load_adapter(build_tiny_sd3(VOCABULARY, TinySD3Config(), seed=0).to(args.device))
    prompts = [spec.prompt for spec in sample_prompts(args.batch, seed=0, split="train")]
    cfg = RolloutConfig(
        num_steps=10, window_start=0, window_size=9, noise_level=0.7, sampler="cps",
        guidance_scale=args.guidance_scale, completions=True, micro_batch_size=args.micro_batch,
    )
    fn = rollout if mode == "lockstep" else rollout_sequential
    fn(adapter, prompts, cfg, generator=torch.Generator(args.device).manual_seed(0))  # warm-up
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for r in range(args.repeats):
        start = time.perf_counter()
        ro = fn(adapter, prompts, cfg, generator=torch.Generator(args.device).manual_seed(r))
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if args.device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({
        "mode": mode,
        "seconds": statistics.median(times),
        "passes": ro.stats.passes,
        "rows": ro.stats.rows,
        "peak_mb": peak_mb,
    })


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/base")
    parser.add_argument("--batch", type=int, default=8, help="trajectories per rollout")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--guidance-scale", type=float, default=4.5)
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    ctx = mp.get_context("spawn")
    results = {}
    for mode in MODES:
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(mode, args, queue))
        proc.start()
        results[mode] = queue.get()
        proc.join()

    lock, seq = results["lockstep"], results["sequential"]
    print(f"model={args.model} batch={args.batch} steps=10 window=9 cfg={args.guidance_scale} "
          f"device={args.device} repeats={args.repeats} (median)")
    print(f"{'mode':<11} {'seconds':>8} {'forwards':>9} {'rows':>7} {'peak MB':>8}")
    for r in (lock, seq):
        print(f"{r['mode']:<11} {r['seconds']:>8.2f} {r['passes']:>9d} {r['rows']:>7d} {r['peak_mb']:>8.0f}")
    print(f"sequential/lockstep: time x{seq['seconds'] / lock['seconds']:.2f}, "
          f"forwards x{seq['passes'] / lock['passes']:.2f}, rows x{seq['rows'] / lock['rows']:.2f}, "
          f"peak memory x{seq['peak_mb'] / lock['peak_mb']:.2f}")
    print(json.dumps(results), file=sys.stderr)


if __name__ == "__main__":
    main()
