"""Tensor parallelism for attention and dense MLP blocks, as a rewrite of the reference program.

In the reference program a rank gathers a block's whole weights and runs the block on its
own B tokens. Under tensor parallelism of degree T, the T ranks of a tensor-parallel group
instead gather each other's *tokens* (T·B of them, sequence-parallel style) and each
computes the block for its own chunk of heads (or MLP columns):

    x [B, ...] --all_gather(tp)--> [T·B, ...] --block on local heads--> partial [T·B, ...]
      --reduce_scatter(tp, sum)--> [B, ...]

Weights are gathered over the data-parallel ranks only, into this rank's chunk (`tp`
layouts from `mopc.plan.layout`): column-parallel projections by output rows,
row-parallel ones by input columns. The backward mirrors it (gather the incoming gradient,
reduce-scatter the partial input gradient); a chunk's gradient sums the T·B tokens' losses,
so it is scaled by 1/T before the data-parallel mean reduce-scatter.

The rewrite re-propagates the block's nodes (forward and backward) on the new shapes:
views, reshapes and expands get their size arguments recomputed (the batch dimension grows
by T, the head or column dimension shrinks by T; "outermost dimension of a merged group"
rule), every other op is simply re-run on the new fake values. A block with an op or a
data flow this cannot express (a parameter that is not chunked, a non-linear use of a
partial sum, dynamic shapes) keeps the reference layout, with a log line saying why.
"""

from __future__ import annotations

import contextlib
import logging
import operator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.checkpoint import CheckpointPolicy

from mopc.passes.analysis.graph_utils import is_reduce_grad, is_unshard
from mopc.passes.pipeline import debug_enabled
from mopc.passes.registry import register_pass
from mopc.passes.rewrite.splice import insert_traced
from mopc.plan.mesh import find_meshes, group_rank

log = logging.getLogger("mopc.passes")
aten = torch.ops.aten
c10d = torch.ops._c10d_functional

TP_ROLES = ("attention", "dense_mlp")
_VIEWS = frozenset({aten.view.default, aten._unsafe_view.default, aten.reshape.default})
_MATMULS = frozenset({aten.mm.default, aten.bmm.default})
# Linear in each tensor argument: a partial sum stays a partial sum through them.
_LINEAR = frozenset({
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.t.default,
    aten.transpose.int, aten.permute.default, aten.clone.default, aten.neg.default, aten.mul.Tensor,
    aten.div.Tensor, aten.expand.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten._to_copy.default, aten.sum.dim_IntList,
})
# Ops that pick or join along a dim: fine unless that dim is the one being split.
_DIM_OPS = frozenset({
    aten.split.Tensor, aten.split_with_sizes.default, aten.slice.Tensor, aten.narrow.default,
    aten.select.int, aten.index_select.default, aten.cat.default, aten.unbind.int,
})
_ADDS = frozenset({aten.add.Tensor, aten.sub.Tensor})
# Ops a block may contain (by packet): elementwise math and shape ops act per element, so
# they follow the new shapes; reductions and softmaxes are checked for the dims they reduce.
_ALLOWED_OPS = frozenset(getattr(aten, name) for name in (
    "add", "sub", "mul", "div", "neg", "exp", "log", "pow", "rsqrt", "sqrt", "reciprocal", "silu",
    "silu_backward", "sigmoid", "sigmoid_backward", "tanh", "tanh_backward", "gelu", "gelu_backward", "relu",
    "threshold_backward", "where", "clone", "_to_copy", "detach", "alias", "contiguous", "fill", "zeros_like",
    "ones_like", "full_like", "empty_like", "scalar_tensor", "abs", "sign", "erf", "square", "lift_fresh_copy",
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze",
    "split", "split_with_sizes", "slice", "narrow", "select", "cat", "unbind", "mm", "bmm", "addmm",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
    "repeat_interleave", "index_select",
) if hasattr(aten, name))
_REDUCTIONS = frozenset(getattr(aten, name) for name in (
    "sum", "mean", "amax", "amin", "_softmax", "_log_softmax", "_softmax_backward_data",
    "_log_softmax_backward_data", "var_mean", "var",
) if hasattr(aten, name))


class _Unsupported(Exception):
    """This block cannot be tensor-parallelized; it keeps the reference layout."""


@dataclass
class _Region:
    role: str
    layer: int | None
    nodes: list[Node] = field(default_factory=list)


# ------------------------------------------------------------------------ shape rules


def _view_groups(old_in: list[int], old_out: list[int]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input dims with runs of output dims whose products are equal."""
    groups, i, j = [], 0, 0
    while i < len(old_in) or j < len(old_out):
        gi, gj = [], []
        pi = pj = 1
        while True:
            if pi == pj and gi and gj and (i >= len(old_in) or old_in[i] != 1) and (j >= len(old_out) or old_out[j] != 1):
                break
            if pi <= pj and i < len(old_in):
                pi *= old_in[i]
                gi.append(i)
                i += 1
            elif j < len(old_out):
                pj *= old_out[j]
                gj.append(j)
                j += 1
            elif i < len(old_in):
                pi *= old_in[i]
                gi.append(i)
                i += 1
            else:
                break
        if pi != pj:
            raise _Unsupported(f"view {old_in} -> {old_out} has no dim grouping")
        groups.append((gi, gj))
    return groups


def _new_view_shape(old_in: list[int], new_in: list[int], old_out: list[int]) -> list[int]:
    """Apply each input group's size ratio to the output dim that carries it.

    Growth is the tensor-parallel group's tokens, stacked on the outermost (batch) dim:
    it goes to the group's first output dim, even one of size 1 (a batch of one sequence).
    Shrinkage is the split heads or columns: it goes to the group's outermost output dim
    that is not 1 and divides.
    """
    new_out = list(old_out)
    for gi, gj in _view_groups(old_in, old_out):
        old_p = _prod(old_in[k] for k in gi)
        new_p = _prod(new_in[k] for k in gi)
        if old_p == new_p:
            continue
        ratio = Fraction(new_p, old_p)
        if ratio > 1:
            if new_in[gi[0]] == old_in[gi[0]] or not gj:
                raise _Unsupported(f"view {old_in} -> {old_out}: the grown dim is not the outermost")
            new_out[gj[0]] = int(old_out[gj[0]] * ratio)
            continue
        for k in gj:
            scaled = old_out[k] * ratio
            if old_out[k] != 1 and scaled.denominator == 1:
                new_out[k] = int(scaled)
                break
        else:
            raise _Unsupported(f"view {old_in} -> {old_out} cannot absorb ratio {ratio}")
    return new_out


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _shape(node_or_val: Any) -> list[int]:
    val = node_or_val.meta["val"] if isinstance(node_or_val, Node) else node_or_val
    shape = list(val.shape)
    if not all(isinstance(s, int) for s in shape):
        raise _Unsupported("dynamic shapes")
    return shape


# ------------------------------------------------------------------------ the rewrite


class _Rewrite:
    """Re-propagates one block on tensor-parallel shapes, then commits the change."""

    def __init__(self, gm: GraphModule, region: _Region, tokens: set[Node], forward: set[Node], tp: int,
                 tp_rank: int, tp_group: str, dp_group: str, world_group: str) -> None:
        self.gm, self.region, self.tokens, self.forward = gm, region, tokens, forward
        self.tp, self.tp_rank = tp, tp_rank
        self.tp_group, self.dp_group, self.world_group = tp_group, dp_group, world_group
        self.members = set(region.nodes)
        self.new_val: dict[Node, Any] = {}
        self.new_args: dict[Node, tuple] = {}
        self.partial: set[Node] = set()
        self.gathered_inputs: dict[Node, Any] = {}  # outside token tensors -> gathered fake value
        self.chunks: dict[Node, Any] = {}  # unshard nodes -> fake value of this rank's chunk

    # -- inputs -----------------------------------------------------------------------
    def _input_val(self, node: Node) -> Any:
        if node in self.members:
            return self.new_val[node]
        if is_unshard(node):
            return self._chunk(node)
        val = node.meta.get("val")
        if node in self.tokens and isinstance(val, torch.Tensor) and val.dim() >= 1:
            if node not in self.gathered_inputs:
                shape = _shape(val)
                shape[0] *= self.tp
                self.gathered_inputs[node] = val.new_empty(shape)
            return self.gathered_inputs[node]
        return val

    def _chunk(self, unshard: Node) -> Any:
        if unshard not in self.chunks:
            _, shape, chunk_dim, num_chunks, group = unshard.args
            if num_chunks != self.tp or group != self.world_group:
                raise _Unsupported(f"parameter input {unshard.args[0]} is not chunked over tp={self.tp}")
            chunk = list(shape)
            chunk[chunk_dim] //= num_chunks
            self.chunks[unshard] = unshard.meta["val"].new_empty(chunk)
        return self.chunks[unshard]

    # -- propagation --------------------------------------------------------------------
    def propagate(self) -> None:
        from torch._guards import detect_fake_mode

        fake_mode = detect_fake_mode([n.meta.get("val") for n in self.region.nodes])
        with fake_mode or contextlib.nullcontext():
            self._propagate()

    def _propagate(self) -> None:
        for node in self.region.nodes:
            args = tree_map(lambda a: self._input_val(a) if isinstance(a, Node) else a, node.args)
            kwargs = tree_map(lambda a: self._input_val(a) if isinstance(a, Node) else a, node.kwargs)
            args = self._resize_args(node, args)
            self._track_partial(node)
            try:
                out = node.target(*args, **kwargs)
            except Exception as err:
                raise _Unsupported(f"{node.format_node()} fails on tensor-parallel shapes: {err}") from err
            self.new_val[node] = out
            self.new_args[node] = args

    def _resize_args(self, node: Node, args: tuple) -> tuple:
        if node.target is operator.getitem:
            return args
        if node.target in _VIEWS:
            old_in, new_in = _shape(node.args[0]), _shape(args[0])
            old_out = _shape(node)
            if old_in == new_in:
                return args
            return (args[0], _new_view_shape(old_in, new_in, old_out), *args[2:])
        if node.target is aten.expand.default:
            old_in, new_in, old_out = _shape(node.args[0]), _shape(args[0]), _shape(node)
            lead = len(old_out) - len(old_in)
            new_out = list(old_out)
            for k in range(len(old_in)):  # a broadcast dim of size 1 stays broadcast, unless it grew
                if old_in[k] != 1 or new_in[k] != old_in[k]:
                    new_out[lead + k] = new_in[k]
            return (args[0], new_out, *args[2:])
        if node.target in _DIM_OPS:
            pos = 2 if node.target in (aten.split.Tensor, aten.split_with_sizes.default) else 1
            dim = node.args[pos] if len(node.args) > pos else node.kwargs.get("dim", 0)
            first = node.args[0][0] if node.target is aten.cat.default else node.args[0]
            new_first = args[0][0] if node.target is aten.cat.default else args[0]
            if isinstance(dim, int) and _shape(first)[dim] != _shape(new_first)[dim]:
                raise _Unsupported(f"{node.target} along a dim that tensor parallelism splits")
        flat_ints = [a for a in node.args if isinstance(a, (list, tuple)) and a and all(type(x) is int for x in a)]
        if flat_ints and node.target not in _LINEAR and not _is_dim_list(node):
            raise _Unsupported(f"{node.target} takes sizes {flat_ints}; no rule to resize them")
        return args

    def _reduced_dims_shrink(self, node: Node) -> bool:
        """Whether a reduction or softmax runs over a dim that tensor parallelism changed:
        a split one (heads) or the grown one (it would mix the tp group's tokens)."""
        src = node.args[0]
        old, new = _shape(src), _shape(self._input_val(src))
        if not old:
            return False
        pos = 2 if "backward_data" in str(node.target) else 1
        dims = node.args[pos] if len(node.args) > pos else list(range(len(old)))
        if dims is None:
            dims = list(range(len(old)))
        dims = [dims] if isinstance(dims, int) else list(dims) or list(range(len(old)))
        return any(new[d % len(old)] != old[d % len(old)] for d in dims)

    def _track_partial(self, node: Node) -> None:
        packet = getattr(node.target, "overloadpacket", node.target)
        if node.target is not operator.getitem and packet not in _ALLOWED_OPS | _REDUCTIONS:
            raise _Unsupported(f"{node.target} has no tensor-parallel rule")
        # with repeats: mul(p, p) reads the partial sum twice, which is not linear
        partial_ins = [a for a in tree_flatten((node.args, node.kwargs))[0] if isinstance(a, Node) and a in self.partial]
        if node.target is aten.addmm.default:  # bias + a @ b: the sum must not be partial
            old_k, new_k = _shape(node.args[1])[-1], _shape(self._input_val(node.args[1]))[-1]
            if partial_ins or new_k < old_k:
                raise _Unsupported("a biased matrix multiply over split columns (bias added on every rank)")
            return
        if packet in _REDUCTIONS and node.target is not aten.sum.dim_IntList:
            if partial_ins or self._reduced_dims_shrink(node):
                raise _Unsupported(f"{node.target} reduces over a split dim or a partial sum")
            return
        if node.target in _MATMULS:
            a = node.args[0]
            old_k = _shape(a)[-1]
            new_k = _shape(self._input_val(a))[-1]
            if partial_ins or new_k < old_k:
                if len(partial_ins) > 1 or (partial_ins and new_k < old_k):
                    raise _Unsupported("matrix multiply of partial sums")
                self.partial.add(node)
            return
        if not partial_ins:
            if node.target is aten.sum.dim_IntList:
                old, new = _shape(node.args[0]), _shape(self._input_val(node.args[0]))
                dims = [d % len(old) for d in node.args[1]]
                if any(new[d] < old[d] for d in dims):
                    self.partial.add(node)
            return
        tensor_args = [a for a in node.args if isinstance(a, Node)]
        if node.target in _ADDS and len(node.args) == 2 and len(partial_ins) == len(tensor_args) == 2:
            self.partial.add(node)  # partial + partial; partial + anything else adds it T times
        elif node.target is aten.div.Tensor and node.args[0] in self.partial and node.args[1] not in self.partial or node.target in _LINEAR and node.target is not aten.div.Tensor and len(partial_ins) == 1 or node.target is operator.getitem:
            self.partial.add(node)
        else:
            raise _Unsupported(f"{node.target} combines a partial sum non-linearly")

    # -- commit -------------------------------------------------------------------------
    def commit(self) -> None:
        graph = self.gm.graph
        order = {n: i for i, n in enumerate(graph.nodes)}
        role = {"mopc_role": self.region.role, "mopc_layer": self.region.layer}
        outputs = self.outputs()
        # 1. this rank's weight chunks, gathered over the data-parallel ranks only
        replaced: dict[Node, Node] = {}
        for unshard, chunk in self.chunks.items():
            with graph.inserting_before(unshard):
                new = graph.call_function(torch.ops.mopc.unshard.default,
                                          (unshard.args[0], list(chunk.shape), 0, 1, self.dp_group))
            new.meta = {**unshard.meta, "val": chunk}
            replaced[unshard] = new
        # 2. tokens of the tensor-parallel group, gathered once per input
        gathered: dict[Node, Node] = {}
        tp, grp = self.tp, self.tp_group

        def gather_tokens(x: torch.Tensor) -> torch.Tensor:
            return c10d.wait_tensor(c10d.all_gather_into_tensor(x.contiguous(), tp, grp))

        for src in sorted(self.gathered_inputs, key=order.__getitem__):
            first = min((u for u in src.users if u in self.members), key=order.__getitem__)
            # gathered again in backward rather than kept: a rank keeps its own B tokens only
            regather = {**role, "recompute": CheckpointPolicy.MUST_RECOMPUTE, "ac_graph_id": 0} \
                if src in self.forward else role
            gathered[src] = insert_traced(graph, gather_tokens, [src], before=first, meta=regather)
        # 3. the block's nodes on the new shapes
        mapping = {**gathered, **replaced}

        def remap(a: Any) -> Any:
            return mapping.get(a, a) if isinstance(a, Node) else a

        for node in self.region.nodes:
            node.args = tree_map(remap, self.new_args_nodes(node))
            node.kwargs = tree_map(remap, node.kwargs)
            node.meta["val"] = self.new_val[node]
        for unshard, new in replaced.items():
            for user in list(unshard.users):
                if user in self.members:
                    user.replace_input_with(unshard, new)
        # 4. what leaves the block goes back to this rank's tokens
        for node, readers in outputs.items():
            self._emit_output(node, readers, role)

    def new_args_nodes(self, node: Node) -> tuple:
        """The node's args with resized size lists (tensors stay graph nodes)."""
        old, new = node.args, self.new_args[node]
        return tuple(o if isinstance(o, Node) or _has_node(o) else n for o, n in zip(old, new))

    def outputs(self) -> dict[Node, list[Node]]:
        """Nodes read outside the block, with their readers; raises when one cannot leave."""
        outputs: dict[Node, list[Node]] = {}
        for node in self.region.nodes:
            readers = [u for u in node.users if u not in self.members]
            if readers:
                outputs[node] = readers
        for node, readers in outputs.items():
            for r in readers:
                if is_reduce_grad(r):
                    if r.args[2] != self.tp or r.args[3] != self.world_group:
                        raise _Unsupported("the gradient of a parameter that is not chunked leaves the block")
                    if node in self.partial:
                        raise _Unsupported(f"the gradient {node.name} of a chunk is a partial sum")
                elif node not in self.partial and node not in self.tokens:
                    if _shape(self.new_val[node]) != _shape(node):
                        raise _Unsupported(f"{node.name} leaves the block with a changed shape")
                else:  # back to this rank's tokens: only the batch dim may have grown, by T
                    old, new = _shape(node), _shape(self.new_val[node])
                    if not old or new != [old[0] * self.tp, *old[1:]]:
                        raise _Unsupported(f"{node.name} leaves the block as {new}, not the tp group's "
                                           f"tokens stacked on {old}")
        return outputs

    def _emit_output(self, node: Node, readers: list[Node], role: dict) -> None:
        graph = self.gm.graph
        tp, grp, rank = self.tp, self.tp_group, self.tp_rank
        grad_readers = [r for r in readers if is_reduce_grad(r)]
        other = [r for r in readers if not is_reduce_grad(r)]
        dp_group = self.dp_group

        def reduce_chunk_grad(g: torch.Tensor) -> torch.Tensor:
            # this rank's chunk gradient sums T*B tokens' losses; the dp mean divides by D only
            return torch.ops.mopc.reduce_grad(g / tp, 0, 1, dp_group)

        for r in grad_readers:
            shard = insert_traced(graph, reduce_chunk_grad, [node], before=r, meta=role)
            r.replace_all_uses_with(shard)
            graph.erase_node(r)
        if not other:
            return
        order = {n: i for i, n in enumerate(graph.nodes)}
        anchor = min(other, key=order.__getitem__)
        if node in self.partial:
            fn = lambda x: c10d.wait_tensor(c10d.reduce_scatter_tensor(x.contiguous(), "sum", tp, grp))
            if node in self.forward:  # never recompute a collective to save its small output
                role = {**role, "recompute": CheckpointPolicy.MUST_SAVE, "ac_graph_id": 0}
        elif node in self.tokens:
            fn = lambda x: x.chunk(tp)[rank].contiguous()
        else:
            return
        local = insert_traced(graph, fn, [node], before=anchor, meta=role)
        for r in other:
            r.replace_input_with(node, local)


def _has_node(value: Any) -> bool:
    found = []
    tree_map(lambda a: found.append(a) if isinstance(a, Node) else a, value)
    return bool(found)


def _is_dim_list(node: Node) -> bool:
    # ops whose int lists are dims or split sizes along an unsplit dim, not shapes
    return node.target in (aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.split.Tensor,
                           aten.permute.default, aten.cat.default, aten.squeeze.dims)


def _token_nodes(gm: GraphModule, module_state: set[Node]) -> set[Node]:
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


def _regions(gm: GraphModule) -> list[_Region]:
    by_key: dict[tuple, _Region] = {}
    shard_side: set[Node] = set()
    for node in gm.graph.nodes:  # the views that unwrap shards feed unshard only
        if is_unshard(node):
            shard_side.add(node.args[0])
    for node in gm.graph.nodes:
        role = node.meta.get("mopc_role")
        if (node.op != "call_function" or role not in TP_ROLES or is_unshard(node) or is_reduce_grad(node)
                or node in shard_side or str(node.target).startswith("_c10d_functional")):
            continue
        if all(is_reduce_grad(a) for a in node.all_input_nodes) and node.all_input_nodes:
            continue  # views of a reduced gradient (the DTensor wrapper)
        key = (role, node.meta.get("mopc_layer"))
        by_key.setdefault(key, _Region(*key)).nodes.append(node)
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
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        region.nodes.sort(key=order.__getitem__)
    return list(by_key.values())


def _is_chunked(node: Node, tp: int) -> bool:
    return is_unshard(node) and node.args[3] == tp and node.args[3] > 1


@register_pass(kind="rewrite", requires=("classify_roles", "annotate_roles"), enabled=lambda c: c.tp > 1,
               options_from_config=lambda c: {"tp": c.tp})
def tensor_parallel(gm: GraphModule, ctx, *, tp: int) -> GraphModule:
    """Run attention and dense MLP blocks on local heads/columns over the tensor-parallel group.

    Algorithm:
    1. group the nodes of each attention / dense-MLP block (role and layer, forward and
       backward), leaving out the shard-side views, unshard and reduce_grad nodes;
    2. re-propagate the block: inputs carrying this rank's tokens become [T·B, ...]
       (all-gather over tp), chunked weights become this rank's chunk, size arguments of
       views and expands are recomputed, partial sums are tracked (contractions over a
       shrunk dim, and linear ops of them);
    3. on success commit: weights gathered over dp into the chunk, token inputs
       all-gathered over tp, the block's nodes rewired and re-typed, partial outputs
       reduce-scattered over tp, token outputs sliced to this rank's tokens, chunk
       gradients scaled by 1/T and reduced over dp; on failure log why and keep the block.
    """
    unshards = [n for n in gm.graph.nodes if is_unshard(n)]
    if not unshards:
        return gm
    world_group = unshards[0].args[4]
    meshes = find_meshes(world_group, tp)
    if meshes is None:
        log.info("tensor_parallel: no (dp, tp=%d) mesh for group %s; skipped", tp, world_group)
        return gm
    tp_rank = group_rank(meshes.tp_group)
    params = {n.args[0] for n in unshards} | {a for n in unshards for a in n.args[0].all_input_nodes}
    module_state = {n for n in gm.graph.nodes if n.op == "placeholder" and n.name in ctx.param_fqns}
    tokens = _token_nodes(gm, {p for p in params if p.op == "placeholder"} | module_state)
    forward_names = ctx.result("classify_roles").forward_nodes
    forward = {n for n in gm.graph.nodes if n.name in forward_names}
    done, kept = [], []
    for region in _regions(gm):
        if not any(_is_chunked(u, tp) for n in region.nodes for u in n.all_input_nodes):
            continue  # the plan kept this block on the reference layout (or it has no weights)
        rewrite = _Rewrite(gm, region, tokens, forward, tp, tp_rank, meshes.tp_group, meshes.dp_group,
                           world_group)
        try:
            rewrite.propagate()
            rewrite.outputs()
        except _Unsupported as why:
            kept.append(f"{region.role}@{region.layer}: {why}")
            continue
        except Exception as err:  # nothing is rewritten before commit: keeping the block is safe
            if debug_enabled(ctx.config):
                raise
            kept.append(f"{region.role}@{region.layer}: no rule covers it ({type(err).__name__}: {err})")
            continue
        if not rewrite.chunks:
            continue  # no chunked weight: nodes of that role outside a block (RoPE tables)
        rewrite.commit()
        done.append(f"{region.role}@{region.layer}")
    gm.graph.eliminate_dead_code()
    log.info("tensor_parallel on %s: %d blocks on tp=%d (%s)", ctx.graph_id, len(done), tp, ", ".join(done))
    for why in kept:
        log.warning("tensor_parallel: kept the reference layout for %s", why)
    return gm
