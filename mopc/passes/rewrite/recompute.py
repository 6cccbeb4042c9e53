"""Full activation recompute (Megatron's "full" activation checkpointing), `recompute="full"`.

Between forward and backward each transformer layer keeps only its input, the residual
stream entering it; everything else the layer computes is computed again in backward,
from that input and the parameters. The pass only tags nodes of the joint graph; the
min-cut partitioner (`mopc/backend.py`) honours the tags when it splits forward from
backward: `MUST_RECOMPUTE` nodes are rebuilt in backward, `MUST_SAVE` ones are kept.

Collectives inside a layer (tensor-parallel all-gathers and reduce-scatters, the
expert-parallel exchange, context-parallel K/V gathers) are recomputed too: every rank
runs the same backward graph, so they pair up across ranks, as the re-gathers of
`gather_params` already do.
"""

from __future__ import annotations

import logging
import operator
from collections import Counter

import torch
from torch.fx import GraphModule, Node
from torch.utils.checkpoint import CheckpointPolicy

from mopc.passes.analysis.graph_utils import (
    MATMUL_OPS,
    SDPA_OPS,
    forward_nodes,
    is_op,
    live_forward,
)
from mopc.passes.registry import register_pass

log = logging.getLogger("mopc.passes")

# mopc ops that compute a value from their inputs and nothing else, so running them again
# in backward gives the same value (the expert exchange re-plans the same route from the
# same counts). The rest of the namespace (unshard/reduce_grad, offload/reload, the
# optimizer hand-off, compressed reductions with error feedback) must not run twice.
_RERUNNABLE_MOPC_OPS = frozenset({
    "ep_dispatch", "ep_combine", "ep_local_offsets", "ep_lend_weights", "cp_attention", "grouped_mm",
    "moe_dispatch_indices", "moe_inverse_perm", "moe_gather_rows", "moe_combine_rows", "moe_rows_dot_tokens",
})
# passes whose forward nodes keep the tags they were given (parameter gathers follow
# `reshard_after_forward`: they are weights, not activations)
_KEEP_TAGS_OF = frozenset({"gather_params"})


def _dropout_p(node: Node) -> object:
    schema = getattr(node.target, "_schema", None)
    for index, arg in enumerate(schema.arguments if schema is not None else ()):
        if arg.name == "dropout_p":
            return node.args[index] if index < len(node.args) else node.kwargs.get("dropout_p", arg.default_value)
    return None


def _is_random(node: Node) -> bool:
    """Seeded random ops; attention kernels carry the tag for their dropout, deterministic at 0."""
    if node.target is operator.getitem:
        return _is_random(node.args[0])
    if torch.Tag.nondeterministic_seeded not in getattr(node.target, "tags", ()):
        return False
    return _dropout_p(node) != 0


def _is_mutating(node: Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def _is_unsafe_mopc_op(node: Node) -> bool:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "mopc":
        return False
    return target._opname not in _RERUNNABLE_MOPC_OPS


def _is_effectful(node: Node) -> bool:
    return node.target is torch.ops.higher_order.with_effects


def _has_tensor_value(node: Node) -> bool:
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return any(isinstance(v, torch.Tensor) for v in val)
    return isinstance(val, torch.Tensor)


def _is_seeded(node: Node) -> bool:
    if node.target is operator.getitem:
        return _is_seeded(node.args[0])
    return torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())


def _has_opaque_inputs(graph: torch.fx.Graph) -> bool:
    """Graph inputs that are neither tensors nor numbers (a DTensor parameter's DeviceMesh)."""
    plain = (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool, type(None))
    return any(not isinstance(ph.meta.get("val"), plain) for ph in graph.find_nodes(op="placeholder"))


def _skip_reason(node: Node, opaque_inputs: bool = False) -> str | None:
    """Why a forward node inside a layer is left to the partitioner, or None to recompute it."""
    if not _has_tensor_value(node):
        return "not a tensor"  # symbolic sizes follow the tensors they come from
    if node.meta.get("mopc_created_by") in _KEEP_TAGS_OF:
        return "parameter gather"
    if _is_random(node):
        return "random"  # saved: running it again would draw other numbers
    if opaque_inputs and _is_seeded(node):
        # A recomputed op with the seeded tag (attention kernels carry it for dropout, even
        # at dropout_p=0) makes the partitioner save the RNG state, and torch 2.13 puts those
        # states in the wrong place among saved values when opaque inputs (a DTensor
        # parameter's DeviceMesh) are saved too; the attention output is saved instead.
        return "seeded op (attention) beside opaque inputs"
    if _is_mutating(node) or _is_effectful(node):
        return "mutation or side effect"
    if _is_unsafe_mopc_op(node) or (node.target is operator.getitem and _is_unsafe_mopc_op(node.args[0])):
        return "mopc op that must not run twice"
    return None


def _is_layer_compute(node: Node) -> bool:
    """Matmuls, attention, collectives and custom ops: what makes rebuilding a value cost a
    layer's work, as opposed to elementwise ops, reductions and views."""
    if is_op(node, MATMUL_OPS | SDPA_OPS):
        return True
    namespace = getattr(node.target, "namespace", "aten")
    return namespace != "aten"


def _cheap_from_boundaries(node: Node, layer_of: dict[Node, int | None], boundaries: set[Node],
                           opaque_inputs: bool) -> bool:
    """Whether `node` is rebuilt from other boundary values (or values outside its layer) by
    elementwise ops, reductions and views only: a norm's statistics and normalised input
    that the layer analysis places in the layer before the norm's weight."""
    layer = layer_of[node]
    stack, seen = list(node.all_input_nodes), set()
    while stack:
        src = stack.pop()
        if src in seen or src in boundaries or layer_of.get(src) != layer:
            continue
        seen.add(src)
        if _is_layer_compute(src) or _skip_reason(src, opaque_inputs) is not None:
            return False
        stack.extend(src.all_input_nodes)
    return not _is_layer_compute(node)


@register_pass(kind="rewrite", requires=("classify_roles", "annotate_roles"),
               enabled=lambda c: c.recompute == "full")
def full_recompute(gm: GraphModule, ctx) -> GraphModule:
    """Tag every forward value computed inside a transformer layer for recompute, except
    the values a layer hands on (the next layer's input).

    Algorithm:
    1. the forward nodes: those of the roles analysis (`classify_roles.forward_nodes`),
       and for nodes rewrites inserted after it (`mopc_created_by` not `capture`), the
       same rule on the current graph (ancestors of the forward outputs, and forward-only
       leftovers);
    2. each forward `call_function` node's layer: `meta["mopc_layer"]` (the roles
       analysis's `node_layers`, or the layer the inserting pass gave it); nodes outside
       layers (embedding, final projection, loss) are left to the partitioner;
    3. skip, leaving their tags as they are, nodes that must not or need not be rerun:
       non-tensor values, parameter gathers of `gather_params` (they follow
       `reshard_after_forward`), random ops (a seeded op with `dropout_p != 0`: its output
       is saved, a rerun would draw other numbers), mutating or effectful ops, mopc ops
       with state or side effects (anything in the `mopc` namespace but the expert
       exchange, context-parallel attention and the dispatch/grouped-matmul codegen ops),
       and, when the graph has opaque inputs (DTensor meshes), seeded ops such as
       attention kernels (torch 2.13 misplaces the saved RNG states beside opaque values);
    4. a layer node read in forward by a node of another layer, outside layers, or by the
       graph output is a layer boundary; a boundary rebuilt from other boundaries (or
       values outside its layer) by elementwise ops, reductions and views alone is not
       kept (the roles analysis puts a norm's statistics and normalised input in the
       layer before the norm's weight; they are recomputed from the residual);
    5. tag the kept boundaries `MUST_SAVE` (the next layer's input) and every other layer
       node `MUST_RECOMPUTE`, with `ac_graph_id=0`, overriding tags earlier passes set
       (the expert-parallel exchange's `MUST_SAVE`), so backward rebuilds the whole layer
       from its input.
    """
    graph = gm.graph
    roles = ctx.result("classify_roles")
    captured_forward = roles.forward_nodes
    inserted = [n for n in graph.nodes if n.meta.get("mopc_created_by", "capture") != "capture"]
    current_forward = forward_nodes(graph, live_forward(graph, ctx.num_fwd_outputs)) if inserted else set()

    def is_forward(node: Node) -> bool:
        if node.meta.get("mopc_created_by", "capture") == "capture":
            return node.name in captured_forward
        return node in current_forward

    def layer_of(node: Node) -> int | None:
        if "mopc_layer" in node.meta:
            return node.meta["mopc_layer"]
        return roles.node_layers.get(node.name)

    in_layers = {n: layer_of(n) for n in graph.nodes
                 if n.op == "call_function" and is_forward(n) and layer_of(n) is not None}
    skipped: Counter[str] = Counter()
    saved: Counter[int] = Counter()
    recomputed: Counter[int] = Counter()
    tagged = {}
    opaque_inputs = _has_opaque_inputs(graph)
    for node, layer in in_layers.items():
        reason = _skip_reason(node, opaque_inputs)
        if reason is not None:
            skipped[reason] += 1
        else:
            tagged[node] = layer
    boundaries = {n for n, layer in tagged.items()
                  if any(u.op == "output" or (is_forward(u) and in_layers.get(u) != layer) for u in n.users)}
    kept = {n for n in boundaries if not _cheap_from_boundaries(n, in_layers, boundaries, opaque_inputs)}
    for node, layer in tagged.items():
        if node in kept:
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            saved[layer] += 1
        else:
            node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            recomputed[layer] += 1
        node.meta["ac_graph_id"] = 0
    log.info("full_recompute on %s: %d nodes recomputed, %d saved at layer boundaries over %d layers; skipped %s",
             ctx.graph_id, sum(recomputed.values()), sum(saved.values()), len(recomputed),
             dict(skipped) or "none")
    return gm
