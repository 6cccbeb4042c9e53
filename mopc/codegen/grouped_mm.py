"""`mopc::grouped_mm`: tokens grouped by expert times one weight matrix per expert.

Why a custom op: `aten._grouped_mm` is the right kernel on CUDA in bf16, but its fake
(meta) implementation only accepts bf16, so fp32 models that call it cannot be traced by
Dynamo or `make_fx`, and its CPU kernel needs 16-byte aligned strides. This op has a
fake implementation for every dtype, an autograd formula, and dispatches to
`aten._grouped_mm` where that kernel applies and to a per-group reference otherwise. In
graphs it appears as one node with a 3-D weight operand, which is how analysis recognises
expert compute.

Shapes: `x [M, K]` (rows sorted by group), `w [G, K, N]`, `offs [G]` int32 cumulative row
ends -> `[M, N]`.
"""

from __future__ import annotations

import torch


def _use_aten(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (
        x.is_cuda and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
        and hasattr(torch, "_grouped_mm")
    )


def _bounds(offs: torch.Tensor) -> list[tuple[int, int]]:
    ends = offs.tolist()
    starts = [0, *ends[:-1]]
    return list(zip(starts, ends))


@torch.library.custom_op("mopc::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """out[rows of group g] = x[rows of group g] @ w[g]."""
    if _use_aten(x, w):
        return torch._grouped_mm(x, w, offs=offs)
    out = x.new_zeros(x.shape[0], w.shape[2])
    for g, (start, end) in enumerate(_bounds(offs)):
        if end > start:
            out[start:end] = x[start:end] @ w[g]
    return out


@grouped_mm.register_fake
def _(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    torch._check(x.dim() == 2 and w.dim() == 3, lambda: "grouped_mm expects x [M, K] and w [G, K, N]")
    torch._check(x.shape[1] == w.shape[1], lambda: f"grouped_mm: x has K={x.shape[1]}, w has K={w.shape[1]}")
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("mopc::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(x: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor, num_groups: int) -> torch.Tensor:
    """dW[g] = x[rows of g]^T @ grad[rows of g] -> [G, K, N]; zero for empty groups."""
    if _use_aten(x, grad):
        return torch._grouped_mm(x.t(), grad, offs=offs)
    out = x.new_zeros(num_groups, x.shape[1], grad.shape[1])
    for g, (start, end) in enumerate(_bounds(offs)):
        if end > start:
            out[g] = x[start:end].t() @ grad[start:end]
    return out


@grouped_mm_weight_grad.register_fake
def _(x: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor, num_groups: int) -> torch.Tensor:
    return x.new_empty(num_groups, x.shape[1], grad.shape[1])


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, w, offs = inputs
    ctx.save_for_backward(x, w, offs)


def _backward(ctx, grad):  # noqa: ANN001
    x, w, offs = ctx.saved_tensors
    grad_x = grouped_mm(grad, w.transpose(1, 2).contiguous(), offs) if ctx.needs_input_grad[0] else None
    grad_w = grouped_mm_weight_grad(x, grad, offs, w.shape[0]) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


grouped_mm.register_autograd(_backward, setup_context=_setup_context)
