"""Small, read-only helpers over ATen FX graphs shared by the analysis passes.

Everything here only reads the graph. Op sets are by `OpOverloadPacket` so that both
overloads and the packet itself match (`aten.mm` and `aten.mm.default`).
"""

from __future__ import annotations

import collections
import operator
from typing import Callable, Iterable

import torch
from torch.fx import Graph, Node

aten = torch.ops.aten
prims = torch.ops.prims


def _packets(*ops: object) -> frozenset:
    found = set()
    for op in ops:
        if op is not None:
            found.add(op)
    return frozenset(found)


class _Tolerant:
    """Attribute access on an op namespace that yields None for ops this torch lacks."""

    def __init__(self, namespace: object) -> None:
        self._namespace = namespace

    def __getattr__(self, name: str) -> object:
        return getattr(self._namespace, name, None)


_aten = _Tolerant(aten)
_prims = _Tolerant(prims)


def packet_of(node: Node) -> object:
    """The OpOverloadPacket of a call_function node (or its target when it has none)."""
    target = node.target
    return getattr(target, "overloadpacket", target)


def is_op(node: Node, ops: frozenset) -> bool:
    return node.op == "call_function" and packet_of(node) in ops


def is_named_op(node: Node, qualified_name: str) -> bool:
    """Whether a node calls the custom op `namespace::name` (registered or not yet)."""
    return node.op == "call_function" and getattr(packet_of(node), "_qualified_op_name", None) == qualified_name


def is_unshard(node: Node) -> bool:
    """`mopc::unshard`: a sharded parameter gathered into its full value."""
    return is_named_op(node, "mopc::unshard")


def is_reduce_grad(node: Node) -> bool:
    """`mopc::reduce_grad`: a full gradient reduced into this rank's shard of it."""
    return is_named_op(node, "mopc::reduce_grad")


# Ops that only re-describe a tensor (no arithmetic on its values).
VIEW_OPS = _packets(
    _aten.t, _aten.transpose, _aten.permute, _aten.view, _aten.reshape, _aten._unsafe_view,
    _aten.expand, _aten.unsqueeze, _aten.squeeze, _aten.clone, _aten.contiguous, _aten._to_copy,
    _aten.alias, _aten.detach, _aten.lift_fresh_copy, _aten.view_as, _aten.expand_as, _aten.flatten,
    _aten.unflatten, _aten.to, _aten.type_as, _aten._reshape_alias, _aten.as_strided,
    _prims.convert_element_type, _aten.unfold, _aten._reshape_copy,
    _aten.slice, _aten.select, _aten.split, _aten.split_with_sizes, _aten.unbind, _aten.chunk,
    _aten.narrow, _aten.movedim, _aten.mT, _aten.numpy_T, _aten.matrix_H, _aten.adjoint,
)

MATMUL_OPS = _packets(
    _aten.mm, _aten.addmm, _aten.bmm, _aten.baddbmm, _aten.matmul, _aten.linear, _aten.einsum,
    _aten.addbmm, _aten.mv, _aten.addmv, _aten.dot, _aten.tensordot,
    _aten._grouped_mm, _aten._scaled_mm, _aten._scaled_grouped_mm,
    _aten._int_mm,
)

SDPA_OPS = _packets(
    _aten.scaled_dot_product_attention,
    _aten._scaled_dot_product_flash_attention_for_cpu,
    _aten._scaled_dot_product_flash_attention,
    _aten._scaled_dot_product_efficient_attention,
    _aten._scaled_dot_product_cudnn_attention,
    _aten._scaled_dot_product_attention_math,
    _aten._scaled_dot_product_fused_attention_overrideable,
    _aten._flash_attention_forward,
    _aten._efficient_attention_forward,
)

SOFTMAX_OPS = _packets(_aten._softmax, _aten.softmax, _aten._safe_softmax)
LOG_SOFTMAX_OPS = _packets(_aten._log_softmax, _aten.log_softmax)
LOSS_OPS = _packets(
    _aten.nll_loss_forward, _aten.nll_loss, _aten.nll_loss2d_forward, _aten.nll_loss_nd,
    _aten.cross_entropy_loss, _aten.nll_loss2d,
)
TOPK_OPS = _packets(_aten.topk)
EMBEDDING_OPS = _packets(_aten.embedding)
NORM_OPS = _packets(
    _aten.native_layer_norm, _aten.layer_norm, _aten.rms_norm,
    _aten._fused_rms_norm, _aten.native_group_norm, _aten.group_norm,
    _aten.native_batch_norm, _aten._native_batch_norm_legit_functional,
)
# Index-like ops: their index operand selects rows of their data operand.
INDEXING_OPS = _packets(
    _aten.index, _aten.index_select, _aten.gather, _aten.masked_select, _aten.take,
    _aten._unsafe_index, _aten.take_along_dim,
)
# Ops that scatter or reduce expert results back into token order.
COMBINE_OPS = _packets(
    _aten.index_add, _aten.index_put, _aten.scatter, _aten.scatter_add, _aten.scatter_reduce,
    _aten._unsafe_index_put, _aten.index_reduce, _aten.sum, _aten.mean, _aten.amax,
)
RSQRT_LIKE_OPS = _packets(_aten.rsqrt, _aten.reciprocal, _aten.sqrt, _aten.div, _aten.var_mean, _aten.var)


def size_hint(size: object) -> int | None:
    """An int for a size without adding a guard: symbolic sizes give their hint (or None).

    Analysis must never specialise a dynamic shape: `int(symint)` would add a guard and
    make Dynamo recompile for every new size.
    """
    if isinstance(size, int):
        return size
    if isinstance(size, torch.SymInt):
        node = size.node
        return node.hint if getattr(node, "has_hint", lambda: False)() else None
    return None


def shape_hint(val: object) -> tuple[int | None, ...] | None:
    return tuple(size_hint(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def tensor_meta(node: object) -> torch.Tensor | None:
    """The example value (`meta["val"]`) of a node if it is a tensor."""
    if not isinstance(node, Node):
        return None
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def tensor_inputs(node: Node) -> list[Node]:
    """Node inputs of `node` (flattened args and kwargs) in order, without duplicates."""
    return list(dict.fromkeys(node.all_input_nodes))


def view_source(node: Node) -> Node:
    """Walk back through view-like ops along their first tensor input."""
    seen = 0
    while isinstance(node, Node) and is_op(node, VIEW_OPS) and seen < 64:
        ins = tensor_inputs(node)
        if not ins:
            break
        node = ins[0]
        seen += 1
    # getitem of split/unbind/chunk outputs
    if node.op == "call_function" and node.target is operator.getitem:
        parent = node.args[0]
        if isinstance(parent, Node) and is_op(parent, VIEW_OPS):
            return view_source(parent)
    return node


def walk_back(
    starts: Iterable[Node],
    stop: Callable[[Node], bool],
    allowed: Callable[[Node], bool] = lambda n: True,
    max_nodes: int = 100_000,
) -> tuple[set[Node], list[Node]]:
    """Breadth-first walk against data flow.

    Returns (visited, frontier): `visited` are the nodes passed through, `frontier` the
    nodes where `stop` held (not expanded). Nodes failing `allowed` are skipped.
    """
    visited: set[Node] = set()
    frontier: list[Node] = []
    queue = collections.deque(starts)
    seen: set[Node] = set()
    while queue and len(seen) < max_nodes:
        node = queue.popleft()
        if node in seen or not allowed(node):
            continue
        seen.add(node)
        if stop(node):
            frontier.append(node)
            continue
        visited.add(node)
        queue.extend(tensor_inputs(node))
    return visited, frontier


def descendants(starts: Iterable[Node], allowed: Callable[[Node], bool] = lambda n: True) -> set[Node]:
    out: set[Node] = set()
    queue = list(starts)
    while queue:
        node = queue.pop()
        for user in node.users:
            if user not in out and allowed(user):
                out.add(user)
                queue.append(user)
    return out


def post_dominated(
    graph_nodes: list[Node],
    seeds: Iterable[Node],
    members: set[Node],
    allowed: Callable[[Node], bool] = lambda n: True,
) -> set[Node]:
    """Nodes (within `members`) all of whose users inside `members` lie in the region.

    The region starts as `seeds` and grows against data flow: a node joins once every one
    of its users among `members` is already in it. Used to find what is private to a
    component (a norm's statistics, an attention block's projections and RoPE).
    `allowed` limits which nodes may join (a norm's region must not swallow the residual
    stream that only feeds it, say).
    """
    region = set(seeds)
    # views kept only for the backward (AOT's `detach` of saved values) do not count as uses
    dead_ends = {n for n in members if is_op(n, VIEW_OPS) and not any(u in members for u in n.users)}
    for node in reversed(graph_nodes):
        if node in region or node not in members or node.op == "output" or node in dead_ends:
            continue
        if not allowed(node):
            continue
        users = [u for u in node.users if u in members and u not in dead_ends]
        if users and all(u in region for u in users):
            region.add(node)
    region |= {n for n in dead_ends if any(i in region for i in n.all_input_nodes)}
    return region


def node_bytes(node: Node) -> int:
    """Bytes of a node's tensor outputs, from `meta["val"]` (size hints for symbolic shapes,
    0 when a size has no hint)."""
    val = node.meta.get("val")
    vals = val if isinstance(val, (list, tuple)) else [val]
    total = 0
    for v in vals:
        shape = shape_hint(v)
        if shape is not None and None not in shape:
            numel = 1
            for s in shape:
                numel *= s
            total += numel * v.element_size()
    return total


def live_forward(graph: Graph, num_fwd_outputs: int) -> set[Node]:
    """Ancestors of the forward outputs: the forward nodes whose values are used."""
    out_node = graph.find_nodes(op="output")[0]
    outs = out_node.args[0]
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    fwd_outs = [o for o in outs[:num_fwd_outputs] if isinstance(o, Node)]
    live, _ = walk_back(fwd_outs, stop=lambda n: False)
    return live


def forward_nodes(graph: Graph, live: set[Node]) -> set[Node]:
    """Live forward nodes plus forward-only leftovers (values kept for the backward)."""
    fwd = set(live)
    tangents = {n for n in graph.nodes if n.op == "placeholder" and "tangent" in n.name}
    after_tangent = descendants(tangents)
    for node in graph.nodes:
        if node in fwd or node in after_tangent or node.op == "output":
            continue
        if node.meta.get("autograd_backward") or node.meta.get("partitioner_tag") == "is_backward":
            continue
        ins = tensor_inputs(node)
        if node.op == "placeholder" or (ins and all(i in fwd for i in ins)):
            fwd.add(node)
    return fwd


def flatten_args(args: object) -> list[object]:
    if isinstance(args, (list, tuple)):
        return [x for a in args for x in flatten_args(a)]
    return [args]
