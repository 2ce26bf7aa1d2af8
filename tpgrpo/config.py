"""The typed experiment configuration, loaded from ``params.yaml``.

One schema for every entry point (CLI, DVC stages, Prefect flows). Every section forbids
unknown keys, and any invalid value fails at load time with a one-line :class:`ConfigError`
naming the file, the dotted field and what was expected.

Ablations are expressed as dotted overrides (``credit.mode=incremental``), either given
directly or collected under a named variant in the ``variants`` section.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Mapping, Sequence, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tpgrpo.errors import ConfigError
from tpgrpo.fileio import parse_yaml

if TYPE_CHECKING:
    from tpgrpo.credit import CreditConfig


class _Section(BaseModel):
    # strict: "10" is not silently an int, nor 1 a bool; lists stay lists.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True)


class ModelSection(_Section):
    """The base pipeline: a diffusers directory or hub id.

    ``path``: a local pipeline directory or a Hugging Face hub id ``owner/name``, told apart by
    ``tpgrpo.models.hub_id``'s rule (``models/base``, absolute and ``./``, ``../``, ``~`` paths are
    always local); a hub id loads through the hub's cache, only from it with ``HF_HUB_OFFLINE``.
    ``family`` must match the pipeline's class (``sd3``: StableDiffusion3Pipeline, ``flux``:
    FluxPipeline). ``offload_text_encoders`` / ``offload_vae``: keep those modules in CPU memory
    and move them to the accelerator only while they encode prompts / decode latents (no-ops on a
    CPU-only machine).
    """

    path: str = "models/base"
    family: Literal["sd3", "flux"] = "sd3"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    resolution: int = Field(64, ge=16, multiple_of=16)
    offload_text_encoders: bool = False
    offload_vae: bool = False
    max_sequence_length: int | None = Field(
        None, ge=1, description="T5 tokens per prompt; None = the tokenizer's length capped at the pipeline's 256 (SD3) / 512 (FLUX)"
    )


class DataSection(_Section):
    """Prompt sets (``<dir>/train.jsonl``, ``<dir>/test.jsonl``), written by ``tpgrpo prepare``.

    ``source``: null = the synthetic shape world, ``num_train`` / ``num_test`` prompts drawn with
    ``seed``; a directory = import the prompt set it holds (``train.txt`` / ``test.txt`` or
    GenEval's ``train_metadata.jsonl`` / ``test_metadata.jsonl``, :mod:`tpgrpo.prompt_import`),
    and ``num_train``, ``num_test``, ``seed`` are then unused. ``dvc repro`` tracks a source under
    ``data/sources/`` (the prepare stage depends on that directory).
    """

    dir: str = "data/prompts"
    num_train: int = Field(2000, ge=1)
    num_test: int = Field(64, ge=1)
    seed: int = 0
    source: str | None = Field(None, min_length=1)


class PretrainSection(_Section):
    """Pretraining of the embedded tiny SD3 base model on the synthetic world (``tpgrpo pretrain``).

    Model size: ``image_size``, ``num_layers``, ``num_attention_heads``, ``attention_head_dim``,
    ``patch_size``. Data: ``num_train_images`` train-distribution images, rendered and encoded once.
    VAE: ``vae_steps`` AdamW steps of ``vae_batch_size`` at ``vae_lr`` (cosine), loss MSE + L1
    weighted ``1 + vae_saturation_weight * chroma``; ``vae_test_images`` test images measure it.
    Transformer: ``transformer_steps`` AdamW steps of ``batch_size`` at ``lr`` (``warmup_steps``
    linear warm-up, cosine to ``min_lr_ratio * lr``), ``weight_decay``, gradient norm clip
    ``grad_clip`` (0: off), sigma = sigmoid(N(``logit_mean``, ``logit_std``)) shifted like the
    scheduler when ``shift_sigmas``, ``caption_dropout`` of captions emptied, EMA ``ema_decay``.
    Evaluation: as the training runs evaluate (the ``eval`` section and the top-level ``seed``);
    ``eval_prompts``: how many world test prompts :func:`tpgrpo.pretrain.pretrain` samples when it
    is given none (``tpgrpo pretrain`` evaluates the first ``eval.num_prompts`` of test.jsonl).
    ``num_threads``: torch CPU threads (0 = leave torch's setting); 1 is fastest on a busy 2-core
    box and keeps float reductions, and so the model, reproducible.
    """

    image_size: int = Field(32, ge=16, multiple_of=16)
    num_layers: int = Field(4, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    attention_head_dim: int = Field(32, ge=1)
    patch_size: int = Field(2, ge=1)
    num_train_images: int = Field(4096, ge=1)
    vae_steps: int = Field(600, ge=1)
    vae_batch_size: int = Field(32, ge=1)
    vae_lr: float = Field(2e-3, gt=0.0)
    vae_saturation_weight: float = Field(2.0, ge=0.0)
    vae_test_images: int = Field(256, ge=1)
    transformer_steps: int = Field(1000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.01, ge=0.0)
    grad_clip: float = Field(1.0, ge=0.0)
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0.0)
    shift_sigmas: bool = True
    caption_dropout: float = Field(0.1, ge=0.0, le=1.0)
    ema_decay: float = Field(0.995, ge=0.0, lt=1.0)
    zero_init: bool = True
    eval_prompts: int = Field(128, ge=1)
    num_threads: int = Field(1, ge=0)

    @model_validator(mode="after")
    def _check_heads(self) -> "PretrainSection":
        latent = self.image_size // 4
        if latent % self.patch_size:
            raise ValueError(f"patch_size: expected to divide the latent side ({latent}), got {self.patch_size}")
        return self


class SampleSection(_Section):
    """Rollouts: the sampler, its SDE window and the GRPO groups.

    ``cache_text_embeddings``: keep the embeddings of up to ``text_embedding_cache_size``
    distinct prompts in CPU memory and reuse them (see :mod:`tpgrpo.models.managed`).
    ``completion`` / ``completion_steps``: how the intermediate states are completed to the
    images TP-GRPO scores (see :class:`tpgrpo.rollout.RolloutConfig`). ``baseline_noise``: R_0
    scores the pure-ODE image from the trajectory's own x_T (``shared``, the paper's definition)
    or from fresh noise (``independent``, the published code's ``same_latent=False``).
    """

    num_steps: int = Field(10, ge=1)
    window_start: int = Field(0, ge=0)
    window_size: int = Field(9, ge=1)
    noise_level: float = Field(0.7, ge=0.0)
    sampler: Literal["sde", "cps"] = "cps"
    log_prob: Literal["gaussian", "unnormalized"] | None = None
    guidance_scale: float = Field(2.0, ge=1.0)
    completion: Literal["ode", "one_step", "coarse"] = "ode"
    completion_steps: int = Field(2, ge=1, description="Euler steps of a coarse completion")
    baseline_noise: Literal["shared", "independent"] = "shared"
    batch_size: int = Field(16, ge=1, description="trajectories per rollout batch, summed over processes")
    group_size: int = Field(4, ge=2, description="trajectories per prompt (the GRPO group)")
    batches_per_epoch: int = Field(2, ge=1)
    micro_batch_size: int | None = Field(None, ge=1, description="rows per transformer forward; None = all")
    cache_text_embeddings: bool = Field(False, description="keep each distinct prompt's embeddings (on CPU)")
    text_embedding_cache_size: int = Field(1024, ge=1, description="prompts kept, least recently used dropped")

    @model_validator(mode="after")
    def _check(self) -> "SampleSection":
        if self.window_start + self.window_size > self.num_steps:
            raise ValueError(
                f"window_size: expected window_start + window_size <= num_steps ({self.num_steps}), "
                f"got {self.window_start} + {self.window_size}"
            )
        if self.batch_size % self.group_size:
            raise ValueError(f"batch_size: expected a multiple of group_size ({self.group_size}), got {self.batch_size}")
        form = self.log_prob or ("unnormalized" if self.sampler == "cps" else "gaussian")
        if self.sampler == "cps" and form == "gaussian" and self.window_start + self.window_size == self.num_steps:
            raise ValueError(
                "log_prob: gaussian is undefined for cps at the last step (std 0 at sigma' = 0); "
                "end the window before the last step or use unnormalized"
            )
        return self


class CreditSection(_Section):
    """Step-level credit assignment (see :mod:`tpgrpo.credit`).

    ``balance_key``: rank turning points by their own ``|R_W - R_{k-1}|`` (``aggregated``) or by
    their trajectory's ``|R_W - R_0|`` (``trajectory``, the published code). ``balance_scope``:
    balance over the whole gathered rollout batch (``batch``) or within each process's slice of
    it (``process``, the published code's per-GPU sampling batch).
    """

    mode: Literal["outcome", "incremental", "turning_point"] = "turning_point"
    consistent: bool = True
    first_step: bool = True
    balance: bool = True
    balance_key: Literal["aggregated", "trajectory"] = "aggregated"
    balance_scope: Literal["batch", "process"] = "batch"
    replace: bool = True
    eta: float = Field(1.0, gt=0.0)

    def to_credit_config(self) -> CreditConfig:
        # Imported here: validating a config must not wait for torch.
        from tpgrpo.credit import CreditConfig

        return CreditConfig(**self.model_dump(exclude={"balance_scope"}))


class AdvantageSection(_Section):
    """Group normalisation of step rewards (see :mod:`tpgrpo.advantages`)."""

    global_std: bool = False
    clip_max: float = Field(5.0, gt=0.0)


class TrainSection(_Section):
    """The policy update.

    ``mixed_precision``: accelerate's autocast for every transformer forward (rollouts, update,
    evaluation alike, so old and new log-probs come from the same arithmetic); the trainable
    weights are then kept in float32. ``gradient_checkpointing``: recompute the transformer
    blocks' activations in the backward pass instead of storing them (same gradients, less
    memory, one more forward). ``num_threads``: torch's CPU threads while the run trains (0 =
    torch's default, one per core); 1 when several runs share a CPU's cores, as the ablation
    study's do.

    ``gradient_accumulation``: rollout batches per optimizer step (it must divide
    ``sample.batches_per_epoch``; the published setting is 2 optimizer steps an epoch).
    ``micro_batch_size``: trajectories per forward/backward in the update (None = all kept rows of
    a batch at once); the gradients are the same. ``ema_decay`` / ``ema_every``: an EMA of the
    trainable weights (diffusers' ``EMAModel``) with decay ``min((1 + s) / (10 + s), ema_decay)``
    at optimizer step s, applied after every rollout batch's update when ``(s + 1) % ema_every ==
    0`` (the published cadence); the EMA weights are what evaluation and the export use.
    ``max_nonfinite_updates``: a non-finite loss or gradient norm skips that optimizer step; this
    many in a row stop the run (its last checkpoint stays).
    """

    epochs: int = Field(20, ge=1)
    time_budget_minutes: float | None = Field(None, gt=0.0)
    learning_rate: float = Field(3e-4, gt=0.0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    clip_range: float = Field(1e-4, gt=0.0)
    kl_beta: float = Field(0.0, ge=0.0)
    inner_epochs: int = Field(1, ge=1)
    lora_rank: int | None = Field(8, ge=1, description="None = full fine-tuning")
    lora_alpha: float = Field(16.0, gt=0.0)
    lora_targets: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], min_length=1)
    gradient_accumulation: int = Field(1, ge=1, description="rollout batches per optimizer step")
    micro_batch_size: int | None = Field(None, ge=1, description="trajectories per forward/backward in the update; None = all")
    ema_decay: float | None = Field(0.9, ge=0.0, lt=1.0, description="max EMA decay; None = no EMA")
    ema_every: int = Field(1, ge=1, description="optimizer steps between EMA updates")
    max_nonfinite_updates: int = Field(3, ge=1, description="non-finite updates in a row that stop the run")
    checkpoint_every: int = Field(1, ge=1)
    mixed_precision: Literal["no", "bf16", "fp16"] | None = Field(
        None, description="accelerate's autocast; None = the accelerate launch setting ('no' without one)"
    )
    gradient_checkpointing: bool = False
    num_threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch's default (one per core)")


class RewardSection(_Section):
    """The reward, by registry name, with its options; or a weighted sum of rewards.

    Weighted sum: ``name: multi``, ``weights: {pickscore: 1.0, ocr: 0.5}`` and, per reward,
    ``options: {pickscore: {path: ...}}`` (rewards without an entry take their defaults).
    ``weights`` is a mapping rather than optional so that dotted overrides reach into it
    (``reward.weights.ocr=0.5``), as they do into ``options``; empty means a single reward.
    """

    name: str = "verifiable"
    options: dict[str, Any] = Field(default_factory=dict)
    weights: dict[str, Annotated[float, Field(allow_inf_nan=False)]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_name(self) -> "RewardSection":
        # At load time, like every other value: not after the model loaded and a run was opened.
        from tpgrpo.rewards import available_rewards

        if self.name not in available_rewards():
            raise ValueError(f"name: unknown reward {self.name!r}; available: {', '.join(available_rewards())}")
        return self

    @model_validator(mode="after")
    def _check_weights(self) -> "RewardSection":
        from tpgrpo.rewards import available_rewards

        if self.name != "multi":
            if self.weights:
                raise ValueError(f"name: expected multi when weights are given, got {self.name!r}")
            return self
        if not self.weights:
            raise ValueError("weights: expected at least one reward when name is multi, e.g. {pickscore: 1.0}")
        for name in self.weights:
            if name not in available_rewards():
                raise ValueError(f"weights.{name}: unknown reward {name!r}; available: {', '.join(available_rewards())}")
        for name, options in self.options.items():
            if name not in self.weights:
                raise ValueError(f"options.{name}: {name!r} has no weight (weights: {', '.join(self.weights)})")
            if not isinstance(options, dict):
                raise ValueError(f"options.{name}: expected a mapping of the reward's options, got {options!r}")
        return self


class EvalSection(_Section):
    """ODE evaluation on the test prompts.

    ``reward``: what the evaluation scores, when it is not the training reward (None) — e.g.
    training on the verifiable reward's graded (``soft``) form and reporting its strict,
    GenEval-style accuracy; the training reward of the same images is then reported too
    (``eval/train_reward``). ``heldin_prompts``: how many train prompts (the first of
    train.jsonl) are evaluated beside the test prompts (``eval/heldin_reward``): does RL improve
    what it trains on, and how much of it transfers to the held-out colour–shape pairs?
    """

    every: int = Field(5, ge=1)
    num_steps: int = Field(10, ge=1)
    guidance_scale: float = Field(2.0, ge=1.0)
    num_prompts: int | None = Field(None, ge=1, description="None = the whole test set")
    heldin_prompts: int = Field(0, ge=0, description="the first N train prompts, also evaluated (held-in); 0 = none")
    batch_size: int = Field(32, ge=1)
    reward: RewardSection | None = None


class TrackingSection(_Section):
    """MLflow. A relative sqlite path is resolved against the params file's directory."""

    uri: str = "sqlite:///mlflow.db"
    experiment: str = "tpgrpo"


class PipelineSection(_Section):
    """What ``dvc repro`` trains, evaluates and compares: names under ``variants``."""

    variants: list[str] = Field(default_factory=list)


class StudySection(_Section):
    """One seeded comparison: every (variant, seed) trains with the study's settings on top of the
    variant's own, and the report compares the variants seed by seed (:mod:`tpgrpo.reporting.study`).

    ``epochs`` and ``eval_prompts`` (None: the params file's ``train.epochs`` and
    ``eval.num_prompts``) and then ``overrides`` (dotted, as in a variant) apply to every run.
    ``reference``: the variant every other one is compared with (paired difference, its 95%
    interval and detectable effect, epochs to reach the reference's final eval reward). Runs are
    named by variant, seed and these settings (:func:`tpgrpo.rundir.study_run_name`), so studies
    that share a (variant, seed, settings) share its run, trained once.
    """

    variants: list[str] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [1, 2, 3], min_length=1)
    epochs: int | None = Field(None, ge=1)
    eval_prompts: int | None = Field(None, ge=1)
    overrides: dict[str, Any] = Field(default_factory=dict)
    reference: str = "flow_grpo"

    @model_validator(mode="after")
    def _check_seeds(self) -> "StudySection":
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: expected distinct seeds, got {self.seeds}")
        return self

    def override_list(self) -> list[str]:
        """Every run's settings as ``KEY=VALUE`` strings (JSON values, which parse back as YAML):
        ``train.epochs``, ``eval.num_prompts``, then ``overrides``."""
        settings: dict[str, Any] = {}
        if self.epochs is not None:
            settings["train.epochs"] = self.epochs
        if self.eval_prompts is not None:
            settings["eval.num_prompts"] = self.eval_prompts
        settings |= self.overrides
        return [f"{key}={json.dumps(value)}" for key, value in settings.items()]


class AblationSection(StudySection):
    """The default study (the ``tpgrpo/ablation`` deployment, ``python -m flows.ablation``), and
    where every study's runs and reports go.

    ``max_parallel``: training runs at once when they go to the ``tpgrpo-train/train`` deployment
    (runs in the flow's own process go one at a time). ``runs_dir``: every study's runs;
    ``reports_dir``: ``<study>.md`` / ``<study>.json`` and plots of each study. Relative paths are
    anchored at the params file's directory.
    """

    max_parallel: int = Field(1, ge=1)
    runs_dir: str = Field("ablation/runs", min_length=1)
    reports_dir: str = Field("ablation/reports", min_length=1)


DEFAULT_STUDY = "ablation"


class ExperimentConfig(_Section):
    """The whole experiment; ``variants`` maps a name to dotted overrides; ``pipeline`` and
    ``ablation`` name the variants that ``dvc repro`` and the ablation study run."""

    seed: int = 42
    runs_dir: str = "runs"
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    pretrain: PretrainSection = PretrainSection()
    sample: SampleSection = SampleSection()
    credit: CreditSection = CreditSection()
    advantage: AdvantageSection = AdvantageSection()
    train: TrainSection = TrainSection()
    reward: RewardSection = RewardSection()
    eval: EvalSection = EvalSection()
    tracking: TrackingSection = TrackingSection()
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)
    pipeline: PipelineSection = PipelineSection()
    ablation: AblationSection = AblationSection()
    studies: dict[str, StudySection] = Field(default_factory=dict)

    def study(self, name: str | None = None) -> StudySection:
        """The study ``name`` (None or ``"ablation"``: the default study, the ``ablation``
        section). Raises ConfigError naming the defined studies."""
        if name is None or name == DEFAULT_STUDY:
            return self.ablation
        if name not in self.studies:
            known = ", ".join([DEFAULT_STUDY, *self.studies])
            raise ConfigError(f"study {name!r} is not defined under 'studies' (defined: {known})")
        return self.studies[name]

    @model_validator(mode="after")
    def _check_accumulation(self) -> "ExperimentConfig":
        if self.sample.batches_per_epoch % self.train.gradient_accumulation:
            raise ValueError(
                f"train.gradient_accumulation: expected a divisor of sample.batches_per_epoch "
                f"({self.sample.batches_per_epoch}), got {self.train.gradient_accumulation}"
            )
        return self

    def flat(self) -> dict[str, Any]:
        """Every leaf under its dotted name (``credit.mode``) of what a run trains with (variants,
        pipeline and the studies excluded): for trackers."""
        return _flatten(self.model_dump(mode="json", exclude={"variants", "pipeline", "ablation", "studies"}))


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any] | Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with dotted overrides applied.

    Args:
        raw: the nested mapping read from params.yaml.
        overrides: ``{"credit.mode": "incremental"}`` or ``["credit.mode=incremental"]``; string
            values are parsed as YAML scalars (``true``, ``0.5``, ``null``).

    Raises:
        ConfigError: an override is malformed or names a key that the schema does not have.
    """
    pairs = _parse_overrides(overrides)
    out = _deep_copy(raw)
    for dotted, value in pairs:
        parts = dotted.split(".")
        if not all(parts):
            raise ConfigError(f"override {dotted!r}: expected a dotted key such as credit.mode")
        model: type[BaseModel] | None = ExperimentConfig
        node = out
        for i, part in enumerate(parts):
            path = ".".join(parts[: i + 1])
            if model is None or part not in model.model_fields:
                raise ConfigError(f"override {dotted!r}: unknown key {path!r}{_expected_keys(model)}")
            annotation = _unwrap_optional(model.model_fields[part].annotation)
            is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
            is_mapping = get_origin(annotation) is dict
            if i == len(parts) - 1:
                node[part] = value
                break
            if not (is_section or is_mapping):
                raise ConfigError(f"override {dotted!r}: {path!r} is a value, not a section")
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {dotted!r}: {path!r} is not a mapping in the params file")
            if is_mapping:
                # Free-form options (reward.options.*): the remaining parts are plain keys.
                for key in parts[i + 1 : -1]:
                    child = child.setdefault(key, {})
                child[parts[-1]] = value
                break
            node, model = child, annotation
    return out


def _unwrap_optional(annotation: Any) -> Any:
    """``Section | None`` -> ``Section``: an optional section (``eval.reward``) is still a section
    that dotted overrides step into."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def load_config(
    path: str | Path = "params.yaml",
    *,
    preset: str | Path | None = None,
    variant: str | None = None,
    overrides: Mapping[str, Any] | Sequence[str] = (),
) -> ExperimentConfig:
    """Load, override and validate the experiment configuration.

    Args:
        path: the params file.
        preset: a params override file (``configs/presets/*.yaml``) merged over it first (see
            :func:`merge_preset`).
        variant: a name under ``variants`` whose overrides are applied next.
        overrides: further dotted overrides, applied last.

    Raises:
        ConfigError: one line naming the file (params, preset, or both for a merged value that
            is invalid) and the first offending field.
    """
    path = Path(path)
    raw = read_yaml_mapping(path, "params")
    source = str(path)
    if preset is not None:
        preset = Path(preset)
        preset_raw = read_yaml_mapping(preset, "preset")
        try:
            raw = merge_preset(raw, preset_raw)
        except ConfigError as exc:
            raise ConfigError(f"{preset}: {exc}") from None
        source = f"{path} + {preset}"
    return config_from_dict(raw, source=source, variant=variant, overrides=overrides, base_dir=path.parent)


def read_yaml_mapping(path: str | Path, kind: str) -> dict[str, Any]:
    """The top-level mapping of a params or preset file (``kind`` names it in errors)."""
    path = Path(path)
    try:
        raw = parse_yaml(path.read_text()) or {}
    except FileNotFoundError:
        where = "" if path.is_absolute() else f" in {Path.cwd()}"
        hint = " (run in the project directory or pass --params FILE)" if kind == "params" else ""
        raise ConfigError(f"{path}: {kind} file not found{where}{hint}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return raw


def merge_preset(raw: Mapping[str, Any], preset: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` with ``preset`` merged over it: sections merge key by key, everything else —
    values and free-form mappings (``reward.options``, ``reward.weights``, ``variants``) — is
    replaced whole, so a preset's reward never inherits options meant for another reward and
    a preset with ``variants`` defines exactly its own.

    Raises:
        ConfigError: a preset key the schema does not have, by dotted name.
    """
    return _merge(raw, preset, ExperimentConfig, "")


def _merge(base: Mapping[str, Any], over: Mapping[str, Any], model: type[BaseModel], prefix: str) -> dict[str, Any]:
    out = _deep_copy(base)
    for key, value in over.items():
        dotted = f"{prefix}{key}"
        if key not in model.model_fields:
            raise ConfigError(f"{dotted}: unknown key{_expected_keys(model)}")
        annotation = model.model_fields[key].annotation
        child = out.get(key)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(value, Mapping):
            out[key] = _merge(child if isinstance(child, Mapping) else {}, value, annotation, dotted + ".")
        else:
            out[key] = _deep_copy(value)
    return out


def config_from_dict(
    raw: Mapping[str, Any],
    *,
    source: str = "params",
    variant: str | None = None,
    overrides: Mapping[str, Any] | Sequence[str] = (),
    base_dir: str | Path = ".",
) -> ExperimentConfig:
    """Validate a nested mapping as :class:`ExperimentConfig` (see :func:`load_config`)."""
    try:
        data = dict(raw)
        if variant is not None:
            variants = data.get("variants") or {}
            if variant not in variants:
                known = ", ".join(sorted(variants)) or "none"
                raise ConfigError(f"variant {variant!r} is not defined under 'variants' (defined: {known})")
            data = apply_overrides(data, variants[variant] or {})
        data = apply_overrides(data, overrides)
        cfg = ExperimentConfig.model_validate(data)
        for name, spec in cfg.variants.items():
            try:
                ExperimentConfig.model_validate(apply_overrides({**data, "variants": {}}, spec or {}))
            except ConfigError as exc:
                raise ConfigError(f"variants.{name}: {exc}") from None
            except ValidationError as exc:
                raise ConfigError(f"variants.{name}: {_first_error(exc)}") from None
        _check_variant_lists(cfg, data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_first_error(exc)}") from None
    return _resolve_ablation_dirs(_resolve_tracking_uri(cfg, Path(base_dir)), Path(base_dir))


def _check_variant_lists(cfg: ExperimentConfig, data: Mapping[str, Any]) -> None:
    """``pipeline.variants`` and every study's ``variants`` and ``reference`` name defined
    variants; every study's settings are valid on each of its variants."""
    defined = ", ".join(cfg.variants) or "none"
    if DEFAULT_STUDY in cfg.studies:
        raise ConfigError(f"studies.{DEFAULT_STUDY}: reserved for the default study, the '{DEFAULT_STUDY}' section")
    lists = [("pipeline.variants", cfg.pipeline.variants)]
    studies = [(DEFAULT_STUDY, cfg.ablation), *((f"studies.{n}", s) for n, s in cfg.studies.items())]
    lists += [(f"{field}.variants", study.variants) for field, study in studies]
    for field, names in lists:
        for name in names:
            if name not in cfg.variants:
                raise ConfigError(f"{field}: {name!r} is not defined under 'variants' (defined: {defined})")
        if len(set(names)) != len(names):
            raise ConfigError(f"{field}: expected distinct names, got {names}")
    base = {**data, "variants": {}}
    for field, study in studies:
        if study.variants and study.reference not in study.variants:
            raise ConfigError(
                f"{field}.reference: expected one of {field}.variants ({', '.join(study.variants)}), got {study.reference!r}"
            )
        for name in study.variants:
            try:
                ExperimentConfig.model_validate(apply_overrides(apply_overrides(base, cfg.variants[name] or {}), study.override_list()))
            except ConfigError as exc:
                raise ConfigError(f"{field}.overrides: {exc}") from None
            except ValidationError as exc:
                raise ConfigError(f"{field}.overrides: {_first_error(exc)}") from None


def _resolve_ablation_dirs(cfg: ExperimentConfig, base_dir: Path) -> ExperimentConfig:
    # The study is launched from wherever a Prefect worker runs; its outputs belong next to the
    # params file that defines it.
    study = cfg.ablation
    dirs = {name: str((base_dir / getattr(study, name)).resolve()) for name in ("runs_dir", "reports_dir")}
    return cfg.model_copy(update={"ablation": study.model_copy(update=dirs)})


def _resolve_tracking_uri(cfg: ExperimentConfig, base_dir: Path) -> ExperimentConfig:
    # A relative sqlite path would follow the working directory, which differs inside
    # `dvc exp` temp copies; anchoring it to the params file keeps every run in one store.
    prefix = "sqlite:///"
    uri = cfg.tracking.uri
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        absolute = (base_dir / uri[len(prefix) :]).resolve()
        tracking = cfg.tracking.model_copy(update={"uri": prefix + str(absolute)})
        return cfg.model_copy(update={"tracking": tracking})
    return cfg


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key{_expected_keys(_section_at(err['loc'][:-1]))}"
    if err["type"] == "value_error":
        # Cross-field checks name their field first ("window_size: expected ...").
        field, _, rest = err["msg"].removeprefix("Value error, ").partition(": ")
        return f"{'.'.join(filter(None, (loc, field)))}: {rest}"
    got = err.get("input")
    got_text = "" if isinstance(got, dict) else f", got {got!r}"
    return f"{loc or '(top level)'}: {err['msg'].lower()}{got_text}"


def _expected_keys(model: type[BaseModel] | None) -> str:
    """``"; expected one of: a, b"``: the keys a section has, for an unknown-key message."""
    return f"; expected one of: {', '.join(model.model_fields)}" if model is not None else ""


def _section_at(loc: Sequence[Any]) -> type[BaseModel] | None:
    """The schema section at a validation error's location (``("sample",)``), or None."""
    model: Any = ExperimentConfig
    for part in loc:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        model = _unwrap_optional(field.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _parse_overrides(overrides: Mapping[str, Any] | Sequence[str]) -> list[tuple[str, Any]]:
    if isinstance(overrides, Mapping):
        return list(overrides.items())
    pairs = []
    for item in overrides:
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. credit.mode=incremental")
        try:
            value = parse_yaml(text) if text.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: value is not a valid YAML scalar") from None
        pairs.append((key.strip(), value))
    return pairs


def _deep_copy(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {k: _deep_copy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_deep_copy(v) for v in node]
    return node


def _flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
