"""Run under torchrun: mopc vs single-device eager on the same global batches.

    torchrun --nproc-per-node W tests/mp_parity.py OUT.json "tp=1;tp=2;ep=2,skew=True" [steps] [per_rank_batch]

For each configuration: build `tiny` on meta, `mopc.parallelize` with that rank's slice
of the global batch, AdamW for `steps` steps through `torch.compile(backend="mop")` with
gradient clipping, and, in the same process, the single-device eager model on the whole
global batch. `skew=True` (not a mop option) forces skewed routing in both models: the
router correction bias of experts 0 and 1 is raised so every token picks them (the first
expert-parallel rank gets every row, experts 2.. and the other ranks none); `skew=N` raises
experts 0..N-1 (`skew=1` with `topk=1`: every token to expert 0); `topk=N` builds
`tiny` with N experts per token; `biased_wo=True` gives layer 0's attention output projection
a bias (tensor parallelism cannot split it: that block must fall back to ZeRO-3). Rank 0 writes losses, final parameter differences, per-rank byte counts
and gradient-norm agreement to OUT.json, and the graph dumps to OUT.json.dumps/<config>/.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import torch
import torch.distributed as dist

import mopc
import mopc.optim
import mopc.runtime.compression
import mopc.runtime.context_parallel
from mopc.models import PRESETS, build_model, make_init_fn
from mopc.models.moe_transformer import init_weights
from mopc.runtime.ownership import full_parameters
from mopc.runtime.trainer import synthetic_batch

# Adam divides by sqrt(v): an element whose gradient is at fp32 rounding level moves by up to
# lr either way, so parameter agreement after N steps is bounded by about N * lr * (rounding
# noise); 1e-4 keeps that well under 1e-5 while the loss still falls.
SEQ, LR = 16, 1e-4
PER_RANK = int(sys.argv[4]) if len(sys.argv) > 4 else 2


def _full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full gradients from the shards' gradients (gathered, then un-laid-out)."""
    from mopc.runtime.ownership import gathered_to_full

    out = {}
    for fqn, param in model.named_parameters():
        if param.grad is None and getattr(param, "_mopc_remote", False):  # another pipeline stage's
            continue
        layout = param._mopc_layout
        gathered = param.grad.full_tensor()
        out[fqn] = gathered_to_full(gathered, list(layout.shape), layout.chunk_dim, layout.num_chunks,
                                    layout.world_size).clone()  # a one-rank mesh's full_tensor is the shard itself
    return out


def _max_over_ranks(value: float) -> float:
    """The largest value any rank saw (under pp each rank compares its own stages' parameters)."""
    t = torch.tensor(value, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:  # the gradient of another pipeline stage's parameter
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def _skew(model: torch.nn.Module, hot: int) -> None:
    for module in model.modules():
        if getattr(module, "expert_bias", None) is not None:
            module.expert_bias[:hot] = 1.0


def _grad_rel_diff(grads: dict[str, torch.Tensor], ref: torch.nn.Module) -> float:
    """Largest gradient difference per tensor, relative to the tensor's largest element.

    A gradient that is mathematically zero (the router of a top-1 model with normalized
    weights: d(s/s)/ds = 0) is fp32 rounding noise in both runs, with no scale of its own;
    such a tensor (largest element under 1e-6 of the largest of any gradient) is measured
    against 1e-3 of that largest gradient instead."""
    top = max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None)

    def scale(g: torch.Tensor) -> float:
        own = g.abs().max().item()
        return own if own >= 1e-6 * top else 1e-3 * top

    return max(((grads[k] - p.grad).abs().max() / scale(p.grad)).item()
               for k, p in ref.named_parameters() if p.grad is not None and k in grads)  # this rank's stages


def _biases(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.expert_bias for m in model.modules() if getattr(m, "expert_bias", None) is not None]


def _count_routing(model: torch.nn.Module) -> dict:
    """Tokens per expert of each router's last call (the single-device reference's global counts)."""
    counts = {}
    for module in model.modules():
        if getattr(module, "expert_bias", None) is not None:
            slot = counts.setdefault(module, [None])

            def hook(mod, args, out, slot=slot):
                slot[0] = torch.bincount(out[1].reshape(-1), minlength=mod.num_experts).double()

            module.register_forward_hook(hook)
    return counts


def run(options: dict, steps: int, dump_dir: str | None) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    mopc.runtime.compression.reset_compression_state()  # this configuration's compressed reductions only
    options = dict(options)
    skew = options.pop("skew", False)
    config = dataclasses.replace(PRESETS["tiny"], top_k=options.pop("topk", PRESETS["tiny"].top_k),
                                 num_layers=options.pop("layers", PRESETS["tiny"].num_layers))
    ref = build_model(config, device="cpu", seed=0)
    model = build_model(config, device="meta", seed=0)
    biased_wo = options.pop("biased_wo", False)
    host_adamw = options.pop("host_adamw", False)  # mopc.optim.HostAdamW (+ optimizer_offload), no clipping
    if biased_wo:  # a block tensor parallelism cannot express: it must fall back
        ref.layers[0].attention.wo = torch.nn.Linear(config.dim, config.dim, bias=True)
        init_weights(ref, 0)  # values by name: the same as make_init_fn gives the meta model
        with torch.device("meta"):
            model.layers[0].attention.wo = torch.nn.Linear(config.dim, config.dim, bias=True)
    vocab = ref.config.vocab_size
    # context parallelism: the cp ranks of a group read the same sequences, each its two chunks
    cp, tp, pp = options.get("cp", 1), options.get("tp", 1), options.get("pp", 1)
    stage_rank = rank % (world // pp)  # the ranks of a pipeline read the same rows
    index, owners = (stage_rank // (tp * cp)) * tp + stage_rank % tp, world // pp // cp
    global_batch = owners * PER_RANK
    cut = mopc.runtime.context_parallel.shard_sequence

    def mine(batch):
        rows = {k: v[index * PER_RANK:(index + 1) * PER_RANK] for k, v in batch.items()}
        return {k: cut(v, cp, (stage_rank // tp) % cp) for k, v in rows.items()} if cp > 1 else rows

    model = mopc.parallelize(model, mine(synthetic_batch(0, global_batch, SEQ, vocab)),
                             init_fn=make_init_fn(model, 0), **options)
    if mopc.data_parallel_rank(model) != (index, owners):
        raise AssertionError(f"data_parallel_rank {mopc.data_parallel_rank(model)} != {(index, owners)}")
    batch0 = synthetic_batch(0, global_batch, SEQ, vocab)
    rows0 = {k: v[index * PER_RANK:(index + 1) * PER_RANK] for k, v in batch0.items()}
    if any(not torch.equal(a, b) for a, b in zip(mine(batch0).values(), mopc.shard_sequence(rows0, model).values())):
        raise AssertionError("mopc.shard_sequence cut the batch differently from the runtime's chunks")
    if skew:
        hot = 2 if skew is True else int(skew)
        _skew(ref, hot)
        _skew(model, hot)
    ref_params = full_parameters(ref)
    init_diff = _max_over_ranks(max((v - ref_params[k]).abs().max().item() for k, v in full_parameters(model).items()))
    opt = mopc.optim.HostAdamW(model.parameters(), lr=LR) if host_adamw else torch.optim.AdamW(model.parameters(), lr=LR)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR)
    rate = options.get("expert_bias_update_rate", 0.0)
    ref_counts = _count_routing(ref) if rate else {}
    compile_options = {"dump_dir": dump_dir} if dump_dir and rank == 0 else {}
    step_fn = torch.compile(model, backend="mop", options=compile_options)
    losses, ref_losses, norms, ref_norms = [], [], [], []
    for step in range(steps):
        batch = synthetic_batch(step, global_batch, SEQ, vocab)
        loss = step_fn(**mine(batch))
        loss.backward()
        if step == 0:
            grads = _full_grads(model)
        # HostAdamW: no clipping, so the updates started in backward are the ones used
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]) \
            if host_adamw else mopc.clip_grad_norm_(model, 1.0)
        norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        opt.step()
        if step == steps - 1:
            grad_bytes = _local_bytes(p.grad for p in model.parameters())
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
        ref_loss = ref(**batch)
        ref_loss.backward()
        if step == 0:
            grad_diff = _max_over_ranks(_grad_rel_diff(grads, ref))
        ref_norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]) if host_adamw
                               else torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)))
        ref_opt.step()
        ref_opt.zero_grad()
        for router, counts in ref_counts.items():  # aux-loss-free balancing, by hand, from global counts
            with torch.no_grad():
                router.expert_bias += torch.sign(counts[0].mean() - counts[0]) * rate
        ref_losses.append(ref_loss.item())
    bias_diff = max(((a - b).abs().max().item() for a, b in zip(_biases(model), _biases(ref))), default=0.0)
    final = full_parameters(model)
    ref_final = full_parameters(ref)
    param_diff = _max_over_ranks(max((v - ref_final[k]).abs().max().item() for k, v in final.items()))
    stats = torch.tensor([
        _local_bytes(model.parameters()), grad_bytes,
        _local_bytes(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0),
    ], dtype=torch.float64)
    per_rank = [torch.zeros_like(stats) for _ in range(world)]
    dist.all_gather(per_rank, stats)
    full_bytes = sum(p.numel() * p.element_size() for p in ref.parameters())
    sd = model.state_dict()
    pipeline = [None] * world  # per rank: its stages, most micro-batches in flight, bubble fraction
    dist.all_gather_object(pipeline, mopc.pipeline_stats() if pp > 1 else None)
    return {
        "options": options, "world": world, "losses": losses, "ref_losses": ref_losses,
        "grad_norms": norms, "ref_grad_norms": ref_norms, "init_diff": init_diff, "first_step_grad_rel_diff": grad_diff,
        "param_diff": param_diff, "full_param_bytes": full_bytes,
        "per_rank_bytes": [{"params": s[0].item(), "grads": s[1].item(), "optimizer": s[2].item()}
                           for s in per_rank],
        "state_dict_local_numel": sum(v.to_local().numel() if hasattr(v, "to_local") else v.numel()
                                      for v in sd.values()),
        "plan": model.mopc_plan.summary(),
        "skew": skew,
        "biased_wo": biased_wo,
        "bias_diff": bias_diff,
        "bias_moved": max((b.abs().max().item() for b in _biases(ref)), default=0.0) if not skew else None,
        "top_k": config.top_k,
        "expert_load": {str(k): v for k, v in mopc.expert_load_stats().items()},
        "compression": mopc.compression_stats(),
        "host_adamw": opt.overlap_stats() if host_adamw else None,
        "pipeline": pipeline,
    }


def main() -> None:
    out, configs = sys.argv[1], sys.argv[2]
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    results = []
    for index, spec in enumerate(configs.split(";")):
        options = {}
        for item in filter(None, spec.split(",")):
            key, value = item.split("=")
            options[key] = (int(value) if value.isdigit() else value == "True" if value in ("True", "False")
                            else float(value) if value.replace(".", "", 1).isdigit() else value)
        results.append(run(options, steps, f"{out}.dumps/{index}"))
        torch._dynamo.reset()
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
