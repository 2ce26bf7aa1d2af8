"""Group advantages: hand-worked values and a plain-loop reference."""

from __future__ import annotations

import math

import pytest
import torch

from tpgrpo.advantages import group_advantages, local_rows


def _keys(names: list[str]) -> torch.Tensor:
    """Group keys from names (the trainer passes prompt indices)."""
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(n, len(index)) for n in names], dtype=torch.long)


def reference_advantages(rewards: list[list[float]], prompts: list[str], global_std: bool, clip_max: float, eps: float = 1e-4):
    B, W = len(rewards), len(rewards[0])
    out = [[0.0] * W for _ in range(B)]
    for k in range(W):
        column = [rewards[b][k] for b in range(B)]
        all_mean = sum(column) / B
        all_std = math.sqrt(sum((c - all_mean) ** 2 for c in column) / B)
        for b in range(B):
            members = [column[j] for j in range(B) if prompts[j] == prompts[b]]
            mean = sum(members) / len(members)
            std = all_std if global_std else math.sqrt(sum((m - mean) ** 2 for m in members) / len(members))
            out[b][k] = max(-clip_max, min(clip_max, (column[b] - mean) / (std + eps)))
    return out


def test_hand_worked_two_groups() -> None:
    # Group "a": rewards 1 and 3 at step 1 (mean 2, std 1) -> -1/(1+1e-4), +1/(1+1e-4).
    # Group "b": rewards 5, 5 (std 0) -> 0, 0: those rows have no signal at step 1.
    rewards = torch.tensor([[1.0, 0.0], [5.0, 2.0], [3.0, 0.0], [5.0, 4.0]], dtype=torch.float64)
    out = group_advantages(rewards, _keys(["a", "b", "a", "b"]))
    s = 1 / (1 + 1e-4)
    torch.testing.assert_close(out.advantages, torch.tensor([[-s, 0.0], [0.0, -s], [s, 0.0], [0.0, s]], dtype=torch.float64))
    assert out.keep.tolist() == [True, True, True, True]
    assert out.group_ids.tolist() == [0, 1, 0, 1]


def test_all_zero_rows_are_dropped() -> None:
    rewards = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 2.0], [1.0, 2.0]])
    out = group_advantages(rewards, _keys(["a", "a", "b", "b"]))
    assert out.keep.tolist() == [False, False, True, True]


def test_global_std() -> None:
    # Step column [0, 2, 4, 6]: global std = sqrt(5); group means 1 and 5.
    rewards = torch.tensor([[0.0], [2.0], [4.0], [6.0]], dtype=torch.float64)
    out = group_advantages(rewards, _keys(["a", "a", "b", "b"]), global_std=True)
    d = math.sqrt(5) + 1e-4
    torch.testing.assert_close(out.advantages[:, 0], torch.tensor([-1 / d, 1 / d, -1 / d, 1 / d], dtype=torch.float64))


def test_clipping() -> None:
    rewards = torch.tensor([[0.0]] * 9 + [[1.0]], dtype=torch.float64)  # the outlier's z-score is 3
    out = group_advantages(rewards, _keys(["p"] * 10), clip_max=2.0)
    assert out.advantages.max().item() == 2.0


@pytest.mark.parametrize("global_std", [False, True])
def test_matches_plain_loop_reference(global_std: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        B = int(torch.randint(1, 13, (1,), generator=gen))
        W = int(torch.randint(1, 6, (1,), generator=gen))
        rewards = torch.randint(-3, 4, (B, W), generator=gen).double() * 0.25
        names = [f"p{int(i)}" for i in torch.randint(0, 4, (B,), generator=gen)]
        out = group_advantages(rewards, _keys(names), global_std=global_std, clip_max=3.0)
        ref = reference_advantages(rewards.tolist(), names, global_std, 3.0)
        torch.testing.assert_close(out.advantages, torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-9)
        assert out.keep.tolist() == [any(v != 0 for v in row) for row in ref]


def test_gathered_groups_then_local_slice() -> None:
    # Two processes hold two rows each; the groups straddle processes. Normalising the gathered
    # batch and slicing gives each process the same values as the whole-batch computation.
    gathered = torch.tensor([[1.0], [10.0], [3.0], [20.0]])
    prompts = ["a", "b", "a", "b"]
    full = group_advantages(gathered, _keys(prompts)).advantages
    rank1 = full[local_rows(4, rank=1, world_size=2)]
    torch.testing.assert_close(rank1, full[2:])
    assert rank1[0, 0] > 0 and rank1[1, 0] > 0  # 3 > mean(1, 3) and 20 > mean(10, 20)


def test_groups_are_keyed_by_prompt_index_not_text() -> None:
    # Rows 0 and 1 share key 7, rows 2 and 3 key 3: two groups of two whatever the keys' values;
    # the same text under two indices (two prompt-file lines) would be two groups.
    rewards = torch.tensor([[1.0], [3.0], [10.0], [20.0]])
    out = group_advantages(rewards, torch.tensor([7, 7, 3, 3]))
    assert out.group_ids.tolist() == [1, 1, 0, 0]
    assert out.advantages[:, 0].sign().tolist() == [-1.0, 1.0, -1.0, 1.0]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: group_advantages(torch.zeros(3), _keys(["a"] * 3)), "rewards"),
        (lambda: group_advantages(torch.zeros(3, 2), _keys(["a"] * 2)), "groups"),
        (lambda: group_advantages(torch.zeros(3, 2), _keys(["a"] * 3), clip_max=0), "clip_max"),
        (lambda: local_rows(5, 0, 2), "evenly"),
        (lambda: local_rows(4, 2, 2), "rank"),
    ],
)
def test_bad_input(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
