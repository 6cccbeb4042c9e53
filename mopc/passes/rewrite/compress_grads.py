"""Compressed gradient reduction: `reduce_grad` nodes become `mopc::compressed_reduce_grad`.

The reference program (and expert parallelism, over the expert-data-parallel group)
reduces every sharded gradient with `mopc::reduce_grad`, which `gather_params` lowers into
bucketed reduce-scatters. With `grad_compression` set, this pass runs first and swaps the
chosen gradients' reductions for the compressed op of `mopc/runtime/compression.py`
(`skip_idle`, `int8`, `fp8`, `powersgd`); the rest are bucketed as before. The op returns
the same piece of the same mean (exactly for `skip_idle`, up to the error-feedback
residual otherwise), so nothing else in the graph changes.
"""

from __future__ import annotations

import itertools
import logging

import torch
from torch.fx import GraphModule

import mopc.runtime.compression  # noqa: F401  (registers mopc::compressed_reduce_grad)
from mopc.passes.analysis.graph_utils import is_reduce_grad
from mopc.passes.registry import register_pass
from mopc.plan.mesh import group_size

log = logging.getLogger("mopc.passes")

_SERIAL = itertools.count()  # one per pass run: residuals are never shared between compiled graphs

# Modes that act on rows (experts along dim 0) or matrices: 1-D gradients stay uncompressed.
_NEEDS_2D = ("skip_idle", "powersgd")


@register_pass(
    kind="rewrite", requires=("annotate_roles",), numerics="approx",
    enabled=lambda c: c.grad_compression != "none",
    options_from_config=lambda c: {"mode": c.grad_compression, "scope": c.grad_compression_scope,
                                   "block": c.grad_compression_block, "rank": c.powersgd_rank,
                                   "warmup": c.powersgd_warmup_steps},
)
def compress_grads(gm: GraphModule, ctx, *, mode: str, scope: str, block: int, rank: int,
                   warmup: int) -> GraphModule:
    """Reduce the chosen gradients from compressed messages.

    Algorithm:
    1. take every `reduce_grad` node (after `expert_parallel`: expert gradients reduce over
       the expert-data-parallel group); keep those of role `expert`, or all with
       `scope="all"`; skip groups of one rank (nothing travels) and, for `skip_idle` and
       `powersgd`, 1-D gradients (no rows or matrix to exploit);
    2. replace each by `mopc::compressed_reduce_grad` with the same gradient, layout and
       group, plus the mode, its options and a key naming this graph and node (the
       error-feedback residual and the PowerSGD basis live under that key at run time).
    """
    serial = next(_SERIAL)
    graph = gm.graph
    done: dict[str, int] = {}
    for node in [n for n in graph.nodes if is_reduce_grad(n)]:
        role = node.meta.get("mopc_role", "other")
        if scope == "experts" and role != "expert":
            continue
        grad, chunk_dim, num_chunks, group = node.args[:4]
        if group_size(group) == 1:
            continue
        if mode in _NEEDS_2D and grad.meta["val"].dim() < 2:
            continue
        key = f"{ctx.graph_id}#{serial}/{node.name}"
        with graph.inserting_before(node):
            new = graph.call_function(torch.ops.mopc.compressed_reduce_grad.default,
                                      (grad, chunk_dim, num_chunks, group, mode, key, block, rank, warmup))
        new.meta.update({k: v for k, v in node.meta.items() if k != "mopc_created_by"})
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        done[role] = done.get(role, 0) + 1
    log.info("compress_grads on %s: %s reductions of %s", ctx.graph_id, mode,
             ", ".join(f"{n} {role}" for role, n in done.items()) or "no gradient")
    return gm


__all__ = ["compress_grads"]
