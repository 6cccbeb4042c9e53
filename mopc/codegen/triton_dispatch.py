"""Triton kernels and launchers behind the `mopc::moe_*` dispatch/combine ops (mopc/codegen/dispatch.py).

Imported only when a Triton path runs, so `import mopc.codegen.dispatch` works without
triton. On CPU the kernels run only under `TRITON_INTERPRET=1` (read when `@triton.jit`
decorates, i.e. when this module is first imported).

Each launcher takes and returns what the matching torch reference in dispatch.py does
(`combine_rows` and `rows_dot_tokens` take the inverse permutation instead of `perm`),
and is tested against it in tests/test_dispatch_kernels.py. Pointer offsets are int64 so
[P, D] tensors past 2**31 elements index correctly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_M = 128  # slots per program in the dispatch kernels (a BLOCK_M x BLOCK_M compare per program)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_d(dim: int, cap: int = 1024) -> int:
    return min(max(triton.next_power_of_2(dim), 16), cap)


# ---------------------------------------------------------------- dispatch indices


@triton.jit
def _block_histogram_kernel(ids_ptr, block_counts_ptr, num_slots, num_blocks, BLOCK_M: tl.constexpr):
    """block_counts[e, b] += 1 for each slot of block b routed to expert e.

    Algorithm:
      1. load the BLOCK_M ids of this block;
      2. atomically add 1 at [id, block] (integer atomics: the result is exact).
    """
    block = tl.program_id(0).to(tl.int64)
    slots = block * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = slots < num_slots
    ids = tl.load(ids_ptr + slots, mask=mask, other=0).to(tl.int64)
    ones = tl.full([BLOCK_M], 1, tl.int32)
    tl.atomic_add(block_counts_ptr + ids * num_blocks + block, ones, mask=mask, sem="relaxed")


@triton.jit
def _block_scan_kernel(block_counts_ptr, block_starts_ptr, counts_ptr, num_blocks, BLOCK_B: tl.constexpr):
    """Per expert (one program each): where each block's slots of that expert start.

    Algorithm:
      1. over chunks of BLOCK_B blocks of row `expert` of block_counts [E, NB]: exclusive
         cumsum plus the running total -> block_starts[expert, b] (rows before block b's
         first slot of this expert, counted from the expert's first row);
      2. counts[expert] = the total.
    """
    expert = tl.program_id(0).to(tl.int64)
    total = tl.sum(tl.zeros([BLOCK_B], dtype=tl.int32), axis=0)  # a scalar int32 zero
    for b0 in range(0, num_blocks, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        mask = blocks < num_blocks
        c = tl.load(block_counts_ptr + expert * num_blocks + blocks, mask=mask, other=0)
        tl.store(block_starts_ptr + expert * num_blocks + blocks, tl.cumsum(c, axis=0) - c + total, mask=mask)
        total = total + tl.sum(c, axis=0).to(tl.int32)
    tl.store(counts_ptr + expert, total.to(tl.int64))


@triton.jit
def _expert_offsets_kernel(counts_ptr, offsets_ptr, starts_ptr, num_experts, align, BLOCK_E: tl.constexpr):
    """One program: padded group ends (the grouped-mm offsets) and group starts.

    Algorithm:
      1. padded[e] = counts[e] rounded up to a multiple of `align`;
      2. offsets = inclusive cumsum of padded (int32); starts = offsets - padded.
    """
    experts = tl.arange(0, BLOCK_E)
    mask = experts < num_experts
    counts = tl.load(counts_ptr + experts, mask=mask, other=0)
    padded = (counts + align - 1) // align * align
    ends = tl.cumsum(padded, axis=0)
    tl.store(offsets_ptr + experts, ends.to(tl.int32), mask=mask)
    tl.store(starts_ptr + experts, ends - padded, mask=mask)


@triton.jit
def _scatter_perm_kernel(ids_ptr, block_starts_ptr, starts_ptr, perm_ptr, num_slots, num_blocks,
                         BLOCK_M: tl.constexpr):
    """perm[row of slot s] = s for the slots of one block; stable within each expert.

    Algorithm:
      1. load the block's ids (masked slots get id -1, matching no expert);
      2. rank of slot i = number of earlier slots in the block with the same id (a
         BLOCK_M x BLOCK_M compare, summed over the earlier ones);
      3. row = starts[id] + block_starts[id, block] + rank; store the slot index there.
    """
    block = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, BLOCK_M)
    slots = block * BLOCK_M + lane
    mask = slots < num_slots
    ids = tl.load(ids_ptr + slots, mask=mask, other=-1).to(tl.int64)
    ids32 = ids.to(tl.int32)  # experts fit in int32; halves the registers of the compare
    earlier_same = (ids32[:, None] == ids32[None, :]) & (lane[None, :] < lane[:, None])
    rank = tl.sum(earlier_same.to(tl.int32), axis=1)
    safe_ids = tl.where(mask, ids, 0)
    base = tl.load(starts_ptr + safe_ids, mask=mask, other=0)
    base += tl.load(block_starts_ptr + safe_ids * num_blocks + block, mask=mask, other=0).to(tl.int64)
    tl.store(perm_ptr + base + rank.to(tl.int64), slots, mask=mask)


def dispatch_indices(ids: torch.Tensor, num_experts: int, align: int, block_m: int = _BLOCK_M,
                     block_b: int | None = None):
    """Launch histogram -> block scan -> expert offsets -> scatter.

    Returns (perm int64 [M + E*(align-1)], offsets int32 [E], counts int64 [E]). `block_m`
    (slots per program) and `block_b` (blocks per scan step) are powers of two; tests pass
    small ones to run the multi-block and multi-step paths on tiny inputs.
    """
    if align < 1:
        raise ValueError(f"moe_dispatch_indices: align={align}, expected >= 1")
    ids = ids.reshape(-1).contiguous()
    num_slots = ids.numel()
    device = ids.device
    perm = torch.full((num_slots + num_experts * (align - 1),), -1, dtype=torch.int64, device=device)
    offsets = torch.zeros(num_experts, dtype=torch.int32, device=device)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    if num_slots == 0 or num_experts == 0:
        return perm, offsets, counts
    num_blocks = triton.cdiv(num_slots, block_m)
    starts = torch.empty(num_experts, dtype=torch.int64, device=device)
    block_counts = torch.zeros(num_experts, num_blocks, dtype=torch.int32, device=device)
    block_starts = torch.empty_like(block_counts)
    _block_histogram_kernel[(num_blocks,)](ids, block_counts, num_slots, num_blocks, BLOCK_M=block_m)
    block_b = block_b or min(max(triton.next_power_of_2(num_blocks), 16), 4096)
    _block_scan_kernel[(num_experts,)](block_counts, block_starts, counts, num_blocks, BLOCK_B=block_b)
    _expert_offsets_kernel[(1,)](counts, offsets, starts, num_experts, align,
                                 BLOCK_E=max(triton.next_power_of_2(num_experts), 16))
    _scatter_perm_kernel[(num_blocks,)](ids, block_starts, starts, perm, num_slots, num_blocks, BLOCK_M=block_m)
    return perm, offsets, counts


# ---------------------------------------------------------------- inverse permutation


@triton.jit
def _inverse_perm_kernel(perm_ptr, inv_ptr, num_rows, BLOCK: tl.constexpr):
    """inv[perm[i]] = i for the rows i of one block with perm[i] >= 0 (each slot written once)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < num_rows
    slots = tl.load(perm_ptr + rows, mask=mask, other=-1)
    tl.store(inv_ptr + slots, rows, mask=mask & (slots >= 0))


def inverse_perm(perm: torch.Tensor, num_slots: int, block: int = 1024) -> torch.Tensor:
    """Slot -> row: int64 [num_slots]."""
    perm = perm.contiguous()
    inv = torch.zeros(num_slots, dtype=torch.int64, device=perm.device)
    if perm.numel() > 0:
        _inverse_perm_kernel[(triton.cdiv(perm.numel(), block),)](perm, inv, perm.numel(), BLOCK=block)
    return inv


# ---------------------------------------------------------------- gather


@triton.jit
def _gather_rows_kernel(x_ptr, perm_ptr, gate_ptr, out_ptr, dim,
                        TOP_K: tl.constexpr, HAS_GATE: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[row, chunk] = x[perm[row] // TOP_K, chunk] (* gate[perm[row]]); zeros for padding rows.

    Algorithm:
      1. load slot = perm[row] (one scalar per program); padding if slot < 0;
      2. load the chunk of token slot // TOP_K (masked to zero for padding);
      3. with a gate: multiply in ACC and round once to the output dtype;
      4. store the chunk (zeros for padding rows, so `out` may start uninitialised).
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < dim
    slot = tl.load(perm_ptr + row)
    # broadcast before comparing: `block_mask & (scalar >= 0)` fails in the interpreter
    valid = (tl.zeros([BLOCK_D], dtype=tl.int64) + slot) >= 0
    safe_slot = tl.maximum(slot, 0)
    token = safe_slot // TOP_K
    vals = tl.load(x_ptr + token * dim + cols, mask=col_mask & valid, other=0)
    if HAS_GATE:
        g = tl.load(gate_ptr + safe_slot).to(ACC)
        vals = (vals.to(ACC) * g).to(out_ptr.dtype.element_ty)
    vals = tl.where(valid, vals, tl.zeros_like(vals))
    tl.store(out_ptr + row * dim + cols, vals, mask=col_mask)


def gather_rows(x: torch.Tensor, perm: torch.Tensor, top_k: int, gate: torch.Tensor | None) -> torch.Tensor:
    """[T, D] tokens -> [P, D] grouped rows."""
    x = x.contiguous()
    perm = perm.contiguous()
    num_rows, dim = perm.numel(), x.shape[1]
    out = torch.empty(num_rows, dim, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out.zero_()
    if num_rows == 0 or dim == 0:
        return out
    block_d = _block_d(dim)
    has_gate = gate is not None
    gate_arg = gate.reshape(-1).contiguous() if has_gate else x
    grid = (num_rows, triton.cdiv(dim, block_d))
    _gather_rows_kernel[grid](x, perm, gate_arg, out, dim, TOP_K=top_k, HAS_GATE=has_gate, ACC=_acc(x.dtype),
                              BLOCK_D=block_d)
    return out


# ---------------------------------------------------------------- combine


@triton.jit
def _combine_rows_kernel(y_ptr, inv_ptr, w_ptr, out_ptr, dim,
                         TOP_K: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t, chunk] = sum_j w[t*K+j] * y[inv[t*K+j], chunk], j = 0..K-1 in order.

    Algorithm:
      1. one program per (token, chunk of D); no atomics, so the result is deterministic;
      2. for each of the token's TOP_K slots (unrolled, slot order): load its row index
         from the inverse permutation, its weight, and the row chunk; accumulate in ACC;
      3. store the sum in y's dtype.
    """
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < dim
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for j in tl.static_range(TOP_K):
        slot = token * TOP_K + j
        row = tl.load(inv_ptr + slot)
        w = tl.load(w_ptr + slot).to(ACC)
        vals = tl.load(y_ptr + row * dim + cols, mask=col_mask, other=0).to(ACC)
        acc += vals * w
    tl.store(out_ptr + token * dim + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


def combine_rows(y: torch.Tensor, inv: torch.Tensor, weights: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """[P, D] grouped rows -> [T, D] tokens, gathering each token's rows through `inv` (slot -> row)."""
    y = y.contiguous()
    dim = y.shape[1]
    out = torch.empty(num_tokens, dim, dtype=y.dtype, device=y.device)
    if num_tokens == 0 or dim == 0:
        return out
    block_d = _block_d(dim)
    grid = (num_tokens, triton.cdiv(dim, block_d))
    _combine_rows_kernel[grid](y, inv.contiguous(), weights.reshape(-1).contiguous(), out, dim, TOP_K=top_k,
                               ACC=_acc(y.dtype), BLOCK_D=block_d)
    return out


# ---------------------------------------------------------------- slot dot products (backward)


@triton.jit
def _rows_dot_tokens_kernel(rows_ptr, tokens_ptr, inv_ptr, out_ptr, dim,
                            TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t*K+j] = dot(rows[inv[t*K+j]], tokens[t]) for the K slots of one token.

    Algorithm:
      1. one program per token; load its K row indices;
      2. over chunks of D: load the token chunk once and the [K, chunk] rows, accumulate
         the elementwise products in a [K, BLOCK_D] ACC tile;
      3. reduce the tile over D and store K values.
    """
    token = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    k_mask = ks < TOP_K
    slots = token * TOP_K + ks
    rows = tl.load(inv_ptr + slots, mask=k_mask, other=0)
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=ACC)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < dim
        tok = tl.load(tokens_ptr + token * dim + cols, mask=col_mask, other=0).to(ACC)
        r = tl.load(rows_ptr + rows[:, None] * dim + cols[None, :], mask=k_mask[:, None] & col_mask[None, :],
                    other=0).to(ACC)
        acc += r * tok[None, :]
    tl.store(out_ptr + slots, tl.sum(acc, axis=1), mask=k_mask)


def rows_dot_tokens(rows: torch.Tensor, tokens: torch.Tensor, inv: torch.Tensor, top_k: int) -> torch.Tensor:
    """[P, D] rows, [T, D] tokens -> [T*top_k] slot dot products in fp32 (fp64 for fp64 rows)."""
    rows = rows.contiguous()
    tokens = tokens.contiguous()
    num_tokens, dim = tokens.shape
    acc_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    out = torch.zeros(num_tokens * top_k, dtype=acc_dtype, device=rows.device)
    if num_tokens == 0 or dim == 0:
        return out
    block_k = max(triton.next_power_of_2(top_k), 2)
    block_d = _block_d(dim, cap=max(16, 4096 // block_k))
    _rows_dot_tokens_kernel[(num_tokens,)](rows, tokens, inv.contiguous(), out, dim, TOP_K=top_k, BLOCK_K=block_k,
                                           ACC=_acc(rows.dtype), BLOCK_D=block_d)
    return out
