"""Compressed gradient reduction: the op the `compress_grads` pass puts in place of `reduce_grad`.

In the reference program a sharded parameter's gradient is reduced by `reduce_grad`: the
mean over a group of W ranks, each rank keeping its piece (a reduce-scatter of the
gradient laid out in rank order, `[W, S]`, row r = what rank r keeps). The compressed
reduction computes the same piece from fewer bytes:

| mode | what travels | result |
|---|---|---|
| `skip_idle` | flags per expert (all-reduce of E ints), then only the rows of experts some rank used (all-to-all, uneven) | exact |
| `int8` / `fp8` | every destination's piece quantized in blocks of `block` values with one fp32 scale each (all-to-all) | error feedback |
| `powersgd` | P = M Q and Q = Mᵀ P of a rank-r factorization (two all-reduces) | error feedback, warm start |

`skip_idle`: an expert whose gradient is exactly zero on every rank of the group (it got
no rows anywhere this step, or all its rows were dropped) sends nothing and gets an exactly
zero mean; the others are reduced as before. Rows are whole experts (dim 0 of a
`[E, ...]` weight), or whole rows of a 2-D weight under `grad_compression_scope="all"`
(an embedding's unused tokens).

`int8` / `fp8` (error feedback, Seide et al. 2014; Karimireddy et al. 2019): the rank adds
the residual it kept from the last step to its gradient, quantizes each destination's
piece in blocks (scale = block absmax / 127, or / 448 for float8_e4m3fn), keeps what the
quantization lost as the new residual (one per destination piece, `[W, S]`), and sends the
codes and scales by all-to-all. The owner dequantizes every source's piece and sums them
in rank order, its own piece exact (never quantized, so its residual row stays zero).

`powersgd` (Vogels et al. 2019): the gradient plus residual, as a matrix M, is approximated
by P Qᵀ with rank r: P = M Q (all-reduced, orthonormalized), Q = Mᵀ P (all-reduced); the
mean is P Qᵀ / W and the residual M - P Qᵀ / W. Q is kept for the next step (warm start).
A `[E, m, n]` expert weight is folded to `[E·m, n]` or `[m, E·n]`, whichever has the smaller
rows + cols, so the experts share one rank-r basis on their common (model) dimension. The
first `warmup` steps are reduced uncompressed.

State (residuals, Q, step counts) lives here, per gradient (`key`, unique per compiled
graph and node); statistics for reports are in `compression_stats()`. Bytes are counted
from the tensors each collective sends, under the model of `mopc/runtime/comm.py`, with
`bytes_uncompressed` the reduce-scatter the op replaces.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mopc.plan.mesh import is_fake_group, reduce_scatter_flat, resolve_group
from mopc.runtime.comm import bytes_sent
from mopc.runtime.ownership import _reduce_grad_fake, full_to_gathered

log = logging.getLogger("mopc.compression")

__all__ = ["MODES", "compression_stats", "dequantize_blocks", "fold_matrix", "mean_residual_norm",
           "orthonormalize", "quantize_blocks", "reset_compression_state"]

MODES = ("skip_idle", "int8", "fp8", "powersgd")
EXACT_MODES = ("skip_idle",)

_QMAX = {"int8": 127.0, "fp8": 448.0}


# ------------------------------------------------------------------------ the math (pure)


def _code_dtype(mode: str) -> torch.dtype:
    if mode == "int8":
        return torch.int8
    dtype = getattr(torch, "float8_e4m3fn", None)
    if dtype is None:
        raise RuntimeError("grad_compression='fp8' needs torch.float8_e4m3fn, which this torch build lacks")
    return dtype


def quantize_blocks(x: torch.Tensor, block: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., S] float -> codes [..., S_pad] (int8 or float8_e4m3fn) and scales [..., S_pad / block] fp32.

    Each block of `block` consecutive values is scaled by its absolute maximum so the largest
    maps to the code range's end (127 or 448); zero blocks get scale 0. Round to nearest.
    """
    qmax = _QMAX[mode]
    size = x.shape[-1]
    padded = -(-size // block) * block
    blocks = F.pad(x.float(), (0, padded - size)).unflatten(-1, (padded // block, block))
    scales = blocks.abs().amax(-1) / qmax
    scaled = (blocks / torch.where(scales > 0, scales, 1.0).unsqueeze(-1)).clamp(-qmax, qmax)
    codes = scaled.round().to(torch.int8) if mode == "int8" else scaled.to(_code_dtype(mode))
    return codes.flatten(-2), scales


def dequantize_blocks(codes: torch.Tensor, scales: torch.Tensor, size: int) -> torch.Tensor:
    """Inverse of `quantize_blocks` (up to the rounding): fp32 [..., size]."""
    blocks = codes.float().unflatten(-1, (scales.shape[-1], -1)) * scales.unsqueeze(-1)
    return blocks.flatten(-2)[..., :size]


def fold_matrix(shape: tuple[int, ...]) -> tuple[str, int, int]:
    """How a gradient of `shape` is seen as a matrix for PowerSGD: (how, rows, cols).

    2-D: as is. `[E, m, n]`: `rows` stacks the experts over m (`[E·m, n]`), `cols` over n
    (`[m, E·n]`), whichever has the smaller rows + cols (fewer bytes per rank of the
    factorization); more dimensions fold into the last.
    """
    if len(shape) == 2:
        return "plain", shape[0], shape[1]
    e, m = shape[0], shape[1]
    n = math.prod(shape[2:])
    if e * m + n <= m + e * n:
        return "rows", e * m, n
    return "cols", m, e * n


def _to_matrix(x: torch.Tensor, how: str) -> torch.Tensor:
    if how == "plain":
        return x
    e, m = x.shape[0], x.shape[1]
    flat = x.reshape(e, m, -1)
    return flat.reshape(e * m, -1) if how == "rows" else flat.transpose(0, 1).reshape(m, -1)


def _from_matrix(mat: torch.Tensor, how: str, shape: torch.Size) -> torch.Tensor:
    if how == "plain":
        return mat.reshape(shape)
    e, m = shape[0], shape[1]
    if how == "rows":
        return mat.reshape(shape)
    return mat.reshape(m, e, -1).transpose(0, 1).reshape(shape)


def orthonormalize(p: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning p's (the Q of a reduced QR; deterministic on every rank)."""
    return torch.linalg.qr(p, mode="reduced").Q


# ------------------------------------------------------------------------ state and stats


@dataclass
class _State:
    mode: str
    group_name: str = ""
    steps: int = 0
    residual: torch.Tensor | None = None
    q: torch.Tensor | None = None
    residual_norm: torch.Tensor | float = 0.0
    """Norms stay tensors until `compression_stats()` reads them (no device sync per step)."""
    input_norm: torch.Tensor | float = 0.0


@dataclass
class _Ledger:
    calls: int = 0
    bytes_sent: int = 0
    bytes_uncompressed: int = 0
    by_mode: dict[str, dict[str, int]] = field(default_factory=dict)


_STATES: dict[str, _State] = {}
_LEDGER = _Ledger()


def _record(mode: str, sent: int, uncompressed: int) -> None:
    _LEDGER.calls += 1
    _LEDGER.bytes_sent += sent
    _LEDGER.bytes_uncompressed += uncompressed
    slot = _LEDGER.by_mode.setdefault(mode, {"calls": 0, "bytes_sent": 0, "bytes_uncompressed": 0})
    slot["calls"] += 1
    slot["bytes_sent"] += sent
    slot["bytes_uncompressed"] += uncompressed


def compression_stats() -> dict:
    """What the compressed reductions of this process did so far.

    `bytes_sent` / `bytes_uncompressed`: cumulative bytes this rank sent, and what the
    reduce-scatters they replace would have sent (difference two calls for one step);
    `residual_norm` / `input_norm`: the error-feedback residual after the last step and the
    norm of what was compressed (gradient + previous residual), over all compressed tensors.
    """
    return {
        "calls": _LEDGER.calls,
        "bytes_sent": _LEDGER.bytes_sent,
        "bytes_uncompressed": _LEDGER.bytes_uncompressed,
        "by_mode": {k: dict(v) for k, v in _LEDGER.by_mode.items()},
        "tensors": len(_STATES),
        "residual_norm": math.sqrt(sum(float(s.residual_norm) ** 2 for s in _STATES.values())),
        "input_norm": math.sqrt(sum(float(s.input_norm) ** 2 for s in _STATES.values())),
    }


def mean_residual_norm() -> float:
    """Norm of the group-mean error-feedback residual, over every compressed tensor (collective).

    Each rank's residual is its own gradient minus a share of the group's compressed mean, so
    rank-to-rank differences (which cancel in every sum the next step sends) accumulate in
    it; what the update actually misses is the mean over the group. This all-reduces every
    residual once: a diagnostic (for `mopc train` and benchmarks, outside the measured step),
    to be called on every rank in step.
    """
    total = 0.0
    for key in sorted(_STATES):
        state = _STATES[key]
        if state.residual is None:
            continue
        group = resolve_group(state.group_name)
        mean = state.residual.clone()
        if not is_fake_group(group):
            dist.all_reduce(mean, group=group)
        total += float((mean / group.size()).norm()) ** 2
    return math.sqrt(total)


def reset_compression_state() -> None:
    """Forget every residual, PowerSGD basis and counter (a new run in the same process)."""
    _STATES.clear()
    _LEDGER.__init__()


# ------------------------------------------------------------------------ the op



def _rs_bytes(shard_numel: int, world: int, element_size: int) -> int:
    """What the replaced reduce-scatter sends: N (W-1)/W of the [W, S] input."""
    return bytes_sent("reduce_scatter", world * shard_numel * element_size, world)


def _plain(gathered: torch.Tensor, group: dist.ProcessGroup, world: int) -> torch.Tensor:
    out = gathered.new_empty(gathered.shape[1])
    reduce_scatter_flat(out, gathered.reshape(-1).contiguous(), group=group)
    return out / world


def _skip_idle(grad, gathered, chunk_dim, num_chunks, group, world, me, state) -> tuple[torch.Tensor, int]:
    rows = grad.shape[0]
    flags = grad.reshape(rows, -1).ne(0).any(1).to(torch.int32)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    active = flags.to(torch.uint8).view(rows, *([1] * (grad.dim() - 1))).expand(grad.shape)
    mask = full_to_gathered(active, chunk_dim, num_chunks, world).view(world, -1).bool()
    lens = mask.sum(1).tolist()
    out = gathered.new_zeros(gathered.shape[1])
    state.input_norm = gathered.norm()
    if not sum(lens):  # no expert used anywhere in the group (every flag agrees): nothing to send
        return out, bytes_sent("all_reduce", rows * 4, world)
    send = gathered[mask]  # row-major: destination 0's values first
    recv = send.new_empty(world * lens[me])
    dist.all_to_all_single(recv, send, [lens[me]] * world, lens, group=group)
    out[mask[me]] = recv.view(world, lens[me]).sum(0) / world
    sent = (sum(lens) - lens[me]) * gathered.element_size() + bytes_sent("all_reduce", rows * 4, world)
    return out, sent


def _quantized(gathered, mode, block, group, world, me, state) -> tuple[torch.Tensor, int]:
    size = gathered.shape[1]
    if state.residual is None:
        state.residual = torch.zeros_like(gathered, dtype=torch.float32)
    total = gathered.float() + state.residual
    codes, scales = quantize_blocks(total, block, mode)
    state.residual = total - dequantize_blocks(codes, scales, size)
    state.residual[me] = 0.0  # the own piece is never quantized
    payload = torch.cat([codes.view(torch.uint8), scales.view(torch.uint8).view(world, -1)], dim=1).contiguous()
    recv = torch.empty_like(payload)
    dist.all_to_all_single(recv, payload, group=group)
    width = codes.shape[1]
    got_codes = recv[:, :width].contiguous().view(codes.dtype)
    got_scales = recv[:, width:].contiguous().view(torch.float32)
    pieces = dequantize_blocks(got_codes, got_scales, size)
    pieces[me] = total[me]
    state.input_norm = total.norm()
    state.residual_norm = state.residual.norm()
    sent = bytes_sent("all_to_all", payload.numel(), world)
    return (pieces.sum(0) / world).to(gathered.dtype), sent


def _powersgd(grad, chunk_dim, num_chunks, rank, group, world, me, state) -> tuple[torch.Tensor, int]:
    how, rows, cols = fold_matrix(tuple(grad.shape))
    r = max(1, min(rank, rows, cols))
    if state.residual is None:
        state.residual = torch.zeros_like(grad, dtype=torch.float32)
    total = grad.float() + state.residual
    mat = _to_matrix(total, how)
    if state.q is None:  # the same start on every rank
        gen = torch.Generator(device="cpu").manual_seed(0)
        state.q = torch.randn(cols, r, generator=gen).to(mat.device)
    p = mat @ state.q
    dist.all_reduce(p, group=group)
    p = orthonormalize(p)
    q = mat.transpose(0, 1) @ p
    dist.all_reduce(q, group=group)
    state.q = q
    approx = _from_matrix(p @ q.transpose(0, 1) / world, how, grad.shape)
    state.residual = total - approx
    state.input_norm = total.norm()
    state.residual_norm = state.residual.norm()
    mine = full_to_gathered(approx, chunk_dim, num_chunks, world).view(world, -1)[me]
    sent = bytes_sent("all_reduce", p.numel() * 4, world) + bytes_sent("all_reduce", q.numel() * 4, world)
    return mine.to(grad.dtype).clone(), sent


@torch.library.custom_op("mopc::compressed_reduce_grad", mutates_args=())
def compressed_reduce_grad(grad: torch.Tensor, chunk_dim: int, num_chunks: int, group_name: str, mode: str,
                           key: str, block: int, rank: int, warmup: int) -> torch.Tensor:
    """`reduce_grad` (mean over the group, this rank's piece) from compressed messages (module docstring)."""
    group = resolve_group(group_name)
    world, me = group.size(), dist.get_rank(group)
    gathered = full_to_gathered(grad, chunk_dim, num_chunks, world).view(world, -1)
    if is_fake_group(group):  # the fake group moves no data: shapes only
        return gathered.new_zeros(gathered.shape[1])
    state = _STATES.setdefault(key, _State(mode, group_name))
    state.steps += 1
    uncompressed = _rs_bytes(gathered.shape[1], world, gathered.element_size())
    if mode == "skip_idle":
        out, sent = _skip_idle(grad, gathered, chunk_dim, num_chunks, group, world, me, state)
    elif mode in _QMAX:
        out, sent = _quantized(gathered, mode, block, group, world, me, state)
    elif mode == "powersgd" and state.steps <= warmup:
        out, sent = _plain(gathered, group, world), uncompressed
        state.input_norm = gathered.norm()
    elif mode == "powersgd":
        out, sent = _powersgd(grad, chunk_dim, num_chunks, rank, group, world, me, state)
    else:
        raise ValueError(f"unknown grad_compression mode {mode!r}; use one of {', '.join(MODES)}")
    _record(mode, sent, uncompressed)
    return out


@compressed_reduce_grad.register_fake
def _compressed_reduce_grad_fake(grad, chunk_dim, num_chunks, group_name, mode, key, block, rank, warmup):
    return _reduce_grad_fake(grad, chunk_dim, num_chunks, group_name)  # the same piece of the same mean
