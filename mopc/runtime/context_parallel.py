"""Context parallelism: which tokens a rank holds, and causal attention over the whole sequence.

Under `cp = C` every sequence of length L is cut into 2·C chunks of L / (2·C) tokens, and
the rank with context-parallel rank r holds chunks r and 2·C−1−r, in that order (an early
and a late chunk: under a causal mask the work per rank is then the same, C·(2C+1)/C
chunk pairs each, instead of the last rank doing most of it). `sequence_chunk_ids`,
`shard_sequence` and `global_positions` say which.

Attention needs the keys and values of the whole sequence. The `context_parallel` rewrite
all-gathers this rank's K and V over the cp group (rank-major: [C·B, H, 2c, D]) and calls
`mopc::cp_attention`, which computes, for each of the rank's two query chunks with global
index g, attention over the chunks before g (no mask) and over chunk g itself (causal),
merged by their log-sum-exp. Its backward, `mopc::cp_attention_backward`, gives the
query gradient and the gradient of every gathered key and value (the rewrite
reduce-scatters those back to their owners, summed): the flash backward of each piece is
run with the *merged* output and log-sum-exp, which is exactly the piece's share of the
gradient. Both use `aten._scaled_dot_product_flash_attention_for_cpu` (and its backward)
per piece: nothing of size [L, L] is ever formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DataPart", "data_part", "global_positions", "sequence_chunk_ids", "shard_sequence"]

aten = torch.ops.aten


@dataclass(frozen=True)
class DataPart:
    """Which part of every global batch a rank reads."""

    index: int
    """Which slice of rows (`mopc.data_parallel_rank`'s index)."""
    count: int
    """Ranks reading different rows: world // cp."""
    cp: int = 1
    cp_rank: int = 0
    """Which two of the 2·cp chunks of each sequence the rank keeps (cp > 1)."""


def data_part(rank: int, world: int, cp: int = 1, tp: int = 1) -> DataPart:
    """The part of the data `rank` reads on the mesh (dp, cp, tp), tp fastest: the cp ranks
    of a group share rows. Pure arithmetic, so usable before `mopc.parallelize` (whose
    example inputs must already be the rank's part)."""
    tp_rank, rest = rank % tp, rank // tp
    return DataPart(index=(rest // cp) * tp + tp_rank, count=world // cp, cp=cp, cp_rank=rest % cp)


def sequence_chunk_ids(cp: int, cp_rank: int) -> tuple[int, int]:
    """The global chunk indices (of 2·cp) that context-parallel rank `cp_rank` holds."""
    return cp_rank, 2 * cp - 1 - cp_rank


def global_positions(local_len: int, cp: int, cp_rank: int) -> list[tuple[int, int]]:
    """The (start, end) global token positions of this rank's two chunks."""
    c = local_len // 2
    return [(g * c, (g + 1) * c) for g in sequence_chunk_ids(cp, cp_rank)]


def shard_sequence(x: torch.Tensor, cp: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's two chunks of the full sequences `x` (sequence on `dim`), concatenated."""
    length = x.shape[dim]
    if length % (2 * cp):
        raise ValueError(f"context parallelism: sequence length {length} is not divisible by 2*cp={2 * cp}; "
                         f"pad the sequences to a multiple of {2 * cp}")
    c = length // (2 * cp)
    return torch.cat([x.narrow(dim, g * c, c) for g in sequence_chunk_ids(cp, cp_rank)], dim=dim)


def _chunk_views(kv_all: torch.Tensor, cp: int) -> list[torch.Tensor]:
    """The gathered [cp·B, H, 2c, D] keys (or values) as the 2·cp global chunks, in order."""
    per_rank = kv_all.chunk(cp, dim=0)
    out: list[torch.Tensor | None] = [None] * (2 * cp)
    for r, kv in enumerate(per_rank):
        early, late = kv.chunk(2, dim=2)
        a, b = sequence_chunk_ids(cp, r)
        out[a], out[b] = early, late
    return out  # type: ignore[return-value]


def _pieces(k_all: torch.Tensor, v_all: torch.Tensor, cp: int, g: int):
    """Keys/values of the chunks before g (None if g == 0) and of chunk g."""
    ks, vs = _chunk_views(k_all, cp), _chunk_views(v_all, cp)
    prefix = (torch.cat(ks[:g], dim=2), torch.cat(vs[:g], dim=2)) if g else None
    return prefix, (ks[g], vs[g])


def _merge(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor):
    lse = torch.logaddexp(l1, l2)
    out = o1.float() * (l1 - lse).exp().unsqueeze(-1) + o2.float() * (l2 - lse).exp().unsqueeze(-1)
    return out.to(o1.dtype), lse


def _bshd(like: torch.Tensor, shape: torch.Size | tuple, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty [B, H, S(, D)] tensor laid out as [B, S, H(, D)] in memory: the strides the
    flash kernels give their outputs, which the graph around them was traced with."""
    order = (0, 2, 1, 3) if len(shape) == 4 else (0, 2, 1)
    physical = [shape[i] for i in order]
    return like.new_empty(physical, dtype=dtype or like.dtype).permute(*order)


def _laid_out(x: torch.Tensor) -> torch.Tensor:
    out = _bshd(x, x.shape)
    out.copy_(x)
    return out


@torch.library.custom_op("mopc::cp_attention", mutates_args=())
def cp_attention(q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, cp: int, cp_rank: int,
                 scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of this rank's queries [B, Hq, 2c, D] over the whole sequence, whose
    keys and values `k_all`, `v_all` [cp·B, Hk, 2c, D] were gathered rank-major.
    Returns the output [B, Hq, 2c, D] and the log-sum-exp [B, Hq, 2c] (fp32)."""
    outs, lses = [], []
    for q_h, g in zip(q.chunk(2, dim=2), sequence_chunk_ids(cp, cp_rank), strict=True):
        prefix, (k_g, v_g) = _pieces(k_all, v_all, cp, g)
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q_h, k_g, v_g, 0.0, True, scale=scale)
        if prefix is not None:
            out_p, lse_p = aten._scaled_dot_product_flash_attention_for_cpu(q_h, *prefix, 0.0, False, scale=scale)
            out, lse = _merge(out_p, lse_p, out, lse)
        outs.append(out)
        lses.append(lse)
    return _laid_out(torch.cat(outs, dim=2)), _laid_out(torch.cat(lses, dim=2))


@cp_attention.register_fake
def _cp_attention_fake(q, k_all, v_all, cp, cp_rank, scale=None):
    return _bshd(q, q.shape), _bshd(q, q.shape[:-1], torch.float32)


@torch.library.custom_op("mopc::cp_attention_backward", mutates_args=())
def cp_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor,
                          out: torch.Tensor, lse: torch.Tensor, cp: int, cp_rank: int,
                          scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `cp_attention`: dq [B, Hq, 2c, D], and dk, dv for every gathered key and
    value [cp·B, Hk, 2c, D] (this rank's contribution; the owners sum them)."""
    c = q.shape[2] // 2
    length = 2 * cp * c
    B = q.shape[0]
    acc = torch.float32 if k_all.dtype != torch.float64 else torch.float64
    dk = k_all.new_zeros((B, k_all.shape[1], length, k_all.shape[3]), dtype=acc)  # global order
    dv = v_all.new_zeros((B, v_all.shape[1], length, v_all.shape[3]), dtype=acc)
    dqs = []
    pieces = zip(grad_out.chunk(2, dim=2), q.chunk(2, dim=2), out.chunk(2, dim=2), lse.chunk(2, dim=2),
                 sequence_chunk_ids(cp, cp_rank), strict=True)
    for go_h, q_h, o_h, l_h, g in pieces:
        prefix, (k_g, v_g) = _pieces(k_all, v_all, cp, g)
        go_h, o_h, l_h = go_h.contiguous(), o_h.contiguous(), l_h.contiguous()
        dq, dk_g, dv_g = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            go_h, q_h, k_g, v_g, o_h, l_h, 0.0, True, scale=scale)
        dq = dq.to(acc)
        dk[:, :, g * c:(g + 1) * c] += dk_g
        dv[:, :, g * c:(g + 1) * c] += dv_g
        if prefix is not None:
            dq_p, dk_p, dv_p = aten._scaled_dot_product_flash_attention_for_cpu_backward(
                go_h, q_h, *prefix, o_h, l_h, 0.0, False, scale=scale)
            dq = dq + dq_p
            dk[:, :, :g * c] += dk_p
            dv[:, :, :g * c] += dv_p
        dqs.append(dq)
    return (_laid_out(torch.cat(dqs, dim=2).to(q.dtype)), _laid_out(_to_gathered(dk, cp).to(k_all.dtype)),
            _laid_out(_to_gathered(dv, cp).to(v_all.dtype)))


def _to_gathered(x: torch.Tensor, cp: int) -> torch.Tensor:
    """[B, H, L, D] in global order -> [cp·B, H, 2c, D] rank-major (the all-gather's layout)."""
    chunks = x.chunk(2 * cp, dim=2)
    return torch.cat([torch.cat([chunks[a], chunks[b]], dim=2)
                      for a, b in (sequence_chunk_ids(cp, r) for r in range(cp))], dim=0)


@cp_attention_backward.register_fake
def _cp_attention_backward_fake(grad_out, q, k_all, v_all, out, lse, cp, cp_rank, scale=None):
    return _bshd(q, q.shape), _bshd(k_all, k_all.shape), _bshd(v_all, v_all.shape)
