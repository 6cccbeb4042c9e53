"""Context parallelism: attention over the whole sequence when each rank holds two chunks of it.

In the reference program every rank owns its tokens. Under `cp = C` a rank's tokens are
two chunks (an early and a late one, `mopc.runtime.context_parallel`) of sequences whose
other chunks live on the C−1 other ranks of its context-parallel group. Every layer but
attention is per token, so it runs unchanged on the local tokens (expert dispatch just
sees more ranks' tokens). This pass rewrites what is not per token:

* **attention**: each causal `scaled_dot_product_attention` (the fused flash op and its
  backward in the joint graph) becomes: all-gather K and V over the cp group (tagged
  must-recompute, so backward gathers them again instead of keeping them),
  `mopc::cp_attention` on the local queries; in backward `mopc::cp_attention_backward`
  and a reduce-scatter (sum) of the key and value gradients back to their owners;
* **positions**: a `arange(S)` over the local length S that feeds the queries or keys
  (RoPE's positions, a learned position embedding's indices) becomes this rank's global
  positions, so rotary phases and position embeddings stay those of the full sequence.

Attention written out by hand (softmax of QKᵀ), with a mask tensor, dropout, or a
non-causal SDPA cannot be expressed this way: the pass refuses it with an error naming the
layer, rather than compute attention within each chunk only.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch.fx import GraphModule, Node
from torch.utils.checkpoint import CheckpointPolicy

from mopc.config import MoPConfigError
from mopc.passes.analysis.graph_utils import descendants, is_unshard
from mopc.passes.registry import register_pass
from mopc.passes.rewrite.splice import insert_traced
from mopc.plan.mesh import find_meshes, group_rank
from mopc.runtime import context_parallel as cp_ops

log = logging.getLogger("mopc.passes")

aten = torch.ops.aten
c10d = torch.ops._c10d_functional

_FLASH = aten._scaled_dot_product_flash_attention_for_cpu.default
_FLASH_BACKWARD = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
_OTHER_ATTENTION = {
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_fused_attention_overrideable",
    "_flash_attention_forward", "_efficient_attention_forward",
}
_ARANGES = (aten.arange.default, aten.arange.start, aten.arange.start_step)
_TOKEN_PATH_ROLES = ("dispatch", "combine", "expert", "router", "shared_expert")


def _where(node: Node) -> str:
    layer = node.meta.get("mopc_layer")
    return f"layer {layer}" if layer is not None else f"node {node.name}"


def _check_supported(gm: GraphModule, flash: list[Node]) -> None:
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", "").split(".")[0]
        if name in _OTHER_ATTENTION:
            raise MoPConfigError(
                f"mop option cp > 1: attention in {_where(node)} runs as aten.{name}, which context parallelism "
                "does not rewrite yet (it rewrites the CPU flash SDPA); run with cp=1 on this device")
        if node.target is aten._softmax.default and node.meta.get("mopc_role") == "attention":
            raise MoPConfigError(
                f"mop option cp > 1: attention in {_where(node)} is computed by hand (softmax of QK^T), which "
                "context parallelism cannot split over sequence chunks; use "
                "torch.nn.functional.scaled_dot_product_attention(..., is_causal=True), or cp=1")
    for node in flash:
        args = list(node.args) + [None] * (5 - len(node.args))
        dropout, causal = args[3] or 0.0, bool(args[4])
        if node.kwargs.get("attn_mask") is not None or not causal or dropout:
            why = ("an attention mask tensor" if node.kwargs.get("attn_mask") is not None
                   else "is_causal=False" if not causal else f"dropout_p={dropout}")
            raise MoPConfigError(
                f"mop option cp > 1: attention in {_where(node)} has {why}; context parallelism supports causal "
                "scaled_dot_product_attention(is_causal=True) without a mask or dropout; use cp=1 for this model")


def _positions_fn(spans: list[tuple[int, int]], dtype: torch.dtype, device: torch.device):
    def positions() -> torch.Tensor:
        return torch.cat([torch.arange(a, b, dtype=dtype, device=device) for a, b in spans])

    return positions


def _rewrite_positions(gm: GraphModule, flash: list[Node], cp: int, cp_rank: int) -> int:
    """Replace each arange(0, S, 1) that reaches a query or key input by the global positions."""
    local = flash[0].args[0].meta["val"].shape[2]
    qk_inputs = {a for n in flash for a in n.args[1:2] + n.args[0:1]}
    moved = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _ARANGES:
            continue
        if node.meta.get("mopc_role") in _TOKEN_PATH_ROLES:
            continue
        args = list(node.args)
        start, end, step = (0, args[0], 1) if len(args) == 1 else (args[0], args[1], args[2] if len(args) > 2 else 1)
        if (start, end, step) != (0, local, 1):
            continue
        if not (descendants([node]) & qk_inputs):
            continue
        val = node.meta["val"]
        spans = cp_ops.global_positions(local, cp, cp_rank)
        new = insert_traced(gm.graph, _positions_fn(spans, val.dtype, val.device), [], before=node,
                            meta={"mopc_role": node.meta.get("mopc_role", "attention"), "mopc_layer": None})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        moved += 1
    return moved


# Collectives on [B, H, S, D] tensors laid out [B, S, H, D] in memory (the flash kernels'
# layout): moved as the contiguous [B, S, H, D] view, so nothing is copied to send them.
def _gather(x: torch.Tensor, cp: int, group: str) -> torch.Tensor:
    sent = x.transpose(1, 2).contiguous()
    return c10d.wait_tensor(c10d.all_gather_into_tensor(sent, cp, group)).transpose(1, 2)


def _reduce(x: torch.Tensor, cp: int, group: str) -> torch.Tensor:
    sent = x.transpose(1, 2).contiguous()
    return c10d.wait_tensor(c10d.reduce_scatter_tensor(sent, "sum", cp, group)).transpose(1, 2)


def _forward_fn(cp: int, cp_rank: int, scale: float | None):
    def forward(q, k_all, v_all):
        return torch.ops.mopc.cp_attention(q, k_all, v_all, cp, cp_rank, scale)

    return forward


def _backward_fn(cp: int, cp_rank: int, scale: float | None, group: str):
    def backward(grad_out, q, k_all, v_all, out, lse):
        dq, dk_all, dv_all = torch.ops.mopc.cp_attention_backward(grad_out, q, k_all, v_all, out, lse, cp, cp_rank,
                                                                  scale)
        return dq, _reduce(dk_all, cp, group), _reduce(dv_all, cp, group)

    return backward


# ---- head <-> sequence all-to-all (cp_attention="all_to_all")
# A tensor [B, H, S_local, ...] (laid out [B, S, H, ...] in memory, as the flash kernels
# give and take them) is exchanged so each rank holds heads H / cp over the whole sequence,
# in global order, and back.

def _seq_to_heads(x: torch.Tensor, cp: int, group: str) -> torch.Tensor:
    B, H, S = x.shape[:3]
    rest = tuple(x.shape[3:])
    bshd = x.transpose(1, 2).reshape(B, S, cp, H // cp, *rest)
    send = bshd.movedim(2, 0).contiguous().view(cp * B, S, H // cp, *rest)  # head group (= destination) major
    got = c10d.wait_tensor(c10d.all_to_all_single(send, [B] * cp, [B] * cp, group))
    got = got.view(cp, B, S, H // cp, *rest)  # [source rank, B, its two chunks, heads, ...]
    c = S // 2
    chunks: list[torch.Tensor | None] = [None] * (2 * cp)
    for r in range(cp):
        a, b = cp_ops.sequence_chunk_ids(cp, r)
        chunks[a], chunks[b] = got[r, :, :c], got[r, :, c:]
    return torch.cat(chunks, dim=1).transpose(1, 2)  # [B, H / cp, L, ...]


def _heads_to_seq(y: torch.Tensor, cp: int, group: str) -> torch.Tensor:
    B, Hh, L = y.shape[:3]
    rest = tuple(y.shape[3:])
    c = L // (2 * cp)
    chunks = y.transpose(1, 2).split(c, dim=1)  # the 2·cp global chunks, [B, c, H / cp, ...]
    send = torch.cat([torch.cat([chunks[a], chunks[b]], dim=1)  # destination rank major
                      for a, b in (cp_ops.sequence_chunk_ids(cp, r) for r in range(cp))])
    got = c10d.wait_tensor(c10d.all_to_all_single(send, [B] * cp, [B] * cp, group))
    got = got.view(cp, B, 2 * c, Hh, *rest)  # [head group, B, this rank's tokens, heads, ...]
    # contiguous first: with one head per rank a reshape would be a view with other strides
    # than the [B, S, H, ...] layout the graph after attention was traced with
    return got.movedim(0, 2).contiguous().view(B, 2 * c, cp * Hh, *rest).transpose(1, 2)


def _a2a_inputs_fn(cp: int, group: str):
    def inputs(q, k, v):
        return _seq_to_heads(q, cp, group), _seq_to_heads(k, cp, group), _seq_to_heads(v, cp, group)

    return inputs


def _a2a_forward_fn(cp: int, group: str, scale: float | None):
    def forward(q_h, k_h, v_h):
        out_h, lse_h = aten._scaled_dot_product_flash_attention_for_cpu(q_h, k_h, v_h, 0.0, True, scale=scale)
        return out_h, lse_h, _heads_to_seq(out_h, cp, group), _heads_to_seq(lse_h, cp, group)

    return forward


def _a2a_backward_fn(cp: int, group: str, scale: float | None):
    def backward(grad_out, q_h, k_h, v_h, out_h, lse_h):
        go_h = _seq_to_heads(grad_out, cp, group)
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            go_h, q_h, k_h, v_h, out_h, lse_h, 0.0, True, scale=scale)
        return _heads_to_seq(dq, cp, group), _heads_to_seq(dk, cp, group), _heads_to_seq(dv, cp, group)

    return backward


def _rewrite_all_to_all(gm: GraphModule, fwd: Node, bwd: Node | None, cp: int, group: str) -> None:
    """Ulysses-style: whole sequence, heads / cp per rank. The exchanged q, k, v are gathered
    again in backward (must-recompute); the head-layout output and log-sum-exp are saved."""
    q, k, v = fwd.args[0:3]
    for name, node in (("heads", q), ("key/value heads", k)):
        heads = node.meta["val"].shape[1]
        if heads % cp:
            raise MoPConfigError(f"mop option cp_attention='all_to_all' with cp={cp}: attention in {_where(fwd)} has "
                                 f"{heads} {name} on this rank, not divisible by {cp}; use cp_attention='all_gather'")
    scale = fwd.kwargs.get("scale")
    layer = {"mopc_role": "attention", "mopc_layer": fwd.meta.get("mopc_layer")}
    regather = {**layer, "recompute": CheckpointPolicy.MUST_RECOMPUTE, "ac_graph_id": 0}
    q_h, k_h, v_h = insert_traced(gm.graph, _a2a_inputs_fn(cp, group), [q, k, v], before=fwd, meta=regather)
    out_h, lse_h, out, lse = insert_traced(gm.graph, _a2a_forward_fn(cp, group, scale), [q_h, k_h, v_h],
                                           before=fwd, meta=layer)
    if bwd is not None:
        grads = insert_traced(gm.graph, _a2a_backward_fn(cp, group, scale), [bwd.args[0], q_h, k_h, v_h, out_h, lse_h],
                              before=bwd, meta=layer)
        for index, item in _getitems(bwd).items():
            item.replace_all_uses_with(grads[index])
    for index, item in _getitems(fwd).items():
        item.replace_all_uses_with((out, lse)[index])


def _backward_of(fwd: Node, backwards: list[Node]) -> Node | None:
    for bwd in backwards:
        if tuple(bwd.args[1:4]) == tuple(fwd.args[0:3]):
            return bwd
    return None


def _getitems(node: Node) -> dict[int, Node]:
    return {u.args[1]: u for u in node.users if u.target is operator.getitem}


@register_pass(
    kind="rewrite",
    requires=("annotate_roles",),
    enabled=lambda c: c.cp > 1,
    options_from_config=lambda c: {"cp": c.cp, "tp": c.tp, "variant": c.cp_attention},
)
def context_parallel(gm: GraphModule, ctx, *, cp: int, tp: int, variant: str = "all_gather") -> GraphModule:
    """Attention over the cp group's gathered keys and values; positions made global.

    Algorithm:
    1. find the causal flash SDPA nodes and their backward; refuse attention this cannot
       split (other SDPA kernels, softmax written out, masks, dropout);
    2. replace every `arange(S)` over the local length that feeds queries or keys by this
       rank's global positions (its two chunks);
    3. per attention: all-gather K and V over cp (must-recompute: backward gathers them
       again), `mopc::cp_attention` in place of the forward; in backward
       `mopc::cp_attention_backward`, and reduce-scatter (sum) of dK and dV to their owners.
       With `cp_attention="all_to_all"`: all-to-all q, k, v to heads / cp over the whole
       sequence (again in backward), causal flash attention there, all-to-all the output
       and log-sum-exp back; backward exchanges the output gradient, and dq, dk, dv back.
    """
    flash = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _FLASH]
    _check_supported(gm, flash)
    if not flash:
        log.info("context_parallel: no attention in graph %s; nothing to rewrite", ctx.graph_id)
        return gm
    meshes = None
    for node in gm.graph.nodes:
        if is_unshard(node):
            meshes = find_meshes(node.args[4], tp, cp=cp)
            if meshes is not None:
                break
    if meshes is None or meshes.cp_group is None:
        raise MoPConfigError(f"mop option cp={cp}: no context-parallel process group was built for this model; "
                             "pass cp to mopc.parallelize (not only to torch.compile)")
    group, cp_rank = meshes.cp_group, group_rank(meshes.cp_group)
    local = flash[0].args[0].meta["val"].shape[2]
    if not isinstance(local, int) or local % 2:
        raise MoPConfigError(f"mop option cp={cp}: this rank holds {local} tokens per sequence, which must be an even "
                             f"number (two chunks); the sequence length must be divisible by 2*cp={2 * cp}")
    moved = _rewrite_positions(gm, flash, cp, cp_rank)
    backwards = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _FLASH_BACKWARD]
    for fwd in flash:
        if variant == "all_to_all":
            _rewrite_all_to_all(gm, fwd, _backward_of(fwd, backwards), cp, group)
            continue
        q, k, v = fwd.args[0:3]
        scale = fwd.kwargs.get("scale")
        layer = {"mopc_role": "attention", "mopc_layer": fwd.meta.get("mopc_layer")}
        regather = {**layer, "recompute": CheckpointPolicy.MUST_RECOMPUTE, "ac_graph_id": 0}
        k_all = insert_traced(gm.graph, lambda x: _gather(x, cp, group), [k], before=fwd, meta=regather)
        v_all = insert_traced(gm.graph, lambda x: _gather(x, cp, group), [v], before=fwd, meta=regather)

        out, lse = insert_traced(gm.graph, _forward_fn(cp, cp_rank, scale), [q, k_all, v_all], before=fwd, meta=layer)
        bwd = _backward_of(fwd, backwards)
        if bwd is not None:
            grad_out, _, _, _, saved_out, saved_lse = bwd.args[0:6]
            grads = insert_traced(gm.graph, _backward_fn(cp, cp_rank, scale, group),
                                  [grad_out, q, k_all, v_all, saved_out, saved_lse],
                                  before=bwd, meta=layer)
            for index, item in _getitems(bwd).items():
                item.replace_all_uses_with(grads[index])
        for index, item in _getitems(fwd).items():
            item.replace_all_uses_with((out, lse)[index])
    gm.graph.eliminate_dead_code()
    replaced = {n.name for n in flash + backwards}
    left = [n.name for n in gm.graph.nodes if n.name in replaced and n.target in (_FLASH, _FLASH_BACKWARD)]
    if left:
        raise RuntimeError(f"context_parallel: attention nodes left after the rewrite: {left}")
    log.info("context_parallel: graph %s: %d attention ops over cp=%d (rank %d, %s), %d position tensors made global",
             ctx.graph_id, len(flash), cp, cp_rank, variant, moved)
    return gm
