"""Which nodes form a tensor-parallel block, and which carry this rank's tokens.

A block is every node of one attention or dense-MLP component (role and layer, forward and
backward). Two kinds of neighbours join it:
* views and sums of its own outputs (the gradient branches of its input), so they leave
  through one reduce-scatter, not one each;
* norms its values go through and come back from (OLMoE's q_norm/k_norm over all heads,
  MLA's low-rank norms), forward and backward, with the weight-gradient chains that hang
  off them: left outside, they would force the block's split values back to whole ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from mopc.passes.analysis.graph_utils import is_reduce_grad, is_unshard

aten = torch.ops.aten

TP_ROLES = ("attention", "dense_mlp")
# roles whose nodes join a block they sit inside of (same layer)
SANDWICHED_ROLES = ("norm",)
_VIEWS = frozenset({aten.view.default, aten._unsafe_view.default, aten.reshape.default})
_ADDS = frozenset({aten.add.Tensor, aten.sub.Tensor})


@dataclass
class Region:
    role: str
    layer: int | None
    nodes: list[Node] = field(default_factory=list)


def token_nodes(gm: GraphModule, module_state: set[Node]) -> set[Node]:
    """Nodes whose values depend on this rank's tokens (user inputs or the loss gradient);
    parameters and buffers (RoPE tables, masks) are the same on every rank."""
    out: set[Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if node not in module_state and isinstance(val, torch.Tensor) and (
                    val.dim() >= 1 or node.name.startswith("tangents")):
                out.add(node)
        elif any(a in out for a in node.all_input_nodes) and not is_unshard(node):
            out.add(node)
    return out


def _is_collective(node: Node) -> bool:
    return str(node.target).startswith("_c10d_functional")


def regions(gm: GraphModule) -> list[Region]:
    by_key: dict[tuple, Region] = {}
    shard_side: set[Node] = set()
    reduced: set[Node] = set()
    for node in gm.graph.nodes:  # the views that unwrap shards feed unshard only
        if is_unshard(node):
            shard_side.add(node.args[0])
    for node in gm.graph.nodes:
        role = node.meta.get("mopc_role")
        if (node.op != "call_function" or role not in TP_ROLES or is_unshard(node) or is_reduce_grad(node)
                or node in shard_side or _is_collective(node)):
            continue
        if all(is_reduce_grad(a) or a in reduced for a in node.all_input_nodes) and node.all_input_nodes:
            reduced.add(node)  # views of a reduced gradient (the DTensor wrapper; casts to the shard's dtype)
            continue
        key = (role, node.meta.get("mopc_layer"))
        by_key.setdefault(key, Region(*key)).nodes.append(node)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    claimed = {n for region in by_key.values() for n in region.nodes}
    for region in by_key.values():  # views and sums of the block's own outputs (the gradient
        members = set(region.nodes)  # branches of its input) join it: one reduce-scatter, not one each
        for node in gm.graph.nodes:
            if node.op != "call_function" or node in members:
                continue
            ins = [a for a in node.args if isinstance(a, Node)]
            if (node.target in _VIEWS and ins and ins[0] in members) or (
                    node.target in _ADDS and len(ins) == 2 and all(a in members for a in ins)):
                region.nodes.append(node)
                members.add(node)
        joined = _sandwiched(gm, region, members, claimed, shard_side)
        region.nodes.extend(joined)
        claimed |= members | joined
        region.nodes.sort(key=order.__getitem__)
    return list(by_key.values())


def _sandwiched(gm: GraphModule, region: Region, members: set[Node], claimed: set[Node],
                shard_side: set[Node]) -> set[Node]:
    """Nodes of a sandwiched role (same layer) on a path from the block back into it, and the
    chains that leave them only for the block, each other or a gradient reduction."""

    def candidate(n: Node) -> bool:
        return (n.op == "call_function" and n not in members and n not in claimed
                and n.meta.get("mopc_role") in SANDWICHED_ROLES and n.meta.get("mopc_layer") == region.layer
                and not is_unshard(n) and not is_reduce_grad(n) and n not in shard_side and not _is_collective(n))

    nodes = list(gm.graph.nodes)
    down: set[Node] = set()  # reached from the block through candidates
    for n in nodes:
        if candidate(n) and any(a in members or a in down for a in n.all_input_nodes):
            down.add(n)
    inside: set[Node] = set()  # ... and reaching back into it
    for n in reversed(nodes):
        if n in down and any(u in members or u in inside for u in n.users):
            inside.add(n)
    if not inside:
        return set()
    tails = {n for n in nodes if candidate(n) and n not in inside}
    reached: set[Node] = set()
    for n in nodes:  # hanging off what joined (not off the block itself: its exits stay exits)
        if n in tails and any(a in inside or a in reached for a in n.all_input_nodes):
            reached.add(n)
    while True:  # keep the chains whose every reader is inside or a gradient reduction
        gone = {n for n in reached
                if not all(u in members or u in inside or u in reached or is_reduce_grad(u) for u in n.users)}
        if not gone:
            break
        reached -= gone
    return inside | reached


def returned_hint(region: Region, forward: set[Node]) -> str:
    """The model returns a tensor of the block (a key/value cache): its layout cannot change."""
    returned = [n.name for n in region.nodes if n in forward and any(u.op == "output" for u in n.users)]
    if not returned:
        return ""
    return (f"; the model returns {', '.join(returned)} from inside the block (a key/value cache? call the "
            "model with use_cache=False)")
