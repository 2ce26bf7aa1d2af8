"""End to end: GRPO training moves a reward the policy can move, in the direction of the reward.

The tiny random pipeline's images all have a brightness near 0.48 with a spread of ~0.002
between samples, so one training run's change in brightness is a small signal on top of a
drift that any sizeable weight update causes. The test therefore trains twice from the same
start, seed and noise: once on ``brightness`` and once on ``darkness`` (its negative), and
compares the two runs' ODE evaluations of brightness on the same fixed noise. The drift is
common to both runs and cancels; the learned, reward-directed part does not.

Measured (full fine-tuning, lr 3e-3, 4 epochs of one 32-trajectory batch in groups of 4;
eval = mean brightness of the 4 test prompts on fixed noise, 3 ODE steps):

    the eval metric's own seed noise (the untrained model, seeds 1-7): sd 0.0012
    one run's gain, trained on brightness (outcome, seeds 1-7): +0.0023 .. +0.0098, mean +0.0064
    one run's gain, trained on darkness (outcome, seeds 1-7):   -0.0132 .. -0.0011
    common drift (bright + dark) / 2, seeds 1-7:                sd 0.0025
    paired difference bright - dark, outcome, seeds 1-7:        0.0069 .. 0.0206, mean 0.0122, sd 0.005
    paired difference bright - dark, turning_point, seeds 1,2,6: 0.0089, 0.0291, 0.0172
    the same with the advantage negated in the loss:            the negative of the above

The margin, 0.004, is 3x the eval's seed noise and 1.6x the run-to-run drift's sd, below the
smallest paired difference seen (0.0069); with the update's direction broken (the advantage
negated in tpgrpo/loss.py) the paired difference is about -0.012 and the test fails. The
training reward (history 'reward/mean', fresh samples each epoch, mean of the last two epochs)
moved the same way in every seed (bright - dark: 0.0056 .. 0.022) and is checked for its sign.

Runtime: 4 runs of ~5-8 s each on 2 idle cores (~30 s); minutes when the machine is loaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tpgrpo.config import load_config
from tpgrpo.rewards import RewardOutput, register_reward
from tpgrpo.trainer import Trainer
from conftest import tiny_workspace

MARGIN = 0.004
EPOCHS = 4


def _darkness():
    def score(images, prompts, metadata):
        return RewardOutput(scores=-images.mean(dim=(1, 2, 3)))

    return score


@pytest.fixture(scope="module", autouse=True)
def _register_darkness():
    register_reward("darkness", _darkness, overwrite=True)


@pytest.fixture(autouse=True)
def _keep_torch_rng():
    """The trainer seeds torch's global RNG; give the next test the state it would have had."""
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


def _train(params: Path, mode: str, reward: str) -> tuple[float, float, list[float]]:
    cfg = load_config(
        params,
        overrides=[
            "seed=1",
            f"credit.mode={mode}",
            f"reward.name={reward}",
            "train.lora_rank=null",  # full fine-tuning: LoRA on attention alone moves brightness too slowly here
            "train.learning_rate=0.003",
            f"train.epochs={EPOCHS}",
            "train.ema_decay=null",  # evaluate the trained weights themselves
            f"train.checkpoint_every={EPOCHS}",
            "sample.batch_size=32",
            "sample.group_size=4",
        ],
    )
    trainer = Trainer(cfg, variant=f"{mode}-{reward}", resume=False)
    result = trainer.fit()
    return result.eval_reward_initial, result.eval_reward_final, [row["reward/mean"] for row in trainer.history]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["outcome", "turning_point"])
def test_training_moves_brightness_the_way_the_reward_points(tmp_path: Path, tiny_pipe, mode: str) -> None:
    """Guards: an update whose direction is broken (advantage sign flipped in the loss or the
    credit, a ratio inverted, rewards paired with the wrong trajectories), which no unit test of
    one piece notices but which stops Flow-GRPO (``outcome``) or TP-GRPO (``turning_point``) from
    learning anything."""
    params = tiny_workspace(
        tmp_path,
        tiny_pipe,
        reward={"name": "brightness"},
        # Both runs are evaluated on brightness, on the test prompts' fixed noise.
        eval={"reward": {"name": "brightness", "options": {}}, "num_steps": 3, "every": EPOCHS},
    )
    b0, b1, b_train = _train(params, mode, "brightness")
    d0, d1, d_train = _train(params, mode, "darkness")
    print(f"{mode}: eval brightness, trained on brightness {b0:.5f} -> {b1:.5f}, on darkness {d0:.5f} -> {d1:.5f}; "
          f"reward/mean {[round(r, 4) for r in b_train]} vs {[round(-r, 4) for r in d_train]}")
    assert b0 == d0  # the same model on the same noise before training
    assert b1 - d1 > MARGIN, f"trained on brightness {b1:.5f} vs on darkness {d1:.5f}: difference below {MARGIN}"
    # The training reward, on fresh samples (darkness's reward/mean is minus the brightness).
    late_bright = sum(b_train[-2:]) / 2
    late_dark = -sum(d_train[-2:]) / 2
    assert late_bright > late_dark
