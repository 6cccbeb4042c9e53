"""Op tables and helpers of the tensor-parallel rewrite (mopc/passes/rewrite/tensor_parallel.py).

What each op may do to a partial sum or a split dim, how tensors that are the same on every
rank are laid out like a block's values (tiled on a stacked dim, cut on a split one), which
arguments of an op must line up dim by dim, and the small traced functions the rewrite
inserts (collectives, relays).
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from typing import Any

import torch
from torch.fx import Node
from torch.utils._pytree import tree_map

from mopc.passes.rewrite import tp_shapes
from mopc.passes.rewrite.tp_shapes import Dims
from mopc.passes.rewrite.tp_shapes import Unsupported as _Unsupported

aten = torch.ops.aten
c10d = torch.ops._c10d_functional

VIEWS = frozenset({aten.view.default, aten._unsafe_view.default, aten.reshape.default})
MATMULS = frozenset({aten.mm.default, aten.bmm.default})
# Linear in each tensor argument: a partial sum stays a partial sum through them.
LINEAR = frozenset({
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.t.default,
    aten.transpose.int, aten.permute.default, aten.clone.default, aten.neg.default, aten.mul.Tensor,
    aten.div.Tensor, aten.expand.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten._to_copy.default, aten.sum.dim_IntList,
    aten.slice_backward.default, aten.select_backward.default,
})
# Ops that pick or join along a dim: fine unless that dim is the one being split.
DIM_OPS = frozenset({
    aten.split.Tensor, aten.split_with_sizes.default, aten.slice.Tensor, aten.narrow.default,
    aten.select.int, aten.index_select.default, aten.cat.default, aten.unbind.int,
})
ADDS = frozenset({aten.add.Tensor, aten.sub.Tensor})
PICK_BACKWARDS = frozenset({aten.slice_backward.default, aten.select_backward.default})
# Ops a block may contain (by packet): elementwise math and shape ops act per element, so
# they follow the new shapes; reductions and softmaxes are checked for the dims they reduce.
ALLOWED_OPS = frozenset(getattr(aten, name) for name in (
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
    "repeat_interleave", "index_select", "slice_backward", "select_backward",
) if hasattr(aten, name))
REDUCTIONS = frozenset(getattr(aten, name) for name in (
    "sum", "mean", "amax", "amin", "_softmax", "_log_softmax", "_softmax_backward_data",
    "_log_softmax_backward_data", "var_mean", "var",
) if hasattr(aten, name))


# ------------------------------------------------------------------------ helpers


def static_shape(node_or_val: Any) -> list[int]:
    val = node_or_val.meta["val"] if isinstance(node_or_val, Node) else node_or_val
    shape = list(val.shape)
    if not all(isinstance(s, int) for s in shape):
        raise _Unsupported("dynamic shapes")
    return shape


def uniform_source(node: Node, dim: int, members: set[Node]) -> tuple[Node, int] | None:
    """The expand (of a size-1 dim) that makes `node` the same along `dim`, through
    elementwise ops whose other operands are broadcast along it; None if there is none."""
    while node in members:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or dim >= val.dim():
            return None
        if node.target is aten.expand.default:
            src = static_shape(node.args[0])
            at = dim - (val.dim() - len(src))
            return (node, dim) if (at < 0 or src[at] == 1) and val.shape[dim] != 1 else None
        if getattr(node.target, "overloadpacket", None) not in UNIFORM_KEEPING:
            return None
        tensors = [a for a in node.args if isinstance(a, Node) and isinstance(a.meta.get("val"), torch.Tensor)]
        along = [a for a in tensors if a.meta["val"].dim() - val.dim() + dim >= 0
                 and a.meta["val"].shape[a.meta["val"].dim() - val.dim() + dim] != 1]
        if len(along) != 1 or along[0].meta["val"].dim() != val.dim():
            return None
        node = along[0]
    return None


# elementwise ops: an output the same along a dim when the one operand spanning it is
UNIFORM_KEEPING = frozenset(getattr(aten, name) for name in (
    "add", "sub", "mul", "div", "neg", "clone", "_to_copy", "pow", "exp", "rsqrt", "sqrt", "detach", "alias",
) if hasattr(aten, name))


def bind_all_reduce(scale: Fraction, group: str):
    """The true value of a partial sum on every rank of the group: scale * (sum of the ranks')."""
    if scale == 1:
        return lambda x: c10d.wait_tensor(c10d.all_reduce(x.contiguous(), "sum", group))
    return lambda x: c10d.wait_tensor(c10d.all_reduce(x.contiguous(), "sum", group)) * float(scale)


def relay(x: torch.Tensor, steps: tuple[tuple[int, str], ...], tp: int, rank: int) -> torch.Tensor:
    """A tensor equal on every rank, laid out like the block's: tiled T times on a stacked
    dim (rank-major, as an all-gather would stack it), this rank's chunk of a split one."""
    for dim, how in steps:
        if how == "tile":
            x = torch.cat([x] * tp, dim)
        else:
            x = x.chunk(tp, dim)[rank]
    return x.contiguous()


def schema_args(node: Node) -> dict[str, Any]:
    """The op's arguments by schema name."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return {}
    named = {a.name: v for a, v in zip(schema.arguments, node.args)}
    named.update(node.kwargs)
    return named


def bind_relay(steps: tuple[tuple[int, str], ...], tp: int, rank: int):
    return lambda x: relay(x, steps, tp, rank)


def has_node(value: Any) -> bool:
    found = []
    tree_map(lambda a: found.append(a) if isinstance(a, Node) else a, value)
    return bool(found)


def is_dim_list(node: Node) -> bool:
    # ops whose int lists are dims or split sizes along an unsplit dim, not shapes
    return node.target in (aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.split.Tensor,
                           aten.split_with_sizes.default, aten.permute.default, aten.cat.default, aten.squeeze.dims)


def partners(node: Node, dims_of: Callable[[Node], Dims]) -> dict[Node, list[list[Dims]]]:
    """For each tensor argument that must line up with others: per dim, the atoms of the
    other arguments' dims it meets (elementwise ops: same size, aligned from the right;
    cat: every dim but the joined one; an attention mask: q @ k^T's [..., L, S])."""
    if node.target is aten.cat.default:
        inputs = [a for a in node.args[0] if static_shape(a) != [0]]  # cat skips 1-D empty tensors
        rank = len(static_shape(node))
        dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % rank
        return {arg: [[dims_of(o)[k] for o in inputs if o is not arg] if k != dim else []
                      for k in range(rank)] for arg in inputs}
    if getattr(node.target, "overloadpacket", None) in tp_shapes.BROADCASTING \
            and isinstance(node.meta.get("val"), torch.Tensor):
        tensors = [a for a in node.args if isinstance(a, Node) and isinstance(a.meta.get("val"), torch.Tensor)]
        rank = len(static_shape(node))
        out: dict[Node, list[list[Dims]]] = {}
        for arg in tensors:
            old, lead, met = static_shape(arg), rank - len(static_shape(arg)), []
            for k, size in enumerate(old):
                met.append([])
                for other in tensors:
                    at = k + lead - (rank - len(static_shape(other)))
                    if other is not arg and at >= 0 and size != 1 and static_shape(other)[at] == size:
                        met[-1].append(dims_of(other)[at])
            out[arg] = met
        return out
    named = schema_args(node)
    mask = named.get("attn_mask", named.get("attn_bias"))
    if not isinstance(mask, Node) or "query" not in named:
        return {}
    q, k = named["query"], named["key"]
    ref_old = [*static_shape(q)[:-1], static_shape(k)[-2]]
    ref = [*dims_of(q)[:-1], dims_of(k)[-2]]
    old, lead = static_shape(mask), len(ref_old) - len(static_shape(mask))
    return {mask: [[ref[j + lead]] if j + lead >= 0 and size != 1 and ref_old[j + lead] == size else []
                   for j, size in enumerate(old)]}
