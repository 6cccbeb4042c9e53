"""Expert parallelism for routed experts, as a rewrite of the reference program.

In the reference program every rank gathers all E experts of a layer and computes its
own routed rows `x [N, D]` (grouped by expert, `offsets` their cumulative ends). Under
expert parallelism of degree P the experts stay split over the P ranks of an
expert-parallel group (E/P each, ZeRO-3-sharded over the ranks holding the same experts)
and the rows travel instead:

    counts [E] = diff(offsets) --all_gather(ep)--> counts_all [P, E]
    x [N, D] --ep_dispatch--> x_loc [R, D] (R: rows this rank computes, known at run time)
    experts(x_loc, local offsets, local weights) --> y_loc [R, D]
    y_loc --ep_combine--> y [N, D]        (back in x's order, for the unchanged combine)

The backward is the exact reverse: the gradient of `y` is dispatched like `x`, the
gradient of `x_loc` combined like `y_loc`. Weight gradients of the local experts sum
the whole group's rows, so they are scaled by 1/P before the mean reduce-scatter over the
expert-data-parallel ranks (which gives the reference program's world mean). With
spilling, borrowed experts' weights are appended to the local ones (`ep_lend_weights`)
and their gradients returned to the owner (`ep_return_grads`). Router, shared experts
and the model's own dispatch/combine keep their layout.

The experts' own nodes are re-propagated on the new shapes (ops are re-run on fake
values; `R` is an unbacked size). A block whose data flow this cannot express (several
token inputs, an expert weight that is not split, an op that fails on the new shapes)
keeps the reference layout, with a warning saying why.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import compute_unbacked_bindings
from torch.utils._pytree import tree_map
from torch.utils.checkpoint import CheckpointPolicy

import mopc.runtime.experts  # noqa: F401  (registers the mopc::ep_* ops)
from mopc.passes.analysis.graph_utils import is_reduce_grad, is_unshard
from mopc.passes.pipeline import debug_enabled
from mopc.passes.registry import register_pass
from mopc.passes.rewrite.splice import insert_traced
from mopc.plan.mesh import find_meshes

log = logging.getLogger("mopc.passes")
c10d = torch.ops._c10d_functional
mopc_ops = torch.ops.mopc

# Ops taking the number of expert groups as an argument: (op, argument index).
_GROUP_COUNT_ARGS = {"mopc::grouped_mm_weight_grad": 3}
# Grouped matmuls whose third operand is the cumulative row ends per expert (transformers 5.x
# runs fp32 experts under torch.compile through its own (input, weight [E, ...], offs) ops).
_OFFSET_OPERAND_OPS = frozenset({"mopc::grouped_mm", "mopc::grouped_mm_weight_grad", "aten::_grouped_mm",
                                 "transformers::grouped_mm_fallback", "transformers::grouped_mm_fallback_backward"})


class _Unsupported(Exception):
    """This block keeps the reference layout."""


def _is_shard_side(node: Node, shard_side: set[Node], reduced: set[Node]) -> bool:
    """A view that unwraps a shard, or an op on reduced gradients only (the view that wraps
    a DTensor; under mixed precision the cast back to the shard's dtype before it). Call it
    in graph order: `reduced` collects the latter."""
    if node in shard_side:
        return True
    if node.all_input_nodes and all(is_reduce_grad(a) or a in reduced for a in node.all_input_nodes):
        reduced.add(node)
        return True
    return False


@dataclass
class _Block:
    layer: int | None
    nodes: list[Node] = field(default_factory=list)


def _blocks(gm: GraphModule) -> list[_Block]:
    shard_side = {n.args[0] for n in gm.graph.nodes if is_unshard(n)}
    reduced: set[Node] = set()
    by_layer: dict[Any, _Block] = {}
    for node in gm.graph.nodes:
        if (node.op != "call_function" or node.meta.get("mopc_role") != "expert" or is_unshard(node)
                or is_reduce_grad(node) or _is_shard_side(node, shard_side, reduced)
                or str(node.target).startswith("_c10d_functional")):
            continue
        layer = node.meta.get("mopc_layer")
        by_layer.setdefault(layer, _Block(layer)).nodes.append(node)
    return list(by_layer.values())


def _fake_mode(gm: GraphModule):
    from torch._guards import detect_fake_mode

    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


class _Rewrite:
    """One MoE layer's experts: find the interface, re-propagate, then commit."""

    def __init__(self, gm: GraphModule, block: _Block, forward: set[Node], ep: int, groups: tuple[str, str],
                 route: tuple[float, float, int], reshard: bool) -> None:
        self.gm, self.block, self.forward, self.ep = gm, block, forward, ep
        self.ep_group, self.edp_group = groups
        self.capacity, self.spill, self.slots = route
        self.reshard = reshard
        self.members = set(block.nodes)
        self.fake_mode = _fake_mode(gm)

    # ------------------------------------------------------------------ interface

    def find_interface(self) -> None:
        unshards, tokens, grads, offsets = [], [], [], []
        for node in self.block.nodes:
            for a in node.all_input_nodes:
                if a in self.members:
                    continue
                val = a.meta.get("val")
                if is_unshard(a):
                    if a.args[3] != self.ep or a.args[2] != 0:
                        raise _Unsupported(f"expert weight {a.args[0]} is not split over ep={self.ep}")
                    unshards.append(a)
                elif isinstance(val, torch.Tensor) and not val.is_floating_point() and val.dim() == 1:
                    offsets.append(a)
                elif isinstance(val, torch.Tensor) and val.dim() == 2 and val.is_floating_point():
                    (tokens if a in self.forward else grads).append(a)
                else:
                    raise _Unsupported(f"unexpected input {a.name} ({getattr(val, 'shape', val)})")
        unique = lambda xs: list(dict.fromkeys(xs))
        self.unshards, tokens, grads, offsets = unique(unshards), unique(tokens), unique(grads), unique(offsets)
        if len(tokens) != 1 or len(offsets) != 1 or len(grads) > 1 or not self.unshards:
            raise _Unsupported(f"expected one token input, one offsets input and split weights; found "
                               f"{len(tokens)} token, {len(offsets)} offsets, {len(self.unshards)} weight inputs")
        self.x, self.offsets = tokens[0], offsets[0]
        self.grad_y = grads[0] if grads else None
        self.num_experts = int(self.offsets.meta["val"].shape[0])
        self._check_offsets()
        self._check_order()
        self.num_rows = int(self.x.meta["val"].shape[0])
        self.local_experts = self.num_experts // self.ep
        self.num_slots = self.local_experts + (self.slots if self.spill > 0 else 0)
        # what leaves the block
        self.y = self.grad_x = None
        self.weight_grads: list[tuple[Node, Node]] = []
        for node in self.block.nodes:
            outside = [u for u in node.users if u not in self.members]
            if not outside:
                continue
            if all(is_reduce_grad(u) for u in outside):
                self.weight_grads.extend((node, u) for u in outside)
            elif node in self.forward and self.y is None:
                self.y = node
            elif node not in self.forward and self.grad_x is None:
                self.grad_x = node
            else:
                raise _Unsupported(f"{node.name} is used outside the experts ({outside[0].name})")
        if self.y is None:
            raise _Unsupported("no expert output found")
        for node, reduce in self.weight_grads:
            if reduce.args[1] != 0 or reduce.args[2] != self.ep:
                raise _Unsupported(f"gradient {node.name} is not reduced as an expert-split weight")

    def _check_offsets(self) -> None:
        """The 1-D integer input must be grouped_mm offsets (cumulative row ends per expert):
        int32, one per expert of every weight, and read only as the `offs` operand."""
        val = self.offsets.meta["val"]
        if val.dtype != torch.int32:
            raise _Unsupported(f"{self.offsets.name} ({val.dtype}) is not int32 grouped_mm offsets")
        for u in self.unshards:
            if int(u.args[1][0]) != self.num_experts:
                raise _Unsupported(f"{u.name} has {u.args[1][0]} experts but the offsets {self.num_experts}")
        for user in self.offsets.users:
            if user not in self.members:
                continue
            name = user.target.name() if hasattr(user.target, "name") else str(user.target)
            operand = 2 if name.split(".")[0] in _OFFSET_OPERAND_OPS else None
            if operand is None or user.args[operand] is not self.offsets or self.offsets in user.args[:operand]:
                raise _Unsupported(f"the offsets feed {user.name} ({name}), not a grouped matmul's offs")

    def _check_order(self) -> None:
        """The counts exchange goes right after the offsets are computed: the token input and
        (when spilling lends weights) the weights must first be used after that."""
        if self.offsets.op != "call_function":
            raise _Unsupported(f"the offsets {self.offsets.name} are a graph input")
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        defined = order[self.offsets]
        late = [self.x] + (self.unshards if self.spill > 0 else [])
        for src in late:
            uses = [order[u] for u in src.users if u in self.members]
            if uses and min(uses) < defined:
                raise _Unsupported(f"{src.name} is used by the experts before the offsets exist")

    # ------------------------------------------------------------------ fake values

    def _fake_call(self, op, *args) -> torch.Tensor:
        shape_env = self.fake_mode.shape_env
        if shape_env is None:
            raise _Unsupported("the graph's fake mode has no shape environment for data-dependent sizes")
        # Dynamo turns data-dependent output sizes off unless fullgraph=True; the rows a rank
        # receives are data-dependent by nature, so allow them for this call.
        settings = shape_env.settings
        shape_env.settings = dataclasses.replace(settings, allow_dynamic_output_shape_ops=True)
        try:
            with self.fake_mode:
                out = op(*args)
        finally:
            shape_env.settings = settings
        # The node we create binds the fresh symbol (where its value comes from at run time).
        self.bindings[id(out)] = compute_unbacked_bindings(shape_env, out)
        return out

    def propagate(self) -> None:
        val = lambda n: n.meta["val"]
        route = self._route_args()
        counts = torch.empty(self.num_experts, dtype=torch.int64, device=val(self.offsets).device)
        counts_all = counts.new_empty(self.ep, self.num_experts)
        with self.fake_mode:
            counts, counts_all = self.fake_mode.from_tensor(counts), self.fake_mode.from_tensor(counts_all)
        self.bindings: dict[int, Any] = {}
        self.x_loc_val = self._fake_call(mopc_ops.ep_dispatch, val(self.x), counts, counts_all, *route, -1)
        rows = self.x_loc_val.shape[0]
        self.offs_val = self._fake_call(mopc_ops.ep_local_offsets, counts, counts_all, *route)
        self.chunk_vals = {}
        for u in self.unshards:
            shape = list(val(u).shape)
            shape[0] //= self.ep
            chunk = val(u).new_empty(shape)
            shape[0] = self.num_slots
            self.chunk_vals[u] = (chunk, val(u).new_empty(shape))
        env: dict[Node, Any] = {self.x: self.x_loc_val, self.offsets: self.offs_val}
        env.update({u: ext for u, (_, ext) in self.chunk_vals.items()})
        if self.grad_y is not None:
            env[self.grad_y] = val(self.grad_y).new_empty((rows, *val(self.grad_y).shape[1:]))
        self.new_vals: dict[Node, Any] = {}
        self.new_args: dict[Node, tuple] = {}

        def fake(a: Any) -> Any:  # a node's value on the new shapes (or as traced, outside the block)
            return env.get(a, self.new_vals.get(a, a.meta.get("val"))) if isinstance(a, Node) else a

        for node in self.block.nodes:
            args = self._args(node)
            self.new_args[node] = args
            fake_args = tree_map(fake, args)
            fake_kwargs = tree_map(fake, dict(node.kwargs))
            try:
                with self.fake_mode:
                    self.new_vals[node] = node.target(*fake_args, **fake_kwargs)
            except Exception as err:  # noqa: BLE001 - any failure means: keep the reference layout
                raise _Unsupported(f"{node.name} ({node.target}) on local experts: {type(err).__name__}: "
                                   f"{str(err).splitlines()[0] if str(err) else ''}") from None
        self.env = env

    def _args(self, node: Node) -> tuple:
        args = list(node.args)
        name = node.target.name() if hasattr(node.target, "name") else ""
        index = _GROUP_COUNT_ARGS.get(name.split(".")[0])
        if index is not None and args[index] == self.num_experts:
            args[index] = self.num_slots
        return tuple(args)

    def _route_args(self) -> tuple:
        return (self.ep_group, float(self.capacity), float(self.spill), int(self.slots))

    # ------------------------------------------------------------------ commit

    def commit(self) -> None:
        graph = self.gm.graph
        order = {n: i for i, n in enumerate(graph.nodes)}

        def first_use(*sources: Node) -> Node:
            """The earliest block node reading any of `sources` (inserted nodes go before it)."""
            return min((u for src in sources for u in src.users if u in self.members), key=order.__getitem__)

        layer = self.block.layer
        meta = {"mopc_role": "dispatch", "mopc_layer": layer}
        saved = {**meta, "recompute": CheckpointPolicy.MUST_SAVE, "ac_graph_id": 0}
        ep, num_experts, group = self.ep, self.num_experts, self.ep_group
        route = self._route_args()

        def exchange_counts(offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            ends = offsets.to(torch.int64)
            counts = ends - torch.nn.functional.pad(ends[:-1], (1, 0))
            everyone = c10d.wait_tensor(c10d.all_gather_into_tensor(counts, ep, group))
            return counts, everyone.view(ep, num_experts)

        # right after the offsets exist, before any expert node reads the tokens or lent weights
        counts, counts_all = insert_traced(graph, exchange_counts, [self.offsets], before=self.offsets.next,
                                           meta=saved)
        order = {n: i for i, n in enumerate(graph.nodes)}
        first = first_use(self.x, self.offsets)

        def call(op, args: tuple, val: Any, before: Node, node_meta: dict) -> Node:
            with graph.inserting_before(before):
                new = graph.call_function(op, args)
            new.meta.update({**node_meta, "val": val})
            return new

        x_loc = call(mopc_ops.ep_dispatch.default, (self.x, counts, counts_all, *route, layer if layer is not None else -1),
                     self.x_loc_val, first, saved)
        if self.bindings.get(id(self.x_loc_val)):
            x_loc.meta["unbacked_bindings"] = self.bindings[id(self.x_loc_val)]
        offs = call(mopc_ops.ep_local_offsets.default, (counts, counts_all, *route), self.offs_val, first, meta)
        mapping: dict[Node, Node] = {self.x: x_loc, self.offsets: offs}
        regather = {"recompute": CheckpointPolicy.MUST_RECOMPUTE, "ac_graph_id": 0} if self.reshard else {}
        expert_meta = {"mopc_role": "expert", "mopc_layer": layer}
        for u, (chunk_val, ext_val) in self.chunk_vals.items():
            chunk = call(mopc_ops.unshard.default, (u.args[0], list(chunk_val.shape), 0, 1, self.edp_group, *u.args[5:]),
                         chunk_val, u, {k: v for k, v in u.meta.items() if k != "val"})
            if self.spill > 0:  # after the counts (`_check_order`), before the weight's first use
                chunk = call(mopc_ops.ep_lend_weights.default, (chunk, counts, counts_all, *route), ext_val,
                             first_use(u), {**expert_meta, **regather})
            mapping[u] = chunk
        if self.grad_y is not None:
            first_use = min((u for u in self.grad_y.users if u in self.members), key=order.__getitem__)
            mapping[self.grad_y] = call(
                mopc_ops.ep_dispatch.default, (self.grad_y, counts, counts_all, *route, -1),
                self.env[self.grad_y], first_use, {"mopc_role": "combine", "mopc_layer": layer})

        def remap(a: Any) -> Any:
            return mapping.get(a, a) if isinstance(a, Node) else a

        for node in self.block.nodes:
            node.args = tree_map(remap, self.new_args[node])
            node.kwargs = tree_map(remap, dict(node.kwargs))
            node.meta["val"] = self.new_vals[node]
        # outputs: rows back to their source ranks, in the model's order
        for node, role in ((self.y, "combine"), (self.grad_x, "dispatch")):
            if node is None:
                continue
            outside = [u for u in node.users if u not in self.members]
            back_val = node.meta["val"].new_empty((self.num_rows, *node.meta["val"].shape[1:]))
            with graph.inserting_after(node):
                back = graph.call_function(mopc_ops.ep_combine.default,
                                           (node, counts, counts_all, *route, self.num_rows))
            back.meta.update({"mopc_role": role, "mopc_layer": layer, "val": back_val})
            if node is self.y:
                back.meta.update({"recompute": CheckpointPolicy.MUST_SAVE, "ac_graph_id": 0})
            for user in outside:
                user.replace_input_with(node, back)
        # weight gradients: borrowed experts' back to the owner, then 1/P and the mean over edp
        edp = self.edp_group
        spill = self.spill > 0

        def reduce_local(g: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
            if spill:
                g = mopc_ops.ep_return_grads(g, rest[0], rest[1], *route)
            return mopc_ops.reduce_grad(g / ep, 0, 1, edp)

        for node, reduce in self.weight_grads:
            args = [node, counts, counts_all] if spill else [node]
            new = insert_traced(graph, reduce_local, args, before=reduce, meta=dict(expert_meta))
            reduce.replace_all_uses_with(new)
            graph.erase_node(reduce)


@register_pass(kind="rewrite", requires=("classify_roles", "annotate_roles"), enabled=lambda c: c.ep > 1,
               options_from_config=lambda c: {
                   "ep": c.ep, "tp": c.tp, "capacity_factor": c.capacity_factor or 0.0,
                   "spill_factor": c.expert_spill_factor or 0.0, "spill_slots": c.expert_spill_slots,
                   "reshard": c.reshard_after_forward})
def expert_parallel(gm: GraphModule, ctx, *, ep: int, tp: int, capacity_factor: float, spill_factor: float,
                    spill_slots: int, reshard: bool) -> GraphModule:
    """Run each MoE layer's routed experts on their owners: tokens travel, weights stay.

    Algorithm:
    1. group the expert nodes of each layer (forward and backward), leaving out the
       shard-side views, unshard and reduce_grad nodes; find the block's interface: one
       token input (rows grouped by expert), one offsets input, expert-split weights, the
       incoming gradient, the output, the input gradient and the weight gradients;
    2. re-propagate the block on the local rows (an unbacked size), the local offsets and
       the local (plus borrowed) experts; fall back on any failure;
    3. commit: all-gather the per-expert counts over the ep group; dispatch the rows and
       the incoming gradient (`ep_dispatch`), compute local offsets, gather each weight's
       local experts over the expert-data-parallel ranks (lend borrowed ones when
       spilling), rewire the block, combine its output and input gradient back into the
       model's order (`ep_combine`), and reduce the local weight gradients over edp.
    """
    unshards = [n for n in gm.graph.nodes if is_unshard(n)]
    if not unshards:
        return gm
    world_group = unshards[0].args[4]
    meshes = find_meshes(world_group, tp, ep)
    if meshes is None:
        log.warning("expert_parallel: no ep=%d mesh for group %s; experts keep the reference layout "
                    "(gathered over the world)", ep, world_group)
        return gm
    forward_names = ctx.result("classify_roles").forward_nodes
    forward = {n for n in gm.graph.nodes if n.name in forward_names}
    done, kept = [], []
    for block in _blocks(gm):
        if not any(is_unshard(a) and a.args[3] == ep for n in block.nodes for a in n.all_input_nodes):
            continue
        rewrite = _Rewrite(gm, block, forward, ep, (meshes.ep_group, meshes.edp_group),
                           (capacity_factor, spill_factor, spill_slots), reshard)
        try:
            rewrite.find_interface()
            rewrite.propagate()
        except _Unsupported as why:
            kept.append(f"experts@{block.layer}: {why}")
            continue
        except Exception as err:  # nothing is rewritten before commit: keeping the layer is safe
            if debug_enabled(ctx.config):
                raise
            kept.append(f"experts@{block.layer}: no rule covers it ({type(err).__name__}: {err})")
            continue
        rewrite.commit()
        done.append(f"experts@{block.layer}")
    gm.graph.eliminate_dead_code()
    log.info("expert_parallel on %s: %d MoE layers on ep=%d (%s)", ctx.graph_id, len(done), ep, ", ".join(done))
    for why in kept:
        log.warning("expert_parallel: kept the reference layout for %s", why)
    return gm


__all__ = ["expert_parallel"]
