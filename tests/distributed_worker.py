"""Run under `accelerate launch --num_processes 2`: trains one epoch and checks the gathered groups.

Usage: distributed_worker.py CONFIG_JSON OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import save_file

from tpgrpo.advantages import group_advantages
from tpgrpo.config import config_from_dict
from tpgrpo.credit import assign_credit
from tpgrpo.rewards import register_reward
from tpgrpo.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import brightness_reward  # noqa: E402


def main() -> None:
    register_reward("brightness", brightness_reward, overwrite=True)
    cfg = config_from_dict(json.loads(Path(sys.argv[1]).read_text()))
    out = Path(sys.argv[2])
    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2, acc.num_processes
    trainer = Trainer(cfg, variant="ddp", accelerator=acc)

    samples = trainer.rollout(0)
    scores = trainer.score(samples)
    credit = trainer.credit(samples, scores)
    batch = samples.batches[0]
    prompts_all = gather_object(list(batch.prompts))
    R_all = acc.gather(scores.R[0]).cpu()
    local = set(batch.prompts)
    other = set(prompts_all[len(batch.prompts):] if acc.process_index == 0 else prompts_all[: len(batch.prompts)])
    n = len(batch.prompts)
    # balance_scope "process": turning points are balanced within each process's rows.
    pools = torch.arange(len(prompts_all)) // n if cfg.credit.balance_scope == "process" else None
    expected = group_advantages(assign_credit(R_all.double(), cfg.credit.to_credit_config(), pools=pools).rewards, batch.indices).advantages
    mine = expected[acc.process_index * n : (acc.process_index + 1) * n].float()
    report = {
        "rank": acc.process_index,
        "straddling_groups": len(local & other),
        "matches_gathered": bool(torch.allclose(credit.advantages[0].cpu(), mine, atol=1e-6)),
        "local_only_differs": bool(
            not torch.allclose(
                group_advantages(assign_credit(scores.R[0].cpu().double(), cfg.credit.to_credit_config()).rewards, batch.indices[acc.process_index * n : (acc.process_index + 1) * n]).advantages.float(),
                mine,
                atol=1e-6,
            )
        ),
    }
    trainer.update(samples, credit)
    save_file(trainer.policy.trainable_state(), str(out / f"rank{acc.process_index}.safetensors"))
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(report))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
