"""Replace the token dispatch and combine around routed experts by the fused codegen ops.

A routed MoE layer traced to ATen permutes its tokens with a handful of generic ops: a
stable sort of the flat expert ids, a floor-divide and an index to gather rows, a
scatter-add and cumsum for the offsets; and it combines them back with an inverse
permutation (scatter), an index, a view, a multiply by the routing weights and a sum.
The backward adds index_put accumulations and a weight-gradient reduction. On a GPU that
is a dozen kernels and several [T*k, D] temporaries; `mopc/codegen/dispatch.py` does
each side in one op (Triton on CUDA, the torch reference elsewhere):

    sort + scatter_add + cumsum              -> moe_dispatch_indices(ids, E, 1)
    index(x, [order // k])                   -> moe_gather_rows(x, perm, k)
    sum(index(y, [inverse]).view(T,k,D) * w) -> moe_combine_rows(y, perm, w, T, k)
    index_put(0, [inverse], g * w)           -> moe_gather_rows(g, perm, k, w)
    sum(g * y[inverse], -1)                  -> moe_rows_dot_tokens(y, g, perm, k)
    index_put(0, [order // k], gx)           -> moe_combine_rows(gx, perm, 1, T, k)

Each replacement computes the same values in fp32 (the permutation is the same stable
order; the sums over k run in the same slot order; scatter-add accumulations may
reassociate; in bf16 the gate product is rounded once, from fp32) and is applied where its
pattern matches and the new value has the old one's shape and dtype; what does not match
stays as traced.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
from torch.fx import GraphModule, Node

import mopc.codegen.dispatch  # noqa: F401  (registers the mopc::moe_* ops)
from mopc.passes.registry import register_pass
from mopc.passes.rewrite.splice import insert_traced

log = logging.getLogger("mopc.passes")
aten = torch.ops.aten
mopc_ops = torch.ops.mopc


def _is(node: Any, *targets: Any) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def _users(node: Node, *targets: Any) -> list[Node]:
    return [u for u in node.users if _is(u, *targets)]


def _one(nodes: list[Node]) -> Node | None:
    return nodes[0] if len(nodes) == 1 else None


def _val(node: Node) -> torch.Tensor:
    return node.meta["val"]


def _replace(old: Node, new: Node) -> bool:
    """Rewire `old`'s users to `new` when both compute a tensor of the same shape and dtype
    (otherwise the pattern only looked alike; the unused new nodes are dropped later)."""
    a, b = old.meta.get("val"), new.meta.get("val")
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype):
        return False
    old.replace_all_uses_with(new)
    return True


def _meta(node: Node) -> dict:
    return {k: node.meta[k] for k in ("mopc_role", "mopc_layer") if k in node.meta}


class _Site:
    """One layer's dispatch/combine, found from its stable sort of the flat expert ids."""

    def __init__(self, sort: Node) -> None:
        self.sort = sort
        self.ids = sort.args[0]
        self.order = _one([u for u in sort.users if _is(u, operator.getitem) and u.args[1] == 1])
        self.fused: list[str] = []

    def match(self) -> bool:
        ids, order = self.ids, self.order
        if order is None or not isinstance(ids, Node) or _val(ids).dim() != 1 or _val(ids).is_floating_point():
            return False
        if self.sort.kwargs.get("descending", False) or self.sort.kwargs.get("dim", -1) not in (-1, 0):
            return False
        self.slots = int(_val(ids).shape[0])
        self.div = _one([u for u in _users(order, aten.floor_divide.default) if isinstance(u.args[1], int)])
        if self.div is None:
            return False
        self.top_k = int(self.div.args[1])
        self.tokens = self.slots // self.top_k
        counts = _one([u for u in _users(ids, aten.scatter_add.default)
                       if u.args[1] == 0 and u.args[2] is ids and _is(u.args[3], aten.ones_like.default)
                       and _is(u.args[0], aten.zeros.default)])
        cumsum = _one(_users(counts, aten.cumsum.default)) if counts is not None else None
        self.offsets = _one([u for u in _users(cumsum, aten._to_copy.default)
                             if u.kwargs.get("dtype") == torch.int32]) if cumsum is not None else None
        if self.offsets is None:
            return False
        self.num_experts = int(_val(counts).shape[0])
        self.counts = counts
        inverse = [u for u in _users(order, aten.scatter.src) if u.args[2] is order]
        self.inverse = _one(inverse)
        return True

    # ------------------------------------------------------------------ rewrites

    def fuse(self, graph) -> None:
        e = self.num_experts
        perm, offsets, counts = insert_traced(
            graph, lambda ids: mopc_ops.moe_dispatch_indices(ids, e, 1), [self.ids], before=self.sort,
            meta=_meta(self.sort))
        self.perm = perm
        if not (_replace(self.offsets, offsets) and _replace(self.counts, counts)):
            return
        self.fused.append("indices")
        k = self.top_k
        for index in [u for u in _users(self.div, aten.index.Tensor) if u.args[1] == [self.div]]:
            x = index.args[0]
            if _val(x).dim() != 2 or int(_val(x).shape[0]) != self.tokens:
                continue
            new = insert_traced(graph, lambda x, p: mopc_ops.moe_gather_rows(x, p, k, None), [x, perm],
                                before=index, meta=_meta(index))
            if _replace(index, new):
                self.fused.append("gather")
        for put in _users(self.div, aten.index_put.default):
            if self._is_accumulate_into_zeros(put, self.div):
                self._fuse_grad_x(graph, put)
        if self.inverse is not None:
            self._fuse_combine(graph)
        if self.fused:  # what is left (e.g. a user-visible order) reads perm, the same stable order
            self.order.replace_all_uses_with(perm)

    def _is_accumulate_into_zeros(self, put: Node, index: Node) -> bool:
        args = put.args
        return (len(args) >= 4 and args[3] is True and args[1] == [index] and _is(args[0], aten.new_zeros.default)
                and list(_val(args[0]).shape) == [self.tokens, *_val(args[2]).shape[1:]])

    def _fuse_grad_x(self, graph, put: Node) -> None:
        k, t = self.top_k, self.tokens

        def scatter_back(gx: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            return mopc_ops.moe_combine_rows(gx, p, gx.new_ones(p.shape[0]), t, k)

        if _val(put.args[2]).dim() != 2:
            return
        new = insert_traced(graph, scatter_back, [put.args[2], self.perm], before=put, meta=_meta(put))
        if _replace(put, new):
            self.fused.append("grad_x")

    def _fuse_combine(self, graph) -> None:
        k, t = self.top_k, self.tokens
        for index in [u for u in _users(self.inverse, aten.index.Tensor) if u.args[1] == [self.inverse]]:
            view = _one(_users(index, aten.view.default))
            if view is None or list(_val(view).shape)[:2] != [t, k]:
                continue
            for mul in _users(view, aten.mul.Tensor):
                weight = mul.args[1] if mul.args[0] is view else mul.args[0]
                if not (_is(weight, aten.unsqueeze.default) and weight.args[1] in (-1, 2)):
                    continue
                w_tk = weight.args[0]
                total = _one([u for u in _users(mul, aten.sum.dim_IntList) if list(u.args[1]) == [1]])
                y = index.args[0]
                if total is None or list(_val(w_tk).shape) != [t, k] or _val(y).dim() != 2:
                    continue

                def combine(y: torch.Tensor, p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                    return mopc_ops.moe_combine_rows(y, p, w.reshape(-1).to(y.dtype), t, k)

                new = insert_traced(graph, combine, [y, self.perm, w_tk], before=total, meta=_meta(total))
                if _replace(total, new):
                    self.fused.append("combine")
                    self._fuse_combine_backward(graph, view, weight, w_tk, y)

    def _fuse_combine_backward(self, graph, view: Node, weight: Node, w_tk: Node, y: Node) -> None:
        k, t = self.top_k, self.tokens
        for put in _users(self.inverse, aten.index_put.default):
            if not self._is_accumulate_into_zeros_rows(put):
                continue
            flat = put.args[2]
            prod = flat.args[0] if _is(flat, aten.view.default) else None
            if not _is(prod, aten.mul.Tensor) or weight not in prod.args:
                continue
            grad = prod.args[0] if prod.args[1] is weight else prod.args[1]
            source = self._grad_source(grad)
            if source is None or _val(source).dim() != 2:
                continue

            def gather_grad(g: torch.Tensor, p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                return mopc_ops.moe_gather_rows(g, p, k, w.reshape(-1).to(g.dtype))

            new = insert_traced(graph, gather_grad, [source, self.perm, w_tk], before=put, meta=_meta(put))
            if not _replace(put, new):
                continue
            self.fused.append("grad_y")
            for mul in _users(grad, aten.mul.Tensor):  # g * y[inverse] summed over D: the weight gradient
                if view not in mul.args:
                    continue
                total = _one([u for u in _users(mul, aten.sum.dim_IntList) if list(u.args[1]) in ([2], [-1])])
                squeeze = _one(_users(total, aten.squeeze.dim)) if total is not None else None
                if squeeze is None or list(_val(squeeze).shape) != [t, k]:
                    continue

                def weight_grad(y: torch.Tensor, g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
                    return mopc_ops.moe_rows_dot_tokens(y, g, p, k).view(t, k)

                new_w = insert_traced(graph, weight_grad, [y, source, self.perm], before=squeeze,
                                      meta=_meta(squeeze))
                if _replace(squeeze, new_w):
                    self.fused.append("grad_weights")

    def _is_accumulate_into_zeros_rows(self, put: Node) -> bool:
        args = put.args
        return (len(args) >= 4 and args[3] is True and args[1] == [self.inverse]
                and _is(args[0], aten.new_zeros.default) and int(_val(args[0]).shape[0]) == self.slots)

    def _grad_source(self, grad: Node) -> Node | None:
        """`expand(unsqueeze(g, 1), [T, k, D])` -> g [T, D]."""
        if not _is(grad, aten.expand.default):
            return None
        unsq = grad.args[0]
        if not (_is(unsq, aten.unsqueeze.default) and unsq.args[1] == 1):
            return None
        return unsq.args[0]


def _wants(config) -> bool:
    """`on`, or `auto` when the graphs go to Inductor (CUDA inputs), where the Triton kernels run."""
    return config.fuse_dispatch == "on" or (config.fuse_dispatch == "auto" and config.lowering == "inductor")


@register_pass(kind="rewrite", requires=("annotate_roles",), enabled=_wants)
def fuse_dispatch(gm: GraphModule, ctx) -> GraphModule:
    """Fuse each MoE layer's token dispatch and combine (forward and backward) into codegen ops.

    Algorithm:
    1. (in the pipeline with `fuse_dispatch="on"`, or `auto` when the graphs are lowered
       by Inductor, i.e. CUDA inputs: the Triton kernels run there, the torch references
       elsewhere);
    2. find every stable sort of a flat int tensor whose order is floor-divided by an int
       k (the token of each routed slot): one dispatch site per MoE layer;
    3. replace the sort/scatter_add/cumsum indices, the token gather, the weighted combine
       and, in backward, the gradient scatters and the routing-weight gradient by the
       fused ops, each where its pattern matches, and drop what is left unused.
    """
    sites = [_Site(n) for n in gm.graph.nodes if _is(n, aten.sort.stable) and n.kwargs.get("stable", False)]
    done = []
    for site in sites:
        if not site.match():
            continue
        site.fuse(gm.graph)
        done.append(f"layer {site.sort.meta.get('mopc_layer')}: {'+'.join(site.fused)}")
    gm.graph.eliminate_dead_code()
    log.info("fuse_dispatch on %s: %d sites (%s)", ctx.graph_id, len(done), "; ".join(done))
    return gm


__all__ = ["fuse_dispatch"]
