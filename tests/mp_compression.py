"""Run under torchrun: `mopc train`'s loop once per gradient-compression mode, same data.

    torchrun --nproc-per-node W tests/mp_compression.py OUT.json "none;skip_idle;int8" STEPS [ep]

`tiny` with skewed routing (every token picks experts 0 and 1, the other six are idle),
4 sequences of 16 tokens per step, AdamW; powersgd starts after one uncompressed step.
Rank 0 writes {mode: the training report} to OUT.json.
"""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

from mopc.runtime.trainer import TrainSettings, run_training


def main() -> None:
    out, modes, steps = sys.argv[1], sys.argv[2].split(";"), int(sys.argv[3])
    # one process group for every run (run_training creates and destroys one only when none exists)
    dist.init_process_group("gloo")
    ep = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    reports = {}
    for mode in modes:
        options = {"grad_compression": mode, "ep": ep}
        if mode == "powersgd":
            options["powersgd_warmup_steps"] = 1
        settings = TrainSettings(model="tiny", steps=steps, batch=4, seq_len=16, quiet=True, skew_experts=2,
                                 mop_options=options)
        reports[mode] = run_training(settings)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(reports, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
