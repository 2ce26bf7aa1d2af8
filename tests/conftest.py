"""Shared test setup: no telemetry, no hub access."""

from __future__ import annotations

import os

for _key, _value in {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_OFFLINE": "1",
}.items():
    os.environ.setdefault(_key, _value)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipe():
    """A randomly initialised tiny SD3 pipeline (32 px), built once per session."""
    from tpgrpo.models import TinySD3Config, build_tiny_sd3
    from tpgrpo.world import VOCABULARY

    return build_tiny_sd3(VOCABULARY, TinySD3Config(image_size=32), seed=0)


def brightness_reward():
    """A dense test reward (mean intensity, a detail per channel): a random tiny model scores ~0
    on the verifiable reward, which would leave every group with zero variance."""
    from tpgrpo.rewards import RewardOutput

    def score(images, prompts, metadata):
        return RewardOutput(
            scores=images.mean(dim=(1, 2, 3)),
            details={"red": images[:, 0].mean(dim=(1, 2)), "blue": images[:, 2].mean(dim=(1, 2))},
        )

    return score


def pytest_configure(config):
    from tpgrpo.rewards import register_reward

    register_reward("brightness", brightness_reward, overwrite=True)


def tiny_workspace(root, pipe, **sections):
    """Write a tiny pipeline, prompt sets and a params file under ``root``; return the params path.

    The params are the shipped params.yaml shrunk to seconds (3 steps, window 2, batches of 4 in
    groups of 2, one batch per epoch, LoRA rank 2, MLflow in ``root``); ``sections`` update it,
    e.g. ``train={"epochs": 1}``.
    """
    from pathlib import Path

    import yaml

    from tpgrpo.models import save_pipeline
    from tpgrpo.world import write_prompt_sets

    root = Path(root)
    save_pipeline(pipe, root / "base")
    write_prompt_sets(root / "prompts", n_train=16, n_test=4, seed=0)
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params.update(runs_dir=str(root / "runs"))
    params["model"].update(path=str(root / "base"), resolution=32)
    params["data"].update(dir=str(root / "prompts"))
    params["sample"].update(num_steps=3, window_size=2, batch_size=4, group_size=2, batches_per_epoch=1)
    params["train"].update(lora_rank=2)
    params["eval"].update(num_steps=2)
    params["tracking"].update(uri=f"sqlite:///{root / 'mlflow.db'}")
    if "reward" in sections:
        # A test's reward replaces the shipped one, options included, and is what evaluation scores.
        params["reward"] = {"options": {}, **sections.pop("reward")}
        params["eval"]["reward"] = None
    for name, values in sections.items():
        params[name].update(values)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def trainer_workspace(tmp_path_factory, tiny_pipe):
    """The tiny pipeline saved as a base model, and prompt sets of 32 train / 4 test prompts: what
    the trainer tests of one module train on (their runs go to directories of their own)."""
    from tpgrpo.models import save_pipeline
    from tpgrpo.world import write_prompt_sets

    root = tmp_path_factory.mktemp("trainer")
    save_pipeline(tiny_pipe, root / "base")
    write_prompt_sets(root / "prompts", n_train=32, n_test=4, seed=0)
    return root


def trainer_config(root, runs: str, sections: dict | None = None, **overrides):
    """A config that trains on ``trainer_workspace`` in seconds (4 steps, window 3, batches of 4
    in groups of 2, two batches an epoch, LoRA rank 2, the brightness reward) into ``root/runs``;
    ``sections`` update it section by section, then ``overrides`` apply as dotted ``--set``s."""
    from tpgrpo.config import config_from_dict

    raw = {
        "seed": 3,
        "runs_dir": str(root / runs),
        "model": {"path": str(root / "base"), "resolution": 32},
        "data": {"dir": str(root / "prompts")},
        "sample": {
            "num_steps": 4, "window_start": 0, "window_size": 3, "guidance_scale": 2.0,
            "batch_size": 4, "group_size": 2, "batches_per_epoch": 2,
        },
        "train": {"epochs": 2, "learning_rate": 1e-2, "clip_range": 0.2, "lora_rank": 2, "kl_beta": 0.1},
        "eval": {"every": 1, "num_steps": 4, "batch_size": 4},
        "reward": {"name": "brightness"},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"},
    }
    for name, values in (sections or {}).items():
        if isinstance(values, dict):
            raw.setdefault(name, {}).update(values)
        else:
            raw[name] = values
    return config_from_dict(raw, overrides=[f"{k}={v}" for k, v in overrides.items()])
