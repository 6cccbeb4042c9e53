"""Per-rank memory and step-time estimates of a candidate layout.

Memory, by category (bytes per rank):
- params, grads, optimizer: the shards of `model.layout_bytes` (exact: `make_plan`'s
  layouts), fp32 at rest whatever the compute dtype (mixed precision keeps fp32 shards,
  fp32 shard gradients, and the shard IS the fp32 master: no extra copy); AdamW keeps two
  fp32 moments per element and one 4-byte step counter per tensor;
- activations: forward values saved for backward, per token, from probes of the real
  compiled program (`probe.py`) scaled to the candidate's tokens per rank and layer counts;
  the part sized by the rows an expert-parallel rank receives is scaled by the routing
  skew (max over EP ranks of received rows / mean, at a percentile of a multinomial); what
  the probe gathered from every rank of its world (the vocabulary-parallel loss's hidden
  states) grows per token with the world and is rescaled to the candidate's. Under
  `param_dtype="bf16"` activations are bf16: the probes trace in fp32 (one probe set
  serves both dtypes), so their saved bytes and token-collective bytes are halved
  (`dtype_scale`). The model's fp32 islands (RMSNorm's and RoPE's upcasts, the router's
  fp32 logits, the loss's fp32 log-softmax, flash attention's fp32 log-sum-exp) are then
  counted at half: measured on `tiny` (`run_probe` with `param_dtype` bf16 and fp32), a
  bf16 probe saves 0.51x (dense layer), 0.60x (MoE layer) and 0.73x (head) of the fp32
  probe's bytes, so bf16 activations are underestimated by up to ~1/6 per MoE layer there
  (less on wide models, where the fp32 router and norm tensors are a smaller share);
- context parallelism (`cp`): a rank holds L/cp tokens of each of its sequences, and every
  layer but attention runs on them alone, so the per-token saved bytes are the cp=1
  probe's (checked: a cp=2 probe saves the same bytes per local token). Attention adds
  transient buffers (`cp_attention_transient`). Modelled: `cp_attention="all_gather"`
  (the default); the head-exchanging `all_to_all` variant is not a candidate yet;
- expert-activation offload (`offload="experts"`): the saved tensors of routed-expert,
  dispatch and combine nodes (the probe reads that share by the producer's `mopc_role`)
  live in host memory between forward and backward; the device holds the rest, or, when
  larger, the rest less the head's share (backward frees it first) plus one MoE layer's
  reloaded expert share (`offload_prefetch` reloads ahead, within the layer in use);
- optimizer offload (`mopc.optim.HostAdamW`): no optimizer bytes on the device; host
  memory holds the two fp32 moments, an fp32 master copy of each shard and a 4-byte step
  per tensor (as `MemoryTracker` counts `optimizer_host`);
- `live_peak` = params + optimizer + max(activations, grads): what
  `mopc.runtime.memory.MemoryTracker` measures (saved activations are freed by the
  compiled backward before its gradients accumulate);
- transient (device only, not in the live-storage count): a layer's gathered weights in
  `param_dtype` and, next to them, the next layer's (forward) or the layer's full gradient
  in `reduce_dtype` before its reduce-scatter (backward); the larger of the token buffers
  of a collective (tensor or expert parallel) and of context-parallel attention; plus the
  device's reserved bytes. `peak` = live_peak + transient: what must fit the device.

Time: compute = flops / (peak flops of the compute dtype x mfu), from the probes'
per-token flops plus the attention core, which grows with seq_len^2 per sequence (under
cp a rank does 1/cp of each sequence's causal work: the chunks are load-balanced);
communication = bytes per mesh axis / link bandwidth (intra-node when the group fits in a
node), not overlapped (mopc does not reorder collectives yet): ZeRO-3 gathers in
`param_dtype`, gradient reduce-scatters in `reduce_dtype`, token collectives in
`param_dtype`, and cp's K/V all-gathers (forward, again in backward) and dK/dV
reduce-scatters (`cp_comm_bytes`); pipeline bubble (p-1)/m of compute; offload traffic
over the host link (activation copies overlap compute; the optimizer's gradient and
parameter copies and its host update do not).

Candidates with features mopc cannot run yet (pipeline stages, full recompute) are
projections: the same per-token measurements, with each feature's effect modelled by a
formula; they are never what `search` chooses to run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from mopc.planner.hardware import HardwareSpec
from mopc.planner.model import LayoutBytes, ModelInfo, layout_bytes
from mopc.planner.probe import LayerCosts, ProbeResult

__all__ = ["ITEMSIZE", "Candidate", "Estimate", "ProbeSet", "cp_attention_transient", "cp_comm_bytes", "dtype_scale",
           "estimate", "routing_skew"]

ITEMSIZE = {"fp32": 4, "bf16": 2}
"""Bytes per element of the dtypes `mopc.parallelize` takes (`param_dtype`, `reduce_dtype`)."""


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """A mixture of parallelisms. `missing` lists what mopc cannot run yet (empty: runnable)."""

    world: int
    tp: int = 1
    ep: int = 1
    pp: int = 1
    cp: int = 1
    microbatches: int = 1
    vocab_parallel: bool = True
    dtype: str = "fp32"
    """`param_dtype`: what weights are gathered in and activations computed in (shards stay fp32)."""
    reduce_dtype: str | None = None
    """The dtype gradients are reduce-scattered in; None: `dtype` (as `mopc.parallelize`)."""
    recompute: str = "min_cut"
    """`min_cut` (mopc's partitioner: cheap ops recomputed) or `full` (only layer inputs saved)."""
    offload_activations: bool = False
    """Saved activations of MoE expert blocks in host memory (`offload="experts"`)."""
    offload_optimizer: bool = False
    """AdamW state and fp32 master copies in host memory (`mopc.optim.HostAdamW`)."""

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp * self.cp)

    @property
    def grad_dtype(self) -> str:
        return self.reduce_dtype or self.dtype

    @property
    def missing(self) -> tuple[str, ...]:
        out = []
        if self.pp > 1:
            out.append("pipeline parallelism")
        if self.recompute != "min_cut":
            out.append("full activation recompute")
        return tuple(out)

    @property
    def runnable(self) -> bool:
        return not self.missing

    def label(self) -> str:
        parts = [f"dp{self.dp}", f"tp{self.tp}", f"ep{self.ep}"]
        if self.pp > 1:
            parts.append(f"pp{self.pp}x{self.microbatches}mb")
        if self.cp > 1:
            parts.append(f"cp{self.cp}")
        extra = [self.dtype] if self.dtype != "fp32" else []
        extra += [f"reduce-{self.reduce_dtype}"] if self.reduce_dtype not in (None, self.dtype) else []
        extra += ["full-recompute"] if self.recompute == "full" else []
        extra += ["act-offload"] if self.offload_activations else []
        extra += ["opt-offload"] if self.offload_optimizer else []
        extra += [] if self.vocab_parallel else ["no-vocab-par"]
        return " ".join(parts) + (" +" + ",".join(extra) if extra else "")


@dataclass(frozen=True)
class Estimate:
    candidate: Candidate
    tokens_per_rank: int
    params: int
    grads: int
    optimizer: int
    activations: int
    live_peak: int
    transient: int
    peak: int
    host_bytes: int
    fits: bool
    why_not: str
    compute_s: float
    comm_s: float
    bubble_s: float
    offload_s: float
    step_time_s: float
    tokens_per_s_per_gpu: float
    comm_by_axis: dict[str, int] = field(default_factory=dict)
    dominant: str = ""
    host_activations: int = 0
    """Part of `host_bytes`: offloaded saved activations."""
    host_optimizer: int = 0
    """Part of `host_bytes`: optimizer state and master copies (`optimizer` is then 0)."""

    def as_dict(self) -> dict[str, Any]:
        c = self.candidate
        out = {"layout": c.label(), "dp": c.dp, "tp": c.tp, "ep": c.ep, "pp": c.pp, "cp": c.cp,
               "microbatches": c.microbatches, "vocab_parallel": c.vocab_parallel, "dtype": c.dtype,
               "reduce_dtype": c.grad_dtype,
               "recompute": c.recompute, "offload_activations": c.offload_activations,
               "offload_optimizer": c.offload_optimizer, "runnable": c.runnable, "needs": list(c.missing)}
        fields = asdict(self)
        fields.pop("candidate")
        out.update(fields)
        out["peak_bytes_per_rank"] = self.peak
        return out


@dataclass(frozen=True)
class ProbeSet:
    """The probes an estimate composes: `base` at tp=1, ep=1 and `split` at (tp_rep, ep_rep).

    Per layer, the saved bytes of attention, dense MLP and norms come from `base` (tp=1) or
    `split` (its tp; other degrees in between by the fraction 1 - 1/tp of a head shard that
    a rank does not hold), the MoE block's from `base` (ep=1) or `split` (any ep > 1; the
    received rows are scaled by the routing skew). Token collectives come from the probe of
    the same degree, rescaled from the probe's group size to the candidate's.
    """

    base: ProbeResult
    split: ProbeResult


def routing_skew(tokens: int, top_k: int, num_experts: int, ep: int, percentile_z: float = 2.326) -> float:
    """Max over EP ranks of received rows / mean, at a percentile (default z for p99) of a
    multinomial: `tokens x top_k` rows of an EP group spread uniformly over `num_experts`."""
    if ep <= 1:
        return 1.0
    rows = max(tokens * top_k, 1)
    p = 1.0 / ep
    mean = rows * p
    return 1.0 + percentile_z * math.sqrt(rows * p * (1 - p)) / mean


def dtype_scale(probe: ProbeResult, dtype: str) -> float:
    """Factor from a probe's activation and token-collective bytes to `dtype`'s: the probe
    traced in its `param_dtype` (fp32 unless given); see the module docstring."""
    return ITEMSIZE[dtype] / ITEMSIZE[probe.options.get("param_dtype", "fp32")]


def _kv_bytes_per_token(cfg: Any, c: Candidate) -> float:
    """Bytes of one token's keys (or values) on a rank: its kv heads (split by tp) x head_dim."""
    head_dim = cfg.head_dim or cfg.dim // cfg.num_heads
    return cfg.num_kv_heads / c.tp * head_dim * ITEMSIZE[c.dtype]


def cp_comm_bytes(cfg: Any, c: Candidate, tokens: int, num_layers: float) -> float:
    """Bytes a rank sends per step in context-parallel attention, as the `context_parallel`
    rewrite runs it: per layer, K and V of its `tokens` all-gathered over the cp group in
    forward and again in backward (must-recompute), and dK, dV (gathered size, `param_dtype`)
    reduce-scattered back: 4 gathers of (cp-1) x local bytes + 2 reduce-scatters of
    cp x local x (cp-1)/cp bytes = 6 (cp-1) x local."""
    if c.cp <= 1:
        return 0.0
    return 6 * (c.cp - 1) * tokens * _kv_bytes_per_token(cfg, c) * num_layers


def cp_attention_transient(cfg: Any, c: Candidate, sequences: float, seq_len: int) -> float:
    """Peak bytes of one attention layer's context-parallel buffers (`mopc::cp_attention`
    and its backward on `sequences` sequences of `seq_len` tokens): the larger of
    - forward: the gathered K and V of the whole sequences (cp x L/cp tokens each) and the
      concatenated copy of the chunks before a query chunk (at most 2cp-1 of 2cp chunks, on
      cp rank 0), for K and V;
    - backward: K and V gathered again, fp32 dK and dV accumulators over the whole
      sequences, and either the prefix copies with their gradient pieces (in the loop) or
      the fp32 rank-major copy plus the returned dK, dV in `param_dtype` (at the return).
    cp=1 runs the flash kernel on the local tensors: nothing beyond them (0)."""
    if c.cp <= 1:
        return 0.0
    item = ITEMSIZE[c.dtype]
    whole = sequences * seq_len * _kv_bytes_per_token(cfg, c) / item  # elements of K (or V), whole sequences
    prefix = (2 * c.cp - 1) / (2 * c.cp)
    forward = whole * item * 2 * (1 + prefix)
    backward = whole * (2 * item + 2 * 4 + max(4 * item * prefix, 4 + 2 * item))
    return max(forward, backward)


def _per_token(c: LayerCosts, tokens: int) -> dict[str, float]:
    moe_rows = c.saved_bytes_ep_rows
    offload, offload_rows = c.saved_bytes_offload, c.saved_bytes_offload_ep_rows
    if offload is None:  # a probe without roles: the received rows (dispatched tokens, expert intermediates)
        offload, offload_rows = moe_rows, moe_rows
    return {"dense_part": (c.saved_bytes - c.saved_bytes_moe - c.saved_bytes_world) / tokens,
            "world_part": c.saved_bytes_world / tokens,
            "moe_part": (c.saved_bytes_moe - moe_rows) / tokens,
            "ep_rows": moe_rows / tokens,
            "offload_part": (offload - offload_rows) / tokens,
            "offload_rows": offload_rows / tokens}


def _saved_split(probes: ProbeSet, kind: str, tp: int, ep: int, skew: float,
                 world: int | None = None) -> tuple[float, float]:
    """Saved bytes per token of one layer of `kind`, and the part `offload="experts"` moves to host.
    What the probe gathered over its whole world is rescaled to `world` (default: the probe's)."""
    base = probes.base.layers.get(kind)
    if base is None:
        return 0.0, 0.0
    b = _per_token(base, probes.base.tokens)
    split = probes.split.layers.get(kind, base)
    s = _per_token(split, probes.split.tokens)
    frac = (1 - 1 / tp) / (1 - 1 / probes.split.tp) if probes.split.tp > 1 else 0.0
    dense = b["dense_part"] + (s["dense_part"] - b["dense_part"]) * frac
    dense += b["world_part"] * (world or probes.base.world) / probes.base.world
    if ep > 1 and probes.split.ep > 1:
        moe, offload = s["moe_part"] + s["ep_rows"] * skew, s["offload_part"] + s["offload_rows"] * skew
    else:
        moe, offload = b["moe_part"] + b["ep_rows"], b["offload_part"] + b["offload_rows"]
    return dense + moe, offload


def _saved_per_token(probes: ProbeSet, kind: str, tp: int, ep: int, skew: float) -> float:
    return _saved_split(probes, kind, tp, ep, skew)[0]


def _group_size(axis: str, world: int, tp: int, ep: int) -> int:
    names = axis.split("/")
    if "world" in names:
        return world
    sizes = {"tp": tp, "ep": ep, "dp": world // tp, "edp": world // ep}
    return sizes.get(names[0], world)


def _rescale(kind: str, size_from: int, size_to: int) -> float:
    def f(w: int) -> float:
        if w <= 1:
            return 0.0
        return (w - 1) if kind == "all_gather" else (w - 1) / w
    a = f(size_from)
    return f(size_to) / a if a else 0.0


def _canonical_axis(axis: str, op: str) -> str:
    """The axis a token collective runs on: `world` (vocabulary loss), `tp` or `ep`."""
    names = axis.split("/")
    if "world" in names:
        return "world"
    if op == "all_to_all" or "tp" not in names:
        return "ep" if ("ep" in names or op == "all_to_all") else names[0]
    return "tp"


def _token_comm(probes: ProbeSet, info: ModelInfo, c: Candidate, tokens: int, skew: float) -> dict[str, float]:
    """Bytes this rank sends per step in token collectives, by axis (`tp`, `ep`, `world`):
    tensor- and expert-parallel ones from the `split` probe (when the candidate uses that
    degree), the vocabulary loss's from `base`; each rescaled to the candidate's group size."""
    out: dict[str, float] = {}
    wanted = {"tp": (probes.split, c.tp) if c.tp > 1 else None,
              "ep": (probes.split, c.ep) if c.ep > 1 else None,
              "world": (probes.base, c.world)}
    for axis_name, pick in wanted.items():
        if pick is None:
            continue
        probe, size_to = pick
        size_from = {"tp": probe.tp, "ep": probe.ep, "world": probe.world}[axis_name]
        for kind in ("head", "dense", "moe"):
            costs = probe.layers.get(kind)
            if costs is None:
                continue
            for key, sent in costs.token_comm.items():
                axis, op = key.split(":")
                if _canonical_axis(axis, op) != axis_name:
                    continue
                scale = tokens / probe.tokens * _rescale(op, size_from, size_to) * info.count(kind)
                out[axis_name] = out.get(axis_name, 0.0) + sent * scale * (skew if axis_name == "ep" else 1.0)
    return out


def _flops(probes: ProbeSet, info: ModelInfo, tokens: int, seq_len: int, cp: int) -> float:
    base = probes.base
    total = 0.0
    for kind in ("head", "dense", "moe"):
        costs = base.layers.get(kind)
        if costs is None:
            continue
        linear = costs.flops / base.tokens * tokens
        # attention core: per sequence ~ seq_len^2; a rank holds tokens/seq_len sequences (1/cp of each)
        per_seq = costs.attention_core_flops / base.batch / base.seq_len ** 2
        core = per_seq * seq_len ** 2 * (tokens * cp / seq_len) / cp
        total += (linear + core) * info.count(kind)
    return total


def estimate(info: ModelInfo, probes: ProbeSet, hw: HardwareSpec, c: Candidate, *, global_batch: int | None,
             seq_len: int, skew_z: float = 2.326, skew: float | None = None) -> Estimate:
    """The memory and step-time estimate of candidate `c` (see the module docstring)."""
    cfg = info.config
    stage_ranks = c.world // c.pp
    if global_batch is None:  # one sequence per context-parallel group and microbatch
        global_batch = c.world // c.cp
    # a sequence is split over cp ranks; the ranks of one pipeline stage share the batch
    rows_per_rank = global_batch * c.cp / stage_ranks
    tokens_per_rank = int(global_batch * seq_len // stage_ranks)  # per step, all microbatches
    microbatches = max(int(rows_per_rank), 1) if c.pp > 1 else 1
    c = dataclasses.replace(c, microbatches=microbatches)
    tokens_in_flight = tokens_per_rank // microbatches * min(c.pp, microbatches) if c.pp > 1 else tokens_per_rank
    if skew is None:
        skew = routing_skew(tokens_per_rank * c.ep // max(c.microbatches, 1), cfg.top_k, cfg.num_experts, c.ep,
                            skew_z)
    lay: LayoutBytes = layout_bytes(info, stage_ranks, c.tp, c.ep, c.vocab_parallel)
    item, grad_item = ITEMSIZE[c.dtype], ITEMSIZE[c.grad_dtype]
    # model state, per rank (a pipeline stage holds 1/pp of the layers): fp32 shards, fp32
    # shard gradients and fp32 moments in every dtype (bf16 keeps no other master copy)
    shard_bytes = lay.param_bytes / c.pp
    shard_numel = shard_bytes / 4
    params = grads = shard_numel * 4
    optimizer = shard_numel * 8 + 4 * lay.num_tensors / c.pp
    # activations of the tokens in flight
    act_scale = dtype_scale(probes.base, c.dtype)
    split = {k: _saved_split(probes, k, c.tp, c.ep, skew) for k in ("dense", "moe")}
    per_layer = {k: total * act_scale for k, (total, _) in split.items()}
    per_layer_offload = {k: offload * act_scale for k, (_, offload) in split.items()}
    head = _saved_split(probes, "head", c.tp, c.ep, skew, stage_ranks)[0] * act_scale
    layers_per_stage = {k: info.count(k) / c.pp for k in ("dense", "moe")}
    if c.recompute == "full":  # layer inputs kept, one layer's saved values rebuilt at a time in backward
        kept = sum(layers_per_stage.values()) * cfg.dim * item
        activations = tokens_in_flight * (kept + head) + tokens_per_rank // max(c.microbatches, 1) * max(
            per_layer.values(), default=0)
    else:
        activations = tokens_in_flight * (head + sum(per_layer[k] * layers_per_stage[k] for k in per_layer))
    host_act = 0.0
    if c.offload_activations and c.recompute == "min_cut":  # full recompute saves no expert tensors
        host_act = tokens_in_flight * sum(per_layer_offload[k] * layers_per_stage[k] for k in per_layer_offload)
        # backward frees the head's saved values first, then reloads one layer's expert share at a time
        one_layer = tokens_per_rank // max(c.microbatches, 1) * max(per_layer_offload.values(), default=0)
        activations = max(activations - host_act, activations - host_act - tokens_in_flight * head + one_layer)
    opt_device, host_opt = optimizer, 0.0
    if c.offload_optimizer:  # HostAdamW: moments, step and an fp32 master copy of each shard
        opt_device, host_opt = 0.0, optimizer + shard_numel * 4
    host = host_act + host_opt
    live_peak = params + opt_device + max(activations, grads)
    # transient: a layer's gathered weights and the next one's (or its full gradient), the
    # biggest token buffers of a collective or of cp attention, reserved
    gathered_numel = lay.gathered_bytes_max_layer / 4
    gathered = gathered_numel * item + gathered_numel * max(item, grad_item)
    mb_tokens = tokens_per_rank // max(c.microbatches, 1)
    token_buffers = max(c.tp * mb_tokens * cfg.dim * item,
                        2 * mb_tokens * cfg.top_k * cfg.dim * item * skew if c.ep > 1 else 0,
                        cp_attention_transient(cfg, c, mb_tokens * c.cp / seq_len, seq_len))
    transient = gathered + token_buffers + hw.reserved_bytes
    peak = live_peak + transient
    host_limit = hw.host_memory_bytes_per_node / min(hw.devices_per_node, c.world) * 0.9
    why = []
    if peak > hw.device_memory_bytes:
        why.append("device memory")
    if host > host_limit:
        why.append("host memory")
    if c.cp > 1 and seq_len % (2 * c.cp):
        why.append(f"sequence length {seq_len} not divisible by 2*cp={2 * c.cp}")
    if rows_per_rank < 1 or rows_per_rank != int(rows_per_rank):
        why.append(f"global batch {global_batch} does not split into whole sequences over {stage_ranks // c.cp} "
                   f"rank groups{'' if c.cp > 1 else ' (needs context parallelism)'}")
    # time
    flops = _flops(probes, info, tokens_per_rank, seq_len, c.cp)
    if c.recompute == "full":
        flops *= 4 / 3  # one more forward
    compute_s = flops / (hw.peak_flops(c.dtype) * hw.mfu)
    comm_total: dict[str, float] = {}
    for key, sent in lay.comm_bytes.items():  # ZeRO-3: gathers in param_dtype, reduce-scatters in reduce_dtype
        axis, kind = key.split(":")
        scale = (item if kind == "all_gather" else grad_item) / 4
        comm_total[axis] = comm_total.get(axis, 0.0) + sent * scale / c.pp
    for axis, sent in _token_comm(probes, info, c, tokens_per_rank, skew).items():
        comm_total[axis] = comm_total.get(axis, 0.0) + sent * act_scale
    if c.cp > 1:
        comm_total["cp"] = cp_comm_bytes(cfg, c, tokens_per_rank, (info.num_dense + info.num_moe) / c.pp)
    comm_s = 0.0
    gpn = hw.devices_per_node
    for axis, sent in comm_total.items():
        size = {"tp": c.tp, "ep": c.ep, "cp": c.cp, "world": stage_ranks, "dp": stage_ranks // c.tp,
                "edp": stage_ranks // c.ep}.get(axis, stage_ranks)
        span = {"tp": c.tp, "ep": c.ep, "cp": c.cp * c.tp}.get(axis, stage_ranks)  # cp ranks are strided by tp
        spans = span > gpn
        comm_s += sent / hw.link_bandwidth(size, spans)
    bubble_s = compute_s * (c.pp - 1) / c.microbatches if c.pp > 1 else 0.0
    offload_s = 0.0
    if host_act:
        offload_s += max(0.0, 2 * host_act / hw.host_device_bandwidth - compute_s)  # overlapped with compute
    if c.offload_optimizer:  # gradients out, parameters back, the update at host memory speed
        offload_s += (grads + params) / hw.host_device_bandwidth + host_opt * 1.5 / (hw.hbm_bandwidth / 40)
    step = compute_s + comm_s + bubble_s + offload_s
    parts = {"compute": compute_s, "communication": comm_s, "pipeline bubble": bubble_s, "offload": offload_s}
    return Estimate(candidate=c, tokens_per_rank=tokens_per_rank, params=int(params), grads=int(grads),
                    optimizer=int(opt_device), activations=int(activations), live_peak=int(live_peak),
                    transient=int(transient), peak=int(peak), host_bytes=int(host), fits=not why,
                    why_not=", ".join(why), compute_s=compute_s, comm_s=comm_s, bubble_s=bubble_s,
                    offload_s=offload_s, step_time_s=step,
                    tokens_per_s_per_gpu=global_batch * seq_len / step / c.world if step else 0.0,
                    comm_by_axis={k: int(v) for k, v in comm_total.items()},
                    dominant=max(parts, key=parts.get), host_activations=int(host_act),
                    host_optimizer=int(host_opt))
