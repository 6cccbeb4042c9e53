"""Offload saved activations to host memory between forward and backward (option `offload`).

Runs on the partitioned graphs, where "saved for backward" is explicit: the forward graph
returns its outputs followed by the tensors the backward needs, and the backward graph
takes each of those as a placeholder of the same name. For every saved tensor the policy
chooses (`offload="experts"`: those produced by a MoE layer's routed-expert, dispatch or
combine nodes — dispatched tokens, expert intermediates, combine weights; `offload="auto"`:
the saved tensors `mopc.passes.rewrite.memory_policy` names, passed as `names`):

1. forward: `h = mopc::offload(t)` right after `t`'s producer, and the forward returns `h`
   instead of `t`, so nothing keeps `t` alive after its last forward use;
2. backward: `t' = mopc::reload(h)` inserted `offload_prefetch` reloads ahead of its first
   use (0: right before it; 1: right before the first use of the previous offloaded
   tensor, so one copy is in flight while that one is consumed; and so on), and every use
   of the placeholder reads `t'`.

Both ops copy exactly, so numerics do not change. Saved tensors that are parameters or
inputs (placeholders of the forward) are never offloaded: they live anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

import mopc.runtime.offload  # noqa: F401  (registers mopc::offload / mopc::reload)

log = logging.getLogger("mopc.passes")

EXPERT_ROLES = frozenset({"expert", "dispatch", "combine"})


@dataclass(frozen=True)
class OffloadSummary:
    tensors: int
    bytes: int
    names: tuple[str, ...]


def _nbytes(node: Node) -> int:
    val = node.meta.get("val")
    return val.numel() * val.element_size() if isinstance(val, torch.Tensor) else 0


def _chosen(node: Node, policy: str | None, names: Collection[str] | None) -> bool:
    if node.op != "call_function" or not isinstance(node.meta.get("val"), torch.Tensor):
        return False
    if names is not None:
        return node.name in names
    if policy == "experts":
        return node.meta.get("mopc_role") in EXPERT_ROLES
    raise ValueError(f"offload policy {policy!r}")


def offload_saved_activations(fw: GraphModule, bw: GraphModule, *, num_fwd_outputs: int, policy: str | None = None,
                              prefetch: int, names: Collection[str] | None = None) -> OffloadSummary:
    """Rewrite `fw` and `bw` in place (see the module docstring).

    Either `policy` (`"experts"`) picks the saved tensors by role, or `names` lists them
    (forward node names; names that are not saved call_function tensors are skipped).
    """
    if (policy is None) == (names is None):
        raise ValueError("offload_saved_activations: pass exactly one of policy= and names=")
    prefetch = max(prefetch, 0)
    output = fw.graph.find_nodes(op="output")[0]
    outs = list(output.args[0])
    placeholders = {n.name: n for n in bw.graph.find_nodes(op="placeholder")}
    chosen = [(i, n) for i, n in enumerate(outs) if i >= num_fwd_outputs and isinstance(n, Node)
              and n.name in placeholders and _chosen(n, policy, names) and outs.count(n) == 1]
    if not chosen:
        return OffloadSummary(0, 0, ())

    offload = torch.ops.mopc.offload.default
    reload = torch.ops.mopc.reload.default
    for i, node in chosen:
        with fw.graph.inserting_after(node):
            host = fw.graph.call_function(offload, (node,))
        host.meta.update({k: v for k, v in node.meta.items() if k in ("mopc_role", "mopc_layer")})
        host.meta["val"] = node.meta["val"].to("cpu") if node.meta["val"].is_cuda else node.meta["val"]
        outs[i] = host
    output.args = (tuple(outs), *output.args[1:])
    fw.graph.lint()
    fw.recompile()

    order = {n: k for k, n in enumerate(bw.graph.nodes)}
    by_first_use = sorted((min((order[u] for u in placeholders[n.name].users), default=len(order)),
                           placeholders[n.name], n) for _, n in chosen)
    first_compute = next((n for n in bw.graph.nodes if n.op != "placeholder"), None)

    first_use = {ph: min(ph.users, key=order.__getitem__) if ph.users else None for _, ph, _ in by_first_use}
    for k, (_, ph, fw_node) in enumerate(by_first_use):
        lead = by_first_use[k - prefetch][1] if k >= prefetch else None  # the reload `prefetch` ahead
        target = (first_use[lead] if lead is not None else None) or first_compute
        own = first_use[ph]
        if own is not None and order[target] > order[own]:
            target = own
        with bw.graph.inserting_before(target):
            back = bw.graph.call_function(reload, (ph, fw_node.meta["val"].device))
        back.meta.update({k2: v for k2, v in fw_node.meta.items() if k2 in ("val", "mopc_role", "mopc_layer")})
        ph.replace_all_uses_with(back, delete_user_cb=lambda user, back=back: user is not back)
        if fw_node.meta["val"].is_cuda:
            ph.meta["val"] = fw_node.meta["val"].to("cpu")
    bw.graph.lint()
    bw.recompile()
    summary = OffloadSummary(len(chosen), sum(_nbytes(n) for _, n in chosen), tuple(n.name for _, n in chosen))
    log.debug("offload: %d saved tensors (%d bytes) to host, prefetch %d", summary.tensors, summary.bytes, prefetch)
    return summary
