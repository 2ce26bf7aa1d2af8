"""The README's diffusers snippet ("To use the trained LoRA elsewhere") gives the images the
project's evaluation gives, run verbatim in a repository laid out as `dvc repro` leaves it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tpgrpo.config import config_from_dict
from tpgrpo.data import load_prompt_set
from tpgrpo.evaluate import evaluate_prompts, save_images
from tpgrpo.models import build_tiny_sd3, save_pipeline
from tpgrpo.models.sd3 import SD3Adapter
from tpgrpo.pretrain import tiny_config
from tpgrpo.policy import load_model
from tpgrpo.rewards import reward_from_section
from tpgrpo.trainer import Trainer
from tpgrpo.world import VOCABULARY, write_prompt_sets

ROOT = Path(__file__).resolve().parents[1]
VARIANT = "tp_grpo"


def _snippet() -> str:
    """The first python block after "To use the trained LoRA elsewhere", verbatim."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("To use the trained LoRA elsewhere")
    match = re.compile(r"```python\n(.*?)```", re.S).search(readme, start)
    assert match, "README: no python block after 'To use the trained LoRA elsewhere'"
    return match.group(1)


def _shipped_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def _pipe_call(snippet: str) -> ast.Call:
    calls = [
        node
        for node in ast.walk(ast.parse(snippet))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "pipe"
    ]
    assert len(calls) == 1, "README snippet: expected one pipe(...) call"
    return calls[0]


def _constants(node: ast.AST) -> list:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant)]


def test_snippet_constants_are_the_shipped_evaluation_settings():
    """The snippet spells params.yaml's values out: a change there must come with the README's."""
    snippet = _snippet()
    cfg = config_from_dict(_shipped_params())
    keywords = {k.arg: k.value for k in _pipe_call(snippet).keywords}
    assert ast.literal_eval(keywords["num_inference_steps"]) == cfg.eval.num_steps
    assert ast.literal_eval(keywords["guidance_scale"]) == cfg.eval.guidance_scale
    assert ast.literal_eval(keywords["height"]) == ast.literal_eval(keywords["width"]) == cfg.model.resolution
    assert ast.unparse(keywords["generator"]) == f"torch.Generator('cpu').manual_seed({cfg.seed})"
    # The T5 length the project encodes with: model.max_sequence_length, or by default the
    # tokenizer's, here that of the base model tpgrpo pretrain builds.
    base = build_tiny_sd3(VOCABULARY, tiny_config(cfg.pretrain), seed=0)
    tokens = cfg.model.max_sequence_length or SD3Adapter(base).max_sequence_length
    assert ast.literal_eval(keywords["max_sequence_length"]) == tokens
    strings = set(_constants(ast.parse(snippet)))
    assert cfg.model.path in strings
    assert f"{cfg.runs_dir}/{VARIANT}/final" in strings and VARIANT in cfg.pipeline.variants
    assert f"{cfg.data.dir}/test.jsonl" in strings


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A repository as `dvc repro` leaves it, at the shipped settings: a base model (the
    pretraining architecture, untrained) in models/base, a LoRA exported by the trainer in
    runs/tp_grpo/final, and data/prompts/test.jsonl with more prompts than the snippet takes."""
    root = tmp_path_factory.mktemp("repo")
    params = _shipped_params()
    cfg = config_from_dict(params)
    save_pipeline(build_tiny_sd3(VOCABULARY, tiny_config(cfg.pretrain), seed=0), root / cfg.model.path)
    write_prompt_sets(root / cfg.data.dir, n_train=8, n_test=12, seed=0)
    params["tracking"]["uri"] = f"sqlite:///{root / 'mlflow.db'}"
    params["model"]["path"] = str(root / cfg.model.path)
    params["data"]["dir"] = str(root / cfg.data.dir)
    params["runs_dir"] = str(root / cfg.runs_dir)
    params["train"]["ema_decay"] = None  # export the weights set below, not an average
    cfg = config_from_dict(params)
    trainer = Trainer(cfg, variant=VARIANT)
    # LoRA starts at zero (B = 0); random B makes it change the images, so that a snippet that
    # does not load it fails.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in trainer.policy.transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)
    trainer.policy.save_final_weights(Path(cfg.runs_dir) / VARIANT / "final")
    return root, cfg


def _evaluation(cfg):
    """What `tpgrpo evaluate --variant tp_grpo` computes: the model as cmd_evaluate loads it,
    evaluate_prompts at the eval settings on the test prompts."""
    adapter = load_model(cfg, "cpu")
    adapter.pipe.transformer.load_lora_adapter(
        Path(cfg.runs_dir) / VARIANT / "final", weight_name="pytorch_lora_weights.safetensors", prefix="transformer"
    )
    e = cfg.eval
    return evaluate_prompts(
        adapter,
        load_prompt_set(Path(cfg.data.dir) / "test.jsonl"),
        reward_from_section(e.reward or cfg.reward),
        num_steps=e.num_steps,
        guidance_scale=e.guidance_scale,
        batch_size=e.batch_size,
        seed=cfg.seed,
        resolution=cfg.model.resolution,
    )


def _run(snippet: str, root: Path, monkeypatch) -> dict:
    monkeypatch.chdir(root)
    namespace: dict = {}
    exec(compile(snippet, "README.md snippet", "exec"), namespace)
    return namespace


def test_snippet_gives_the_evaluations_images(workspace, monkeypatch, tmp_path):
    root, cfg = workspace
    snippet = _snippet()
    images = _run(snippet, root, monkeypatch)["images"]  # [k, H, W, 3] floats, as diffusers returns them
    result = _evaluation(cfg)
    k = len(images)
    assert 1 <= k < len(result.scores)  # the evaluation draws noise for more prompts than the snippet
    expected = result.images[:k].permute(0, 2, 3, 1).numpy()
    assert images.shape == expected.shape
    assert np.abs(images - expected).max() < 1e-4

    # The files it writes match the evaluation's saved samples to the rounding of 1e-6 noise.
    written = sorted(root.glob(f"{VARIANT}_*.png"))
    saved = save_images(result, tmp_path / "eval_images")
    assert len(written) == k
    for mine, theirs in zip(written, saved):
        diff = np.abs(np.asarray(Image.open(mine), dtype=int) - np.asarray(Image.open(theirs), dtype=int))
        assert diff.max() <= 1

    # Without max_sequence_length (diffusers then pads T5 to 256 tokens) or without the LoRA the
    # images differ by far more: the comparison above can fail.
    for start in ("max_sequence_length=", "pipe.load_lora_weights("):
        line = re.compile(rf"^\s*{re.escape(start)}.*\n", re.M)
        assert len(line.findall(snippet)) == 1, start
        other = _run(line.sub("", snippet), root, monkeypatch)["images"]
        assert np.abs(other - expected).max() > 0.05, start
