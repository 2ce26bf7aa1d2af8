"""The clipped surrogate and KL term, against hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch

from tpgrpo.loss import grpo_loss, kl_to_reference


def test_hand_worked_clipped_surrogate() -> None:
    # Rows: (log-ratio, advantage) with clip 0.2.
    #  0: ratio e^0.1=1.105, A=+1 -> max(-1.105, -1.105) = -1.105 (inside the clip range)
    #  1: ratio e^0.5=1.649, A=+1 -> max(-1.649, -1.2) = -1.2     (clipped, no incentive past 1.2)
    #  2: ratio e^0.5=1.649, A=-1 -> max(1.649, 1.2) = 1.649      (pessimistic: unclipped)
    #  3: ratio e^-0.5=0.607, A=-2 -> max(1.213, 1.6) = 1.6       (clipped at 0.8)
    lr = torch.tensor([0.1, 0.5, 0.5, -0.5])
    adv = torch.tensor([1.0, 1.0, -1.0, -2.0])
    out = grpo_loss(lr, torch.zeros(4), adv, clip_range=0.2)
    expected = (-math.exp(0.1) - 1.2 + math.exp(0.5) + 1.6) / 4
    torch.testing.assert_close(out.policy_loss, torch.tensor(expected))
    torch.testing.assert_close(out.loss, torch.tensor(expected))
    torch.testing.assert_close(out.clip_fraction, torch.tensor(0.75))
    torch.testing.assert_close(out.approx_kl, torch.tensor(0.5 * (0.01 + 0.25 * 3) / 4))
    torch.testing.assert_close(out.ratio_mean, torch.tensor((math.exp(0.1) + 2 * math.exp(0.5) + math.exp(-0.5)) / 4))
    assert out.kl_loss.item() == 0.0


def test_gradient_is_zero_where_clipped() -> None:
    lr = torch.tensor([0.1, 0.5], requires_grad=True)
    out = grpo_loss(lr, torch.zeros(2), torch.tensor([1.0, 1.0]), clip_range=0.2)
    out.loss.backward()
    torch.testing.assert_close(lr.grad, torch.tensor([-math.exp(0.1) / 2, 0.0]))


def test_kl_term() -> None:
    # mean - ref = 0.3 everywhere, std 0.5: KL = 0.09 / (2 * 0.25) = 0.18 per row.
    mean = torch.full((2, 4, 3, 3), 0.3, requires_grad=True)
    ref = torch.zeros(2, 4, 3, 3)
    std = torch.full((2, 1, 1, 1), 0.5)
    torch.testing.assert_close(kl_to_reference(mean, ref, std), torch.tensor([0.18, 0.18]))
    out = grpo_loss(torch.zeros(2), torch.zeros(2), torch.tensor([1.0, -1.0]), clip_range=0.1, beta=0.5, mean=mean, ref_mean=ref, std=std)
    torch.testing.assert_close(out.kl_loss, torch.tensor(0.18))
    torch.testing.assert_close(out.loss, out.policy_loss + 0.5 * 0.18)
    out.loss.backward()
    assert mean.grad is not None and (mean.grad > 0).all()


def test_kl_equals_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    mean, ref = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    std = torch.tensor([0.1, 0.5, 2.0]).reshape(3, 1, 1, 1)
    p = torch.distributions.Normal(mean, std.expand_as(mean))
    q = torch.distributions.Normal(ref, std.expand_as(ref))
    expected = torch.distributions.kl_divergence(p, q).mean(dim=(1, 2, 3))
    torch.testing.assert_close(kl_to_reference(mean, ref, std), expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"clip_range": 0.0}, "clip_range"),
        ({"beta": -1.0}, "beta"),
        ({"beta": 0.1}, "needs mean"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"clip_range": 0.2} | kwargs
    with pytest.raises(ValueError, match=match):
        grpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), **args)


def test_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"\[B\]"):
        grpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), clip_range=0.2)
