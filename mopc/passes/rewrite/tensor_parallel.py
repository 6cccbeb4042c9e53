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

The rewrite re-propagates the block's nodes (forward and backward) on the new shapes. Every
dim is followed as *atoms* (`tp_shapes`: which pieces of it are the group's stacked tokens,
which this rank's chunk), so views that merge the batch with the heads (eager attention's
`[B·H, S, S]` bmm) split back the right way round; view and expand sizes are recomputed
from them, every other op is re-run on the new fake values. Beyond that:
* tensors that are the same on every rank (a causal mask built from sizes, a parameter
  gathered whole) are tiled on a stacked dim or cut to this rank's chunk where they meet
  the block's values (`tp_ops.relay`); an expand of a size-1 dim that meets a split dim
  is re-sized to it (the block is propagated again);
* partial sums (contractions, sums and means over a split dim) stay partial through linear
  ops; a non-linear use all-reduces them over tp first (OLMoE's q/k norm over all heads);
* norms sandwiched in the block join it (`tp_regions`); the gradient of a parameter
  gathered whole leaves as the group's share of the world mean.
A block with an op or a data flow this cannot express (a size written into the graph that
no rule re-derives, a partial sum with a split dim, dynamic shapes) keeps the reference
layout, with a warning saying why; `tp_shapes` states the shape rules.
"""

from __future__ import annotations

import contextlib
import logging
import operator
from fractions import Fraction
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.checkpoint import CheckpointPolicy

from mopc.passes.analysis.graph_utils import is_reduce_grad, is_unshard
from mopc.passes.pipeline import debug_enabled
from mopc.passes.registry import register_pass
from mopc.passes.rewrite import tp_shapes
from mopc.passes.rewrite.splice import insert_traced
from mopc.passes.rewrite.tp_ops import (
    ADDS,
    ALLOWED_OPS,
    DIM_OPS,
    LINEAR,
    MATMULS,
    PICK_BACKWARDS,
    REDUCTIONS,
    VIEWS,
    bind_all_reduce,
    bind_relay,
    has_node,
    is_dim_list,
    partners,
    relay,
    static_shape,
    uniform_source,
)
from mopc.passes.rewrite.tp_regions import Region, regions, returned_hint, token_nodes
from mopc.passes.rewrite.tp_shapes import (
    Dims,
    changed,
    grows,
    new_size,
    plain_dims,
    shrinks,
)
from mopc.passes.rewrite.tp_shapes import Unsupported as _Unsupported
from mopc.plan.mesh import find_meshes, group_rank

log = logging.getLogger("mopc.passes")
aten = torch.ops.aten
c10d = torch.ops._c10d_functional

# ------------------------------------------------------------------------ shapes


_MAX_RETRIES = 8


class _Retry(Exception):
    """Propagate the block again: an expand's size on tensor-parallel shapes was learnt."""


class _Rewrite:
    """Re-propagates one block on tensor-parallel shapes, then commits the change."""

    def __init__(self, gm: GraphModule, region: Region, tokens: set[Node], forward: set[Node], tp: int,
                 tp_rank: int, tp_group: str, dp_group: str, world_group: str) -> None:
        self.gm, self.region, self.tokens, self.forward = gm, region, tokens, forward
        self.tp, self.tp_rank = tp, tp_rank
        self.tp_group, self.dp_group, self.world_group = tp_group, dp_group, world_group
        self.members = set(region.nodes)
        self.new_val: dict[Node, Any] = {}
        self.new_args: dict[Node, tuple] = {}
        # partial sums: the true value is scale * (sum over the tp ranks of each rank's value)
        self.partial: dict[Node, Fraction] = {}
        # partial sums all-reduced before a use that is not linear in them: node -> its readers of the sum
        self.materialized: dict[Node, set[Node]] = {}
        self.gathered_inputs: dict[Node, Any] = {}  # outside token tensors -> gathered fake value
        self.chunks: dict[Node, Any] = {}  # unshard nodes -> fake value of this rank's chunk
        self.dims: dict[Node, Dims] = {}  # the atoms of each tensor's dims (tp_shapes)
        # outside tensors equal on every rank, re-laid out for the block: (dim, "tile" | "chunk") steps
        self.relaid: dict[Node, tuple[tuple[int, str], ...]] = {}
        self.relaid_val: dict[Node, Any] = {}
        # expands of a size-1 dim whose output meets a split dim: that dim's size on tp shapes
        self.expand_sizes: dict[Node, dict[int, int]] = {}
        self.replicated: dict[Node, bool] = {}  # outside tensors: equal on every rank?
        self.reshaped: set[Node] = set()  # views that must copy on the new strides

    # -- inputs -----------------------------------------------------------------------
    def _input_val(self, node: Node) -> Any:
        if node in self.members:
            return self.new_val[node]
        if node in self.relaid_val:
            return self.relaid_val[node]
        if is_unshard(node):
            return self._chunk(node) if _is_chunked(node, self.tp) else self._whole(node)
        val = node.meta.get("val")
        if node in self.tokens and isinstance(val, torch.Tensor) and val.dim() >= 1:
            if node not in self.gathered_inputs:
                shape = static_shape(val)
                shape[0] *= self.tp
                self.gathered_inputs[node] = val.new_empty(shape)
            return self.gathered_inputs[node]
        return val

    def _dims_of(self, node: Node) -> Dims:
        if node not in self.dims:
            if node in self.members:
                raise _Unsupported(f"{node.name} is not a tensor; no dims to follow")
            self.dims[node] = plain_dims(static_shape(node), static_shape(self._input_val(node)))
        return self.dims[node]

    def _whole(self, unshard: Node) -> Any:
        """A parameter every rank gathers whole (ZeRO-3 over the world): the same on every rank."""
        if unshard.args[3] != 1 or unshard.args[4] != self.world_group:
            raise _Unsupported(f"parameter input {unshard.args[0]} is neither chunked over tp={self.tp} "
                               "nor gathered whole")
        return unshard.meta["val"]

    def _chunk(self, unshard: Node) -> Any:
        if unshard not in self.chunks:
            _, shape, chunk_dim, num_chunks, group = unshard.args[:5]  # [5:]: mixed-precision dtypes
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
            for _ in range(_MAX_RETRIES):
                self._reset()
                try:
                    self._propagate()
                    return
                except _Retry:
                    continue  # an expand learnt the size of a dim it broadcasts to: start again
            raise _Unsupported(f"expand sizes did not settle after {_MAX_RETRIES} passes")

    def _reset(self) -> None:
        for state in (self.new_val, self.new_args, self.partial, self.materialized, self.gathered_inputs,
                      self.chunks, self.dims, self.relaid, self.relaid_val, self.reshaped):
            state.clear()

    def _propagate(self) -> None:
        for node in self.region.nodes:
            self._relay_replicated(node)
            args = tree_map(lambda a: self._input_val(a) if isinstance(a, Node) else a, node.args)
            kwargs = tree_map(lambda a: self._input_val(a) if isinstance(a, Node) else a, node.kwargs)
            args, dims = self._resize_args(node, args)
            self._check_op(node)
            try:
                out = self._target(node)(*args, **kwargs)
            except Exception as err:
                if node.target is not aten.view.default or node in self.reshaped:
                    raise _Unsupported(f"{node.format_node()} fails on tensor-parallel shapes: {err}") from err
                # a view the reference program could take only because a dim was 1 (a batch of
                # one): the same values by reshape, which copies when strides demand it
                self.reshaped.add(node)
                out = self._target(node)(*args, **kwargs)
            self.new_val[node] = out
            self.new_args[node] = args
            if isinstance(out, torch.Tensor):
                old_out, new_out = static_shape(node), static_shape(out)
                if dims is None:
                    dims = tp_shapes.out_dims(node, args, self._dims_of, old_out, new_out)
                elif [new_size(d) for d in dims] != new_out:
                    raise _Unsupported(f"{node.name}: {new_out} does not follow its dims {dims}")
                self.dims[node] = dims
            elif any(len(d) > 1 for a in node.all_input_nodes if a.op != "get_attr"
                     and isinstance(a.meta.get("val"), torch.Tensor) for d in self._dims_of(a)):
                raise _Unsupported(f"{node.name}: {node.target} returns several tensors from merged dims")
            self._track_partial(node)

    def _target(self, node: Node) -> Any:
        return aten.reshape.default if node in self.reshaped else node.target

    def _relay_replicated(self, node: Node) -> None:
        """An outside tensor that is the same on every rank (a causal mask built from sizes,
        not from tokens) but meets the block's stacked or split dims under broadcasting: it
        is tiled on a stacked dim (every rank's copy, which is what gathering it would give)
        and cut to this rank's chunk on a split one. Any other tensor must already meet them
        laid out alike (an attention mask has no shape check of its own)."""
        for arg, met in partners(node, self._dims_of).items():
            if arg in self.relaid or not self._replicated(arg):
                continue
            steps = []
            for k, ms in enumerate(met):
                changes = {tuple(m) for m in ms if changed(m)}
                if not changes:
                    continue
                if len(changes) > 1 or len(next(iter(changes))) != 1:
                    raise _Unsupported(f"{node.name}: {arg.name} (the same on every rank) meets merged dims {changes}")
                ((was, now),) = next(iter(changes))
                if now == was * self.tp:
                    steps.append((k, "tile"))
                elif now * self.tp == was:
                    steps.append((k, "chunk"))
                else:
                    raise _Unsupported(f"{node.name}: {arg.name} meets a dim changed from {was} to {now}")
            if steps:
                self.relaid[arg] = tuple(steps)
                self.relaid_val[arg] = relay(arg.meta["val"], self.relaid[arg], self.tp, self.tp_rank)
                self.dims[arg] = plain_dims(static_shape(arg), static_shape(self.relaid_val[arg]))
        for arg, met in partners(node, self._dims_of).items():
            dims = self._dims_of(arg)
            for k, ms in enumerate(met):
                for m in ms:
                    if m == dims[k]:
                        continue
                    source = uniform_source(arg, k, self.members) if not changed(dims[k]) else None
                    if source is not None and len(m) == 1 and source[1] not in self.expand_sizes.get(source[0], {}):
                        # the same along that dim (an expand of a size-1 dim): any chunk of it is
                        # that expand to the chunk's size
                        self.expand_sizes.setdefault(source[0], {})[source[1]] = new_size(m)
                        raise _Retry
                    raise _Unsupported(f"{node.name}: {arg.name} meets dims laid out differently ({dims} vs {met})")

    def _replicated(self, node: Node) -> bool:
        """An outside tensor computed from no rank's tokens or random draws: equal on all ranks."""
        if is_unshard(node):
            return not _is_chunked(node, self.tp)
        if node in self.members or node in self.tokens or node.op == "placeholder" \
                or not isinstance(node.meta.get("val"), torch.Tensor):
            return False
        if node not in self.replicated:
            seen, todo, equal = set(), [node], True
            while todo and equal:
                n = todo.pop()
                if n in seen:
                    continue
                seen.add(n)
                random = isinstance(n.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in n.target.tags
                equal = not random and not (n.op == "placeholder" and n in self.tokens)
                todo.extend(n.all_input_nodes)
            self.replicated[node] = equal
        return self.replicated[node]

    def _resize_args(self, node: Node, args: tuple) -> tuple[tuple, Dims | None]:
        if node.target is operator.getitem:
            return args, None
        if node.target in VIEWS:
            dims = tp_shapes.view_dims(self._dims_of(node.args[0]), static_shape(node.args[0]), static_shape(node))
            return (args[0], [new_size(d) for d in dims], *args[2:]), dims
        if node.target in PICK_BACKWARDS:  # (grad, input sizes, dim, ...): zeros around the picked part
            dims, sizes = list(self._dims_of(node.args[0])), node.args[1]
            dim = node.args[2] % len(sizes)
            whole = tp_shapes.canonical([(sizes[dim], sizes[dim])])
            if node.target is aten.select_backward.default:
                dims.insert(dim, whole)
            elif changed(dims[dim]):
                raise _Unsupported(f"{node.target} along a dim that tensor parallelism splits or stacks")
            else:
                dims[dim] = whole
            return (args[0], [new_size(d) for d in dims], *args[2:]), dims
        if node.target is aten.expand.default:
            old_in, new_in, old_out = static_shape(node.args[0]), static_shape(args[0]), static_shape(node)
            lead = len(old_out) - len(old_in)
            new_out = list(old_out)
            for k in range(len(old_in)):  # a broadcast dim of size 1 stays broadcast, unless it grew
                if old_in[k] != 1 or new_in[k] != old_in[k]:
                    new_out[lead + k] = new_in[k]
            for k, size in self.expand_sizes.get(node, {}).items():
                new_out[k] = size
            return (args[0], new_out, *args[2:]), None
        if node.target in DIM_OPS:
            pos = 2 if node.target in (aten.split.Tensor, aten.split_with_sizes.default) else 1
            dim = node.args[pos] if len(node.args) > pos else node.kwargs.get("dim", 0)
            inputs = node.args[0] if node.target is aten.cat.default else [node.args[0]]
            for old_in in inputs:
                if node.target is aten.cat.default and static_shape(old_in) == [0]:
                    continue  # cat skips a 1-D empty tensor (an empty cache), whatever the others' rank
                if isinstance(dim, int) and changed(self._dims_of(old_in)[dim]):
                    raise _Unsupported(f"{node.target} along a dim that tensor parallelism splits or stacks")
        flat_ints = [a for a in node.args if isinstance(a, (list, tuple)) and a and all(type(x) is int for x in a)]
        if flat_ints and node.target not in LINEAR and not is_dim_list(node):
            raise _Unsupported(f"{node.target} takes sizes {flat_ints}; no rule to resize them")
        return args, None

    def _reduced_dims(self, node: Node) -> list:
        src = node.args[0]
        dims = self._dims_of(src)
        if not dims:
            return []
        pos = 2 if "backward_data" in str(node.target) else 1
        picked = node.args[pos] if len(node.args) > pos else None
        if picked is None:
            picked = list(range(len(dims)))
        picked = [picked] if isinstance(picked, int) else list(picked) or list(range(len(dims)))
        return [dims[d % len(dims)] for d in picked]

    def _check_op(self, node: Node) -> None:
        packet = getattr(node.target, "overloadpacket", node.target)
        if node.target is not operator.getitem and packet not in ALLOWED_OPS | REDUCTIONS:
            raise _Unsupported(f"{node.target} has no tensor-parallel rule")

    def _track_partial(self, node: Node) -> None:
        """Which values are partial sums over the tp ranks (contractions and sums over a split
        dim, a mean over one with its scale, and ops linear in them); a partial sum that
        meets anything else is all-reduced over tp first (materialized)."""
        # with repeats: mul(p, p) reads the partial sum twice, which is not linear
        partial_ins = [a for a in tree_flatten((node.args, node.kwargs))[0] if isinstance(a, Node) and a in self.partial]
        if node.target is operator.getitem:
            if partial_ins:
                self.partial[node] = self.partial[partial_ins[0]]
            return
        if partial_ins and self._linear_in_partials(node, partial_ins):
            self.partial[node] = self.partial[partial_ins[0]]
            return
        for p in dict.fromkeys(partial_ins):
            self._materialize(p, node)
        if node.target is aten.addmm.default:  # bias + a @ b: the bias would be added on every rank
            if shrinks(self._dims_of(node.args[1])[-1]):
                raise _Unsupported("a biased matrix multiply over split columns (bias added on every rank)")
        elif node.target in MATMULS:
            if shrinks(self._dims_of(node.args[0])[-1]):
                self.partial[node] = Fraction(1)
        elif node.target in (aten.sum.dim_IntList, aten.mean.dim):
            reduced = self._reduced_dims(node)
            if any(shrinks(d) for d in reduced):
                if node.target is aten.mean.dim and any(grows(d) for d in reduced):
                    raise _Unsupported(f"{node.name}: a mean over the tp group's stacked tokens")
                # a local mean averages 1/T of the values: the true mean is the sum of the ranks' / T
                scale = Fraction(1)
                if node.target is aten.mean.dim:
                    for d in reduced:
                        scale *= Fraction(new_size(d), tp_shapes.old_size(d))
                self.partial[node] = scale
        elif getattr(node.target, "overloadpacket", None) in REDUCTIONS \
                and any(changed(d) for d in self._reduced_dims(node)):
            # over a split dim (heads) or a stacked one (it would mix the tp group's tokens)
            raise _Unsupported(f"{node.target} reduces over a dim that tensor parallelism splits or stacks")

    def _linear_in_partials(self, node: Node, partial_ins: list[Node]) -> bool:
        scales = {self.partial[p] for p in partial_ins}
        out_dims = self.dims.get(node, [])
        if len(scales) > 1 or any(shrinks(d) for d in out_dims):
            return False  # partial sums never carry split dims: summing the ranks' would mix them
        tensor_args = [a for a in node.args if isinstance(a, Node)]
        if node.target in MATMULS:
            return len(partial_ins) == 1 and not shrinks(self._dims_of(node.args[0])[-1])
        if node.target in ADDS:  # partial + partial; partial + anything else adds it T times
            return len(node.args) == 2 and len(partial_ins) == len(tensor_args) == 2
        if node.target is aten.div.Tensor:
            return node.args[0] in self.partial and node.args[1] not in self.partial
        return node.target in LINEAR and len(partial_ins) == 1

    def _materialize(self, partial: Node, reader: Node) -> None:
        if any(shrinks(d) for d in self.dims.get(partial, [])):
            raise _Unsupported(f"{reader.name}: a partial sum with a split dim ({partial.name}) is used non-linearly")
        self.materialized.setdefault(partial, set()).add(reader)

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
                new = graph.call_function(torch.ops.mopc.unshard.default,  # args[5:]: mixed-precision dtypes
                                          (unshard.args[0], list(chunk.shape), 0, 1, self.dp_group,
                                           *unshard.args[5:]))
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
        # 3. outside tensors equal on every rank (masks), tiled or cut like the block's dims
        relaid: dict[Node, Node] = {}
        for src in sorted(self.relaid, key=order.__getitem__):
            first = min((u for u in src.users if u in self.members), key=order.__getitem__)
            relay = bind_relay(self.relaid[src], tp, self.tp_rank)
            relaid[src] = insert_traced(graph, relay, [src], before=first, meta=role)
        # 4. the block's nodes on the new shapes
        mapping = {**gathered, **relaid, **replaced}

        def remap(a: Any) -> Any:
            return mapping.get(a, a) if isinstance(a, Node) else a

        for node in self.region.nodes:
            node.args = tree_map(remap, self.new_args_nodes(node))
            node.kwargs = tree_map(remap, node.kwargs)
            node.meta["val"] = self.new_val[node]
            node.target = self._target(node)
        for unshard, new in replaced.items():
            for user in list(unshard.users):
                if user in self.members:
                    user.replace_input_with(unshard, new)
        # 5. partial sums a non-linear op reads: all-reduced over tp first
        for partial in sorted(self.materialized, key=order.__getitem__):
            readers = self.materialized[partial]
            meta = {**role, "recompute": CheckpointPolicy.MUST_SAVE, "ac_graph_id": 0} \
                if partial in self.forward else role
            full = insert_traced(graph, bind_all_reduce(self.partial[partial], grp), [partial],
                                 before=min(readers, key=order.__getitem__), meta=meta)
            for reader in readers:
                reader.replace_input_with(partial, full)
        # 6. what leaves the block goes back to this rank's tokens
        for node, readers in outputs.items():
            self._emit_output(node, readers, role)

    def new_args_nodes(self, node: Node) -> tuple:
        """The node's args with resized size lists (tensors stay graph nodes)."""
        old, new = node.args, self.new_args[node]
        return tuple(o if isinstance(o, Node) or has_node(o) else n for o, n in zip(old, new))

    def outputs(self) -> dict[Node, list[Node]]:
        """Nodes read outside the block, with their readers; raises when one cannot leave."""
        outputs: dict[Node, list[Node]] = {}
        for node in self.region.nodes:
            readers = [u for u in node.users if u not in self.members]
            if readers:
                outputs[node] = readers
        for node, readers in outputs.items():
            for r in readers:
                problem = self._exit_problem(node, r)
                if problem:
                    raise _Unsupported(problem)
        return outputs

    def _exit_problem(self, node: Node, reader: Node) -> str | None:
        """Why `node` cannot be read by `reader` outside the block (None: it can)."""
        if is_reduce_grad(reader) and reader.args[2] == 1 and reader.args[3] == self.world_group:
            # a parameter gathered whole: its gradient on the group's tokens, whole or this rank's chunk
            dims = self.dims[node]
            split = [d for d in dims if shrinks(d)]
            if any(grows(d) for d in dims) or (split and node in self.partial) or len(split) > 1 \
                    or any(len(d) != 1 or d[0][1] * self.tp != d[0][0] for d in split):
                return f"the gradient {node.name} of a parameter gathered whole is laid out as {dims}"
            return None
        if is_reduce_grad(reader):
            if reader.args[2] != self.tp or reader.args[3] != self.world_group:
                return "the gradient of a parameter that is not chunked leaves the block"
            if node in self.partial:
                return f"the gradient {node.name} of a chunk is a partial sum"
            if any(grows(d) or len(d) > 1 for d in self.dims[node]):
                return f"the gradient {node.name} of a chunk is not laid out as the chunk"
            return None
        to = f"{node.name} leaves the block to {reader.name} (role {reader.meta.get('mopc_role')})"
        if node not in self.partial and node not in self.tokens:
            if any(changed(d) for d in self.dims.get(node, [])) or static_shape(self.new_val[node]) != static_shape(node):
                return f"{to} with a changed shape"
            return None
        # back to this rank's tokens: only the outermost dim may have grown, by T, rank-major
        old, dims = static_shape(node), self.dims.get(node)
        if not old or dims is None or dims[0] != [(old[0], old[0] * self.tp)] or any(changed(d) for d in dims[1:]):
            return f"{to} as {static_shape(self.new_val[node])}, not the tp group's tokens stacked on {old}"
        return None

    def first_exit_problem(self) -> str | None:
        """After a failed propagation: a node already re-propagated that could not leave the
        block (the usual root cause: a value goes out through another component and back)."""
        for node in self.region.nodes:
            if node not in self.dims or not isinstance(self.new_val.get(node), torch.Tensor):
                continue
            for reader in node.users:
                if reader not in self.members:
                    problem = self._exit_problem(node, reader)  # reads only this node's dims
                    if problem:
                        return problem
        return None

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
            if r.args[2] == 1:  # a parameter gathered whole: its world mean, adjusted for the tp group
                r.replace_input_with(node, insert_traced(graph, self._whole_grad(node), [node], before=r, meta=role))
                continue
            shard = insert_traced(graph, reduce_chunk_grad, [node], before=r, meta=role)
            r.replace_all_uses_with(shard)
            graph.erase_node(r)
        if not other:
            return
        order = {n: i for i, n in enumerate(graph.nodes)}
        anchor = min(other, key=order.__getitem__)
        if node in self.partial:
            scale = float(self.partial[node])
            fn = lambda x: c10d.wait_tensor(c10d.reduce_scatter_tensor(x.contiguous(), "sum", tp, grp)) * scale \
                if scale != 1 else c10d.wait_tensor(c10d.reduce_scatter_tensor(x.contiguous(), "sum", tp, grp))
            if node in self.forward:  # never recompute a collective to save its small output
                role = {**role, "recompute": CheckpointPolicy.MUST_SAVE, "ac_graph_id": 0}
        elif node in self.tokens:
            fn = lambda x: x.chunk(tp)[rank].contiguous()
        else:
            return
        local = insert_traced(graph, fn, [node], before=anchor, meta=role)
        for r in other:
            r.replace_input_with(node, local)


    def _whole_grad(self, node: Node):
        """What a rank hands the world-mean reduction of a parameter gathered whole. Every rank
        of the group computed on the group's T·B tokens: a partial sum is already one T-th of
        the group's gradient in sum; a whole gradient is the group's, so 1/T of it; a chunk's
        gradient goes to its place in zeros (the group's chunks sum to the whole)."""
        tp, rank, dims = self.tp, self.tp_rank, self.dims[node]
        if node in self.partial:
            scale = float(self.partial[node])
            return lambda g: g * scale
        split = [k for k, d in enumerate(dims) if shrinks(d)]
        if not split:
            return lambda g: g / tp
        dim = split[0]

        def place_chunk(g: torch.Tensor) -> torch.Tensor:
            size = list(g.shape)
            before, after = list(size), list(size)
            before[dim], after[dim] = rank * size[dim], (tp - 1 - rank) * size[dim]
            return torch.cat([g.new_zeros(before), g, g.new_zeros(after)], dim)

        return place_chunk


def _is_chunked(node: Node, tp: int) -> bool:
    return is_unshard(node) and node.args[3] == tp and node.args[3] > 1


@register_pass(kind="rewrite", requires=("classify_roles", "annotate_roles"), enabled=lambda c: c.tp > 1,
               options_from_config=lambda c: {"tp": c.tp})
def tensor_parallel(gm: GraphModule, ctx, *, tp: int) -> GraphModule:
    """Run attention and dense MLP blocks on local heads/columns over the tensor-parallel group.

    Algorithm:
    1. group the nodes of each attention / dense-MLP block (role and layer, forward and
       backward, with the norms sandwiched in it), leaving out the shard-side views,
       unshard and reduce_grad nodes;
    2. re-propagate the block: inputs carrying this rank's tokens become [T·B, ...]
       (all-gather over tp), chunked weights become this rank's chunk, tensors equal on
       every rank are tiled or cut where they meet stacked or split dims, size arguments
       of views and expands are recomputed from each dim's atoms, partial sums are
       tracked (contractions, sums and means over a split dim, and linear ops of them)
       and all-reduced before a non-linear use;
    3. on success commit: weights gathered over dp into the chunk, token inputs
       all-gathered over tp, equal-on-every-rank inputs relaid, the block's nodes rewired
       and re-typed, partial sums all-reduced where read non-linearly, partial outputs
       reduce-scattered over tp, token outputs sliced to this rank's tokens, chunk
       gradients scaled by 1/T and reduced over dp, gradients of parameters gathered whole
       handed to their world mean as the group's share; on failure log why and keep the
       block.
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
    tokens = token_nodes(gm, {p for p in params if p.op == "placeholder"} | module_state)
    forward_names = ctx.result("classify_roles").forward_nodes
    forward = {n for n in gm.graph.nodes if n.name in forward_names}
    done, kept = [], []
    for region in regions(gm):
        if not any(_is_chunked(u, tp) for n in region.nodes for u in n.all_input_nodes):
            continue  # the plan kept this block on the reference layout (or it has no weights)
        rewrite = _Rewrite(gm, region, tokens, forward, tp, tp_rank, meshes.tp_group, meshes.dp_group,
                           world_group)
        try:
            rewrite.propagate()
            rewrite.outputs()
        except _Unsupported as why:
            exit_problem = rewrite.first_exit_problem()
            reason = f"{exit_problem} (then: {why})" if exit_problem and exit_problem != str(why) else why
            kept.append(f"{region.role}@{region.layer}: {reason}{returned_hint(region, forward)}")
            continue
        except Exception as err:  # nothing is rewritten before commit: keeping the block is safe
            if debug_enabled(ctx.config):
                raise
            kept.append(f"{region.role}@{region.layer}: no rule covers it ({type(err).__name__}: {err})"
                        f"{returned_hint(region, forward)}")
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
