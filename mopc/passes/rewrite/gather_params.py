"""The reference program's collectives: gather sharded parameters, reduce-scatter gradients.

After `mopc.parallelize`, a parameter enters the graph as this rank's flat shard and is
turned into its full value by `mopc::unshard`; autograd's backward of that op is
`mopc::reduce_grad` (mean over ranks, keep this rank's piece). This pass lowers both into
`_c10d_functional` collectives, merged into buckets per layer, and tags the gathers so
that the partitioner gathers again in backward instead of keeping the full parameters
alive between forward and backward (ZeRO-3's reshard after forward).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node
from torch.utils.checkpoint import CheckpointPolicy

from mopc.passes.analysis.graph_utils import is_reduce_grad, is_unshard
from mopc.passes.registry import register_pass
from mopc.passes.rewrite.splice import insert_traced
from mopc.plan.mesh import group_size
from mopc.runtime.ownership import full_to_gathered, gathered_to_full

c10d = torch.ops._c10d_functional


@dataclass
class _Bucket:
    nodes: list[Node] = field(default_factory=list)
    nbytes: int = 0


def _piece_numel(node: Node) -> int:
    if is_unshard(node):
        return node.args[0].meta["val"].numel()
    return node.meta["val"].numel()


def _buckets(nodes: list[Node], order: dict[Node, int], bucket_bytes: int) -> list[list[Node]]:
    """Consecutive nodes of one layer, dtype and group, up to `bucket_bytes` gathered bytes.

    A bucket is closed early when merging would break topological order: a member's
    inputs must exist before the bucket's collective runs, and no member's result may be
    read before the collective has produced it.
    """
    out: list[list[Node]] = []
    cur = _Bucket()

    def key(n: Node) -> tuple:
        group = n.args[4] if is_unshard(n) else n.args[3]
        return (n.meta.get("mopc_layer"), n.meta["val"].dtype, group)

    for node in nodes:
        full = node.meta["val"] if is_unshard(node) else node.args[0].meta["val"]  # gathered size either way
        nbytes = full.numel() * full.element_size()
        fits = cur.nodes and key(cur.nodes[0]) == key(node) and cur.nbytes + nbytes <= bucket_bytes
        if fits and is_reduce_grad(node):  # the collective goes where the last member was
            fits = all(order[u] > order[node] for m in cur.nodes for u in m.users)
        if fits and is_unshard(node):  # the collective goes where the first member was
            fits = order[node.args[0]] < order[cur.nodes[0]]
        if not fits and cur.nodes:
            out.append(cur.nodes)
            cur = _Bucket()
        cur.nodes.append(node)
        cur.nbytes += nbytes
    if cur.nodes:
        out.append(cur.nodes)
    return out


def _gather_bucket(members: list[Node], world: int, group: str) -> Callable[..., list[torch.Tensor]]:
    layouts = [(list(m.args[1]), m.args[2], m.args[3]) for m in members]
    sizes = [_piece_numel(m) for m in members]
    dtype = members[0].meta["val"].dtype  # the bucket's (one) gathered dtype: param_dtype

    def gather(*shards: torch.Tensor) -> list[torch.Tensor]:
        # mixed precision: cast before the collective, so it moves param_dtype bytes
        shards = tuple(s if s.dtype == dtype else s.to(dtype) for s in shards)
        flat = shards[0] if len(shards) == 1 else torch.cat(shards)
        gathered = c10d.wait_tensor(c10d.all_gather_into_tensor(flat, world, group))
        per_rank = gathered.view(world, -1)
        parts = [per_rank] if len(shards) == 1 else torch.split(per_rank, sizes, dim=1)
        return [gathered_to_full(p.reshape(-1), shape, dim, chunks, world)
                for p, (shape, dim, chunks) in zip(parts, layouts)]

    return gather


def _reduce_bucket(members: list[Node], world: int, group: str) -> Callable[..., list[torch.Tensor]]:
    layouts = [(m.args[1], m.args[2]) for m in members]
    sizes = [_piece_numel(m) for m in members]

    def reduce(*grads: torch.Tensor) -> list[torch.Tensor]:
        per_rank = [full_to_gathered(g, dim, chunks, world).view(world, -1)
                    for g, (dim, chunks) in zip(grads, layouts)]
        flat = per_rank[0] if len(grads) == 1 else torch.cat(per_rank, dim=1)
        mine = c10d.wait_tensor(c10d.reduce_scatter_tensor(flat.reshape(-1), "sum", world, group))
        mine = mine / world  # DDP semantics: the mean over ranks of the rank losses' gradients
        return [mine] if len(grads) == 1 else list(torch.split(mine, sizes))

    return reduce


def _hoist_shard_views(graph: torch.fx.Graph, unshards: list[Node]) -> None:
    """Move the views that unwrap shard inputs (DTensor `to_local`) up to the inputs, so
    that the shards of a whole bucket exist before its first member runs."""
    inputs = graph.find_nodes(op="placeholder")
    if not inputs:  # a graph Dynamo split off that takes nothing (no shard to unwrap)
        return
    last_input = inputs[-1]
    for node in unshards:
        src = node.args[0]
        if src.op == "call_function" and all(a.op == "placeholder" for a in src.all_input_nodes):
            last_input.append(src)
            last_input = src


def _only_to_output(node: Node, output: Node) -> list[Node]:
    """`node` and the nodes after it, when it is a chain of one-input ops that ends at the
    output (a cast back to the shard's dtype, then the view that wraps a DTensor); else []."""
    if node.op != "call_function" or len(node.all_input_nodes) != 1:
        return []
    if set(node.users) == {output}:
        return [node]
    if len(node.users) != 1:
        return []
    rest = _only_to_output(next(iter(node.users)), output)
    return [node, *rest] if rest else []


def _sink_grad_views(graph: torch.fx.Graph, reduces: list[Node]) -> None:
    """Move the views that wrap shard gradients (back into DTensors), and under mixed
    precision the casts back to the shard's dtype before them, down to the output, so that
    a bucket's gradients are not read before its reduce-scatter has run."""
    output = graph.find_nodes(op="output")[0]
    for node in reduces:
        for user in list(node.users):
            for moved in _only_to_output(user, output):
                output.prepend(moved)


@register_pass(
    kind="rewrite",
    requires=("annotate_roles",),
    options_from_config=lambda c: {"bucket_bytes": int(c.bucket_mb * 2**20),
                                   "reshard_after_forward": c.reshard_after_forward},
)
def gather_params(gm: GraphModule, ctx, *, bucket_bytes: int, reshard_after_forward: bool) -> GraphModule:
    """Lower `mopc::unshard` / `mopc::reduce_grad` into bucketed all-gathers and reduce-scatters.

    Algorithm:
    1. collect the unshard nodes (forward) and reduce_grad nodes (backward) in graph order;
    2. bucket consecutive ones of the same layer, dtype and group up to `bucket_bytes`;
    3. per unshard bucket, before its first member: cast the flat shards to the gathered
       dtype (mixed precision's `param_dtype`; no cast by default), concatenate them, one
       `all_gather_into_tensor` over the world, wait, split per parameter and reassemble
       each full parameter from its rank-ordered pieces (`gathered_to_full`);
    4. per reduce_grad bucket, before its last member (its gradients are already in
       `reduce_dtype`: the cast up or down is the unshard backward's, outside reduce_grad,
       as is the cast of the reduced shard back to the shard's dtype), lay each gradient out in rank order
       (`full_to_gathered`), concatenate, one `reduce_scatter_tensor(sum)`, wait, divide
       by the world size, split per parameter;
    5. tag the gather nodes `MUST_RECOMPUTE` (when `reshard_after_forward`), so the
       partitioner saves the shards, not the gathered parameters, for backward.
    """
    graph = gm.graph
    unshards = [n for n in graph.nodes if is_unshard(n) and n.users]
    _hoist_shard_views(graph, unshards)
    order = {n: i for i, n in enumerate(graph.nodes)}
    reduces = [n for n in graph.nodes if is_reduce_grad(n)]
    _sink_grad_views(graph, reduces)
    for members in _buckets(unshards, order, bucket_bytes):
        group = members[0].args[4]
        world = group_size(group)
        tags = {"mopc_role": members[0].meta.get("mopc_role", "other"),
                "mopc_layer": members[0].meta.get("mopc_layer")}
        if reshard_after_forward:
            tags |= {"recompute": CheckpointPolicy.MUST_RECOMPUTE, "ac_graph_id": 0}
        fulls = insert_traced(graph, _gather_bucket(members, world, group), [m.args[0] for m in members],
                              before=members[0], meta=tags)
        for member, full in zip(members, fulls):
            member.replace_all_uses_with(full)
            graph.erase_node(member)
    order = {n: i for i, n in enumerate(graph.nodes)}  # after the gathers went in
    for members in _buckets(reduces, order, bucket_bytes):
        group = members[-1].args[3]
        world = group_size(group)
        tags = {"mopc_role": members[-1].meta.get("mopc_role", "other"),
                "mopc_layer": members[-1].meta.get("mopc_layer")}
        shards = insert_traced(graph, _reduce_bucket(members, world, group), [m.args[0] for m in members],
                               before=members[-1], meta=tags)
        for member, shard in zip(members, shards):
            member.replace_all_uses_with(shard)
            graph.erase_node(member)
    for node in [n for n in graph.nodes if is_unshard(n) and not n.users]:
        graph.erase_node(node)
    graph.eliminate_dead_code()
    return gm

