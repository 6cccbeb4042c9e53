"""Run under torchrun: unmodified Hugging Face MoE models, mopc vs single-device eager AdamW.

    torchrun --nproc-per-node W tests/mp_hf_e2e.py OUT.json "hf_mixtral:tp=2,ep=2;hf_olmoe:ep=2" [steps] [per_rank]

For each `case:options` entry: build the `tests/moe_zoo` case (tiny random config, 2 layers,
fp32, no downloads) twice from the same seed, `mopc.parallelize` one with this rank's slice
of the global batch, `torch.compile(backend="mop")` it and train `steps` AdamW steps; train
the other eagerly in this process on the same batches with DDP semantics: the loss is the
mean of the ranks' slice losses (for a mean-over-tokens loss that is the global batch's;
qwen2_moe's router aux loss is not a mean over tokens, so this is the reference it must
equal). Rank 0 writes per case the losses, the largest relative loss and parameter
differences, the tensor-parallel blocks the pass kept on the reference layout (its
warnings), and the attention shapes of the compiled forward graph (from the dumps).
Each case compiles in the same processes, one after another (`torch._dynamo.reset()`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mopc
from mopc.runtime.ownership import full_parameters
from tests.moe_zoo import hf_models

LR, SEQ = 1e-4, 16
# two layers each: qwen2_moe and deepseek_v3 keep a dense layer 0 and an MoE layer 1; olmoe
# and qwen3_moe use transformers' default grouped_mm experts (the zoo's olmoe runs the
# per-expert loop, which graph-breaks; its qwen3_moe runs batched_mm, which has no offsets
# for the expert-parallel rewrite to route rows by)
BUILDERS = {
    "hf_mixtral": lambda: hf_models.build_mixtral(),
    "hf_qwen2_moe": lambda: hf_models.build_qwen2_moe(n_layers=2),
    "hf_deepseek_v3": lambda: hf_models.build_deepseek_v3(n_layers=2),
    "hf_olmoe": lambda: hf_models.build_olmoe(experts_implementation="grouped_mm"),
    "hf_qwen3_moe": lambda: hf_models.build_qwen3_moe(experts_implementation="grouped_mm"),
}


class _Kept(logging.Handler):
    """The tensor-parallel pass's warnings: blocks it kept on the reference layout."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "kept the reference layout" in record.getMessage():
            self.messages.append(record.getMessage())


def _batch(step: int, size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(3, hf_models.VOCAB, (size, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _attention_shapes(dump: Path) -> list[list[int]]:
    """Shapes of the attention probabilities in the compiled forward graph: [batch, heads, L, S]
    (softmax of eager attention, or the output of a fused attention op: [batch, heads, L, D])."""
    text = "".join(p.read_text() for p in sorted(dump.glob("*/*_forward.txt")))
    shapes = []
    for line in text.splitlines():
        if "role=attention" not in line:
            continue
        m = re.match(r"%\S+: \(?f32\[([\d, ]+)\].* = aten\.(_softmax|_scaled_dot_product_\w+)\(", line)
        if m:
            shapes.append([int(x) for x in m.group(1).split(", ")])
    return shapes


def run(name: str, options: dict, steps: int, per_rank: int, dump: Path) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    start = time.perf_counter()
    ref = BUILDERS[name]().model
    model = BUILDERS[name]().model  # the same seed: the same values
    for m in (ref, model):
        m.config.use_cache = False  # training: no key/value cache returned (it would pin attention's layout)

    def mine(batch: dict) -> dict:
        return {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in batch.items()}

    global_batch = world * per_rank
    model = mopc.parallelize(model, mine(_batch(0, global_batch)), loss_fn=lambda out: out.loss, **options)
    initial = {k: p.detach().clone() for k, p in ref.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR)
    kept = _Kept()
    logging.getLogger("mopc.passes").addHandler(kept)
    dumps = rank == 0 and os.environ.get("MOPC_E2E_DUMPS", "1") == "1"
    step_fn = torch.compile(model, backend="mop", options={"dump_dir": str(dump)} if dumps else {})
    losses, ref_losses = [], []
    try:
        for step in range(steps):
            batch = _batch(step, global_batch)
            loss = step_fn(**mine(batch)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
            ref_loss = sum(ref(**{k: v[r * per_rank:(r + 1) * per_rank] for k, v in batch.items()}).loss
                           for r in range(world)) / world
            ref_loss.backward()
            ref_opt.step()
            ref_opt.zero_grad()
            ref_losses.append(ref_loss.item())
    finally:
        logging.getLogger("mopc.passes").removeHandler(kept)
    final, ref_final = full_parameters(model), dict(ref.named_parameters())
    param_rel = {k: ((final[k] - p.detach()).abs().max() / p.detach().abs().max()).item()
                 for k, p in ref_final.items()}
    worst = max(param_rel, key=param_rel.get)
    return {
        "case": name, "options": options, "world": world, "per_rank": per_rank,
        "losses": losses, "ref_losses": ref_losses,
        "loss_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
        "param_rel_diff": param_rel[worst], "param_rel_diff_at": worst,
        "param_abs_diff": max((final[k] - p.detach()).abs().max().item() for k, p in ref_final.items()),
        "kept_reference_layout": kept.messages,
        "attention_shapes": _attention_shapes(dump) if rank == 0 else [],
        "expert_parallel": rank == 0 and any("mopc.ep_dispatch" in p.read_text() for p in dump.glob("*/*_forward.txt")),
        "num_heads": ref.config.num_attention_heads,
        "plan": model.mopc_plan.summary(),
        "seconds": time.perf_counter() - start,
        "param_moved": max((p.detach() - initial[k]).abs().max().item() for k, p in ref_final.items()),
    }


def _options(spec: str) -> dict:
    out = {}
    for item in filter(None, spec.split(",")):
        key, value = item.split("=")
        out[key] = int(value) if value.isdigit() else value
    return out


def main() -> None:
    out, specs = sys.argv[1], sys.argv[2]
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    per_rank = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    dist.init_process_group("gloo")
    results = []
    for index, spec in enumerate(specs.split(";")):
        name, _, opts = spec.partition(":")
        results.append(run(name, _options(opts), steps, per_rank, Path(f"{out}.dumps/{index}")))
        torch._dynamo.reset()
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
