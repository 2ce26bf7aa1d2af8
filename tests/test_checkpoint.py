"""Checkpoints: exact state round trips, a bitwise-exact resume, atomic commits, one-line errors
naming the file, and why no RNG state is stored."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import tpgrpo.checkpoint as ckpt_mod
from tpgrpo.checkpoint import begin_checkpoint, commit_checkpoint, latest_checkpoint, load_checkpoint, write_main_state
from tpgrpo.errors import CheckpointError, UserError
from tpgrpo.rollout import RolloutConfig, rollout


def _save(root: Path, epoch: int, *, world_size: int = 1, keep: int = 2, **state) -> Path:
    """The trainer's save protocol, in one process; by default weights, EMA and meta of ``epoch``."""
    state = {"weights": {"w": torch.full((4,), float(epoch))}, "ema": {"w": torch.ones(4)}, "meta": {"tag": epoch}, **state}
    tmp = begin_checkpoint(root, epoch)
    write_main_state(tmp, epoch=epoch, **state)
    return commit_checkpoint(tmp, world_size=world_size, keep=keep)


# ------------------------------------------------------------------------------ exact resume


def _fresh(seed: int) -> tuple[nn.Module, torch.optim.AdamW, dict[str, torch.Tensor]]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1))
    # Two groups with different lr / weight decay, one with amsgrad (an extra state tensor).
    opt = torch.optim.AdamW(
        [
            {"params": model[0].parameters(), "lr": 1e-2, "weight_decay": 0.1},
            {"params": model[2].parameters(), "lr": 3e-3, "weight_decay": 0.0, "amsgrad": True},
        ],
        betas=(0.8, 0.95),
    )
    return model, opt, {n: p.detach().clone() for n, p in model.named_parameters()}


def _train_epoch(model: nn.Module, opt: torch.optim.Optimizer, ema: dict[str, torch.Tensor], epoch: int) -> None:
    g = torch.Generator().manual_seed(epoch)  # as in the trainer: the epoch's numbers from its own seed
    x = torch.randn(8, 6, generator=g)
    loss = (model(x) - x.sin().sum(dim=1, keepdim=True)).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        for name, p in model.named_parameters():
            ema[name].mul_(0.9).add_(p, alpha=0.1)


def test_resume_from_a_checkpoint_ends_bitwise_identical(tmp_path):
    model, opt, ema = _fresh(0)
    for epoch in range(6):
        _train_epoch(model, opt, ema, epoch)
    straight, straight_ema = {n: p.detach().clone() for n, p in model.named_parameters()}, ema

    model, opt, ema = _fresh(0)
    for epoch in range(3):
        _train_epoch(model, opt, ema, epoch)
    sd = opt.state_dict()
    history = [{"epoch": 3, "loss": float("nan"), "reward": None}]
    path = _save(tmp_path, 3, weights=dict(model.named_parameters()), ema=ema, optimizer_state_dict=sd, meta={"history": history})

    saved = load_checkpoint(path, world_size=1)
    assert saved.epoch == 3 and saved.world_size == 1 and math.isnan(saved.meta["history"][0]["loss"])
    assert saved.optimizer["param_groups"] == sd["param_groups"]
    assert all(type(g["betas"]) is tuple and g["foreach"] is None for g in saved.optimizer["param_groups"])
    assert set(saved.optimizer["state"]) == set(sd["state"]) == {0, 1, 2, 3} and "max_exp_avg_sq" in saved.optimizer["state"][2]
    for i, s in sd["state"].items():
        assert all(saved.optimizer["state"][i][k].dtype == v.dtype and torch.equal(saved.optimizer["state"][i][k], v) for k, v in s.items())
    del model, opt, ema

    def resume(with_optimizer: bool) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        model, opt, _ = _fresh(123)  # another init: everything must come from disk
        ckpt = load_checkpoint(latest_checkpoint(tmp_path), world_size=1)
        model.load_state_dict(ckpt.weights)
        if with_optimizer:
            opt.load_state_dict(ckpt.optimizer)
        for epoch in range(ckpt.epoch, 6):
            _train_epoch(model, opt, ckpt.ema, epoch)
        return model, ckpt.ema

    model, ema = resume(with_optimizer=True)
    for name, p in model.named_parameters():
        assert torch.equal(p, straight[name]) and torch.equal(ema[name], straight_ema[name]), name
    # Control: without the optimizer state the run ends elsewhere, so the test above has teeth.
    model, _ = resume(with_optimizer=False)
    assert not all(torch.equal(p, straight[n]) for n, p in model.named_parameters())


def test_optimizer_state_comes_back_with_exact_types_and_values(tmp_path):
    state = {
        # 0 and "0" both give the tensor path "state.0.m"; both must survive.
        "state": {0: {"step": torch.tensor(3.0), "m": torch.ones(2, dtype=torch.bfloat16)}, "0": {"m": torch.arange(3)}},
        "param_groups": [{"betas": (0.9, (1, None)), "lr": float("nan"), "top": float("-inf"), "flag": False, "n": 0, "names": ["a", "b"]}],
        "empty": torch.zeros(0, 4),
    }
    back = load_checkpoint(_save(tmp_path, 1, optimizer_state_dict=state)).optimizer
    assert set(back["state"]) == {0, "0"}
    assert torch.equal(back["state"][0]["step"], state["state"][0]["step"]) and back["state"][0]["step"].dim() == 0
    assert back["state"][0]["m"].dtype == torch.bfloat16 and torch.equal(back["state"]["0"]["m"], torch.arange(3))
    group = back["param_groups"][0]
    assert group["betas"] == (0.9, (1, None)) and type(group["betas"][1]) is tuple
    assert math.isnan(group["lr"]) and group["top"] == float("-inf")
    assert group["flag"] is False and type(group["n"]) is int and group["names"] == ["a", "b"]
    assert back["empty"].shape == (0, 4)

    with pytest.raises(TypeError, match="param_groups.0.fn"):
        write_main_state(begin_checkpoint(tmp_path, 2), epoch=2, weights={}, optimizer_state_dict={"param_groups": [{"fn": print}]})


def test_training_depends_on_no_global_rng_state(tiny_pipe):
    """Why checkpoints hold no RNG state: a resumed process's global generators are not where the
    interrupted run's were, and nothing the trainer computes depends on them. A rollout draws its
    noise from the generator it is given (its noise-free ODE steps draw global noise and scale it
    by 0); a training forward and backward draws none (dropout p = 0). End to end:
    tests/test_kill_resume.py and the crash test of tests/test_update.py."""
    cfg = RolloutConfig(num_steps=4, window_start=1, window_size=2, guidance_scale=2.0)
    transformer = tiny_pipe.transformer
    config = transformer.config
    g = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(2, config.in_channels, 8, 8, generator=g),
        torch.randn(2, 5, config.joint_attention_dim, generator=g),
        torch.randn(2, config.pooled_projection_dim, generator=g),
        torch.tensor([700.0, 300.0]),
    )
    runs = []
    with torch.random.fork_rng(devices=[]):
        for global_seed in (1, 2):
            torch.manual_seed(global_seed)
            ro = rollout(tiny_pipe, ["a red circle", "two blue squares"], cfg, generator=torch.Generator().manual_seed(7))
            transformer.train()
            try:
                out = transformer(*inputs).sample
                grads = torch.autograd.grad(out.square().sum(), list(transformer.parameters()))
            finally:
                transformer.eval()
            runs.append((ro.latents, ro.log_probs, ro.completion_images, out, *grads))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# -------------------------------------------------------------------------------- atomicity


def test_a_crash_mid_save_leaves_the_previous_checkpoint_latest(tmp_path, monkeypatch):
    first = _save(tmp_path, 1)
    assert first.name == "epoch-000001" and latest_checkpoint(tmp_path) == first

    tmp = begin_checkpoint(tmp_path, 2)  # killed after writing part of the state ...
    assert tmp.name == ".tmp-epoch-000002"
    write_main_state(tmp, epoch=2, weights={"w": torch.zeros(4)})
    assert latest_checkpoint(tmp_path) == first

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.os, "rename", killed)  # ... or inside the commit, before the rename
    with pytest.raises(KeyboardInterrupt):
        commit_checkpoint(tmp, world_size=1)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == first and load_checkpoint(first).meta == {"tag": 1}

    # The next save starts clean: what interrupted saves leave is removed.
    (tmp_path / ".tmp-epoch-000009").mkdir()
    (tmp_path / ".trash-epoch-000001-7").mkdir()
    (tmp_path / ".latest.tmp-7").write_text("epoch-000009\n")
    tmp = begin_checkpoint(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-epoch-000002", "epoch-000001", "latest"]
    assert list(tmp.iterdir()) == []

    with pytest.raises(CheckpointError, match="meta.json: missing; write_main_state"):
        commit_checkpoint(tmp, world_size=1)
    with pytest.raises(ValueError, match="not the staging directory of epoch 3"):
        write_main_state(tmp, epoch=3, weights={})
    second = _save(tmp_path, 2)
    assert latest_checkpoint(tmp_path) == second and (tmp_path / "latest").read_text() == "epoch-000002\n"


def test_truncated_or_corrupt_files_give_one_line_errors_naming_the_file(tmp_path):
    path = _save(tmp_path, 3, optimizer_state_dict={"state": {0: {"m": torch.ones(2)}}})
    weights = path / "weights.safetensors"
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "\n" not in msg and str(weights) in msg and "truncated" in msg
    assert isinstance(info.value, UserError)

    # Same size, broken header: the checksum catches it; without checksums the parser does.
    weights.write_bytes(data[:8] + b"X" + data[9:])
    with pytest.raises(CheckpointError, match=re.escape(str(weights)) + ".*corrupt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, verify=False)
    assert "\n" not in str(info.value) and str(weights) in str(info.value) and "unreadable" in str(info.value)
    weights.write_bytes(data)

    optimizer = path / "optimizer.json"
    text = optimizer.read_text()
    optimizer.write_text(text.replace("__tensor__", "__tensxr__"))  # same size: only verify sees it
    with pytest.raises(CheckpointError, match=re.escape(str(optimizer)) + r": malformed \(unknown tag"):
        load_checkpoint(path, verify=False)
    optimizer.write_text(text)

    (path / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match=re.escape(str(path / "ema.safetensors")) + ": missing"):
        load_checkpoint(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=re.escape(str(path / "manifest.json")) + ": unreadable JSON"):
        load_checkpoint(path)

    incomplete = tmp_path / "epoch-000004"  # e.g. copied by hand, no manifest
    incomplete.mkdir()
    with pytest.raises(CheckpointError, match="manifest.json: missing"):
        load_checkpoint(incomplete)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_checkpoint(tmp_path / "epoch-000042")


def test_latest_pointer_garbage_or_missing_falls_back_to_scanning(tmp_path):
    assert latest_checkpoint(tmp_path) is None and latest_checkpoint(tmp_path / "absent") is None
    _save(tmp_path, 1)
    second = _save(tmp_path, 2)
    (tmp_path / "epoch-000007").mkdir()  # incomplete: never a candidate
    (tmp_path / ".tmp-epoch-000008").mkdir()

    pointer = tmp_path / "latest"
    for garbage in (b"\x00\xff garbage", b"epoch-000099\n", b"../epoch-000001", b""):
        pointer.write_bytes(garbage)
        assert latest_checkpoint(tmp_path) == second
    pointer.unlink()
    assert latest_checkpoint(tmp_path) == second

    # A valid pointer wins over a newer directory (a run resumed from an older checkpoint).
    pointer.write_text("epoch-000001\n")
    assert latest_checkpoint(tmp_path).name == "epoch-000001"


def test_pruning_and_recommitting_an_existing_epoch(tmp_path):
    for epoch in range(1, 5):
        _save(tmp_path, epoch)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-000003", "epoch-000004", "latest"]

    # Resumed from epoch 3, epoch 4 is saved again: the old one is replaced, the pointer moves.
    again = _save(tmp_path, 4, keep=1, meta={"tag": "again"})
    assert load_checkpoint(again).meta == {"tag": "again"} and latest_checkpoint(tmp_path) == again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-000004", "latest"]

    # Sent back to epoch 4 by hand (the pointer rewritten): redoing epoch 5 prunes epoch 4 but not
    # the abandoned epoch 6, newer than the checkpoint just committed.
    _save(tmp_path, 5, keep=3)
    _save(tmp_path, 6, keep=3)
    (tmp_path / "latest").write_text("epoch-000004\n")
    redone = _save(tmp_path, 5, keep=1)
    assert latest_checkpoint(tmp_path) == redone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-000005", "epoch-000006", "latest"]

    with pytest.raises(ValueError, match="keep"):
        commit_checkpoint(begin_checkpoint(tmp_path, 5), world_size=1, keep=0)


def test_a_resume_must_use_as_many_processes_as_the_saving_run(tmp_path):
    path = _save(tmp_path, 0, world_size=2)
    assert load_checkpoint(path, world_size=2).world_size == 2
    assert load_checkpoint(path).world_size == 2  # no world size given: not checked
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, world_size=3)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}: saved by 2 processes, resumed by 3")


def test_module_never_uses_pickle_or_torch_serialisation():
    source = Path(ckpt_mod.__file__).read_text(encoding="utf-8")
    assert "pickle" not in source.lower()
    assert not re.search(r"\btorch\s*\.\s*(load|save)\b", source)
    assert "torch.serialization" not in source and "np.load" not in source
