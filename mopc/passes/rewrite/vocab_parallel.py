"""Vocabulary-parallel projection and cross-entropy: the [tokens, vocab] logits never exist.

In the reference program every rank gathers the whole vocabulary projection [V, D] and
computes [N, V] logits for its N tokens. After `mopc.parallelize` with `vocab_parallel`,
rank r owns rows [r V/W, (r+1) V/W) of that weight. This pass replaces the projection,
the log-softmax and the NLL loss (forward and backward) by a computation on that shard:

    forward   per chunk of C own tokens (C = loss_chunk_tokens / W):
                  h_c = all_gather(own chunk)            [W C, D]  (that chunk of every rank)
                  logits = h_c @ w_r^T                   [W C, V/W]
                  max  -> all_reduce(max),  sum exp -> all_reduce(sum)  => log-sum-exp
                  target logit if the label falls in this shard          -> all_reduce(sum)
              loss = mean over this rank's own tokens of (lse - target logit)
    backward  coefficient of each rank's tokens (dL_r / d loss_r / count_r) -> all_gather
              per chunk: dlogits = coef * (softmax - onehot) on the shard (recomputed)
                  dw_r += dlogits^T h_c                  (already this rank's shard; / W at the end)
                  dh_c  = reduce_scatter(dlogits @ w_r)  (back to the chunk's owners)

so a rank holds at most [loss_chunk_tokens, V/W] logits and [loss_chunk_tokens, D] gathered
hidden states at a time, whatever the world size; the weight is never gathered and its
gradient needs no reduce-scatter. Losses and gradients equal the reference up to fp32
reassociation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from mopc.passes.analysis.graph_utils import (
    MATMUL_OPS,
    is_op,
    is_reduce_grad,
    is_unshard,
    view_source,
)
from mopc.passes.registry import register_pass
from mopc.passes.rewrite.splice import insert_traced
from mopc.plan.mesh import group_rank, group_size

log = logging.getLogger("mopc.passes")
aten = torch.ops.aten
c10d = torch.ops._c10d_functional

_MEAN, _SUM = 1, 2  # nll_loss reduction enum


def _is_nll_forward(node: Node) -> bool:
    return node.op == "call_function" and node.target is aten.nll_loss_forward.default


def _is_nll_backward(node: Node) -> bool:
    return node.op == "call_function" and node.target is aten.nll_loss_backward.default


def _is_log_softmax(node: Node) -> bool:
    return node.op == "call_function" and node.target in (aten._log_softmax.default, aten.log_softmax.int)


_PASS_THROUGH = frozenset({
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten._to_copy.default,
    aten.clone.default, aten.alias.default, aten.detach.default,
})


def _upstream(node: Node) -> Node:
    """Through views and dtype casts."""
    while node.op == "call_function" and node.target in _PASS_THROUGH:
        node = node.args[0]
    return node


def _readers(node: Node) -> set[Node]:
    """The nodes that read a value's numbers, looking through views and casts."""
    out, stack = set(), list(node.users)
    while stack:
        user = stack.pop()
        if user.op == "call_function" and user.target in _PASS_THROUGH:
            stack.extend(user.users)
        else:
            out.add(user)
    return out


@dataclass(frozen=True)
class _Match:
    """One projection + cross-entropy region of the joint graph."""

    unshard: Node
    mm: Node
    act: Node
    log_softmax: Node
    nll: Node
    nll_bwd: Node
    grad_h_mm: Node
    reduce: Node


def _find(gm: GraphModule) -> list[_Match] | str:
    """The regions to rewrite, or why there is none."""
    graph = gm.graph
    matches = []
    for nll in (n for n in graph.nodes if _is_nll_forward(n)):
        if nll.args[2] is not None or nll.args[3] not in (_MEAN, _SUM):
            return "the cross-entropy has class weights or an unsupported reduction"
        ls = nll.args[0]
        if not _is_log_softmax(ls) or ls.args[1] not in (1, -1):
            return "the loss input is not a log-softmax over the vocabulary"
        mm = _upstream(ls.args[0])
        if not is_op(mm, MATMUL_OPS) or mm.target is not aten.mm.default:
            return f"the logits come from {mm.target}, not a matrix multiply"
        weight_side = mm.args[1]
        # exactly h @ w.T of the whole sharded weight: no slice (a padded vocabulary), no cast
        if not (weight_side.target is aten.t.default and is_unshard(weight_side.args[0])):
            return "the logits are not h @ w.T of a sharded [vocab, hidden] weight"
        unshard = weight_side.args[0]
        _, shape, chunk_dim, num_chunks, group = unshard.args[:5]  # [5:]: mixed-precision dtypes
        if num_chunks != group_size(group) or chunk_dim != 0 or len(shape) != 2:
            return (f"the projection weight is not laid out by vocabulary rows (vocab_parallel=False, "
                    f"or the weight {shape} is tied to another role)")
        act = mm.args[0]
        if act.meta["val"].shape[-1] != shape[1] or act.meta["val"].dtype != unshard.meta["val"].dtype:
            return "the projection input does not match the weight's hidden size or dtype"
        if _readers(mm) != {ls}:
            return "the logits are used outside the loss (the model returns them?)"
        nll_bwd = [u for u in ls.users if _is_nll_backward(u)]
        lsb = [u for u in graph.nodes if u.op == "call_function"
               and u.target is aten._log_softmax_backward_data.default and nll_bwd and u.args[0] is nll_bwd[0]]
        if len(nll_bwd) != 1 or len(lsb) != 1:
            return "the loss backward has an unexpected form"
        grad_mm = [n for n in graph.nodes if n.target is aten.mm.default
                   and {view_source(a) for a in n.args} == {lsb[0], unshard}]
        reduces = [n for n in graph.nodes if is_reduce_grad(n) and _grad_w_of(n, lsb[0], view_source(act))]
        if len(grad_mm) != 1 or len(reduces) != 1:
            return "the projection backward has an unexpected form"
        if not all(isinstance(s, int) for s in act.meta["val"].shape):
            return "the token count is dynamic (compiled with dynamic shapes)"
        matches.append(_Match(unshard, mm, act, ls, nll, nll_bwd[0], grad_mm[0], reduces[0]))
    return matches or "no cross-entropy over a projection in this graph"


def _grad_w_of(reduce: Node, grad_logits: Node, act_src: Node) -> bool:
    src = view_source(_upstream(reduce.args[0]))  # through reduce_dtype's cast
    return src.target is aten.mm.default and {view_source(a) for a in src.args} == {grad_logits, act_src}


def _gather(x: torch.Tensor, world: int, group: str) -> torch.Tensor:
    return c10d.wait_tensor(c10d.all_gather_into_tensor(x.contiguous(), world, group))


def _forward_fn(*, world: int, rank: int, group: str, rows: int, chunk: int, ignore_index: int,
                reduction: int, param_dtype: torch.dtype, loss_dtype: torch.dtype) -> Callable:
    """Per chunk of `chunk` own tokens: gather that chunk from every rank ([W·chunk, D]),
    logits on the vocabulary shard, log-sum-exp and target logit by all-reduce."""

    def forward(h: torch.Tensor, shard: torch.Tensor, labels: torch.Tensor):
        w = shard.view(rows, -1).to(param_dtype)  # mixed precision: the dtype unshard gathered in
        own_losses, lses = [], []
        for h_c, y_c in zip(h.split(chunk), labels.split(chunk)):
            c = h_c.shape[0]
            y_all = _gather(y_c, world, group)  # rank-major: rows r*c:(r+1)*c are rank r's
            logits = torch.mm(_gather(h_c, world, group), w.t()).float()
            top = c10d.wait_tensor(c10d.all_reduce(logits.amax(-1), "max", group))
            total = c10d.wait_tensor(c10d.all_reduce((logits - top[:, None]).exp().sum(-1), "sum", group))
            lse = top + total.log()
            local = y_all - rank * rows
            inside = (local >= 0) & (local < rows)
            picked = logits.gather(1, local.clamp(0, rows - 1)[:, None]).squeeze(1) * inside
            target = c10d.wait_tensor(c10d.all_reduce(picked, "sum", group))
            own_losses.append(lse[rank * c:(rank + 1) * c] - target[rank * c:(rank + 1) * c])
            lses.append(lse)
        valid = labels != ignore_index
        count = valid.sum().to(loss_dtype)
        loss = (torch.cat(own_losses) * valid).sum().to(loss_dtype)
        return (loss / count if reduction == _MEAN else loss), count, torch.cat(lses)

    return forward


def _backward_fn(*, world: int, rank: int, group: str, rows: int, chunk: int, ignore_index: int,
                 reduction: int, param_dtype: torch.dtype, reduce_dtype: torch.dtype) -> Callable:
    """Per chunk, as in forward: recompute the shard's logits, dlogits = coef (softmax - onehot),
    accumulate dw, reduce-scatter the chunk's dh back to its owners."""

    def backward(grad: torch.Tensor, h: torch.Tensor, shard: torch.Tensor, labels: torch.Tensor,
                 lse: torch.Tensor, count: torch.Tensor):
        w = shard.view(rows, -1).to(param_dtype)
        coef = (grad / count if reduction == _MEAN else grad).float().reshape(1)
        coefs = _gather(coef, world, group)  # every rank's dL_r / d(token loss)
        grad_w = torch.zeros_like(w, dtype=torch.float32)  # summed over chunks: accumulate in fp32
        grad_h, start = [], 0
        for h_c, y_c in zip(h.split(chunk), labels.split(chunk)):
            c = h_c.shape[0]
            h_all, y_all = _gather(h_c, world, group), _gather(y_c, world, group)
            lse_c = lse[start:start + world * c]
            start += world * c
            scale = coefs[:, None].expand(world, c).reshape(-1) * (y_all != ignore_index)
            probs = (torch.mm(h_all, w.t()).float() - lse_c[:, None]).exp()
            local = y_all - rank * rows
            inside = ((local >= 0) & (local < rows)).to(probs.dtype)
            probs = probs.scatter_add(1, local.clamp(0, rows - 1)[:, None], -inside[:, None])
            dlogits = (probs * scale[:, None]).to(w.dtype)
            grad_w = grad_w + torch.mm(dlogits.t(), h_all).float()
            grad_h.append(c10d.wait_tensor(c10d.reduce_scatter_tensor(torch.mm(dlogits, w), "sum", world, group)))
        # in the dtype the replaced reduce_grad produced (reduce_dtype; its cast to the shard's follows)
        return torch.cat(grad_h), (grad_w / world).to(reduce_dtype).reshape(-1)

    return backward


@register_pass(
    kind="rewrite",
    requires=("annotate_roles",),
    enabled=lambda c: c.vocab_parallel,
    options_from_config=lambda c: {"chunk_tokens": c.loss_chunk_tokens},
)
def vocab_parallel_loss(gm: GraphModule, ctx, *, chunk_tokens: int) -> GraphModule:
    """Compute the vocabulary projection and cross-entropy on this rank's vocabulary rows.

    Algorithm:
    1. find nll_loss(log_softmax(mm(h, unshard(w)))) whose weight is laid out by vocabulary
       rows over all ranks, with its backward (nll_loss_backward, the two mms of the
       projection's backward and the weight's reduce_grad); give up, keeping the
       reference program, when any piece has another form;
    2. insert the chunked vocab-parallel forward before the loss; its loss and token count
       replace the nll_loss outputs;
    3. insert the chunked backward before nll_loss_backward; its dh replaces the
       projection's input gradient and its dw the weight's reduced gradient;
    4. drop what became dead (the full logits, the gather of the weight).
    """
    found = _find(gm)
    if isinstance(found, str):
        log.info("vocab_parallel_loss: not applied to %s: %s", ctx.graph_id, found)
        return gm
    for m in found:
        group = m.unshard.args[4]
        world, rank = group_size(group), group_rank(group)
        rows = m.unshard.args[1][0] // world
        ignore_index, reduction = m.nll.args[4], m.nll.args[3]
        own_chunk = max(1, chunk_tokens // world)  # a gathered chunk holds about chunk_tokens tokens
        common = {"world": world, "rank": rank, "group": group, "rows": rows, "chunk": own_chunk,
                  "ignore_index": ignore_index, "reduction": reduction, "param_dtype": m.unshard.meta["val"].dtype}
        shard, labels = m.unshard.args[0], m.nll.args[1]
        loss_dtype = m.nll.meta["val"][0].dtype
        fwd = insert_traced(gm.graph, _forward_fn(**common, loss_dtype=loss_dtype), [m.act, shard, labels],
                            before=m.nll, meta={"mopc_role": "loss", "mopc_layer": None})
        loss, count, lse = fwd
        for user in list(m.nll.users):
            user.replace_all_uses_with(loss if user.args[1] == 0 else count)
        bwd = insert_traced(gm.graph, _backward_fn(**common, reduce_dtype=m.reduce.meta["val"].dtype),
                            [m.nll_bwd.args[0], m.act, shard, labels, lse, count],
                            before=m.nll_bwd, meta={"mopc_role": "vocab_projection", "mopc_layer": None})
        grad_h, grad_w = bwd
        m.grad_h_mm.replace_all_uses_with(grad_h)
        m.reduce.replace_all_uses_with(grad_w)
    gm.graph.eliminate_dead_code()
    return gm
