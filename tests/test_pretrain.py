"""Pre-training of the tiny base model: a very short run end to end, plus the pieces."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image

from tpgrpo import world
from tpgrpo.config import EvalSection, config_from_dict
from tpgrpo.errors import ConfigError
from tpgrpo.models import build_tiny_sd3
from tpgrpo.pretrain import (
    METRICS_FILE,
    PretrainConfig,
    PretrainResult,
    _zero_init,
    encode_text_table,
    pretrain,
    tiny_config,
    train_vae,
)

# A handful of steps on a tiny dataset: exercises every stage in a few seconds.
TINY = PretrainConfig(
    image_size=32,
    num_train_images=128,
    vae_steps=30,
    vae_batch_size=16,
    vae_test_images=16,
    transformer_steps=40,
    batch_size=16,
    warmup_steps=5,
    eval_prompts=8,
)
TINY_EVAL = EvalSection(num_steps=4, batch_size=8)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> PretrainResult:
    return pretrain(tmp_path_factory.mktemp("pretrain") / "base", TINY, seed=0, evaluation=TINY_EVAL, progress=False)


def test_saved_pipeline_loads_with_plain_from_pretrained(tiny_run):
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_run.path, local_files_only=True)
    assert pipe.text_encoder_3 is not None
    assert pipe.vae.config.sample_size == 32
    # the measured latent statistics, not the placeholders of the untrained VAE
    assert pipe.vae.config.scaling_factor == pytest.approx(tiny_run.scaling_factor)
    assert pipe.vae.config.shift_factor == pytest.approx(tiny_run.shift_factor)
    assert pipe.vae.config.scaling_factor != 1.0 and pipe.vae.config.shift_factor != 0.0


def test_latent_convention_normalises_training_latents(tiny_run):
    """Encoding with the saved VAE and ``(z - shift) * scaling`` gives zero-mean, unit-std latents,
    the convention the pipeline's decode (``latents / scaling + shift``) inverts."""
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_run.path, local_files_only=True)
    batch = world.sample_training_batch(64, 32, rng=123)
    with torch.no_grad():
        z = pipe.vae.encode(batch.images * 2 - 1).latent_dist.mode()
    scaled = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    assert abs(float(scaled.mean())) < 0.3
    assert float(scaled.std()) == pytest.approx(1.0, abs=0.3)


def test_losses_decrease(tiny_run):
    vae, tr = tiny_run.vae_losses, tiny_run.transformer_losses
    assert len(vae) == TINY.vae_steps and len(tr) == TINY.transformer_steps
    assert all(math.isfinite(x) for x in vae + tr)
    assert sum(vae[-5:]) / 5 < sum(vae[:5]) / 5
    assert sum(tr[-10:]) / 10 < sum(tr[:10]) / 10


def test_result_metrics(tiny_run):
    assert 0.0 <= tiny_run.reward_base <= 1.0 and 0.0 <= tiny_run.reward_untrained <= 1.0
    assert set(tiny_run.reward_details) == {"color", "count", "shape", "position", "background"}
    assert tiny_run.num_eval_prompts == TINY.eval_prompts
    assert tiny_run.vae_test_mse > 0 and tiny_run.seconds_vae > 0 and tiny_run.seconds_transformer > 0
    saved = json.loads((tiny_run.path / METRICS_FILE).read_text())
    assert saved["config"]["transformer_steps"] == TINY.transformer_steps
    assert saved["eval"]["num_steps"] == TINY_EVAL.num_steps and saved["reward"]["name"] == "verifiable"
    assert saved["metrics"]["reward_base"] == pytest.approx(tiny_run.reward_base)


def test_cli_base_reward_is_the_training_runs_epoch_0_reward(tmp_path, capsys):
    """`tpgrpo pretrain` evaluates as the trainer does (eval section, seed, eval reward): its
    reward_base is the trainer's evaluation of the same model before any update."""
    import yaml

    from tpgrpo.cli import main
    from tpgrpo.config import load_config
    from tpgrpo.trainer import Trainer

    world.write_prompt_sets(tmp_path / "prompts", n_train=8, n_test=6, seed=0)
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params.update(seed=7, runs_dir=str(tmp_path / "runs"))
    params["model"]["path"] = str(tmp_path / "base")
    params["data"]["dir"] = str(tmp_path / "prompts")
    params["pretrain"].update(TINY.model_dump(exclude={"eval_prompts"}))
    params["sample"].update(num_steps=3, window_size=2, batch_size=4, group_size=2, batches_per_epoch=1)
    params["train"].update(lora_rank=2)
    # A dense reward, a sampler and batches unlike the defaults: a setting pretrain did not take
    # from the eval section would change the number.
    params["eval"].update(
        num_steps=3, guidance_scale=3.0, batch_size=4, num_prompts=5, heldin_prompts=0,
        reward={"name": "brightness", "options": {}},
    )  # fmt: skip
    params["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))

    assert main(["pretrain", "--params", str(path), "--report", str(tmp_path / "base_model.json")]) == 0
    # Off a terminal, progress is whole lines (a log file of `make demo` has no bar redraws).
    err = capsys.readouterr().err
    assert "\r" not in err and "pretrain transformer: " in err and "(100%)" in err, err
    reward_base = json.loads((tmp_path / "base_model.json").read_text())["reward_base"]
    epoch_0 = Trainer(load_config(path), variant="tp_grpo").evaluate(0)
    assert reward_base == pytest.approx(epoch_0.reward, rel=1e-6)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("vae_steps", 0),
        ("transformer_steps", 0),
        ("batch_size", -1),
        ("num_train_images", 0),
        ("lr", 0.0),
        ("caption_dropout", 1.5),
        ("ema_decay", 1.0),
        ("eval_prompts", 0),
        ("vae_steps", 2.5),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"^params: pretrain\.{field}: "):
        config_from_dict({"pretrain": {field: value}})


def test_bad_model_size_is_rejected():
    with pytest.raises(ConfigError, match="pretrain.image_size: input should be a multiple of 16"):
        config_from_dict({"pretrain": {"image_size": 36}})


def test_empty_test_prompts_rejected(tmp_path):
    with pytest.raises(ValueError, match="test_prompts"):
        pretrain(tmp_path / "x", TINY, test_prompts=[], progress=False)


def test_train_vae_is_deterministic():
    cfg = PretrainConfig(vae_steps=3, vae_batch_size=4)
    images = (world.sample_training_batch(8, 32, rng=0).images * 255).round().to(torch.uint8)
    runs = []
    for _ in range(2):
        pipe = build_tiny_sd3(world.VOCABULARY, tiny_config(cfg), seed=1)
        runs.append(train_vae(pipe.vae, images, cfg, torch.Generator().manual_seed(5)))
    assert runs[0] == runs[1]


def test_zero_init_gives_zero_velocity():
    cfg = PretrainConfig()
    pipe = build_tiny_sd3(world.VOCABULARY, tiny_config(cfg), seed=0)
    _zero_init(pipe.transformer)
    text = encode_text_table(pipe, ["a red circle", "two blue squares", "a red circle"])
    assert text.embeds.shape[0] == 3  # two distinct prompts + the empty one
    assert text.index.tolist() == [0, 1, 0]
    x = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        v = pipe.transformer(
            hidden_states=x,
            timestep=torch.full((3,), 500.0),
            encoder_hidden_states=text.embeds[text.index],
            pooled_projections=text.pooled[text.index],
            return_dict=False,
        )[0]
    assert torch.count_nonzero(v) == 0


def test_base_evaluation_is_kept_for_the_grid(tiny_run, tmp_path):
    from tpgrpo.evaluate import save_grid

    ev = tiny_run.evaluation
    assert ev.reward == pytest.approx(tiny_run.reward_base)
    assert ev.scores.shape == (tiny_run.num_eval_prompts,)
    image = Image.open(save_grid(ev, tmp_path / "grid.png", columns=4))
    # 8 samples of 32 px upscaled 6x, 4 px padding, a score line and 3 caption lines of 16 px, 4 columns
    assert image.size == (4 * (192 + 8), 2 * (192 + 4 * 16 + 8))


@pytest.mark.slow
def test_same_seed_reproduces_the_model_whatever_the_evaluation(tiny_run, tmp_path):
    """The evaluation runs after the model is saved, from a generator of its own: other
    evaluation settings and prompts leave the weights as they were."""
    other = EvalSection(num_steps=2, guidance_scale=1.0, batch_size=3)
    prompts = [s.to_dict() for s in world.sample_prompts(5, 9, "test")]
    again = pretrain(tmp_path / "again", TINY, seed=0, evaluation=other, test_prompts=prompts, progress=False)
    assert again.num_eval_prompts == 5
    assert again.transformer_losses == tiny_run.transformer_losses
    assert again.scaling_factor == tiny_run.scaling_factor
    a = StableDiffusion3Pipeline.from_pretrained(tiny_run.path, local_files_only=True).transformer.state_dict()
    b = StableDiffusion3Pipeline.from_pretrained(again.path, local_files_only=True).transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
