"""Run under torchrun: mixed precision (`param_dtype`, `reduce_dtype`) against fp32 and eager.

    torchrun --nproc-per-node W tests/mp_mixed_precision.py OUT.json "fp32;param_dtype=bf16;..." [steps] [lr]

Builds `tiny` on meta for every configuration (`fp32`: the default options),
`mopc.parallelize`s it with those options, and trains `steps` AdamW steps with gradient
clipping through `torch.compile(backend="mop")`, each rank on its slice of the same global
batches; in the same process, the single-device eager fp32 model trains on the whole
batches. Rank 0 writes, per configuration: the losses (mean over ranks), the eager losses,
the dtypes of the shards, their gradients and the optimizer state, and the dtypes the
compiled forward's collectives and matmuls ran in (from the dump of the first step).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import mopc
import mopc.runtime.context_parallel
from mopc.models import build_model, make_init_fn
from mopc.runtime.trainer import synthetic_batch

SEQ, PER_RANK = 16, 2


def _parse(spec: str) -> dict:
    options = {}
    for item in filter(None, spec.split(",")):
        key, value = item.split("=")
        options[key] = int(value) if value.isdigit() else value
    return options


def _graph_dtypes(dump_dir: Path) -> dict:
    """dtypes of the all-gathers, reduce-scatters and matmuls in the compiled graphs."""
    out: dict[str, set] = {}
    for path in dump_dir.rglob("*.txt"):
        name = path.stem.split("_", 1)[-1]
        if name not in ("forward", "backward"):
            continue
        for line in path.read_text().splitlines():
            for op in ("all_gather_into_tensor", "reduce_scatter_tensor", "aten.mm", "aten.bmm",
                       "aten._grouped_mm", "mopc.grouped_mm"):
                if f"= _c10d_functional.{op}(" in line or f"= {op}(" in line:
                    dtype = line.split(":", 1)[1].strip().split("[", 1)[0]
                    created = line.rsplit("by=", 1)[-1] if "by=" in line else "?"
                    out.setdefault(f"{name} {op} {created}", set()).add(dtype)
    return {k: sorted(v) for k, v in out.items()}


def run(options: dict, steps: int, lr: float, ref_losses: list[float] | None, dump_dir: str) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    model = build_model("tiny", device="meta", seed=0)
    vocab = model.config.vocab_size
    global_batch = world * PER_RANK

    # context parallelism: the same global batch, its sequences shared by the cp ranks
    cp, tp = options.get("cp", 1), options.get("tp", 1)
    index, rows = (rank // (tp * cp)) * tp + rank % tp, global_batch // (world // cp)

    def mine(batch):
        own = {k: v[index * rows:(index + 1) * rows] for k, v in batch.items()}
        cut = mopc.runtime.context_parallel.shard_sequence
        return {k: cut(v, cp, (rank // tp) % cp) for k, v in own.items()} if cp > 1 else own

    model = mopc.parallelize(model, mine(synthetic_batch(0, global_batch, SEQ, vocab)),
                             init_fn=make_init_fn(model, 0), **options)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    step_fn = torch.compile(model, backend="mop", options={"dump_dir": dump_dir} if rank == 0 else {})
    losses = []
    for step in range(steps):
        loss = step_fn(**mine(synthetic_batch(step, global_batch, SEQ, vocab)))
        loss.backward()
        if step == 0:
            grad_dtypes = sorted({str(p.grad.dtype) for p in model.parameters()})
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    if ref_losses is None:  # the single-device eager fp32 reference, once per launch
        ref = build_model("tiny", device="cpu", seed=0)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=lr)
        ref_losses = []
        for step in range(steps):
            ref_loss = ref(**synthetic_batch(step, global_batch, SEQ, vocab))
            ref_loss.backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
            ref_opt.step()
            ref_opt.zero_grad()
            ref_losses.append(ref_loss.item())
    return {
        "options": options, "world": world, "steps": steps, "lr": lr, "losses": losses, "ref_losses": ref_losses,
        "loss_dtype": str(loss.dtype),
        "shard_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "grad_dtypes": grad_dtypes,
        "optimizer_state_dtypes": sorted({str(t.dtype) for s in opt.state.values() for t in s.values()
                                          if torch.is_tensor(t) and t.dim() > 0}),
        "graph_dtypes": _graph_dtypes(Path(dump_dir)) if rank == 0 else {},
    }


def main() -> None:
    out, configs = sys.argv[1], sys.argv[2]
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 50
    lr = float(sys.argv[4]) if len(sys.argv) > 4 else 1e-3
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    results: list[dict] = []
    for index, spec in enumerate(filter(None, configs.split(";"))):
        ref = results[0]["ref_losses"] if results else None
        results.append(run(_parse("" if spec == "fp32" else spec), steps, lr, ref, f"{out}.dumps/{index}"))
        torch._dynamo.reset()
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
