"""Trajectories with an SDE window, and the ODE completions that TP-GRPO scores.

A trajectory runs N steps on the flow-matching schedule: ODE (Euler) steps before the window,
W stochastic steps ``s .. s+W-1`` (``sde`` or ``cps``, log-probs recorded), ODE steps after.
``z_0`` is the state entering the window and ``z_k`` the state after its k-th SDE step. With
``completions=True`` every ``z_k`` is also completed to an image with the ODE sampler:
completion 0 is the pure-ODE image from the same ``x_T`` (it shares the ODE prefix), and the
completion of ``z_W`` is the trajectory's own final image (the suffix is ODE anyway), so it is
neither recomputed nor decoded twice.

Baseline noise (``RolloutConfig.baseline_noise``, DESIGN §1 on R_0): ``shared`` (default) is the
above. ``independent`` is the published code's ``same_latent=False``: completion 0 is instead the
pure-ODE image from fresh noise ``x_T'`` (same prompt and guidance, all N Euler steps from index
0, whatever ``completion`` says), drawn from the same generator right after the SDE noise, so the
trajectory, its log-probs and completions 1..W are the ``shared`` ones: bit for bit where every
forward keeps its shape (:func:`rollout_sequential`, or micro-batches of B), to float rounding
(~1e-6) in lockstep, whose forwards gain the baseline's rows. The completion of ``z_0`` is then
not computed at all; ``x_T'`` is kept as ``Rollout.baseline_latents``.

Cheaper estimators of those completions (``RolloutConfig.completion``): ``one_step`` scores
the one-step prediction ``x̂0 = z_k - sigma v(z_k)``, which costs no forward (the trajectory
computes ``v(z_k)`` for its own next step); ``coarse`` takes ``completion_steps`` Euler steps on
a sub-grid of the remaining schedule (:func:`completion_grid`). The final image stays the
completion of ``z_W`` in every mode.

Lockstep: at time index i every live branch — the trajectory and each completion that has
started and is due at i — sits at the same timestep, so all of them advance in one batched
transformer forward (split into micro-batches when asked). A completion's first velocity is the
trajectory's velocity at the same state and time, so it is reused rather than recomputed. Coarse
completions only visit schedule indices, so each of their forwards joins the trajectory's
forward at that index: they add rows, never transformer calls. An ``independent`` baseline is
one more branch, live from index 0, that joins the forward at every index.
:func:`rollout_sequential` is the per-completion loop of the published code, kept as the
reference the lockstep version is tested and benchmarked against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tpgrpo.models import ModelAdapter, PromptEmbeds, load_adapter
from tpgrpo.sde import LogProbForm, Sampler, sde_step

if TYPE_CHECKING:
    from tpgrpo.config import ExperimentConfig

Completion = Literal["ode", "one_step", "coarse"]
COMPLETIONS: tuple[str, ...] = ("ode", "one_step", "coarse")
BaselineNoise = Literal["shared", "independent"]
BASELINE_NOISES: tuple[str, ...] = ("shared", "independent")


@dataclass(frozen=True)
class RolloutConfig:
    """How trajectories are sampled.

    Attributes:
        num_steps: N, sampler steps.
        window_start: s, first SDE step (0-based).
        window_size: W >= 1, number of SDE steps; ``s + W <= N``.
        noise_level: a, the SDE noise level (0: every step is the ODE step).
        sampler: ``sde`` or ``cps``.
        log_prob: log-prob form; None = the sampler's default (see :mod:`tpgrpo.sde`).
        guidance_scale: classifier-free guidance (1 = off), for sampling and completions alike.
        completions: also produce the completions of z_0..z_W (TP-GRPO, incremental).
        completion: how z_0..z_{W-1} are completed: ``ode`` (the full ODE run over the rest of
            the schedule, DESIGN §1), ``one_step`` (the one-step prediction z_k - sigma v(z_k),
            no extra forward) or ``coarse`` (``completion_steps`` Euler steps on a sub-grid of
            the rest of the schedule, see :func:`completion_grid`).
        completion_steps: Euler steps of a ``coarse`` completion (1 is ``one_step``; a
            completion with fewer steps left takes them all, i.e. the full ODE).
        baseline_noise: what completion 0 (scored as R_0) is: ``shared`` (DESIGN §1) the
            completion of z_0, i.e. the pure-ODE image from the trajectory's own x_T;
            ``independent`` (the published code's ``same_latent=False``) the pure-ODE image
            (all N Euler steps) from fresh noise x_T', drawn after the SDE noise; the completion
            of z_0 is then not computed.
        micro_batch_size: rows per transformer forward (before CFG doubling); None = all.
        height, width: image size; None = the model's default.
        progress: show a progress bar over the steps (when stderr is a terminal).
    """

    num_steps: int = 10
    window_start: int = 0
    window_size: int = 9
    noise_level: float = 0.7
    sampler: Sampler = "cps"
    log_prob: LogProbForm | None = None
    guidance_scale: float = 4.5
    completions: bool = True
    completion: Completion = "ode"
    completion_steps: int = 2
    baseline_noise: BaselineNoise = "shared"
    micro_batch_size: int | None = None
    height: int | None = None
    width: int | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"num_steps: expected >= 1, got {self.num_steps}")
        if self.window_size < 1 or self.window_start < 0 or self.window_start + self.window_size > self.num_steps:
            raise ValueError(
                f"window: expected 0 <= window_start and 1 <= window_size with window_start + window_size <= "
                f"num_steps ({self.num_steps}), got window_start={self.window_start}, window_size={self.window_size}"
            )
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size: expected >= 1 or None, got {self.micro_batch_size}")
        if self.completion not in COMPLETIONS:
            raise ValueError(f"completion: expected one of {COMPLETIONS}, got {self.completion!r}")
        if self.completion_steps < 1:
            raise ValueError(f"completion_steps: expected >= 1, got {self.completion_steps}")
        if self.baseline_noise not in BASELINE_NOISES:
            raise ValueError(f"baseline_noise: expected one of {BASELINE_NOISES}, got {self.baseline_noise!r}")


def completion_grid(cfg: RolloutConfig, start: int) -> list[int]:
    """Schedule indices a completion of the state at index ``start`` visits: ``start`` first,
    ``cfg.num_steps`` (sigma = 0, the image) last, one Euler step between neighbours.

    ``ode``: every index. ``one_step``: ``[start, N]``. ``coarse`` with m = ``completion_steps``
    and R = N - start steps left: ``start + (l * R) // m`` for l = 0..m (steps as even as whole
    indices allow), or every index when m >= R. The grid keeps to the schedule's own points:
    each coarse forward then joins the trajectory's forward at that index (rows, never extra
    transformer calls); the schedule's spacing (the shift of SD3.5 / FLUX) carries over; and the
    estimator degrades exactly into the others, m = 1 into ``one_step`` and m >= R into ``ode``.
    """
    N = cfg.num_steps
    if not 0 <= start < N:
        raise ValueError(f"start: expected 0 <= start < {N}, got {start}")
    left = N - start
    steps = {"ode": left, "one_step": 1, "coarse": min(cfg.completion_steps, left)}[cfg.completion]
    return [start + (l * left) // steps for l in range(steps + 1)]


@dataclass(frozen=True)
class ForwardStats:
    """Cost of a rollout: transformer calls and the rows they processed (CFG rows counted);
    ``completion_rows`` of those rows advanced completions, the rest the trajectories."""

    passes: int
    rows: int
    completion_rows: int


@dataclass(frozen=True)
class Rollout:
    """A batch of B trajectories.

    Attributes:
        images: [B, 3, H, W] float in [0, 1], final images.
        completion_images: [B, W+1, 3, H, W] completions of z_0..z_W by ``cfg.completion``
            (index 0: z_0's, with ``ode`` the pure-ODE image from x_T, or with
            ``baseline_noise="independent"`` the pure-ODE image from ``baseline_latents``;
            index W: ``images``); None without completions.
        latents: [B, W+1, C, h, w] z_0..z_W.
        log_probs: [B, W] float32 log-prob of each SDE transition z_{k-1} -> z_k.
        initial_noise: [B, C, h, w] x_T.
        baseline_latents: [B, C, h, w] x_T', the fresh noise of completion 0 with
            ``baseline_noise="independent"``; None when ``shared`` (completion 0 starts from
            x_T) or without completions (nothing drawn).
        step_indices: [W] long, the schedule index of each SDE step (s .. s+W-1).
        timesteps: [W] model timesteps of the SDE steps.
        sigmas: [N+1] the schedule.
        embeds: the prompts' embeddings, for recomputing log-probs in the update.
        stats: transformer cost.
        config: the settings it was sampled with; the update recomputes its log-probs with the
            same noise level, sampler, log-prob form and guidance.
    """

    images: Tensor
    completion_images: Tensor | None
    latents: Tensor
    log_probs: Tensor
    initial_noise: Tensor
    step_indices: Tensor
    timesteps: Tensor
    sigmas: Tensor
    embeds: PromptEmbeds = field(repr=False)
    stats: ForwardStats
    config: RolloutConfig
    baseline_latents: Tensor | None = None


def as_adapter(model: object) -> ModelAdapter:
    """Accept a diffusers pipeline, a pipeline directory or an adapter."""
    if isinstance(model, ModelAdapter):
        return model
    return load_adapter(model)  # type: ignore[arg-type]


class _Forward:
    """Guided transformer forwards over rows that may belong to different prompts, micro-batched
    and counted."""

    def __init__(self, adapter: ModelAdapter, embeds: PromptEmbeds, guidance_scale: float, micro: int | None):
        self.adapter, self.embeds, self.guidance_scale, self.micro = adapter, embeds, guidance_scale, micro
        self.rows_per_latent = 2 if embeds.has_negative else 1
        self.passes = 0
        self.rows = 0
        self.completion_rows = 0

    def __call__(self, latents: Tensor, timestep: Tensor, prompt_index: Tensor, completions: int = 0) -> Tensor:
        """Velocities [M, C, h, w] at latents [M, C, h, w]; the last ``completions`` rows advance
        completions (counted apart in the stats)."""
        self.completion_rows += completions * self.rows_per_latent
        chunk = self.micro or latents.shape[0]
        out = []
        for start in range(0, latents.shape[0], chunk):
            rows = slice(start, start + chunk)
            embeds = self.embeds.select(prompt_index[rows])
            out.append(self.adapter.velocity(latents[rows], timestep, embeds, self.guidance_scale))
            self.passes += 1
            self.rows += (min(start + chunk, latents.shape[0]) - start) * self.rows_per_latent
        return torch.cat(out)

    def stats(self) -> ForwardStats:
        return ForwardStats(passes=self.passes, rows=self.rows, completion_rows=self.completion_rows)


@dataclass
class _Setup:
    adapter: ModelAdapter
    embeds: PromptEmbeds
    x_T: Tensor
    noise: Tensor
    timesteps: Tensor
    sigmas: Tensor
    forward: _Forward
    baseline: Tensor | None  # x_T' of an independent completion 0


def _setup(
    model: object,
    prompts: Sequence[str],
    cfg: RolloutConfig,
    latents: Tensor | None,
    noise: Tensor | None,
    generator: torch.Generator | None,
) -> _Setup:
    if len(prompts) == 0:
        raise ValueError("prompts: expected at least one prompt")
    adapter = as_adapter(model)
    B = len(prompts)
    embeds = adapter.encode_prompts(list(prompts), cfg.guidance_scale)
    if latents is None:
        latents = adapter.prepare_latents(B, generator, cfg.height, cfg.width)
    elif latents.shape[0] != B:
        raise ValueError(f"latents: expected {B} rows (one per prompt), got shape {tuple(latents.shape)}")
    latents = latents.to(adapter.device, adapter.dtype)
    shape = (B, cfg.window_size, *latents.shape[1:])
    if noise is None:
        # Drawn once up front (after x_T), so any sampling order sees the same noise.
        noise = torch.randn(shape, generator=generator, device=latents.device, dtype=torch.float32)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise: expected shape {shape}, got {tuple(noise.shape)}")
    baseline = None
    if cfg.completions and cfg.baseline_noise == "independent":
        # x_T', drawn after the SDE noise so that the shared draws are unchanged.
        baseline = adapter.prepare_latents(B, generator, cfg.height, cfg.width).to(adapter.device, adapter.dtype)
        if baseline.shape != latents.shape:
            raise ValueError(
                f"latents: baseline_noise='independent' draws x_T' of shape {tuple(baseline.shape)} "
                f"(cfg.height/width), but x_T has shape {tuple(latents.shape)}"
            )
    schedule = adapter.timesteps(cfg.num_steps, cfg.height, cfg.width)
    forward = _Forward(adapter, embeds, cfg.guidance_scale, cfg.micro_batch_size)
    return _Setup(adapter, embeds, latents, noise, schedule.timesteps, schedule.sigmas, forward, baseline)


def _euler(velocity: Tensor, sample: Tensor, sigmas: Tensor, i: int, to: int | None = None) -> Tensor:
    """The ODE step from ``sigmas[i]`` to ``sigmas[to]`` (default: the next index)."""
    to = i + 1 if to is None else to
    return sde_step(velocity, sample, sigmas[[i, to]], 0, noise_level=0.0).sample


@dataclass
class _Branch:
    """A completion under way: B rows at schedule index ``grid[pos]`` (the last: finished)."""

    latents: Tensor
    grid: list[int]
    pos: int = 0

    @property
    def index(self) -> int:
        return self.grid[self.pos]

    def advance(self, velocity: Tensor, sigmas: Tensor) -> None:
        """One Euler step to the next grid point, with ``velocity`` [B, C, h, w] at the current one."""
        self.latents = _euler(velocity, self.latents, sigmas, self.index, self.grid[self.pos + 1])
        self.pos += 1


def _window_step(run: _Setup, cfg: RolloutConfig, velocity: Tensor, sample: Tensor, i: int):
    """The SDE step at schedule index ``i`` inside the window, with its pre-drawn noise."""
    return sde_step(
        velocity, sample, run.sigmas, i,
        noise_level=cfg.noise_level, sampler=cfg.sampler, log_prob_form=cfg.log_prob,
        noise=run.noise[:, i - cfg.window_start],
    )


def _decode(adapter: ModelAdapter, latents: Tensor, micro: int | None) -> Tensor:
    chunk = micro or latents.shape[0]
    return torch.cat([adapter.decode(latents[i : i + chunk]) for i in range(0, latents.shape[0], chunk)])


@torch.no_grad()
def rollout(
    model: object,
    prompts: Sequence[str],
    cfg: RolloutConfig,
    *,
    latents: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample one trajectory per prompt (lockstep over all live branches).

    Args:
        model: a diffusers pipeline, a pipeline directory or a :class:`ModelAdapter`.
        prompts: B prompts (repeat a prompt to get a GRPO group).
        cfg: sampling options.
        latents: [B, C, h, w] x_T; drawn from ``generator`` when None.
        noise: [B, W, C, h, w] standard normal noise of the SDE steps; drawn when None.
        generator: RNG for x_T, the noise and (``baseline_noise="independent"``) x_T', in
            that order.

    Returns:
        :class:`Rollout`.
    """
    run = _setup(model, prompts, cfg, latents, noise, generator)
    B, s, W = len(prompts), cfg.window_start, cfg.window_size
    own = torch.arange(B, device=run.x_T.device)
    x = run.x_T
    states = []
    log_probs = []
    branches: list[_Branch] = []  # the completion of z_k is branches[k], started or finished
    if run.baseline is not None:
        # Completion 0 from x_T': the full ODE, due at every index (no velocity to reuse).
        branches.append(_Branch(run.baseline, list(range(cfg.num_steps + 1))))

    # disable=None: shown on a terminal only (see Trainer.rollout).
    for i in tqdm(range(cfg.num_steps), desc="rollout", disable=None if cfg.progress else True, leave=False):
        t = run.timesteps[i]
        # An ODE completion is due at every index, a coarse one at its grid points only, and a
        # finished one (index N) never.
        due = [b for b in branches if b.index == i]
        v = run.forward(
            torch.cat([x, *(b.latents for b in due)]), t, own.repeat(1 + len(due)), completions=len(due) * B
        )
        v_main = v[:B]
        for branch, v_branch in zip(due, v[B:].split(B)):
            branch.advance(v_branch, run.sigmas)
        if s <= i < s + W:
            states.append(x)
            if cfg.completions and not (i == s and run.baseline is not None):
                # Completion of z_k starts here; its first velocity is the trajectory's.
                branch = _Branch(x, completion_grid(cfg, i))
                branch.advance(v_main, run.sigmas)
                branches.append(branch)
            step = _window_step(run, cfg, v_main, x, i)
            x = step.sample
            log_probs.append(step.log_prob)
        else:
            x = _euler(v_main, x, run.sigmas, i)
        if i == s + W - 1:
            states.append(x)

    if cfg.completions:
        decoded = _decode(run.adapter, torch.cat([*(b.latents for b in branches), x]), cfg.micro_batch_size)
        completion_images = decoded.reshape(W + 1, B, *decoded.shape[1:]).transpose(0, 1)
        images = decoded[W * B :]
    else:
        completion_images = None
        images = _decode(run.adapter, x, cfg.micro_batch_size)
    return _result(run, cfg, images, completion_images, states, log_probs)


@torch.no_grad()
def rollout_sequential(
    model: object,
    prompts: Sequence[str],
    cfg: RolloutConfig,
    *,
    latents: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Rollout:
    """The same samples as :func:`rollout`, computed the published way: the trajectory first, then
    one run per completion (over its :func:`completion_grid`), each starting with its own
    forward (an independent baseline: the full ODE from x_T'). Reference for tests and
    benchmarks; same arguments and result."""
    run = _setup(model, prompts, cfg, latents, noise, generator)
    B, s, W = len(prompts), cfg.window_start, cfg.window_size
    own = torch.arange(B, device=run.x_T.device)
    x = run.x_T
    states, log_probs = [], []
    for i in range(cfg.num_steps):
        v = run.forward(x, run.timesteps[i], own)
        if s <= i < s + W:
            states.append(x)
            step = _window_step(run, cfg, v, x, i)
            x = step.sample
            log_probs.append(step.log_prob)
        else:
            x = _euler(v, x, run.sigmas, i)
        if i == s + W - 1:
            states.append(x)
    images = _decode(run.adapter, x, cfg.micro_batch_size)

    completion_images = None
    if cfg.completions:
        finals = []
        starts = [(states[k], completion_grid(cfg, s + k)) for k in range(W)]
        if run.baseline is not None:
            starts[0] = (run.baseline, list(range(cfg.num_steps + 1)))
        for z, grid in starts:
            for i, to in zip(grid[:-1], grid[1:]):
                z = _euler(run.forward(z, run.timesteps[i], own, completions=B), z, run.sigmas, i, to)
            finals.append(_decode(run.adapter, z, cfg.micro_batch_size))
        completion_images = torch.stack(finals + [images], dim=1)
    return _result(run, cfg, images, completion_images, states, log_probs)


def _result(
    run: _Setup,
    cfg: RolloutConfig,
    images: Tensor,
    completion_images: Tensor | None,
    states: list[Tensor],
    log_probs: list[Tensor],
) -> Rollout:
    steps = torch.arange(cfg.window_start, cfg.window_start + cfg.window_size)
    return Rollout(
        images=images,
        completion_images=completion_images,
        latents=torch.stack(states, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        initial_noise=run.x_T,
        step_indices=steps,
        timesteps=run.timesteps[steps.to(run.timesteps.device)],
        sigmas=run.sigmas,
        embeds=run.embeds,
        stats=run.forward.stats(),
        config=cfg,
        baseline_latents=run.baseline,
    )


def rollout_config(cfg: ExperimentConfig, *, progress: bool = False) -> RolloutConfig:
    """The rollout settings of an experiment (``sample``, the credit mode, the resolution)."""
    s = cfg.sample
    return RolloutConfig(
        num_steps=s.num_steps,
        window_start=s.window_start,
        window_size=s.window_size,
        noise_level=s.noise_level,
        sampler=s.sampler,
        log_prob=s.log_prob,
        guidance_scale=s.guidance_scale,
        completions=cfg.credit.mode != "outcome",
        completion=s.completion,
        completion_steps=s.completion_steps,
        baseline_noise=s.baseline_noise,
        micro_batch_size=s.micro_batch_size,
        height=cfg.model.resolution,
        width=cfg.model.resolution,
        progress=progress,
    )
