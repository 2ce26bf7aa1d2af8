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
