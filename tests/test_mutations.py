"""Tests written against single-line mutations the rest of the suite did not notice.

Each test's docstring names the bug it guards against; each was checked by making that mutation
in the source and watching the test fail.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import tpgrpo.checkpoint as ckpt_mod
from tpgrpo.advantages import group_advantages
from tpgrpo.checkpoint import begin_checkpoint, commit_checkpoint, latest_checkpoint, load_checkpoint, write_main_state
from tpgrpo.rewards import RewardOutput
from tpgrpo.scoring import reward_sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import trainer_config  # noqa: E402


@pytest.fixture(autouse=True)
def _keep_global_rng():
    """The trainer reseeds torch's global RNG; put it back for the tests that follow."""
    with torch.random.fork_rng(devices=[]):
        yield


# ------------------------------------------------------------------ 1. scoring: prompt pairing

PROMPT_WEIGHT = {"a red cube": 1.0, "two blue balls": 10.0, "a green cone": 100.0}


def _keys(names: list[str]) -> torch.Tensor:
    """Group keys from names (the trainer passes prompt indices)."""
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(n, len(index)) for n in names], dtype=torch.long)


def _prompt_dependent_reward(images, prompts, metadata):
    """Score = mean intensity * a per-prompt weight + a per-row offset from the metadata, so an
    image scored with another row's prompt or metadata gets another score."""
    weight = torch.tensor([PROMPT_WEIGHT[p] for p in prompts])
    offset = torch.tensor([float(m["offset"]) for m in metadata])
    brightness = images.mean(dim=(1, 2, 3))
    return RewardOutput(scores=brightness * weight + offset, details={"weighted": brightness * weight, "offset": offset})


def test_reward_sequence_scores_each_completion_with_its_own_prompt_and_metadata():
    """Guards: reward_sequence pairing the flattened [B*(W+1)] completion images with tiled
    prompts/metadata (p0 p1 p2 p0 p1 p2 ...) instead of repeated ones (p0 p0 p0 p0 p1 ...)."""
    B, K = 3, 4  # W = 3: completions of z_0..z_3
    # Image (b, k) is constant with value (b * K + k + 1) / 100, so every score is hand-computable.
    values = (torch.arange(B * K, dtype=torch.float32) + 1) / 100
    images = values.reshape(B, K, 1, 1, 1).expand(B, K, 3, 4, 4).contiguous()
    prompts = list(PROMPT_WEIGHT)
    metadata = [{"offset": 1000.0}, {"offset": 2000.0}, {"offset": 3000.0}]
    ro = SimpleNamespace(completion_images=images)  # reward_sequence reads only the completions

    seq = reward_sequence(ro, prompts, metadata, _prompt_dependent_reward)

    # Plain loop: each (b, k) image scored alone, with row b's prompt and metadata.
    ref = torch.zeros(B, K)
    for b in range(B):
        for k in range(K):
            ref[b, k] = _prompt_dependent_reward(images[b, k][None], [prompts[b]], [metadata[b]]).scores[0]
    torch.testing.assert_close(seq.R, ref)
    # Hand-worked corners: row 0 (weight 1, offset 1000), row 2 (weight 100, offset 3000).
    assert seq.R[0, 0].item() == pytest.approx(0.01 * 1 + 1000)
    assert seq.R[2, 3].item() == pytest.approx(0.12 * 100 + 3000)
    assert seq.R.dtype == torch.float32 and seq.R.shape == (B, K)
    torch.testing.assert_close(seq.final, ref[:, -1])
    torch.testing.assert_close(seq.details["offset"], torch.tensor([[1000.0] * K, [2000.0] * K, [3000.0] * K]))
    torch.testing.assert_close(seq.details["weighted"], values.reshape(B, K) * torch.tensor([1.0, 10.0, 100.0])[:, None])


# ------------------------------------------------------------------ 2. advantages: clip bounds


def test_advantage_clip_bounds_a_large_negative_outlier():
    """Guards: group_advantages clipping only from above (``.clamp(max=clip_max)``), which lets
    one very bad trajectory get an arbitrarily large negative advantage."""
    # One group of 10: nine rewards of 0 and one of -1. mean = -0.1, population std = 0.3.
    # Outlier: (-1 + 0.1) / (0.3 + 1e-4) = -2.99900 -> clipped to -2. The others: 0.1 / 0.3001.
    rewards = torch.tensor([[0.0]] * 9 + [[-1.0]], dtype=torch.float64)
    out = group_advantages(rewards, _keys(["p"] * 10), clip_max=2.0)
    expected = torch.tensor([[0.1 / 0.3001]] * 9 + [[-2.0]], dtype=torch.float64)
    torch.testing.assert_close(out.advantages, expected, rtol=0, atol=1e-12)
    assert out.advantages.min().item() == -2.0

    # Both bounds in one batch (two groups, two steps), against hand values.
    rewards = torch.tensor(
        [[0.0, 5.0]] * 9 + [[-1.0, -5.0]] + [[0.0, 0.0]] * 9 + [[1.0, 0.0]], dtype=torch.float64
    )
    out = group_advantages(rewards, _keys(["a"] * 10 + ["b"] * 10), clip_max=1.5)
    # Group a, step 2: nine 5s and one -5: mean 4, std 3 -> (5-4)/3.0001 and (-5-4)/3.0001 = -3 -> -1.5.
    assert out.advantages[9, 0].item() == -1.5 and out.advantages[9, 1].item() == -1.5
    assert out.advantages[0, 1].item() == pytest.approx(1 / 3.0001, abs=1e-12)
    assert out.advantages[19, 0].item() == 1.5  # group b's positive outlier, z = +3
    assert out.advantages.min().item() == -1.5 and out.advantages.max().item() == 1.5


# ------------------------------------------------------------------ 3. checkpoint durability


def _full_save(root: Path, epoch: int, *, keep: int = 2) -> Path:
    """A checkpoint with every kind of file: weights, EMA, optimizer, meta."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    tmp = begin_checkpoint(root, epoch)
    weights, ema = {"w": torch.full((4,), float(epoch))}, {"w": torch.full((4,), epoch + 0.5)}
    write_main_state(tmp, epoch=epoch, weights=weights, ema=ema, optimizer_state_dict=opt.state_dict(), meta={"tag": epoch})
    return commit_checkpoint(tmp, world_size=1, keep=keep)


def test_every_checkpoint_file_and_directory_is_fsynced_before_it_is_published(tmp_path, monkeypatch):
    """Guards: a dropped fsync in the checkpoint writer (``_fsync(path)`` in _write_safetensors,
    ``os.fsync`` in _write, the staging dir's ``_fsync`` in commit_checkpoint, the root's after
    the rename, the pointer's), after which a power cut can leave a "complete" checkpoint
    (manifest present, renamed into place) whose files are empty or missing."""
    root = tmp_path / "ckpts"
    _full_save(root, 1)  # a previous checkpoint, so the pointer is replaced, not created

    events: list[tuple] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def rename(src, dst, *a, **kw):
        events.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
        return real_rename(src, dst, *a, **kw)

    def replace(src, dst, *a, **kw):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(ckpt_mod.os, "fsync", fsync)
    monkeypatch.setattr(ckpt_mod.os, "rename", rename)
    monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    final = _full_save(root, 2)
    monkeypatch.undo()

    root_real = os.path.realpath(root)
    tmp_real = os.path.join(root_real, ".tmp-epoch-000002")
    final_real = os.path.realpath(final)
    publish = events.index(("rename", tmp_real, final_real))
    synced_before = {e[1] for e in events[:publish] if e[0] == "fsync"}

    files = sorted(p.name for p in final.iterdir())
    assert files == ["ema.safetensors", "manifest.json", "meta.json", "optimizer.json", "optimizer.safetensors", "weights.safetensors"]
    not_synced = [name for name in files if os.path.join(tmp_real, name) not in synced_before]
    assert not_synced == [], f"not fsynced before the rename that publishes the checkpoint: {not_synced}"
    # The staging directory (its entries) after the last file (the manifest) was written.
    manifest_sync = [i for i, e in enumerate(events) if e == ("fsync", os.path.join(tmp_real, "manifest.json"))]
    assert manifest_sync and ("fsync", tmp_real) in events[manifest_sync[-1] : publish]

    # After the rename: the root (the rename itself), then the pointer's contents, then its
    # replace, then the root again (the replace).
    after = events[publish + 1 :]
    pointer_replace = next(i for i, e in enumerate(after) if e[0] == "replace" and e[2] == os.path.join(root_real, "latest"))
    pointer_tmp = after[pointer_replace][1]
    assert ("fsync", root_real) in after[:pointer_replace]
    assert ("fsync", pointer_tmp) in after[:pointer_replace]
    assert ("fsync", root_real) in after[pointer_replace + 1 :]
    assert (root / "latest").read_text() == "epoch-000002\n"


# ------------------------------------------------------------------ 4. checkpoint crash safety


class _Crash(BaseException):
    """A kill in the middle of a commit (BaseException: nothing in the writer may swallow it)."""


@pytest.mark.parametrize("where", ["publish-rename", "root-fsync", "pointer-fsync", "pointer-replace"])
def test_crash_anywhere_in_commit_keeps_the_previous_checkpoint_loadable(tmp_path, monkeypatch, where):
    """Guards: commit_checkpoint pruning the previous checkpoint before the new one is
    committed (renamed into place and named by the ``latest`` pointer). With keep=1 the previous
    checkpoint is the only complete one until the pointer moves; a crash at any point of the
    commit must leave it loadable through latest_checkpoint + load_checkpoint."""
    root = tmp_path / "ckpts"
    prev = _full_save(root, 1, keep=1)
    assert latest_checkpoint(root) == prev

    tmp = begin_checkpoint(root, 2)
    write_main_state(tmp, epoch=2, weights={"w": torch.full((4,), 2.0)}, meta={"tag": 2})
    final = root / "epoch-000002"
    real_rename, real_replace, real_fsync = os.rename, os.replace, os.fsync
    root_real = os.path.realpath(root)

    def rename(src, dst, *a, **kw):
        if where == "publish-rename" and Path(src) == tmp:
            raise _Crash
        return real_rename(src, dst, *a, **kw)

    def replace(src, dst, *a, **kw):
        if where == "pointer-replace" and Path(dst).name == "latest":
            raise _Crash
        return real_replace(src, dst, *a, **kw)

    def fsync(fd):
        path = os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))
        if where == "root-fsync" and path == root_real and final.exists():
            raise _Crash  # the fsync of the root right after the publishing rename
        if where == "pointer-fsync" and Path(path).name.startswith(".latest.tmp-"):
            raise _Crash
        return real_fsync(fd)

    monkeypatch.setattr(ckpt_mod.os, "rename", rename)
    monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    monkeypatch.setattr(ckpt_mod.os, "fsync", fsync)
    with pytest.raises(_Crash):
        commit_checkpoint(tmp, world_size=1, keep=1)
    monkeypatch.undo()

    latest = latest_checkpoint(root)
    assert latest == prev, f"after a crash at {where}, latest_checkpoint() is {latest}"
    loaded = load_checkpoint(latest, world_size=1)
    assert loaded.epoch == 1 and loaded.meta == {"tag": 1}
    assert torch.equal(loaded.weights["w"], torch.full((4,), 1.0))
    assert torch.equal(loaded.ema["w"], torch.full((4,), 1.5))
    assert loaded.optimizer is not None

    # The next save (the resumed run redoing epoch 2) commits and only then drops epoch 1.
    again = _full_save(root, 2, keep=1)
    assert latest_checkpoint(root) == again and sorted(root.iterdir()) == [again, root / "latest"]
    assert load_checkpoint(again).meta == {"tag": 2}


# ------------------------------------------------------------------ 5. KL reference, full fine-tuning


def _full_finetune_cfg(root: Path, runs: str):
    """test_trainer's tiny setup, with full fine-tuning (lora_rank null) and a KL penalty; one
    batch per epoch, so an update's every step sees the weights it started from."""
    sections = {
        "sample": {"batches_per_epoch": 1},
        "credit": {"mode": "outcome"},
        "train": {"epochs": 1, "lora_rank": None, "ema_decay": None},
        "eval": {"num_steps": 2},
    }
    return trainer_config(root, runs, sections)


def test_full_finetuning_kl_reference_is_the_frozen_base_model(trainer_workspace):
    """Guards: under full fine-tuning (train.lora_rank null, kl_beta > 0) the KL reference being
    the trained weights (``self.reference = self.transformer`` instead of a frozen deep copy, or
    the loss evaluating the reference with the trained module): the KL term is then always 0 and
    the penalty does nothing."""
    from tpgrpo.models import load_pipeline
    from tpgrpo.trainer import Trainer

    trainer = Trainer(_full_finetune_cfg(trainer_workspace, "runs-fullft-kl"), variant="full", resume=False)
    assert trainer.policy.reference is not None
    base = load_pipeline(trainer_workspace / "base").transformer.eval()
    config = base.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, config.in_channels, 8, 8, generator=g)
    text = torch.randn(2, 5, config.joint_attention_dim, generator=g)
    pooled = torch.randn(2, config.pooled_projection_dim, generator=g)
    t = torch.tensor([700.0, 300.0])

    def velocities():
        with torch.no_grad():
            with trainer.policy.reference_model() as reference:
                v_ref = reference(x, text, pooled, t).sample
            return v_ref, trainer.policy.transformer(x, text, pooled, t).sample

    with torch.no_grad():
        v_base = base(x, text, pooled, t).sample
    # The frozen copy's forward matches the base model's to float rounding, not bit for bit
    # (measured: 2.8e-7 max, in the attention's context branch; a fresh deepcopy is exact).
    close = dict(rtol=0, atol=1e-5)
    v_ref, v_trained = velocities()
    torch.testing.assert_close(v_ref, v_base, **close)
    assert torch.equal(v_trained, v_base)  # nothing trained yet

    samples = trainer.rollout(0)
    credit = trainer.credit(samples, trainer.score(samples))
    assert all(k.any() for k in credit.keep)
    before = trainer.policy.trainable_state()
    first = trainer.update(samples, credit).metrics
    # Every step of the one batch ran before the optimizer step, so the trained and the reference
    # weights are equal: the KL is 0 (measured: exactly 0.0; the bound allows the copy's rounding
    # above on other platforms, and is ten orders of magnitude below the moved weights' KL).
    print("loss/kl at the start:", first["loss/kl"])
    assert 0.0 <= first["loss/kl"] < 1e-10
    after = trainer.policy.trainable_state()
    assert any(not torch.equal(before[n], after[n]) for n in before), "the update did not move the weights"

    # Move the trained weights further, well away from the base model.
    with torch.no_grad():
        for p in trainer.policy.trainable.values():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    v_ref, v_trained = velocities()
    torch.testing.assert_close(v_ref, v_base, **close, msg="the KL reference is not the base model")
    assert (v_trained - v_base).abs().max() > 1e-3  # the trained weights did move
    assert all(not p.requires_grad for p in trainer.policy.reference.parameters())

    second = trainer.update(samples, credit).metrics
    print("loss/kl after the weights moved:", second["loss/kl"])
    assert second["loss/kl"] > 1e-6, second["loss/kl"]
    assert second["loss/total"] > second["loss/policy"]  # beta * kl > 0 is part of the loss
