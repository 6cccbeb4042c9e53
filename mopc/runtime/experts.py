"""Expert-parallel token exchange: the route plan and the ops the `expert_parallel` pass inserts.

Inside an expert-parallel (EP) group of `ep` ranks, rank q owns experts
[q * E_loc, (q + 1) * E_loc) of every MoE layer (E_loc = E / ep). Each rank arrives with
its own routed rows `x [N, D]`, grouped by expert (the `grouped_mm` contract: row counts
per expert are the differences of the offsets). The ops below move those rows to the
ranks that compute them and back:

    counts_all [ep, E]  (all-gathered in the graph: every rank sees the whole group's routing)
    x_loc  = ep_dispatch(x, ...)       all-to-all, then regrouped by local expert slot
    offs   = ep_local_offsets(...)     int32 cumulative rows per slot, for grouped_mm
    w_ext  = ep_lend_weights(w_loc)    only with spilling: borrowed experts appended
    y      = ep_combine(y_loc, ...)    un-regrouped, reverse all-to-all, back in x's order

The *route plan* decides where each row goes. It is a pure function of `counts_all` and
the options, so every rank of the group computes the same plan without another message:
  1. a row of expert e goes to e's owner, in the order (source rank, source row);
  2. `capacity_factor`: rows of e beyond ceil(c * rows / E) in that order are dropped;
  3. `spill_factor`: when a rank would compute more than ceil(f * mean rows per rank),
     the last rows of its hottest expert go to the least-loaded rank with a free slot,
     which borrows that expert's weights for the step (slots E_loc .. E_loc + S - 1),
     repeatedly, until the rank is under the bound or nobody can take more.
Gradients follow the same plan in reverse, so dispatch and combine are each other's
backward and a spilled expert's weight gradient returns to its owner.

Data-dependent sizes (how many rows a rank receives) exist only inside these ops at run
time; in graphs their fake implementation returns an unbacked size.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mopc.plan.mesh import is_fake_group, resolve_group

log = logging.getLogger("mopc.ep")

__all__ = ["RoutePlan", "expert_bias_buffers", "expert_load_stats", "route_plan", "update_expert_bias"]


# ------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class RoutePlan:
    """Where every routed row of an EP group goes this step (see the module docstring)."""

    ep: int
    num_experts: int
    num_slots: int
    """E_loc + spill slots: the expert slots each rank computes."""
    segments: tuple[tuple[tuple[tuple[int, int, int], ...], ...], ...]
    """segments[s][e] = ((dst rank or -1 for dropped, slot, rows), ...) covering, in order,
    source s's rows of expert e."""
    lent: tuple[tuple[int, ...], ...]
    """lent[q][i] = expert borrowed in slot E_loc + i by rank q, or -1."""
    tokens_per_expert: tuple[int, ...]
    rows_per_rank: tuple[int, ...]
    """Rows each rank computes after drops and spills."""
    owner_rows_per_rank: tuple[int, ...]
    """Rows each rank would compute without spilling (after drops)."""
    dropped: int

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.ep

    def send_ranges(self, src: int, offsets: list[int]) -> list[list[tuple[int, int]]]:
        """Per destination, the (start, rows) ranges of source `src`'s rows it receives, in order."""
        out: list[list[tuple[int, int]]] = [[] for _ in range(self.ep)]
        for e, segs in enumerate(self.segments[src]):
            start = offsets[e]
            for dst, _, rows in segs:
                if dst >= 0 and rows:
                    out[dst].append((start, rows))
                start += rows
        return out

    def recv_slots(self, dst: int) -> list[tuple[int, int]]:
        """(slot, rows) of every segment rank `dst` receives, in arrival order (by source)."""
        return [(slot, rows) for s in range(self.ep) for segs in self.segments[s]
                for d, slot, rows in segs if d == dst and rows]

    def slot_rows(self, dst: int) -> list[int]:
        rows = [0] * self.num_slots
        for slot, n in self.recv_slots(dst):
            rows[slot] += n
        return rows

    def stats(self) -> dict:
        mean = sum(self.rows_per_rank) / max(self.ep, 1)
        owner_max = max(self.owner_rows_per_rank, default=0)
        return {
            "tokens_per_expert": list(self.tokens_per_expert),
            "rows_per_rank": list(self.rows_per_rank),
            "imbalance": (max(self.rows_per_rank) / mean) if mean else 1.0,
            "imbalance_without_spill": (owner_max / mean) if mean else 1.0,
            "dropped_rows": self.dropped,
            "lent_experts": [list(x) for x in self.lent],
        }


def _intersect(src_lo: int, src_hi: int, ranges: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int]]:
    """Cut [src_lo, src_hi) of an expert's global row order by destination ranges."""
    out = []
    for lo, hi, dst, slot in sorted(ranges):
        a, b = max(lo, src_lo), min(hi, src_hi)
        if b > a:
            out.append((dst, slot, b - a))
    return out


@functools.lru_cache(maxsize=256)
def route_plan(counts_all: tuple[tuple[int, ...], ...], capacity_factor: float, spill_factor: float,
               spill_slots: int) -> RoutePlan:
    """The plan for one layer and step; `0.0` turns capacity or spilling off."""
    ep, num_experts = len(counts_all), len(counts_all[0])
    e_loc = num_experts // ep
    totals = [sum(row[e] for row in counts_all) for e in range(num_experts)]
    if capacity_factor > 0:
        cap = math.ceil(capacity_factor * sum(totals) / num_experts)
        kept = [min(t, cap) for t in totals]
    else:
        kept = list(totals)
    owner_rows = list(kept)  # rows still at the owner, per expert
    load = [sum(owner_rows[q * e_loc:(q + 1) * e_loc]) for q in range(ep)]
    owner_load = tuple(load)
    # borrowed ranges per expert: (lo, hi, dst, slot), carved from the end of the owner's range
    borrowed: dict[int, list[tuple[int, int, int, int]]] = {}
    lent = [[-1] * spill_slots for _ in range(ep)] if spill_factor > 0 else [[] for _ in range(ep)]
    if spill_factor > 0 and sum(load):
        bound = math.ceil(spill_factor * sum(load) / ep)
        for q in sorted(range(ep), key=lambda r: (-load[r], r)):
            while load[q] > bound:
                e = max(range(q * e_loc, (q + 1) * e_loc), key=lambda x: (owner_rows[x], -x))
                free = [r for r in range(ep) if r != q and -1 in lent[r] and load[r] < bound]
                if not free or owner_rows[e] == 0:
                    break
                r = min(free, key=lambda x: (load[x], x))
                moved = min(load[q] - bound, bound - load[r], owner_rows[e])
                i = lent[r].index(-1)
                lent[r][i] = e
                hi = owner_rows[e]
                borrowed.setdefault(e, []).append((hi - moved, hi, r, e_loc + i))
                owner_rows[e] -= moved
                load[q] -= moved
                load[r] += moved
    segments = []
    for s in range(ep):
        per_expert = []
        for e in range(num_experts):
            lo = sum(counts_all[x][e] for x in range(s))
            hi = lo + counts_all[s][e]
            owner = e // e_loc
            ranges = [(0, owner_rows[e], owner, e - owner * e_loc), *borrowed.get(e, []),
                      (kept[e], totals[e], -1, -1)]
            per_expert.append(tuple(_intersect(lo, hi, ranges)))
        segments.append(tuple(per_expert))
    return RoutePlan(
        ep=ep, num_experts=num_experts, num_slots=e_loc + (spill_slots if spill_factor > 0 else 0),
        segments=tuple(segments), lent=tuple(tuple(x) for x in lent), tokens_per_expert=tuple(totals),
        rows_per_rank=tuple(load), owner_rows_per_rank=owner_load, dropped=sum(totals) - sum(kept),
    )


# ------------------------------------------------------------------------ load statistics

_LOAD: dict[int, dict] = {}
"""The latest plan statistics of each MoE layer seen by this process (layer -> stats)."""


def expert_load_stats() -> dict[int, dict]:
    """Per MoE layer, the last step's routing in this rank's expert-parallel group: tokens per
    expert, rows per rank (after drops and spills), imbalance ratio max/mean with and without
    spilling, dropped rows and lent experts."""
    return {layer: dict(stats) for layer, stats in sorted(_LOAD.items())}


def _record(layer: int, plan: RoutePlan) -> None:
    stats = plan.stats()
    _LOAD[layer] = stats
    if log.isEnabledFor(logging.DEBUG):
        log.debug("layer %d: rows per rank %s, imbalance %.2f (%.2f without spilling), dropped %d",
                  layer, stats["rows_per_rank"], stats["imbalance"], stats["imbalance_without_spill"],
                  stats["dropped_rows"])


# ------------------------------------------------------------------------ helpers



def _plan_for(counts: torch.Tensor, counts_all: torch.Tensor, group_name: str, capacity_factor: float,
              spill_factor: float, spill_slots: int) -> tuple[RoutePlan, dist.ProcessGroup, int]:
    group = resolve_group(group_name)
    ep = group.size()
    if is_fake_group(group):  # the fake group moves no data: pretend every rank routes like this one
        counts_all = counts.view(1, -1).expand(ep, -1)
    rows = tuple(tuple(r) for r in counts_all.view(ep, -1).tolist())
    plan = route_plan(rows, float(capacity_factor), float(spill_factor), int(spill_slots))
    return plan, group, dist.get_rank(group)


def _index(ranges: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    if not ranges:
        return torch.zeros(0, dtype=torch.int64, device=device)
    return torch.cat([torch.arange(a, a + n, device=device) for a, n in ranges])


def _send_index(plan: RoutePlan, rank: int, counts: list[int], device: torch.device) -> tuple[torch.Tensor, list[int], bool]:
    offsets = [0]
    for c in counts[:-1]:
        offsets.append(offsets[-1] + c)
    per_dst = plan.send_ranges(rank, offsets)
    flat = [r for ranges in per_dst for r in ranges]
    splits = [sum(n for _, n in ranges) for ranges in per_dst]
    identity = sum(splits) == sum(counts) and all(a == b for (a, _), b in zip(flat, _running(flat)))
    return _index(flat, device), splits, identity


def _running(ranges: list[tuple[int, int]]) -> list[int]:
    out, pos = [], 0
    for _, n in ranges:
        out.append(pos)
        pos += n
    return out


def _regroup_index(plan: RoutePlan, rank: int, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """Arrival order -> slot order (stable by source), and the rows each source sends here."""
    segs = plan.recv_slots(rank)
    starts = _running([(0, n) for _, n in segs])
    order = sorted(range(len(segs)), key=lambda i: segs[i][0])
    recv_splits = [sum(n for segs_e in plan.segments[s] for d, _, n in segs_e if d == rank) for s in range(plan.ep)]
    return _index([(starts[i], segs[i][1]) for i in order], device), recv_splits


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    if is_fake_group(group):
        return out.zero_()
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


# ------------------------------------------------------------------------ the ops
# Every op takes the same routing arguments: this rank's counts per expert [E], the group's
# counts [ep, E], the EP group, capacity factor, spill factor and slots (0.0 = off).


@torch.library.custom_op("mopc::ep_dispatch", mutates_args=())
def ep_dispatch(x: torch.Tensor, counts: torch.Tensor, counts_all: torch.Tensor, group_name: str,
                capacity_factor: float, spill_factor: float, spill_slots: int, layer: int) -> torch.Tensor:
    """Send this rank's rows (grouped by expert) to the ranks computing them; return the rows
    this rank computes, grouped by local expert slot (and by source rank within a slot)."""
    plan, group, rank = _plan_for(counts, counts_all, group_name, capacity_factor, spill_factor, spill_slots)
    if layer >= 0:
        _record(layer, plan)
    send_idx, send_splits, identity = _send_index(plan, rank, counts.tolist(), x.device)
    regroup, recv_splits = _regroup_index(plan, rank, x.device)
    sent = x if identity and x.shape[0] == sum(send_splits) else x.index_select(0, send_idx)
    received = _all_to_all(sent, recv_splits, send_splits, group)
    return received.index_select(0, regroup)


@ep_dispatch.register_fake
def _(x, counts, counts_all, group_name, capacity_factor, spill_factor, spill_slots, layer):
    rows = torch.library.get_ctx().new_dynamic_size()
    return x.new_empty((rows, *x.shape[1:]))


@torch.library.custom_op("mopc::ep_combine", mutates_args=())
def ep_combine(y: torch.Tensor, counts: torch.Tensor, counts_all: torch.Tensor, group_name: str,
               capacity_factor: float, spill_factor: float, spill_slots: int, num_rows: int) -> torch.Tensor:
    """The reverse of `ep_dispatch`: rows computed here go back to their source ranks, in the
    source's original order; dropped rows come back as zeros. Output [num_rows, ...]."""
    plan, group, rank = _plan_for(counts, counts_all, group_name, capacity_factor, spill_factor, spill_slots)
    send_idx, send_splits, identity = _send_index(plan, rank, counts.tolist(), y.device)
    regroup, recv_splits = _regroup_index(plan, rank, y.device)
    arrival = torch.empty_like(y).index_copy_(0, regroup, y) if y.shape[0] else y
    back = _all_to_all(arrival, send_splits, recv_splits, group)
    if identity and num_rows == back.shape[0]:
        return back
    out = y.new_zeros((num_rows, *y.shape[1:]))
    return out.index_copy_(0, send_idx, back)


@ep_combine.register_fake
def _(y, counts, counts_all, group_name, capacity_factor, spill_factor, spill_slots, num_rows):
    return y.new_empty((num_rows, *y.shape[1:]))


@torch.library.custom_op("mopc::ep_local_offsets", mutates_args=())
def ep_local_offsets(counts: torch.Tensor, counts_all: torch.Tensor, group_name: str, capacity_factor: float,
                     spill_factor: float, spill_slots: int) -> torch.Tensor:
    """int32 cumulative row ends per local slot (owned experts, then borrowed ones)."""
    plan, _, rank = _plan_for(counts, counts_all, group_name, capacity_factor, spill_factor, spill_slots)
    rows = torch.tensor(plan.slot_rows(rank), dtype=torch.int64, device=counts.device)
    return torch.cumsum(rows, 0).to(torch.int32)


@ep_local_offsets.register_fake
def _(counts, counts_all, group_name, capacity_factor, spill_factor, spill_slots):
    ep = counts_all.shape[0]
    slots = counts.shape[0] // ep + (spill_slots if spill_factor > 0 else 0)
    return counts.new_empty(slots, dtype=torch.int32)


def _lend_splits(plan: RoutePlan, rank: int) -> tuple[list[tuple[int, int, int]], list[int], list[tuple[int, int]], list[int]]:
    """Owner side: (borrower, slot index, local expert) in send order and splits per borrower;
    borrower side: (owner, slot index) in arrival order and splits per owner."""
    e_loc = plan.local_experts
    sends = [(q, i, e - rank * e_loc) for q in range(plan.ep) for i, e in enumerate(plan.lent[q])
             if e >= 0 and e // e_loc == rank]
    send_splits = [sum(1 for q, _, _ in sends if q == d) for d in range(plan.ep)]
    mine = [(e // e_loc, i) for i, e in enumerate(plan.lent[rank]) if e >= 0]
    arrivals = sorted(mine)  # owners send in rank order, and by slot within an owner
    recv_splits = [sum(1 for o, _ in arrivals if o == s) for s in range(plan.ep)]
    return sends, send_splits, arrivals, recv_splits


@torch.library.custom_op("mopc::ep_lend_weights", mutates_args=())
def ep_lend_weights(w: torch.Tensor, counts: torch.Tensor, counts_all: torch.Tensor, group_name: str,
                    capacity_factor: float, spill_factor: float, spill_slots: int) -> torch.Tensor:
    """[E_loc, ...] own experts -> [E_loc + S, ...]: the experts this rank borrows this step
    appended (zeros in unused slots). Owners send each lent expert once per borrower."""
    plan, group, rank = _plan_for(counts, counts_all, group_name, capacity_factor, spill_factor, spill_slots)
    sends, send_splits, arrivals, recv_splits = _lend_splits(plan, rank)
    sent = w[[e for _, _, e in sends]] if sends else w.new_empty((0, *w.shape[1:]))
    received = _all_to_all(sent, recv_splits, send_splits, group)
    extra = w.new_zeros((spill_slots, *w.shape[1:]))
    if arrivals:
        extra[[i for _, i in arrivals]] = received
    return torch.cat([w, extra])


@ep_lend_weights.register_fake
def _(w, counts, counts_all, group_name, capacity_factor, spill_factor, spill_slots):
    return w.new_empty((w.shape[0] + spill_slots, *w.shape[1:]))


@torch.library.custom_op("mopc::ep_return_grads", mutates_args=())
def ep_return_grads(grad: torch.Tensor, counts: torch.Tensor, counts_all: torch.Tensor, group_name: str,
                    capacity_factor: float, spill_factor: float, spill_slots: int) -> torch.Tensor:
    """The reverse of `ep_lend_weights`: [E_loc + S, ...] -> [E_loc, ...], each borrowed
    slot's gradient sent back to the expert's owner and added to its own."""
    plan, group, rank = _plan_for(counts, counts_all, group_name, capacity_factor, spill_factor, spill_slots)
    sends, send_splits, arrivals, recv_splits = _lend_splits(plan, rank)
    e_loc = grad.shape[0] - spill_slots
    back_rows = grad[[e_loc + i for _, i in arrivals]] if arrivals else grad.new_empty((0, *grad.shape[1:]))
    received = _all_to_all(back_rows, send_splits, recv_splits, group)
    out = grad[:e_loc].clone()
    if sends:
        out.index_add_(0, torch.tensor([e for _, _, e in sends], device=grad.device), received)
    return out


@ep_return_grads.register_fake
def _(grad, counts, counts_all, group_name, capacity_factor, spill_factor, spill_slots):
    return grad.new_empty((grad.shape[0] - spill_slots, *grad.shape[1:]))


# ------------------------------------------------------------------------ aux-loss-free balancing

_BIAS_NAMES = ("expert_bias", "e_score_correction_bias")


def expert_bias_buffers(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    """Each MoE layer's router correction bias (a 1-D buffer named like DeepSeek-V3's), by layer."""
    from mopc.passes.analysis.role_defs import layer_of

    out = {}
    for fqn, buf in model.named_buffers():
        if fqn.rsplit(".", 1)[-1] in _BIAS_NAMES and buf.dim() == 1:
            layer = layer_of(fqn)
            if layer is not None:
                out[layer] = buf
    return out


@torch.no_grad()
def update_expert_bias(biases: dict[int, torch.Tensor], rate: float, edp_group: str | None) -> int:
    """One aux-loss-free balancing step (DeepSeek-V3): bias += rate * sign(mean load - load).

    The load of an expert is the number of rows routed to it in the last step over the whole
    world: each expert-parallel group's counts (from its dispatch), summed over the groups
    by an all-reduce over the expert-data-parallel ranks, so every rank applies the same
    update. Returns the number of layers updated.
    """
    layers = [layer for layer in sorted(biases) if layer in _LOAD]
    if not layers:
        return 0
    device = next(iter(biases.values())).device  # NCCL groups reduce device tensors only
    counts = torch.tensor([_LOAD[layer]["tokens_per_expert"] for layer in layers], dtype=torch.float64,
                          device=device)
    if edp_group is not None:
        group = resolve_group(edp_group)
        if group.size() > 1 and not is_fake_group(group):
            dist.all_reduce(counts, group=group)
    for row, layer in zip(counts, layers):
        bias = biases[layer]
        if row.numel() != bias.numel():
            continue
        step = torch.sign(row.mean() - row) * rate
        bias.add_(step.to(device=bias.device, dtype=bias.dtype))
    return len(layers)
