"""Train a Hugging Face Mixtral (small random config) on several ranks with mopc.

    torchrun --nproc-per-node 2 examples/hf_mixtral_train.py            # ep=2: experts split
    torchrun --nproc-per-node 2 examples/hf_mixtral_train.py --tp 2     # and attention heads
    torchrun --nproc-per-node 2 examples/hf_mixtral_train.py --check    # compare with eager

The model is `transformers.MixtralForCausalLM`, unmodified, built from a tiny random config
(no download). `mopc.parallelize` shards its parameters over the ranks and plans a layout
per component; `torch.compile(backend="mop")` turns the step into a distributed program
(experts over `ep` ranks, attention heads over `tp` ranks, everything else ZeRO-3).
Each rank trains on its own slice of every global batch (DDP semantics). With `--check`
each rank also trains the single-device model eagerly on the same batches and the losses
are compared (rank 0 prints both; the exit status is 1 if they differ by more than 1e-5).
Runs on CPU with gloo; on GPUs use "nccl" and move the model to the rank's device first.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.distributed as dist
import transformers

import mopc


def build_model(args) -> transformers.MixtralForCausalLM:
    config = transformers.MixtralConfig(
        vocab_size=args.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=args.seq, use_cache=False,  # training: no key/value cache
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config).float().train()


def global_batch(step: int, args, world: int) -> dict[str, torch.Tensor]:
    """Counting sequences from random starts (next token = this one + 1): easy to learn."""
    g = torch.Generator().manual_seed(step)
    starts = torch.randint(3, args.vocab, (world * args.batch, 1), generator=g)
    ids = 3 + (starts - 3 + torch.arange(args.seq)) % (args.vocab - 3)
    return {"input_ids": ids, "labels": ids.clone()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--ep", type=int, default=None, help="expert-parallel degree (default: the world size)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree for attention")
    parser.add_argument("--batch", type=int, default=2, help="sequences per rank")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--check", action="store_true", help="also train eagerly on one process and compare")
    args = parser.parse_args()

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    ep = world if args.ep is None else args.ep

    def mine(batch: dict) -> dict:
        return {k: v[rank * args.batch:(rank + 1) * args.batch] for k, v in batch.items()}

    model = build_model(args)
    ref = copy.deepcopy(model) if args.check else None
    model = mopc.parallelize(model, mine(global_batch(0, args, world)), loss_fn=lambda out: out.loss,
                             ep=ep, tp=args.tp)
    if rank == 0:
        print(model.mopc_plan.summary())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)  # over this rank's shards only
    step_fn = torch.compile(model, backend="mop")
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=args.lr) if ref is not None else None

    worst = 0.0
    for step in range(args.steps):
        batch = global_batch(step, args, world)
        loss = step_fn(**mine(batch)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)  # the mean over ranks: the global batch's loss
        line = f"step {step}: loss {mean.item() / world:.6f}"
        if ref is not None:  # DDP semantics: the mean of the ranks' slice losses
            ref_loss = sum(ref(**{k: v[r * args.batch:(r + 1) * args.batch] for k, v in batch.items()}).loss
                           for r in range(world)) / world
            ref_loss.backward()
            ref_opt.step()
            ref_opt.zero_grad()
            rel = abs(mean.item() / world - ref_loss.item()) / abs(ref_loss.item())
            worst = max(worst, rel)
            line += f"   eager {ref_loss.item():.6f}   relative difference {rel:.1e}"
        if rank == 0:
            print(line, flush=True)
    if rank == 0:
        kinds = sorted({layout.kind for layout in model.mopc_plan.layouts.values()})
        print(f"done: {args.steps} steps on {world} ranks (ep={ep}, tp={args.tp}; layouts: {', '.join(kinds)})")
        if ref is not None:
            print(f"largest relative loss difference from eager: {worst:.1e}")
    dist.destroy_process_group()
    return 1 if worst > 1e-5 else 0


if __name__ == "__main__":
    sys.exit(main())
