"""The exported LoRA file is the same bytes for the same weights, whatever the process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tpgrpo.trainer import lora_metadata

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj"]
# peft's config dict (target_modules a set) and the exported metadata, as JSON, in one process.
SCRIPT = f"""
import json
from peft import LoraConfig
from tpgrpo.trainer import lora_metadata
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
