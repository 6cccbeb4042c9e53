"""Fused MoE token dispatch and combine: `mopc::moe_dispatch_indices`, `moe_gather_rows`, `moe_combine_rows`.

A routed MoE layer sends each token's k slots (slot `s = t * top_k + j`, the flat index of
the router's `ids [T, k]`) to experts and sums the expert outputs back. These ops do that
in three steps with static shapes and no host reads, so they trace under
`torch.compile(fullgraph=True)` and `make_fx` in fake mode:

    perm, offsets, counts = moe_dispatch_indices(ids.flatten(), E, align)
    x_perm = moe_gather_rows(x, perm, top_k, None)        # [P, D], rows grouped by expert
    y_perm = grouped_mm(x_perm, w, offsets)               # any expert computation
    y = moe_combine_rows(y_perm, perm, weights.flatten(), T, top_k)   # [T, D]

`perm [P]` (`P = T*k + E*(align-1)`) names, for each row of the grouped layout, the slot it
holds, or -1 for padding; every slot appears exactly once. Rows of one expert keep
increasing slot order (stable), so with `align=1` `perm[:T*k]` equals
`torch.argsort(ids, stable=True)` and the ops compute what the reference `MoE.forward`
computes (fp32: gather bit-exact; combine sums over k in slot order like `.sum(1)`).

Backward: gather and combine are each other's adjoints, so the gradient of one is the
other, plus `mopc::moe_rows_dot_tokens` for the gate / weight gradients.

Implementations: each op has a torch reference (used on CPU, and the source of truth in
tests) and a Triton path (mopc/codegen/triton_dispatch.py). Which one runs is chosen per
call by the environment variable `MOPC_DISPATCH_KERNELS`:
  - `auto` (default): Triton for CUDA tensors when triton imports, the reference otherwise;
  - `torch`: always the reference (e.g. to rule the kernels out when debugging);
  - `triton`: always Triton; on CPU this needs `TRITON_INTERPRET=1` set before triton is
    first imported (the interpreter is ~1e4x slower than torch: tiny shapes only).
The ops are opaque in graphs, so the switch does not affect tracing or compile caches.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

_KERNELS_ENV = "MOPC_DISPATCH_KERNELS"


@functools.cache
def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def _use_triton(t: torch.Tensor) -> bool:
    mode = os.environ.get(_KERNELS_ENV, "auto")
    if mode == "torch":
        return False
    if mode == "triton":
        if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"{_KERNELS_ENV}=triton on {t.device} tensors needs TRITON_INTERPRET=1 in the environment "
                "before triton is imported; set it, or use a CUDA device, or "
                f"{_KERNELS_ENV}=auto|torch")
        return True
    if mode != "auto":
        raise ValueError(f"{_KERNELS_ENV}={mode!r}: expected one of auto, torch, triton")
    return t.is_cuda and _triton_installed()


def _kernels():
    from mopc.codegen import triton_dispatch

    return triton_dispatch


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit floats and fp32, fp64 stays fp64 (so gradcheck sees full precision)."""
    return torch.promote_types(dtype, torch.float32)


# ---------------------------------------------------------------- torch references


def dispatch_indices_reference(ids: torch.Tensor, num_experts: int, align: int):
    """Reference for `moe_dispatch_indices`: stable argsort plus per-expert padded placement."""
    ids = ids.reshape(-1)
    num_slots = ids.numel()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    counts = counts.scatter_add(0, ids, torch.ones_like(ids))
    padded = (counts + (align - 1)) // align * align
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    # rank of a slot among its expert's slots = its sorted position minus the expert's
    # first sorted position (the unpadded exclusive cumsum of counts)
    first = torch.cumsum(counts, 0) - counts
    rows = starts[sorted_ids] + torch.arange(num_slots, device=ids.device) - first[sorted_ids]
    perm = torch.full((num_slots + num_experts * (align - 1),), -1, dtype=torch.int64, device=ids.device)
    perm = perm.scatter(0, rows, order)
    return perm, ends.to(torch.int32), counts


def inverse_perm_reference(perm: torch.Tensor, num_slots: int) -> torch.Tensor:
    """inv[perm[i]] = i for every non-padding row i; padding rows write to a dropped extra slot."""
    target = torch.where(perm >= 0, perm, num_slots)
    rows = torch.arange(perm.numel(), device=perm.device)
    inv = torch.zeros(num_slots + 1, dtype=torch.int64, device=perm.device)
    return inv.scatter(0, target, rows)[:num_slots]


def gather_rows_reference(x: torch.Tensor, perm: torch.Tensor, top_k: int, gate: torch.Tensor | None) -> torch.Tensor:
    """out[i] = x[perm[i] // top_k] (* gate[perm[i]]), zero where perm[i] < 0."""
    valid = (perm >= 0).unsqueeze(-1)
    if x.shape[0] == 0:
        return x.new_zeros(perm.numel(), x.shape[1])
    slots = perm.clamp(min=0)
    out = x[slots // top_k]
    if gate is not None:
        acc = _acc_dtype(x.dtype)
        out = (out.to(acc) * gate[slots].to(acc).unsqueeze(-1)).to(x.dtype)
    return out.masked_fill(~valid, 0)


def combine_rows_reference(y: torch.Tensor, perm: torch.Tensor, weights: torch.Tensor, num_tokens: int,
                           top_k: int) -> torch.Tensor:
    """out[t] = sum_j weights[t*k+j] * y[inv[t*k+j]], in slot order, accumulated in fp32 (or fp64)."""
    acc = _acc_dtype(y.dtype)
    inv = inverse_perm_reference(perm, num_tokens * top_k)
    y_TKD = y[inv].view(num_tokens, top_k, y.shape[1]).to(acc)
    return (y_TKD * weights.reshape(num_tokens, top_k, 1).to(acc)).sum(1).to(y.dtype)


def rows_dot_tokens_reference(rows: torch.Tensor, tokens: torch.Tensor, perm: torch.Tensor, top_k: int) -> torch.Tensor:
    """out[s] = dot(rows[inv[s]], tokens[s // top_k]) for every slot s, in the accumulation dtype."""
    acc = _acc_dtype(rows.dtype)
    num_tokens, dim = tokens.shape
    inv = inverse_perm_reference(perm, num_tokens * top_k)
    r_TKD = rows[inv].view(num_tokens, top_k, dim).to(acc)
    return (r_TKD * tokens.to(acc).unsqueeze(1)).sum(-1).reshape(-1)


# ---------------------------------------------------------------- custom ops


@torch.library.custom_op("mopc::moe_dispatch_indices", mutates_args=())
def moe_dispatch_indices(ids: torch.Tensor, num_experts: int, align: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the slots of flat expert ids by expert -> (perm, offsets, counts).

    ids: int64 [M] (M = T * top_k, values in [0, num_experts)); align >= 1.
    counts: int64 [E], slots per expert. offsets: int32 [E], cumulative ends of the groups
    after padding each to a multiple of `align` (the `offs` of `torch._grouped_mm`).
    perm: int64 [M + E*(align-1)], the slot each row holds, stable within an expert; -1
    for padding rows and for the tail past offsets[-1]. Shapes never depend on the data.
    """
    if _use_triton(ids):
        return _kernels().dispatch_indices(ids, num_experts, align)
    return dispatch_indices_reference(ids, num_experts, align)


@moe_dispatch_indices.register_fake
def _(ids: torch.Tensor, num_experts: int, align: int):
    torch._check(align >= 1, lambda: f"moe_dispatch_indices: align={align}, expected >= 1")
    torch._check(not ids.is_floating_point(), lambda: f"moe_dispatch_indices: ids must be integers, got {ids.dtype}")
    perm = ids.new_empty(ids.numel() + num_experts * (align - 1), dtype=torch.int64)
    offsets = ids.new_empty(num_experts, dtype=torch.int32)
    counts = ids.new_empty(num_experts, dtype=torch.int64)
    return perm, offsets, counts


@torch.library.custom_op("mopc::moe_inverse_perm", mutates_args=())
def moe_inverse_perm(perm: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Slot -> row: inv [num_slots] int64 with inv[perm[i]] = i for every row i with perm[i] >= 0."""
    if _use_triton(perm):
        return _kernels().inverse_perm(perm, num_slots)
    return inverse_perm_reference(perm, num_slots)


@moe_inverse_perm.register_fake
def _(perm: torch.Tensor, num_slots: int) -> torch.Tensor:
    return perm.new_empty(num_slots, dtype=torch.int64)


@torch.library.custom_op("mopc::moe_gather_rows", mutates_args=())
def moe_gather_rows(x: torch.Tensor, perm: torch.Tensor, top_k: int, gate: torch.Tensor | None) -> torch.Tensor:
    """Tokens to grouped rows: out [P, D] with out[i] = x[perm[i] // top_k] * gate[perm[i]].

    x [T, D]; perm [P] from `moe_dispatch_indices`; gate [T*top_k] or None (then no
    scaling). Padding rows (perm < 0) are zero. With a gate the product is taken in fp32
    (fp64 for fp64 x) and rounded once to x's dtype.
    """
    if _use_triton(x):
        return _kernels().gather_rows(x, perm, top_k, gate)
    return gather_rows_reference(x, perm, top_k, gate)


@moe_gather_rows.register_fake
def _(x: torch.Tensor, perm: torch.Tensor, top_k: int, gate: torch.Tensor | None) -> torch.Tensor:
    torch._check(x.dim() == 2 and perm.dim() == 1, lambda: "moe_gather_rows expects x [T, D] and perm [P]")
    return x.new_empty(perm.shape[0], x.shape[1])


@torch.library.custom_op("mopc::moe_combine_rows", mutates_args=())
def moe_combine_rows(y: torch.Tensor, perm: torch.Tensor, weights: torch.Tensor, num_tokens: int,
                     top_k: int) -> torch.Tensor:
    """Grouped rows back to tokens: out [T, D], out[t] = sum_j weights[t*k+j] * y[row of slot t*k+j].

    y [P, D]; perm [P]; weights [T*top_k] (any float dtype). Padding rows are ignored. Sums
    over j in slot order in fp32 (fp64 for fp64 y), one token at a time (deterministic, no
    atomics), and returns y's dtype.
    """
    if _use_triton(y):
        kernels = _kernels()
        inv = kernels.inverse_perm(perm, num_tokens * top_k)
        return kernels.combine_rows(y, inv, weights, num_tokens, top_k)
    return combine_rows_reference(y, perm, weights, num_tokens, top_k)


@moe_combine_rows.register_fake
def _(y: torch.Tensor, perm: torch.Tensor, weights: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    torch._check(y.dim() == 2 and perm.dim() == 1, lambda: "moe_combine_rows expects y [P, D] and perm [P]")
    torch._check(weights.numel() == num_tokens * top_k,
                 lambda: f"moe_combine_rows: weights has {weights.numel()} elements, expected {num_tokens}*{top_k}")
    return y.new_empty(num_tokens, y.shape[1])


@torch.library.custom_op("mopc::moe_rows_dot_tokens", mutates_args=())
def moe_rows_dot_tokens(rows: torch.Tensor, tokens: torch.Tensor, perm: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per slot s: dot(rows[row of s], tokens[s // top_k]) -> [T*top_k], fp32 (fp64 for fp64 rows).

    The gate gradient of `moe_gather_rows` and the weight gradient of `moe_combine_rows`.
    """
    if _use_triton(rows):
        kernels = _kernels()
        inv = kernels.inverse_perm(perm, tokens.shape[0] * top_k)
        return kernels.rows_dot_tokens(rows, tokens, inv, top_k)
    return rows_dot_tokens_reference(rows, tokens, perm, top_k)


@moe_rows_dot_tokens.register_fake
def _(rows: torch.Tensor, tokens: torch.Tensor, perm: torch.Tensor, top_k: int) -> torch.Tensor:
    torch._check(rows.shape[1] == tokens.shape[1],
                 lambda: f"moe_rows_dot_tokens: rows have D={rows.shape[1]}, tokens have D={tokens.shape[1]}")
    return rows.new_empty(tokens.shape[0] * top_k, dtype=_acc_dtype(rows.dtype))


# ---------------------------------------------------------------- autograd


def _gather_setup_context(ctx, inputs, output) -> None:
    x, perm, top_k, gate = inputs
    ctx.top_k = top_k
    ctx.save_for_backward(x, perm, gate)


def _gather_backward(ctx, grad):
    x, perm, gate = ctx.saved_tensors
    num_tokens = x.shape[0]
    grad_x = grad_gate = None
    if ctx.needs_input_grad[0]:
        scale = gate if gate is not None else grad.new_ones(num_tokens * ctx.top_k)
        grad_x = moe_combine_rows(grad, perm, scale, num_tokens, ctx.top_k)
    if gate is not None and ctx.needs_input_grad[3]:
        grad_gate = moe_rows_dot_tokens(grad, x, perm, ctx.top_k).to(gate.dtype)
    return grad_x, None, None, grad_gate


def _combine_setup_context(ctx, inputs, output) -> None:
    y, perm, weights, _, top_k = inputs
    ctx.top_k = top_k
    ctx.save_for_backward(y, perm, weights)


def _combine_backward(ctx, grad):
    y, perm, weights = ctx.saved_tensors
    grad_y = grad_weights = None
    if ctx.needs_input_grad[0]:
        grad_y = moe_gather_rows(grad, perm, ctx.top_k, weights)
    if ctx.needs_input_grad[2]:
        grad_weights = moe_rows_dot_tokens(y, grad, perm, ctx.top_k).to(weights.dtype)
    return grad_y, None, grad_weights, None, None


moe_gather_rows.register_autograd(_gather_backward, setup_context=_gather_setup_context)
moe_combine_rows.register_autograd(_combine_backward, setup_context=_combine_setup_context)

