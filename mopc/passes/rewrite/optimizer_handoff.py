"""Thread a host-resident optimizer's updates through the compiled step (`optimizer_offload`).

Runs on the partitioned graphs, like `offload`. Backward returns one gradient per primal
input of the joint graph, in order; the primals that are trainable parameters have a key
in `mopc.runtime.host_optim`'s registry (bound to the parameter object at compile time).

Algorithm:
1. backward: for every output that is a parameter's gradient shard, insert
   `mopc::grad_ready(grad, key)` right after the node that produces it, so the optimizer
   that owns the parameter starts its update while the rest of backward runs (the layers
   below the one just reduced);
2. forward: for every parameter placeholder, insert `mopc::await_update(key)` right before
   its first user, so the next step's forward waits for that parameter's update only
   (the first layers' gathers start while the last layers' updates still run), and mark
   the key fenced so the optimizer's `step()` may return before its updates are done.

Both ops are side effects only (they return nothing and change no value): numerics do not
change. Under Inductor the forward fences are left out (Inductor may move a read of a
graph input across an op it does not read from), and `step()` waits for its updates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from mopc.runtime import host_optim

log = logging.getLogger("mopc.passes")


@dataclass(frozen=True)
class HandoffSummary:
    handoffs: int
    fences: int


def _insert_after(bw: GraphModule, node: Node) -> Node:
    """Where the hand-off goes: after `node`, or after the last placeholder if `node` is one."""
    return node if node.op != "placeholder" else bw.graph.find_nodes(op="placeholder")[-1]


def insert_update_handoffs(fw: GraphModule, bw: GraphModule, *, primal_names: list[str],
                           keys: dict[str, int], fence_forward: bool) -> HandoffSummary:
    """Rewrite `fw` and `bw` in place (module docstring). `primal_names` are the joint
    graph's primal placeholders in order; `keys` maps those that are trainable parameters
    to their registry key."""
    grad_ready = torch.ops.mopc.grad_ready.default
    await_update = torch.ops.mopc.await_update.default
    outputs = list(bw.graph.find_nodes(op="output")[0].args[0])
    if len(outputs) != len(primal_names):
        log.warning("optimizer_offload: backward returns %d values for %d primal inputs; no hand-off inserted",
                    len(outputs), len(primal_names))
        return HandoffSummary(0, 0)
    handoffs = 0
    for name, grad in zip(primal_names, outputs, strict=True):
        key = keys.get(name)
        if key is None or not isinstance(grad, Node) or not isinstance(grad.meta.get("val"), torch.Tensor):
            continue
        with bw.graph.inserting_after(_insert_after(bw, grad)):
            node = bw.graph.call_function(grad_ready, (grad, key))
        node.meta["mopc_role"] = "optimizer"
        if "mopc_layer" in grad.meta:
            node.meta["mopc_layer"] = grad.meta["mopc_layer"]
        handoffs += 1
    bw.graph.lint()
    bw.recompile()

    fences = 0
    if fence_forward:
        order = {n: i for i, n in enumerate(fw.graph.nodes)}
        for ph in fw.graph.find_nodes(op="placeholder"):
            key = keys.get(ph.name)
            if key is None or not ph.users:
                continue
            first = min(ph.users, key=order.__getitem__)
            with fw.graph.inserting_before(first):
                node = fw.graph.call_function(await_update, (key,))
            node.meta["mopc_role"] = "optimizer"
            host_optim.mark_fenced(key)
            fences += 1
        fw.graph.lint()
        fw.recompile()
    log.info("optimizer_offload: %d gradient hand-offs in backward, %d update fences in forward", handoffs, fences)
    return HandoffSummary(handoffs, fences)
