"""The exported LoRA file is the same bytes for the same weights, whatever the process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tpgrpo.policy import lora_metadata

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj"]
# peft's config dict (target_modules a set) and the exported metadata, as JSON, in one process.
SCRIPT = f"""
import json
from peft import LoraConfig
from tpgrpo.policy import lora_metadata
config = LoraConfig(r=4, lora_alpha=8, target_modules={TARGETS!r}).to_dict()
print(json.dumps(config, default=list))
print(json.dumps(lora_metadata(config)))
"""


def _in_process(hash_seed: int) -> tuple[str, str]:
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True).stdout
    raw, exported = out.splitlines()
    return raw, exported


@pytest.mark.slow
def test_lora_metadata_is_the_same_in_every_process() -> None:
    runs = [_in_process(seed) for seed in range(4)]
    # peft's own dict holds a set, whose order follows each process's string hashing ...
    assert len({raw for raw, _ in runs}) > 1
    # ... the exported metadata does not.
    assert len({exported for _, exported in runs}) == 1
    assert json.loads(runs[0][1])["target_modules"] == sorted(TARGETS)


def test_lora_metadata_keeps_everything_else() -> None:
    config = {"r": 4, "lora_alpha": 8.0, "target_modules": {"b", "a"}, "layers_to_transform": None, "alpha_pattern": {}}
    assert lora_metadata(config) == {"r": 4, "lora_alpha": 8.0, "target_modules": ["a", "b"], "layers_to_transform": None, "alpha_pattern": {}}


def test_safetensors_header_is_canonical(tmp_path) -> None:
    """safetensors writes its metadata map in a fresh hash order for every file: the same tensors
    and metadata give different bytes until the header is sorted."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from tpgrpo.checkpoint import canonical_safetensors_header

    tensors = {"b.weight": torch.arange(6.0).view(2, 3), "a.weight": torch.ones(4, dtype=torch.float16)}
    metadata = {"format": "pt", **{f"key_{i}": json.dumps({"value": i, "text": "ä\n"}) for i in range(6)}}
    paths = [tmp_path / f"{i}.safetensors" for i in range(6)]
    for path in paths:
        save_file(tensors, str(path), metadata=metadata)
    assert len({p.read_bytes() for p in paths}) > 1
    for path in paths:
        canonical_safetensors_header(path)
    assert len({p.read_bytes() for p in paths}) == 1
    with safe_open(str(paths[0]), "pt") as f:
        assert f.metadata() == metadata
    loaded = load_file(str(paths[0]))
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], v) for k, v in tensors.items())
