"""Presets (configs/presets/*.yaml) and the memory options for large models.

Every preset loads and validates with both paper variants and sets exactly the values listed
here (the published TP-GRPO launch settings, with the project's deliberate differences), and the
README's preset table shows each of them; `tpgrpo train --preset ...` runs one epoch of a preset
shrunk to a tiny SD3 or FLUX pipeline through the CLI; a placeholder model path or a pipeline of
the wrong family fails with one line. The memory options give the same results
as without them on CPU: the text-embedding cache and offloading exactly, gradient checkpointing
to float rounding.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tpgrpo.cli import COMMANDS, main
from tpgrpo.config import config_from_dict, load_config, merge_preset, parse_yaml
from tpgrpo.errors import ConfigError, ModelLoadError
from tpgrpo.models import ManagedAdapter, TinyFluxConfig, build_tiny_flux, load_adapter, save_pipeline
from tpgrpo.rollout import RolloutConfig, rollout, rollout_config
from tpgrpo.trainer import Trainer
from tpgrpo.world import VOCABULARY

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
PRESETS = sorted((ROOT / "configs" / "presets").glob("*.yaml"))
PAPER_VARIANTS = ("flow_grpo", "tp_grpo")

README = ROOT / "README.md"

# Every value each preset sets, as it loads over params.yaml: the published TP-GRPO launch
# (YunzeTong/TurningPoint-GRPO: config/my_grpo.py *_fast_op3 over config/base.py, launched by
# scripts/multi_node/common_op3.sh on 32 GPUs, with the values scripts/my_train_*_fast_with_op3.py
# fix in code), except where marked. README "Presets" cites the source of each.
PUBLISHED_GPUS = 32
SD3_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
               "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
FLUX_TARGETS = [*SD3_TARGETS, "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
COMMON = {
    "seed": 42,
    "model.resolution": 512, "model.max_sequence_length": 128,
    "sample.window_start": 0, "sample.noise_level": 0.7, "sample.sampler": "cps", "sample.log_prob": None,
    "sample.completion": "ode", "sample.group_size": 24,
    "credit.consistent": True, "credit.first_step": True, "credit.balance": True, "credit.replace": True,
    "credit.eta": 1.0,
    "advantage.global_std": False, "advantage.clip_max": 5.0,
    "train.learning_rate": 3e-4, "train.adam_beta1": 0.9, "train.adam_beta2": 0.999, "train.weight_decay": 1e-4,
    "train.max_grad_norm": 1.0, "train.clip_range": 1e-5, "train.kl_beta": 1e-4, "train.inner_epochs": 1,
    "train.ema_decay": 0.9, "train.ema_every": 8,
    "eval.every": 20, "eval.num_prompts": None,
    # The paper's definitions, deliberately not the published code's (independent, trajectory,
    # process): params.yaml's tp_grpo_published variant switches to those.
    "sample.baseline_noise": "shared", "credit.balance_key": "aggregated", "credit.balance_scope": "batch",
    # Not published values: a training budget, memory options, the preset's own reward at evaluation.
    "train.epochs": 1000, "sample.cache_text_embeddings": True, "model.offload_vae": False, "eval.reward": None,
}
SD35M = {
    **COMMON,
    "model.path": "stabilityai/stable-diffusion-3.5-medium", "model.family": "sd3", "model.dtype": "float16",
    "model.offload_text_encoders": False,
    "sample.num_steps": 10, "sample.window_size": 9, "sample.guidance_scale": 4.5,
    "sample.batch_size": PUBLISHED_GPUS * 9, "sample.batches_per_epoch": 4, "sample.micro_batch_size": 9,
    "train.lora_rank": 32, "train.lora_alpha": 64.0, "train.lora_targets": SD3_TARGETS,
    "train.gradient_accumulation": 2, "train.micro_batch_size": 9, "train.mixed_precision": "fp16",
    "train.gradient_checkpointing": False,
    "eval.num_steps": 40, "eval.guidance_scale": 4.5, "eval.batch_size": 16,
}
EXPECTED: dict[str, dict[str, Any]] = {
    "sd35m_pickscore": {**SD35M, "data.dir": "/data/prompts/pickscore", "reward.name": "pickscore", "reward.options": {}},
    "sd35m_ocr": {**SD35M, "data.dir": "/data/prompts/ocr", "reward.name": "ocr", "reward.options": {}},
    "sd35m_geneval": {
        **SD35M, "data.dir": "/data/prompts/geneval", "reward.name": "remote",
        "reward.options.url": "http://127.0.0.1:8000/geneval", "reward.options.timeout": 300, "eval.batch_size": 14,
    },
    "flux1dev_pickscore": {
        **COMMON,
        "model.path": "black-forest-labs/FLUX.1-dev", "model.family": "flux", "model.dtype": "bfloat16",
        "model.offload_text_encoders": True,
        "data.dir": "/data/prompts/pickscore",
        "sample.num_steps": 6, "sample.window_size": 5, "sample.guidance_scale": 3.5,
        "sample.batch_size": PUBLISHED_GPUS * 3, "sample.batches_per_epoch": 12, "sample.micro_batch_size": 3,
        "train.lora_rank": 64, "train.lora_alpha": 128.0, "train.lora_targets": FLUX_TARGETS,
        "train.gradient_accumulation": 6, "train.micro_batch_size": 3, "train.mixed_precision": "bf16",
        "train.gradient_checkpointing": True,
        "reward.name": "pickscore", "reward.options": {},
        "eval.num_steps": 28, "eval.guidance_scale": 3.5, "eval.batch_size": 16,
    },
}
# The three definitions where the presets keep the paper's reading, and the published code's.
PUBLISHED_SWITCHES = {"sample.baseline_noise": "independent", "credit.balance_key": "trajectory",
                      "credit.balance_scope": "process"}


def _flatten(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A preset file's values by dotted name (an empty mapping is a value), as cfg.flat() names them."""
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _readme_table() -> tuple[list[str], dict[str, list[str]]]:
    """The README's per-field preset table: its preset columns, and each row's cells by field."""
    text = README.read_text()
    section = text[text.index("### Presets\n") : text.index("\n## ", text.index("### Presets\n"))]
    lines = [line for line in section.splitlines() if line.startswith("| field |")]
    assert len(lines) == 1, "README 'Presets': expected one table whose header starts with '| field |'"
    rows = section[section.index(lines[0]) :].split("\n\n")[0].splitlines()

    def cells(line: str) -> list[str]:
        return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]

    header = cells(rows[0])
    assert header[-2:] == ["published", "source"], header
    presets = [c.strip("`") for c in header[1:-2]]
    table = {}
    for row in rows[2:]:
        parts = cells(row)
        assert len(parts) == len(header), row
        assert parts[0].strip("`") not in table, f"README 'Presets': {parts[0]} has two rows"
        table[parts[0].strip("`")] = parts[1:]
    return presets, table


def _same(a: Any, b: Any) -> bool:
    """Equal, and not a bool standing for a number (True == 1) or the reverse."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _code(cell: str) -> Any:
    """The value of a table cell: its first `code span`, read as YAML (as --set reads values)."""
    match = re.search(r"`([^`]*)`", cell)
    assert match, f"expected a `value` in {cell!r}"
    return parse_yaml(match.group(1))


def _preset(name: str) -> Path:
    return ROOT / "configs" / "presets" / f"{name}.yaml"


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change once set; the
    presets' bf16 needs a fresh one, and later tests get theirs back."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_pipe) -> Path:
    """Tiny SD3 and FLUX pipelines and a prompt set written by `tpgrpo prepare`."""
    root = tmp_path_factory.mktemp("presets")
    save_pipeline(tiny_pipe, root / "sd3")
    save_pipeline(build_tiny_flux(VOCABULARY, TinyFluxConfig(image_size=32), seed=0), root / "flux")
    prepare = ["prepare", "--params", str(PARAMS), "--preset", str(_preset("sd35m_pickscore"))]
    for item in (f"data.dir={root / 'prompts'}", "data.num_train=8", "data.num_test=2"):
        prepare += ["--set", item]
    assert main(prepare) == 0
    return root


def _tiny(root: Path, model: str, runs: str) -> list[str]:
    """--set arguments shrinking a preset to seconds on CPU (32 px, 2 steps, 2 batches of 2 groups
    of 2 and still 2 optimizer steps an epoch, LoRA rank 2, 2 evaluation prompts, a dense test
    reward); everything else — dtype, mixed precision, T5 tokens, sampler, micro-batches, LoRA
    targets, EMA, memory options — stays the preset's."""
    items = [
        f"model.path={root / model}", "model.resolution=32", f"data.dir={root / 'prompts'}",
        f"runs_dir={root / runs}", f"tracking.uri=sqlite:///{root / runs / 'mlflow.db'}",
        "sample.num_steps=2", "sample.window_size=1", "sample.batch_size=4", "sample.group_size=2",
        "sample.batches_per_epoch=2", "train.gradient_accumulation=1",
        "train.epochs=1", "train.lora_rank=2", "train.lora_alpha=4",
        "eval.num_steps=2", "eval.num_prompts=2", "eval.batch_size=2",
        "reward.name=brightness", "reward.options={}",
    ]
    return [arg for item in items for arg in ("--set", item)]


# --- loading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_loads_with_both_paper_variants(preset: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load(preset.read_text())
    expected = EXPECTED[preset.stem]
    # The test asserts every value the preset sets, and nothing it leaves to params.yaml.
    assert set(_flatten(raw)) == set(expected), "the preset and EXPECTED name different values"
    for variant in PAPER_VARIANTS:
        cfg = load_config(PARAMS, preset=preset, variant=variant)
        flat = cfg.flat()
        for key, value in expected.items():
            assert _same(flat[key], value), (preset.stem, variant, key, flat[key])
        # What the values add up to, as published: 48 groups of 24 an epoch, two optimizer steps
        # an epoch, a rollout batch of 32 GPUs' per-GPU batches, which is also the micro-batch.
        s, t = cfg.sample, cfg.train
        assert s.batches_per_epoch / t.gradient_accumulation == 2
        assert s.batch_size * s.batches_per_epoch == 48 * s.group_size
        assert s.batch_size == PUBLISHED_GPUS * s.micro_batch_size == PUBLISHED_GPUS * t.micro_batch_size
        assert cfg.advantage.global_std is False
        assert cfg.credit.mode == ("outcome" if variant == "flow_grpo" else "turning_point")
        # Evaluation scores the preset's own reward, not the embedded world's strict check, which
        # needs shape-world metadata that real prompt sets do not have.
        assert cfg.eval.reward is None
    # A local copy of the model is one override away.
    cfg = load_config(PARAMS, preset=preset, variant="tp_grpo", overrides=[f"model.path={tmp_path}"])
    assert cfg.model.path == str(tmp_path)


def test_readme_preset_table_shows_what_each_preset_loads() -> None:
    presets, table = _readme_table()
    assert sorted(presets) == [p.stem for p in PRESETS]  # a column for every preset
    fixed = {name: _flatten(yaml.safe_load(_preset(name).read_text())) for name in presets}
    # One row for every value some preset sets, and no other rows.
    assert set(table) == set().union(*fixed.values())
    for name in presets:
        flat = load_config(PARAMS, preset=_preset(name)).flat()
        for key, cells in table.items():
            cell = cells[presets.index(name)]
            if cell == "—":
                assert key not in fixed[name], f"README shows {name} {key} as not set"
            else:
                assert key in fixed[name], f"README shows {name} {key}, which the preset does not set"
                value = _code(cell)
                assert _same(value, flat[key]), (name, key, cell, flat[key])
    # The three definitions that differ show the published code's beside the preset's.
    for key, published in PUBLISHED_SWITCHES.items():
        assert _code(table[key][-2]) == published, key


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_tp_grpo_published_variant_switches_a_preset_to_the_published_definitions(preset: Path) -> None:
    paper = load_config(PARAMS, preset=preset, variant="tp_grpo").flat()
    published = load_config(PARAMS, preset=preset, variant="tp_grpo_published").flat()
    for key, value in PUBLISHED_SWITCHES.items():
        assert (paper[key], published[key]) == (EXPECTED[preset.stem][key], value), key
    assert {k for k in paper if paper[k] != published[k]} == set(PUBLISHED_SWITCHES)


def test_presets_merge_sections_and_replace_free_form_mappings() -> None:
    base = {"sample": {"num_steps": 10, "window_size": 9}, "reward": {"name": "verifiable", "options": {"soft": True}},
            "variants": {"a": {"credit.mode": "outcome"}, "b": {}}}
    merged = merge_preset(base, {"sample": {"num_steps": 6}, "reward": {"name": "pickscore", "options": {"path": "x"}},
                                 "variants": {"c": {}}})
    assert merged["sample"] == {"num_steps": 6, "window_size": 9}
    # Options belong to the named reward, and a preset's variants are the whole set.
    assert merged["reward"] == {"name": "pickscore", "options": {"path": "x"}}
    assert merged["variants"] == {"c": {}}
    assert base["sample"]["num_steps"] == 10  # the input is left untouched
    with pytest.raises(ConfigError, match=r"^sample\.num_stepz: unknown key"):
        merge_preset(base, {"sample": {"num_stepz": 3}})


def test_preset_errors_are_one_line_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=f"^{missing}: preset file not found$"):
        load_config(PARAMS, preset=missing)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  lora_rnk: 4\n")
    with pytest.raises(ConfigError, match=f"^{unknown}: train.lora_rnk: unknown key"):
        load_config(PARAMS, preset=unknown)
    bad = tmp_path / "bad.yaml"
    bad.write_text("sample:\n  window_size: 12\n")
    with pytest.raises(ConfigError, match=f"^{PARAMS} \\+ {bad}: sample.window_size: expected window_start"):
        load_config(PARAMS, preset=bad)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_takes_a_preset(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0 and "--preset FILE" in capsys.readouterr().out


def test_cli_preset_errors_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--params", str(PARAMS), "--preset", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err == f"tpgrpo check: error: {tmp_path / 'nope.yaml'}: preset file not found\n"
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  famly: flux\n")
    assert main(["train", "--params", str(PARAMS), "--preset", str(unknown)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tpgrpo train: error: {unknown}: model.famly: unknown key") and err.count("\n") == 1


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_placeholder_model_path_fails_before_any_run(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The preset with a local model path that is not there (its own is a hub id).
    preset = tmp_path / "sd35m_pickscore.yaml"
    preset.write_text(_preset("sd35m_pickscore").read_text().replace(
        "path: stabilityai/stable-diffusion-3.5-medium", "path: /data/models/sd3.5-medium"))
    args = [command, "--params", str(PARAMS), "--preset", str(preset), "--set", f"runs_dir={tmp_path / 'runs'}",
            "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == (
        f"tpgrpo {command}: error: model.path: /data/models/sd3.5-medium: no such pipeline directory "
        f"(set by {preset}; override with --set model.path=DIR)\n"
    )
    assert main([*args, "--set", f"model.path={tmp_path / 'gone'}"]) == 2
    err = capsys.readouterr().err
    assert f"model.path: {tmp_path / 'gone'}: no such pipeline directory (set by --set model.path;" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


# --- training through the CLI -------------------------------------------------------------------


@pytest.mark.parametrize("variant", PAPER_VARIANTS)
def test_sd35m_preset_trains_one_epoch_on_a_tiny_sd3(
    variant: str, workspace: Path, fresh_accelerate_state, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors import safe_open

    args = ["train", "--params", str(PARAMS), "--preset", str(_preset("sd35m_pickscore")), "--variant", variant]
    assert main([*args, *_tiny(workspace, "sd3", f"runs-sd3-{variant}")]) == 0
    assert f"{variant}: 1 epoch in " in capsys.readouterr().out
    run = workspace / f"runs-sd3-{variant}" / variant
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 1
    # The preset's float16 model (fp16 mixed precision) trains float32 LoRA weights.
    with safe_open(run / "final" / "pytorch_lora_weights.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
        assert any(".add_q_proj." in k for k in f.keys())  # the preset's LoRA targets


def test_flux_preset_trains_one_epoch_on_a_tiny_flux(workspace: Path, fresh_accelerate_state) -> None:
    args = ["train", "--params", str(PARAMS), "--preset", str(_preset("flux1dev_pickscore")), "--variant", "tp_grpo"]
    from safetensors import safe_open

    assert main([*args, *_tiny(workspace, "flux", "runs-flux")]) == 0
    run = workspace / "runs-flux" / "tp_grpo"
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 1
    # The published FLUX targets reach the feed-forwards of both streams and the single blocks.
    with safe_open(run / "final" / "pytorch_lora_weights.safetensors", "pt") as f:
        for part in (".ff.net.0.proj.", ".ff_context.net.2.", ".add_q_proj.", "single_transformer_blocks.0.attn.to_q."):
            assert any(part in k for k in f.keys()), part


def test_a_preset_of_the_wrong_family_fails_before_any_run(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "--params", str(PARAMS), "--preset", str(_preset("sd35m_pickscore"))]
    assert main([*args, *_tiny(workspace, "flux", "runs-wrong")]) == 2
    assert capsys.readouterr().err == (
        f"tpgrpo train: error: model.family: expected flux for FluxPipeline at {workspace / 'flux'}, got sd3\n"
    )
    assert not (workspace / "runs-wrong").exists()
    # The trainer checks it too (Prefect flows do not go through the CLI).
    with pytest.raises(ModelLoadError, match="^model.family: expected sd3 for StableDiffusion3Pipeline at"):
        Trainer(_cfg(workspace, "runs-wrong", **{"model.family": "flux"}), variant="v")


# --- memory options ------------------------------------------------------------------------------


def _cfg(root: Path, runs: str, **overrides):
    raw = {
        "seed": 3,
        "runs_dir": str(root / runs),
        "model": {"path": str(root / "sd3"), "resolution": 32},
        "data": {"dir": str(root / "prompts")},
        "sample": {"num_steps": 3, "window_start": 0, "window_size": 2, "guidance_scale": 2.0,
                   "batch_size": 4, "group_size": 2, "batches_per_epoch": 1},
        "train": {"epochs": 1, "learning_rate": 1e-2, "clip_range": 0.2, "lora_rank": 2},
        "eval": {"every": 1, "num_steps": 2, "batch_size": 2},
        "reward": {"name": "brightness"},
        "tracking": {"uri": f"sqlite:///{root / runs / 'mlflow.db'}"},
    }
    return config_from_dict(raw, overrides=[f"{k}={v}" for k, v in overrides.items()])


PROMPTS = ["a red circle", "a red circle", "two blue squares", "two blue squares"]
ROLLOUT = RolloutConfig(num_steps=3, window_size=2, guidance_scale=2.0, height=32, width=32)


def _counting(adapter) -> list[list[str]]:
    """Record the prompts of every call to ``adapter.encode_prompts``."""
    calls: list[list[str]] = []
    encode = adapter.encode_prompts

    def spy(prompts, guidance_scale):
        calls.append(list(prompts))
        return encode(prompts, guidance_scale)

    adapter.encode_prompts = spy
    return calls


def _rollout(adapter, seed: int = 0):
    return rollout(adapter, PROMPTS, ROLLOUT, generator=torch.Generator().manual_seed(seed))


def _assert_identical(a, b) -> None:
    for name in ("images", "completion_images", "latents", "log_probs"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_text_embedding_cache_gives_identical_rollouts(tiny_pipe) -> None:
    inner = load_adapter(tiny_pipe)
    calls = _counting(inner)
    plain = _rollout(ManagedAdapter(inner, "cpu"))
    assert calls == [["a red circle"], ["two blue squares"]]  # one encoding per distinct prompt
    calls.clear()
    cached = ManagedAdapter(inner, "cpu", cache_size=8)
    first, second = _rollout(cached), _rollout(cached)
    assert calls == [["a red circle"], ["two blue squares"]]  # the second rollout encodes nothing
    _assert_identical(first, plain)
    _assert_identical(second, plain)
    # A cache smaller than a batch evicts as it goes and still returns exact embeddings.
    _assert_identical(_rollout(ManagedAdapter(inner, "cpu", cache_size=1)), plain)
    # The empty negative prompt is stored once for all prompts.
    entries = list(cached._cache.values())
    assert entries[0].negative_prompt_embeds is entries[1].negative_prompt_embeds
    # Per-prompt encoding differs from diffusers' batch encoding by float rounding only.
    batch = _rollout(load_adapter(tiny_pipe))
    torch.testing.assert_close(plain.images, batch.images, rtol=0, atol=1e-5)


def test_offloading_moves_modules_only_around_their_use(tiny_pipe) -> None:
    inner = load_adapter(tiny_pipe)
    reference = _rollout(ManagedAdapter(inner, "cpu"))
    adapter = ManagedAdapter(inner, "cpu", offload_text_encoders=True, offload_vae=True)
    moves: list[tuple[str, str]] = []
    names = ["text_encoder", "text_encoder_2", "text_encoder_3", "vae", "transformer"]
    for name in names:
        module = getattr(tiny_pipe, name)
        original = module.to

        def to(*args, _name=name, _original=original, **kwargs):
            moves.append((_name, str(args[0] if args else kwargs["device"])))
            return _original(*args, **kwargs)

        module.to = to
    try:
        adapter.encode_prompts(PROMPTS, 2.0)
        encode_moves = list(moves)
        moves.clear()
        adapter.decode(reference.latents[:, -1])
        decode_moves = list(moves)
        moves.clear()
        result = _rollout(adapter)  # on a CPU-only machine the moves change nothing
    finally:
        for name in names:
            del getattr(tiny_pipe, name).to
    assert encode_moves == [(n, "cpu") for n in names[:3]] * 2  # to the device, then back
    assert decode_moves == [("vae", "cpu")] * 2
    assert all(name != "transformer" for name, _ in moves)
    _assert_identical(result, reference)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(workspace: Path) -> None:
    results = []
    for checkpointing in (False, True):
        cfg = _cfg(workspace, f"runs-gc-{checkpointing}", **{"train.gradient_checkpointing": checkpointing})
        trainer = Trainer(cfg, variant="v")
        assert trainer.policy.transformer.is_gradient_checkpointing is checkpointing
        ro = rollout(trainer.policy.adapter, PROMPTS, rollout_config(trainer.cfg), generator=torch.Generator().manual_seed(0))
        rows = torch.arange(len(PROMPTS))
        block_calls = []
        # A pre-hook: the recomputation stops early, once it has what the backward needs.
        hook = trainer.policy.transformer.transformer_blocks[0].register_forward_pre_hook(lambda *_: block_calls.append(1))
        trainer.policy.ddp_transformer.train()
        out = trainer.updater.step_loss(ro, rows, 1, ro.embeds, torch.tensor([1.0, -0.5, 0.25, -1.0]))
        out.loss.backward()
        hook.remove()
        grads = {n: p.grad.clone() for n, p in trainer.policy.trainable.items() if p.grad is not None}
        results.append((out.loss.detach(), grads, len(block_calls)))
    (loss_a, grads_a, calls_a), (loss_b, grads_b, calls_b) = results
    assert (calls_a, calls_b) == (1, 2)  # checkpointing recomputes the block in the backward pass
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and any(g.abs().sum() > 0 for g in grads_a.values())
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_memory_options_train_like_without_them(workspace: Path) -> None:
    options = {"sample.cache_text_embeddings": True, "model.offload_text_encoders": True,
               "model.offload_vae": True, "train.gradient_checkpointing": True}
    plain = Trainer(_cfg(workspace, "runs-mem-off"), variant="v")
    managed = Trainer(_cfg(workspace, "runs-mem-on", **options), variant="v")
    a, b = plain.fit(), managed.fit()
    # Rollouts (before the update) are exact; the update differs by checkpointing's rounding.
    assert a.history[0]["reward/mean"] == b.history[0]["reward/mean"]
    after_a, after_b = plain.policy.trainable_state(), managed.policy.trainable_state()
    for name in after_a:
        torch.testing.assert_close(after_b[name], after_a[name], rtol=0, atol=1e-6, msg=name)
    assert b.eval_reward_final == pytest.approx(a.eval_reward_final, abs=1e-5)


def test_mixed_precision_keeps_trainable_weights_float32(workspace: Path, fresh_accelerate_state) -> None:
    cfg = _cfg(workspace, "runs-bf16", **{"model.dtype": "bfloat16", "train.mixed_precision": "bf16"})
    trainer = Trainer(cfg, variant="v")
    assert trainer.acc.mixed_precision == "bf16"
    assert {p.dtype for p in trainer.policy.trainable.values()} == {torch.float32}
    assert trainer.policy.transformer.proj_out.weight.dtype == torch.bfloat16
    assert trainer.fit().epochs == 1
