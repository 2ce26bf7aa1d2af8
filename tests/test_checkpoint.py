"""Checkpoints: exact state round trips, bitwise-exact resume, atomic commits, per-rank RNG."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import tpgrpo.checkpoint as ckpt_mod
from tpgrpo.checkpoint import (
    begin_checkpoint,
    capture_rng_state,
    commit_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    restore_rng_state,
    save_checkpoint,
    tmp_dir_for,
    write_main_state,
    write_rank_state,
)
from tpgrpo.errors import CheckpointError, UserError


@pytest.fixture(autouse=True)
def _keep_global_rng():
    """These tests reseed the global RNGs; put them back so other tests see what they expect."""
    state = capture_rng_state()
    yield
    restore_rng_state(state)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _draws(gen: torch.Generator | None = None) -> tuple:
    """Numbers from every RNG a trainer may use (gauss twice: Python and numpy cache a second value)."""
    out = (
        torch.rand(5),
        torch.randn(3, generator=gen) if gen is not None else torch.zeros(3),
        np.random.rand(4),
        np.random.standard_normal(3),
        random.random(),
        random.gauss(0.0, 1.0),
        random.randrange(10**9),
    )
    return out


def _assert_same_draws(a: tuple, b: tuple) -> None:
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert np.array_equal(a[2], b[2]) and np.array_equal(a[3], b[3])
    assert a[4:] == b[4:]


# ----------------------------------------------------------------------------------------- RNG


def test_rng_round_trip_in_memory_and_on_disk(tmp_path):
    _seed_all(7)
    gen = torch.Generator().manual_seed(3)
    # Leave a cached Gaussian in numpy and Python so has_gauss / gauss_next are exercised.
    np.random.standard_normal(1)
    random.gauss(0.0, 1.0)
    state = capture_rng_state({"noise": gen})
    assert state.numpy[3] == 1 and state.python[2] is not None

    first = _draws(gen)
    restore_rng_state(state, {"noise": gen})
    _assert_same_draws(first, _draws(gen))

    path = save_checkpoint(tmp_path, epoch=0, weights={"w": torch.zeros(1)}, rng=state)
    _draws(gen)  # move everything on before restoring from disk
    loaded = load_checkpoint(path).rng
    restore_rng_state(loaded, {"noise": gen})
    _assert_same_draws(first, _draws(gen))

    with pytest.raises(CheckpointError, match="no generator 'other'"):
        restore_rng_state(loaded, {"other": torch.Generator()})


# ---------------------------------------------------------------------------- optimizer state


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Dropout(0.25), nn.Tanh(), nn.Linear(12, 1))


def _adamw(model: nn.Module) -> torch.optim.AdamW:
    # Two groups with different lr / weight decay, one with amsgrad (an extra state tensor).
    return torch.optim.AdamW(
        [
            {"params": model[0].parameters(), "lr": 1e-2, "weight_decay": 0.1},
            {"params": model[3].parameters(), "lr": 3e-3, "weight_decay": 0.0, "amsgrad": True},
        ],
        betas=(0.8, 0.95),
    )


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, ema: dict | None = None) -> None:
    x_all = torch.linspace(-1, 1, 64 * 6).reshape(64, 6)
    y_all = x_all.sin().sum(dim=1, keepdim=True)
    for _ in range(steps):
        idx = random.sample(range(64), 8)  # python RNG
        noise = torch.from_numpy(np.random.normal(scale=0.1, size=(8, 6)).astype(np.float32))  # numpy RNG
        x = x_all[idx] + noise + 0.01 * torch.randn(8, 6)  # torch RNG (and dropout below)
        loss = (model(x) - y_all[idx]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    ema[name].mul_(0.9).add_(p, alpha=0.1)


def test_adamw_state_round_trip_continues_bitwise_identically(tmp_path):
    _seed_all(0)
    model = _model(0)
    opt = _adamw(model)
    _train(model, opt, 3)
    sd = opt.state_dict()

    enc = optimizer_state_to_tensors(sd)
    save_file(enc.tensors, str(tmp_path / "opt.safetensors"))
    (tmp_path / "opt.json").write_text(json.dumps(enc.meta, allow_nan=False))
    restored = optimizer_state_from_tensors(load_file(str(tmp_path / "opt.safetensors")), json.loads((tmp_path / "opt.json").read_text()))

    assert restored["param_groups"] == sd["param_groups"]
    assert all(type(g["betas"]) is tuple and g["foreach"] is None and g["amsgrad"] in (True, False) for g in restored["param_groups"])
    assert set(restored["state"]) == set(sd["state"]) == {0, 1, 2, 3}
    for i, s in sd["state"].items():
        assert set(restored["state"][i]) == set(s)
        for k, v in s.items():
            assert restored["state"][i][k].dtype == v.dtype and torch.equal(restored["state"][i][k], v)
    assert "max_exp_avg_sq" in restored["state"][2]

    twin = _model(99)
    twin.load_state_dict(model.state_dict())
    twin_opt = _adamw(twin)
    twin_opt.load_state_dict(restored)
    rng = capture_rng_state()
    _train(model, opt, 3)
    restore_rng_state(rng)
    _train(twin, twin_opt, 3)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_state_encoding_is_exact_for_awkward_values():
    state = {
        "state": {0: {"step": torch.tensor(3.0), "m": torch.ones(2, dtype=torch.bfloat16)}, "0": {"count": torch.arange(3)}},
        "param_groups": [{"betas": (0.9, (1, None)), "lr": float("nan"), "top": float("-inf"), "flag": False, "n": 0, "names": ["a", "b"]}],
        "empty": torch.zeros(0, 4),
    }
    enc = optimizer_state_to_tensors(state)
    back = optimizer_state_from_tensors(enc.tensors, json.loads(json.dumps(enc.meta, allow_nan=False)))
    assert set(back["state"]) == {0, "0"}
    assert torch.equal(back["state"][0]["step"], state["state"][0]["step"]) and back["state"][0]["step"].dim() == 0
    assert back["state"][0]["m"].dtype == torch.bfloat16 and torch.equal(back["state"]["0"]["count"], torch.arange(3))
    group = back["param_groups"][0]
    assert group["betas"] == (0.9, (1, None)) and math.isnan(group["lr"]) and group["top"] == float("-inf")
    assert group["flag"] is False and group["n"] == 0 and type(group["n"]) is int and group["names"] == ["a", "b"]
    assert back["empty"].shape == (0, 4)

    with pytest.raises(TypeError, match="param_groups.0.fn"):
        optimizer_state_to_tensors({"param_groups": [{"fn": lambda x: x}]})
    with pytest.raises(CheckpointError, match="tensor 'nope' is missing"):
        optimizer_state_from_tensors({}, {"format": 1, "value": {"__tensor__": "nope"}})


# ------------------------------------------------------------------------------ exact resume


def _fresh(seed: int):
    _seed_all(seed)
    model = _model(seed)
    opt = _adamw(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    ema = {n: p.detach().clone() for n, p in model.named_parameters()}
    return model, opt, sched, ema


def _epoch(model, opt, sched, ema) -> None:
    _train(model, opt, 1, ema)
    sched.step()


def test_killed_and_resumed_run_ends_bitwise_identical(tmp_path):
    model, opt, sched, ema = _fresh(0)
    for _ in range(6):
        _epoch(model, opt, sched, ema)
    straight_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    straight_ema = ema

    model, opt, sched, ema = _fresh(0)
    for epoch in range(3):
        _epoch(model, opt, sched, ema)
    save_checkpoint(
        tmp_path,
        epoch=2,
        weights=dict(model.named_parameters()),
        ema=ema,
        optimizer_state_dict=opt.state_dict(),
        extra_states={"scheduler": sched.state_dict()},
        meta={"global_step": 3, "history": [{"epoch": 2, "loss": 0.25, "reward": None}]},
    )
    del model, opt, sched, ema

    def resume(restore_rng: bool):
        model, opt, sched, _ = _fresh(123)  # a different init: everything must come from disk
        ckpt = load_checkpoint(latest_checkpoint(tmp_path))
        model.load_state_dict(ckpt.weights)
        opt.load_state_dict(ckpt.optimizer)
        sched.load_state_dict(ckpt.extra_states["scheduler"])
        ema = ckpt.ema
        if restore_rng:
            restore_rng_state(ckpt.rng)
        for _ in range(ckpt.meta["global_step"], 6):
            _epoch(model, opt, sched, ema)
        return model, ema, ckpt

    model_r, ema_r, ckpt = resume(restore_rng=True)
    assert ckpt.epoch == 2 and ckpt.meta["history"] == [{"epoch": 2, "loss": 0.25, "reward": None}]
    for name, p in model_r.named_parameters():
        assert torch.equal(p, straight_weights[name]), name
        assert torch.equal(ema_r[name], straight_ema[name]), name

    # Control: the RNG really matters in this loop, so the test above is not vacuous.
    model_n, _, _ = resume(restore_rng=False)
    assert not all(torch.equal(p, straight_weights[n]) for n, p in model_n.named_parameters())


def test_tied_and_sliced_tensors_are_saved_as_given(tmp_path):
    # safetensors refuses tensors sharing storage; a tied embedding or a flat buffer's slices must
    # still be savable, and come back with their own values.
    lin = nn.Linear(3, 3)
    flat = torch.arange(10.0)
    weights = {"a": lin.weight, "tied": lin.weight, "s1": flat[:4], "s2": flat[4:], "t": flat.view(2, 5).t()}
    loaded = load_checkpoint(save_checkpoint(tmp_path, epoch=0, weights=weights)).weights
    assert set(loaded) == set(weights) and all(torch.equal(loaded[k], v) for k, v in weights.items())


# -------------------------------------------------------------------------------- atomicity


def _save(root: Path, epoch: int, **kw) -> Path:
    return save_checkpoint(root, epoch=epoch, weights={"w": torch.full((4,), float(epoch))}, ema={"w": torch.ones(4)}, meta={"tag": epoch}, **kw)


def test_crash_before_commit_keeps_previous_checkpoint(tmp_path, monkeypatch):
    first = _save(tmp_path, 1)
    assert first.name == "epoch-000001" and latest_checkpoint(tmp_path) == first

    tmp = begin_checkpoint(tmp_path, 2)  # killed after writing part of the state
    assert tmp == tmp_dir_for(tmp_path, 2) and tmp.name == ".tmp-epoch-000002"
    write_rank_state(tmp, 0, capture_rng_state())
    write_main_state(tmp, epoch=2, weights={"w": torch.zeros(4)})
    assert latest_checkpoint(tmp_path) == first and list_checkpoints(tmp_path) == [first]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.os, "rename", killed)  # killed inside commit, before the rename
    with pytest.raises(KeyboardInterrupt):
        commit_checkpoint(tmp)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == first and load_checkpoint(first).meta == {"tag": 1}

    tmp = begin_checkpoint(tmp_path, 2)  # next attempt starts from an empty staging dir
    assert list(tmp.iterdir()) == []
    (tmp_path / ".tmp-epoch-000009").mkdir()  # leftovers of other epochs go too
    tmp = begin_checkpoint(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-epoch-000002", "epoch-000001", "latest"]

    with pytest.raises(CheckpointError, match="write_main_state"):
        commit_checkpoint(tmp)
    second = _save(tmp_path, 2)
    assert latest_checkpoint(tmp_path) == second and (tmp_path / "latest").read_text() == "epoch-000002\n"


def test_truncated_or_corrupt_files_give_one_line_errors_naming_the_file(tmp_path):
    path = _save(tmp_path, 3)
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
    _save(tmp_path, 1, keep=None)
    second = _save(tmp_path, 2, keep=None)
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
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-000003", "epoch-000004"]

    # Resumed from epoch 3, epoch 4 is saved again: the old one is replaced, the pointer moves.
    again = _save(tmp_path, 4, keep=1)
    assert load_checkpoint(again).meta == {"tag": 4} and latest_checkpoint(tmp_path) == again
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("latest")] == ["epoch-000004"]

    with pytest.raises(ValueError, match="keep"):
        commit_checkpoint(begin_checkpoint(tmp_path, 5), keep=0)


# ------------------------------------------------------------------------------- multi-rank


def _recommit_two_ranks(root: Path, states: list) -> Path:
    """The same two-rank save, with an explicit world size."""
    tmp = begin_checkpoint(root, 0)
    for rank, state in enumerate(states):
        write_rank_state(tmp, rank, state)
    write_main_state(tmp, epoch=0, weights={"w": torch.arange(3.0)}, meta={"global_step": 0})
    return commit_checkpoint(tmp, world_size=2)


def test_two_ranks_write_their_own_rng_and_load_it_back(tmp_path):
    tmp = begin_checkpoint(tmp_path, 0)  # rank 0; a barrier would follow
    states = []
    for rank in (0, 1):  # each rank, in its own process in a real run
        _seed_all(100 + rank)
        states.append(capture_rng_state())
        write_rank_state(tmp_dir_for(tmp_path, 0), rank, states[-1])
    write_main_state(tmp, epoch=0, weights={"w": torch.arange(3.0)}, meta={"global_step": 0})

    with pytest.raises(CheckpointError, match="rng-rank2.safetensors: missing"):
        commit_checkpoint(tmp, world_size=3)
    with pytest.raises(CheckpointError, match="more ranks than world_size=1"):
        commit_checkpoint(tmp, world_size=1)
    path = commit_checkpoint(tmp)  # world size inferred from the rank files: 2
    assert load_checkpoint(path, rng=False).world_size == 2
    path = _recommit_two_ranks(tmp_path, states)

    for rank in (0, 1):
        ckpt = load_checkpoint(path, rank=rank, world_size=2)
        assert ckpt.world_size == 2 and torch.equal(ckpt.rng.torch_cpu, states[rank].torch_cpu)
        restore_rng_state(ckpt.rng)
        got = _draws()
        restore_rng_state(states[rank])
        _assert_same_draws(got, _draws())

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, rank=2)
    assert "\n" not in str(info.value) and "rng-rank2.safetensors" in str(info.value) and "2 processes" in str(info.value)
    with pytest.raises(CheckpointError, match="saved by 2 processes, resuming with 3"):
        load_checkpoint(path, rank=0, world_size=3)
    assert load_checkpoint(path, rank=2, world_size=3, rng=False).rng is None


# ----------------------------------------------------------------------------------- safety


def test_module_never_uses_pickle_or_torch_serialisation():
    source = Path(ckpt_mod.__file__).read_text(encoding="utf-8")
    assert "pickle" not in source.lower()
    assert not re.search(r"\btorch\s*\.\s*(load|save)\b", source)
    assert "torch.serialization" not in source and "np.load" not in source
