"""One TP-GRPO and one Flow-GRPO epoch of a preset's full-size architecture (random weights) on one
device: seconds and peak memory per phase, lockstep vs sequential rollouts, the memory model.

The architecture is the preset's ``model.path`` hub id in
:data:`tpgrpo.models.architectures.ARCHITECTURES` (by ``model.family`` when the path is a local
directory), built by ``build_pipeline`` directly on the device with random weights and
word-level tokenizers: module tree, shapes and the cost of every forward are the real model's.
Resolution, steps, window, micro-batches, LoRA, dtype, mixed precision, gradient checkpointing
and offloading are the preset's (on a CPU float16, slow there, runs in float32, and so does
bfloat16 where its matmuls are slower than float32's). Its ``sample.batch_size`` is global over the published 32 GPUs, so
one device runs one process's share (SD3.5: 288 / 32 = 9 trajectories a rollout batch, FLUX:
96 / 32 = 3), with the largest group that divides it. An epoch is one optimizer step's rollout
batches (``train.gradient_accumulation``), evaluation left out. The presets' rewards need
downloaded weights or a server; a registry reward that needs neither scores instead
(``--reward``, default ``jpeg_compressibility``).

Each variant is a real :class:`tpgrpo.trainer.Trainer` driven step by step as ``Trainer.fit``
drives it: rollout -> score -> credit -> update. Both sample the same prompts with the same x_T
and SDE noise (same seed and epoch), and Flow-GRPO's rollout is TP-GRPO's without the ODE
completions, so the completions' seconds are TP-GRPO's rollout minus Flow-GRPO's. Rewards run in
the trainer's background thread while the next batch is sampled: "scoring" is the reward's own
work (hidden behind the rollout where it overlaps), "score wait" what ``score`` still waited.
Lockstep vs sequential: both rollouts of one TP-GRPO batch, warmed up, then alternated for
``--repeats`` rounds (a change in the machine's load hits both alike); each shows its best
round. Peak memory: on CUDA ``torch.cuda.max_memory_allocated``, reset before each phase; on a
CPU the process's peak resident set size so far (getrusage), which cannot be reset, so a phase
shows the peak of everything before it too. Beside it, the memory model's prediction for the same
settings (:func:`tpgrpo.models.memory.memory_model`), which a GPU run checks.

``--scale F`` divides widths and depths by F (``Architecture.shrink``) and, unless told
otherwise, the resolution (at least 32 px) and the T5 tokens (at least 16) too, with at most 4
trajectories a batch and 2 batches, so the whole script runs on a 2-core CPU in under a minute
(SD3.5 shrunk by 12: ~30 s, FLUX by 16: ~15 s); steps and window stay the preset's. On a CPU
that other work shares, ``--threads 1``: with a thread per core, a thread that loses its core
stalls every parallel region of the other.

    python benchmarks/scale.py --preset configs/presets/sd35m_pickscore.yaml         # full size (GPU)
    python benchmarks/scale.py --preset configs/presets/flux1dev_pickscore.yaml
    python benchmarks/scale.py --preset configs/presets/sd35m_pickscore.yaml --scale 12 --threads 1  # CPU
        [--device auto|cpu|cuda] [--batch N] [--resolution PX] [--batches N] [--reward NAME]
        [--repeats N] [--threads N] [--json OUT]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from accelerate import Accelerator

from tpgrpo.config import ExperimentConfig, ModelSection, load_config
from tpgrpo.errors import ConfigError
from tpgrpo.models import load_adapter
from tpgrpo.models.architectures import (
    ARCHITECTURES,
    FLUX1_DEV,
    SD35_MEDIUM,
    Architecture,
    build_pipeline,
    transformer_size,
)
from tpgrpo.models.memory import GIB, MemoryModel, memory_model
from tpgrpo.policy import managed_adapter
from tpgrpo.rewards import available_rewards
from tpgrpo.rollout import ForwardStats, RolloutConfig, rollout, rollout_config, rollout_sequential
from tpgrpo.tracking import NullTracker
from tpgrpo.trainer import Trainer
from tpgrpo.world import VOCABULARY, write_prompt_sets

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
# The presets' sample.batch_size is summed over the published run's 32 GPUs.
PUBLISHED_GPUS = 32
VARIANTS = ("tp_grpo", "flow_grpo")
BY_FAMILY = {"sd3": SD35_MEDIUM, "flux": FLUX1_DEV}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# --scale defaults: at most this many rollout batches of at most this many trajectories, and T5
# tokens divided by the scale down to this many.
SCALE_BATCHES = 2
SCALE_BATCH = 4
SCALE_MIN_TOKENS = 16
MB = 2**20

T = TypeVar("T")


# ---------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """What runs: the (shrunk) architecture on a device, and the overrides both variants take on
    top of the preset; ``notes`` say what differs from the preset, and why."""

    arch: Architecture
    device: torch.device
    overrides: dict[str, Any]
    notes: list[str]


def architecture_of(model: ModelSection) -> tuple[Architecture, str | None]:
    """The preset's architecture and, when it is chosen by family, the note that says so."""
    if model.path in ARCHITECTURES:
        return ARCHITECTURES[model.path], None
    arch = BY_FAMILY[model.family]
    return arch, f"model.path {model.path!r} is no hub id of ARCHITECTURES: the architecture follows model.family={model.family}"


def choose_device(name: str, parser: argparse.ArgumentParser) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def cpu_matmul_is_fast(dtype: torch.dtype) -> bool:
    """Whether a matmul in ``dtype`` is at least as fast as in float32 on this CPU (bfloat16 is,
    with AVX512-BF16 or AMX; emulated it is several times slower)."""

    def best(dt: torch.dtype) -> float:
        a, b = torch.randn(128, 256, dtype=dt), torch.randn(256, 256, dtype=dt)
        times = []
        for _ in range(6):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times[1:])

    return best(dtype) <= best(torch.float32)


def choose_dtype(cfg: ExperimentConfig, device: torch.device) -> tuple[str, str | None, str | None]:
    """(model.dtype, train.mixed_precision, note): the preset's, except on a CPU where its low
    precision would be slow (float16 always is; bfloat16 without native support)."""
    dtype = cfg.model.dtype
    if device.type == "cuda" or dtype == "float32":
        return dtype, cfg.train.mixed_precision, None
    if dtype == "bfloat16" and cpu_matmul_is_fast(torch.bfloat16):
        return dtype, cfg.train.mixed_precision, None
    why = "float16 matmuls are slow on CPUs" if dtype == "float16" else "bfloat16 matmuls are slower than float32 on this CPU"
    return "float32", "no", f"dtype float32, mixed precision off (the preset's {dtype}: {why})"


def largest_divisor(n: int, at_most: int, at_least: int = 1) -> int | None:
    return next((d for d in range(min(n, at_most), at_least - 1, -1) if n % d == 0), None)


def plan_run(args: argparse.Namespace, preset: ExperimentConfig, parser: argparse.ArgumentParser) -> Plan:
    s, t, m = preset.sample, preset.train, preset.model
    notes: list[str] = []
    arch, note = architecture_of(m)
    notes += [note] if note else []
    arch = arch.shrink(args.scale)
    device = choose_device(args.device, parser)
    dtype, mixed, note = choose_dtype(preset, device)
    notes += [note] if note else []

    share = max(1, s.batch_size // PUBLISHED_GPUS)
    batch = args.batch or (share if args.scale == 1 else min(share, SCALE_BATCH))
    if args.batch is None:
        shrunk = "" if batch == share else f", cut from {share} by --scale"
        notes.append(f"batch {batch}: one process's share of the preset's {s.batch_size} over the published {PUBLISHED_GPUS} GPUs{shrunk}")
    group = largest_divisor(batch, s.group_size, at_least=2)
    if group is None:
        parser.error(f"--batch {batch}: no group size from 2 to the preset's {s.group_size} divides it")
    if group != s.group_size:
        notes.append(f"group {group}: the largest divisor of the batch up to the preset's {s.group_size}")
    batches = args.batches or (t.gradient_accumulation if args.scale == 1 else min(t.gradient_accumulation, SCALE_BATCHES))
    accumulation = largest_divisor(batches, t.gradient_accumulation)
    if accumulation != t.gradient_accumulation:
        notes.append(f"gradient accumulation {accumulation} (preset {t.gradient_accumulation}): it must divide the epoch's {batches} batches")
    resolution = args.resolution or (m.resolution if args.scale == 1 else max(32, m.resolution // args.scale // 16 * 16))
    tokens = preset_tokens = m.max_sequence_length or arch.max_sequence_length
    if args.scale > 1:
        # The text sequence does not shrink with the widths, and at a shrunk resolution it is
        # most of every forward's tokens.
        tokens = max(SCALE_MIN_TOKENS, preset_tokens // args.scale)
        notes.append(f"T5 tokens {tokens} (preset {preset_tokens}): divided by the scale, at least {SCALE_MIN_TOKENS}")

    def clip(micro: int | None, name: str) -> int | None:
        if micro is None or micro <= batch:
            return micro
        notes.append(f"{name} {batch} (preset {micro}): clipped to the batch")
        return batch

    overrides = {
        "model.dtype": dtype,
        "train.mixed_precision": mixed,
        "model.resolution": resolution,
        "model.max_sequence_length": tokens,
        "sample.batch_size": batch,
        "sample.group_size": group,
        "sample.batches_per_epoch": batches,
        "sample.micro_batch_size": clip(s.micro_batch_size, "sample.micro_batch_size"),
        "train.micro_batch_size": clip(t.micro_batch_size, "train.micro_batch_size"),
        "train.gradient_accumulation": accumulation,
        "reward.name": args.reward,
        "reward.options": {},
        "reward.weights": {},
        "eval.reward": None,  # no evaluation; a preset's eval reward may need a server
    }
    return Plan(arch, device, overrides, notes)


# ---------------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Cost:
    """Wall seconds of a phase and the peak memory during it (MB; see ``memory_measure``)."""

    seconds: float
    peak_mb: float


def memory_measure(device: torch.device) -> str:
    if device.type == "cuda":
        return "CUDA max_memory_allocated, reset before each phase"
    return "CPU: the process's peak RSS so far (getrusage; not resettable, so each phase includes every earlier one)"


def measure(device: torch.device, fn: Callable[[], T]) -> tuple[T, Cost]:
    """Run ``fn``; its seconds (the device synchronised before the clock is read) and peak memory."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / MB
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return result, Cost(time.perf_counter() - start, peak)


# ---------------------------------------------------------------------------------- the epoch


@dataclass(frozen=True)
class Parameters:
    """Parameter counts of the built pipeline; ``lora``: what the optimizer trains."""

    transformer: int
    text_encoders: int
    vae: int
    lora: int


@dataclass(frozen=True)
class EpochCost:
    """One variant's epoch. ``rollout``: the trainer's rollout phase (TP-GRPO: completions
    included); ``scoring_s``: the reward's own work in the background thread; ``forwards`` /
    ``rows``: transformer calls and rows (CFG rows counted) of the epoch's rollouts; ``kept``:
    trajectories the update trained on; ``nonfinite``: trajectories with a non-finite reward."""

    variant: str
    trajectories: int
    rollout: Cost
    scoring_s: float
    score_wait: Cost
    credit: Cost
    update: Cost
    forwards: int
    rows: int
    completion_rows: int
    kept: int
    nonfinite: int

    @property
    def seconds(self) -> float:
        return self.rollout.seconds + self.score_wait.seconds + self.credit.seconds + self.update.seconds

    @property
    def samples_per_s(self) -> float:
        return self.trajectories / self.seconds


@dataclass
class Built:
    """A trainer, its pipeline's parameter counts, the seconds it took to build, and the seconds of
    reward work it has done so far."""

    trainer: Trainer
    parameters: Parameters
    build_s: float
    scoring_s: float = 0.0


def build_trainer(cfg: ExperimentConfig, variant: str, plan: Plan) -> Built:
    """A trainer of ``variant`` on a freshly built random pipeline, its reward work timed."""
    start = time.perf_counter()
    pipe = build_pipeline(plan.arch, plan.device, DTYPES[cfg.model.dtype], vocabulary=VOCABULARY, seed=cfg.seed)
    inner = load_adapter(pipe, max_sequence_length=cfg.model.max_sequence_length)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=plan.device.type == "cpu")
    trainer = Trainer(cfg, variant=variant, tracker=NullTracker(), accelerator=accelerator, resume=False,
                      adapter=managed_adapter(cfg, inner, plan.device))
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    encoders = sum(count(m) for n, m in pipe.components.items() if n.startswith("text_encoder") and m is not None)
    lora = sum(p.numel() for p in trainer.policy.trainable.values())
    parameters = Parameters(transformer_size(pipe.transformer).parameters - lora, encoders, count(pipe.vae), lora)
    built = Built(trainer, parameters, time.perf_counter() - start)
    score_batch = trainer.score_batch

    def timed(*args: Any) -> Any:
        start = time.perf_counter()
        try:
            return score_batch(*args)
        finally:
            built.scoring_s += time.perf_counter() - start

    # An instance attribute: Trainer.rollout submits self.score_batch to its thread.
    trainer.score_batch = timed  # type: ignore[method-assign]
    return built


def run_epoch(built: Built, device: torch.device) -> EpochCost:
    """One epoch as ``Trainer.fit`` runs it, evaluation and checkpoint left out."""
    t = built.trainer
    samples, rollout_cost = measure(device, lambda: t.rollout(0))
    scores, wait = measure(device, lambda: t.score(samples))
    credit, credit_cost = measure(device, lambda: t.credit(samples, scores))
    _, update = measure(device, lambda: t.update(samples, credit))
    stats = [b.rollout.stats for b in samples.batches]
    return EpochCost(
        variant=t.variant,
        trajectories=sum(len(b.prompts) for b in samples.batches),
        rollout=rollout_cost,
        scoring_s=built.scoring_s,
        score_wait=wait,
        credit=credit_cost,
        update=update,
        forwards=sum(st.passes for st in stats),
        rows=sum(st.rows for st in stats),
        completion_rows=sum(st.completion_rows for st in stats),
        kept=int(sum(int(k.sum()) for k in credit.keep)),
        nonfinite=int(scores.metrics["skipped/nonfinite"]),
    )


def release(built: Built) -> None:
    """Free a trainer's model and state, so the next variant's peaks are its own."""
    built.trainer.executor.shutdown()
    built.trainer.acc.free_memory()
    del built.trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- lockstep vs sequential


@dataclass(frozen=True)
class ModeCost:
    """One rollout mode: its best round (seconds), every round, forwards, rows, peak memory (MB)."""

    mode: str
    seconds: float
    rounds: list[float]
    forwards: int
    rows: int
    peak_mb: float


@dataclass(frozen=True)
class LockstepCost:
    """Both rollout modes on one batch of ``trajectories``, best of ``repeats`` alternated rounds."""

    trajectories: int
    repeats: int
    lockstep: ModeCost
    sequential: ModeCost

    @property
    def ratio(self) -> float:
        """Sequential seconds over lockstep seconds (> 1: lockstep is faster)."""
        return self.sequential.seconds / self.lockstep.seconds


def compare_rollouts(trainer: Trainer, rcfg: RolloutConfig, repeats: int, device: torch.device) -> LockstepCost:
    """Lockstep and sequential rollouts of one batch (the first prompts of the train set, in
    groups); warmed up once each (that run gives the peak), then alternated ``repeats`` rounds."""
    s = trainer.cfg.sample
    prompts = [p for p in trainer.train_set.prompts[: s.batch_size // s.group_size] for _ in range(s.group_size)]
    adapter = trainer.policy.adapter
    modes = {"lockstep": rollout, "sequential": rollout_sequential}

    def sample(fn: Callable[..., Any], seed: int) -> Any:
        return fn(adapter, prompts, rcfg, generator=torch.Generator(device).manual_seed(seed))

    def stats(fn: Callable[..., Any], seed: int) -> tuple[ForwardStats, Cost]:
        # Only the figures: a mode's peak must not include the other mode's samples.
        ro, cost = measure(device, lambda: sample(fn, seed))
        return ro.stats, cost

    warm = {name: stats(fn, 0) for name, fn in modes.items()}
    rounds: dict[str, list[float]] = {name: [] for name in modes}
    for r in range(repeats):
        for name, fn in modes.items():
            rounds[name].append(stats(fn, 1 + r)[1].seconds)
    costs = {
        name: ModeCost(name, min(rounds[name]), rounds[name], st.passes, st.rows, cost.peak_mb)
        for name, (st, cost) in warm.items()
    }
    return LockstepCost(len(prompts), repeats, costs["lockstep"], costs["sequential"])


# ---------------------------------------------------------------------------------- the memory model


@dataclass(frozen=True)
class Prediction:
    """The memory model's figures for the run's settings, or why there are none."""

    model: MemoryModel | None
    why_not: str | None = None


def predict_memory(arch: Architecture, cfg: ExperimentConfig) -> Prediction:
    m, s, t = cfg.model, cfg.sample, cfg.train
    if t.lora_rank is None:
        return Prediction(None, "full fine-tuning; it models a LoRA")
    return Prediction(memory_model(
        arch,
        dtype=DTYPES[m.dtype],
        targets=list(t.lora_targets),
        rank=t.lora_rank,
        micro_batch=t.micro_batch_size or s.batch_size,
        resolution=m.resolution,
        guidance_scale=s.guidance_scale,
        max_sequence_length=m.max_sequence_length or arch.max_sequence_length,
        checkpointing=t.gradient_checkpointing,
        offload_text_encoders=m.offload_text_encoders,
        offload_vae=m.offload_vae,
    ))


# ---------------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class Result:
    """Everything the benchmark measured, with the settings it ran."""

    preset: str
    settings: dict[str, Any]
    parameters: Parameters
    notes: list[str]
    memory_measure: str
    build_s: float
    epochs: dict[str, EpochCost]
    lockstep: LockstepCost
    memory: Prediction

    @property
    def completions_s(self) -> float:
        """TP-GRPO's rollout minus Flow-GRPO's: same trajectories, plus the completions."""
        return self.epochs["tp_grpo"].rollout.seconds - self.epochs["flow_grpo"].rollout.seconds

    def figures(self) -> dict[str, Any]:
        """Everything printed, as JSON-ready values (seconds, MB, GiB; null where a figure does not apply)."""
        variants = {}
        for name, e in self.epochs.items():
            completions = self.completions_s if name == "tp_grpo" else None
            phases = {"rollout": e.rollout, "score_wait": e.score_wait, "credit": e.credit, "update": e.update}
            peaks = {phase: cost.peak_mb for phase, cost in phases.items()}
            variants[name] = {
                "trajectories": e.trajectories,
                "seconds": {
                    "rollout": e.rollout.seconds - (completions or 0.0),
                    "completions": completions,
                    "scoring": e.scoring_s,
                    "score_wait": e.score_wait.seconds,
                    "credit": e.credit.seconds,
                    "update": e.update.seconds,
                    "epoch": e.seconds,
                },
                "peak_mb": {**peaks, "epoch": max(peaks.values())},
                "samples_per_s": e.samples_per_s,
                "forwards": e.forwards,
                "rows": e.rows,
                "completion_rows": e.completion_rows,
                "kept": e.kept,
                "nonfinite": e.nonfinite,
            }
        memory = None
        if self.memory.model is not None:
            mm = self.memory.model
            measured = self.epochs["tp_grpo"].update.peak_mb * MB / GIB
            on_device = self.settings["device"].startswith("cuda")
            memory = {
                "predicted_gib": mm.peak / GIB,
                "weights_gib": mm.on_device_weights / GIB,
                "lora_state_gib": mm.lora_state / GIB,
                "activations_gib": mm.activations / GIB,
                "rows": mm.rows,
                "measured_update_peak_gib": measured,
                # A CPU's resident set is the whole process, not what the model counts.
                "measured_over_predicted": measured / (mm.peak / GIB) if on_device else None,
            }
        return {
            "preset": self.preset,
            "settings": self.settings,
            "parameters": asdict(self.parameters),
            "notes": self.notes,
            "memory_measure": self.memory_measure,
            "build_s": self.build_s,
            "variants": variants,
            "lockstep": {**asdict(self.lockstep), "sequential_over_lockstep": self.lockstep.ratio},
            "memory_model": memory,
            "memory_model_missing": self.memory.why_not,
        }


def settings_of(cfg: ExperimentConfig, plan: Plan, scale: int, reward: str) -> dict[str, Any]:
    m, s, t = cfg.model, cfg.sample, cfg.train
    return {
        "architecture": plan.arch.name,
        "scale": scale,
        "device": str(plan.device),
        "dtype": m.dtype,
        "mixed_precision": t.mixed_precision,
        "resolution": m.resolution,
        "batch": s.batch_size,
        "group": s.group_size,
        "batches": s.batches_per_epoch,
        "steps": s.num_steps,
        "window": s.window_size,
        "sample_micro_batch": s.micro_batch_size,
        "train_micro_batch": t.micro_batch_size,
        "gradient_accumulation": t.gradient_accumulation,
        "gradient_checkpointing": t.gradient_checkpointing,
        "offload_text_encoders": m.offload_text_encoders,
        "offload_vae": m.offload_vae,
        "t5_tokens": m.max_sequence_length or plan.arch.max_sequence_length,
        "lora_rank": t.lora_rank,
        "reward": reward,
        "threads": torch.get_num_threads() if plan.device.type == "cpu" else None,
    }


def _millions(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def print_report(result: Result) -> None:
    f = result.figures()
    st, p, v = f["settings"], result.parameters, f["variants"]
    size = "full size" if st["scale"] == 1 else f"shrunk by {st['scale']}"
    on_off = lambda flag: "on" if flag else "off"  # noqa: E731
    print(f"scale benchmark: {result.preset} -> {st['architecture']}, {size}, random weights (built in {result.build_s:.1f} s)")
    print(f"settings: device {st['device']}, {st['dtype']} (mixed precision {st['mixed_precision']}), {st['resolution']} px, "
          f"batch {st['batch']} (group {st['group']}), {st['batches']} batches, steps {st['steps']}, window {st['window']}, "
          f"micro-batches sample {st['sample_micro_batch']} / train {st['train_micro_batch']}, "
          f"accumulation {st['gradient_accumulation']}, checkpointing {on_off(st['gradient_checkpointing'])}, "
          f"offload text encoders {on_off(st['offload_text_encoders'])} / VAE {on_off(st['offload_vae'])}, "
          f"T5 tokens {st['t5_tokens']}" + (f", CPU threads {st['threads']}" if st["threads"] else ""))
    print(f"parameters: transformer {_millions(p.transformer)}, text encoders {_millions(p.text_encoders)}, "
          f"VAE {_millions(p.vae)}, LoRA {_millions(p.lora)} (rank {st['lora_rank']})")
    for note in result.notes:
        print(f"note: {note}")
    print(f"memory: {result.memory_measure}")
    print()
    rows = [
        ("rollout (SDE trajectories)", "rollout", "rollout"),
        ("completions (ODE)", "completions", None),
        (f"scoring ({st['reward']})", "scoring", None),
        ("score wait", "score_wait", "score_wait"),
        ("credit", "credit", "credit"),
        ("update", "update", "update"),
        ("epoch", "epoch", "epoch"),
    ]
    print(f"{'phase':<34}" + "".join(f"{n + ' s':>13}" for n in v) + "".join(f"{n + ' MB':>14}" for n in v))
    for label, key, peak in rows:
        secs = [v[n]["seconds"][key] for n in v]
        peaks = [v[n]["peak_mb"][peak] if peak else None for n in v]
        print(f"{label:<34}" + "".join(f"{'-' if x is None else f'{x:.2f}':>13}" for x in secs)
              + "".join(f"{'' if x is None else f'{x:.0f}':>14}" for x in peaks))
    print(f"{'samples/s':<34}" + "".join(f"{v[n]['samples_per_s']:>13.3f}" for n in v))
    for label, a, b in (("forwards / rows", "forwards", "rows"), ("trained on / trajectories", "kept", "trajectories")):
        print(f"{label:<34}" + "".join(f"{f'{v[n][a]} / {v[n][b]}':>13}" for n in v))
    print("completions: tp_grpo's rollout minus flow_grpo's (the same trajectories without them); scoring: the "
          "reward's work in the background thread, overlapping the rollout; epoch: rollout + score wait + credit + update")
    for n in v:
        if v[n]["kept"] == 0:
            # Random weights can give non-finite or constant rewards; the update then skips every row.
            print(f"warning: {n}'s update trained on no trajectory ({v[n]['nonfinite']} non-finite rewards): "
                  "its seconds and memory are not an update's")
    print()
    lk = result.lockstep
    print(f"lockstep vs sequential (tp_grpo rollout of {lk.trajectories} trajectories, best of {lk.repeats} alternated rounds): "
          + "; ".join(f"{c.mode} {c.seconds:.2f} s, {c.forwards} forwards, {c.rows} rows, peak {c.peak_mb:.0f} MB"
                      for c in (lk.lockstep, lk.sequential))
          + f"; sequential/lockstep x{lk.ratio:.2f}")
    mm = f["memory_model"]
    if mm is None:
        print(f"memory model: no prediction ({f['memory_model_missing']})")
        return
    if mm["measured_over_predicted"] is None:
        measured = (f"the CPU process's peak RSS, not comparable (the whole process, no device memory): "
                    f"{mm['measured_update_peak_gib']:.3f} GiB")
    else:
        measured = f"measured {mm['measured_update_peak_gib']:.3f} GiB (x{mm['measured_over_predicted']:.2f} the prediction)"
    print(f"memory model: predicted {mm['predicted_gib']:.3f} GiB (weights on the device {mm['weights_gib']:.3f} + LoRA state "
          f"{mm['lora_state_gib']:.3f} + update activations {mm['activations_gib']:.3f} for {mm['rows']} rows); "
          f"tp_grpo update peak: {measured}")


# ---------------------------------------------------------------------------------- main


def benchmark(args: argparse.Namespace, plan: Plan, configs: dict[str, ExperimentConfig], prompts: Path) -> Result:
    """Both variants' epochs and the lockstep comparison; prompts of the synthetic world (words
    the word-level tokenizers know) are written to ``prompts``, the configs' ``data.dir``."""
    cfg = configs["tp_grpo"]
    s = cfg.sample
    prediction = predict_memory(plan.arch, cfg)
    write_prompt_sets(prompts, max(64, s.batch_size // s.group_size * s.batches_per_epoch), 16, seed=0)
    epochs: dict[str, EpochCost] = {}
    tp = build_trainer(cfg, "tp_grpo", plan)
    # First, so the rollout's kernels are set up before the epochs are timed.
    lockstep = compare_rollouts(tp.trainer, rollout_config(cfg), args.repeats, plan.device)
    epochs["tp_grpo"] = run_epoch(tp, plan.device)
    release(tp)
    flow = build_trainer(configs["flow_grpo"], "flow_grpo", plan)
    epochs["flow_grpo"] = run_epoch(flow, plan.device)
    release(flow)
    return Result(
        preset=args.preset,
        settings=settings_of(cfg, plan, args.scale, args.reward),
        parameters=tp.parameters,
        notes=plan.notes,
        memory_measure=memory_measure(plan.device),
        build_s=tp.build_s,
        epochs=epochs,
        lockstep=lockstep,
        memory=prediction,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, help="e.g. configs/presets/sd35m_pickscore.yaml")
    parser.add_argument("--scale", type=int, default=1, help="divide widths and depths by F (1: full size)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--batch", type=int, default=None, help="trajectories per rollout batch (default: one GPU's share)")
    parser.add_argument("--resolution", type=int, default=None, help="image side, px (default: the preset's; --scale: its / F)")
    parser.add_argument("--batches", type=int, default=None, help="rollout batches of the epoch (default: one optimizer step's)")
    parser.add_argument("--reward", default="jpeg_compressibility", choices=available_rewards())
    parser.add_argument("--repeats", type=int, default=3, help="alternated rounds of lockstep vs sequential")
    parser.add_argument("--threads", type=int, default=0, help="torch's CPU threads (0: torch's default, one per core)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    sizes = (args.scale, args.repeats, *(v for v in (args.batch, args.batches, args.resolution) if v is not None))
    if min(sizes) < 1 or args.threads < 0:
        parser.error("--scale, --repeats, --batch, --batches and --resolution must be >= 1, --threads >= 0")

    if args.threads:
        # On a CPU shared with other work (see the module docstring): the same rollout took 4 to
        # 60 s on 2 threads there, 1.3 to 1.7 s on 1.
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="tpgrpo-scale-") as tmp:
        try:
            plan = plan_run(args, load_config(PARAMS, preset=args.preset), parser)
            overrides = {**plan.overrides, "runs_dir": f"{tmp}/runs", "data.dir": f"{tmp}/prompts"}
            configs = {v: load_config(PARAMS, preset=args.preset, variant=v, overrides=overrides) for v in VARIANTS}
        except ConfigError as exc:
            parser.error(str(exc))
        if rollout_config(configs["flow_grpo"]) != replace(rollout_config(configs["tp_grpo"]), completions=False):
            # Then the difference of their rollouts would not be the completions' cost.
            parser.error("the flow_grpo variant samples otherwise than tp_grpo besides the completions")
        result = benchmark(args, plan, configs, Path(tmp) / "prompts")
    print_report(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result.figures(), indent=2) + "\n")


if __name__ == "__main__":
    main()
