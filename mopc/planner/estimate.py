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
  reloaded expert share (`offload_prefetch` reloads ahead, within the layer in use). That
  reload is a transient term: `MemoryTracker` stops counting a compiled graph's saved
  tensors when its backward starts, so the live count never holds both;
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
parameter copies and its host update do not); pipelines: see below.

Pipeline parallelism (`pp`, runnable: `mopc.parallelize(pp=, microbatches=, schedule=)`):
the layers are cut into stages as the runtime cuts them (`pipeline_stages`), each stage
sharded over world / pp ranks like a whole model over that many. Every stage is estimated
and the worst (largest peak) reported, all of them in `Estimate.stages`:
- state: the shards of the stage's layers, plus the embedding on the first stage and the
  final norm and vocabulary projection on the last (`LayoutBytes.parts`);
- activations: micro-batches in flight (`in_flight`: 1F1B: pipeline rank r holds
  min(pp - r, microbatches), GPipe all) x one micro-batch's saved bytes of the stage's
  layers (and the head on the last stage). The activation a stage receives is saved there
  and the one it sends is not, which cancels against the probe counting each layer's
  output to that layer; the gradients exist next to the in-flight micro-batches from the
  first backward on, so live_peak = params + optimizer + max(activations, grads + those
  in flight then) (all of them under 1F1B with more micro-batches than in flight, else one
  fewer);
- time: the slowest stage's compute, the bubble (pp - 1) / microbatches of it, ZeRO-3
  gathers and reduce-scatters once per micro-batch (each runs the stage's compiled
  forward and backward), and per micro-batch 2 x [rows/M, S/cp, D] through a pipeline
  rank's link (activation forward, gradient back);
- restrictions (`Candidate.invalid`): 1F1B needs microbatches >= pp, the rows of a
  pipeline must cut into the micro-batches, no optimizer offload, pp <= layers.

Full activation recompute (`recompute="full"`, runnable): a layer keeps its input,
[tokens, dim] in `param_dtype`, and attention's output (its heads / tp) and fp32
log-sum-exp, which the pass leaves saved under `mopc.parallelize`; the head keeps what the
partitioner saves (the probe's).
Backward rebuilds one layer's saved values at a time (the probe's min-cut bytes of the
largest layer), a transient term like the offload reload; compute is 4/3 (one more
forward).
"""

from __future__ import annotations

import functools
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
    """Micro-batches per step under pipeline parallelism (1 without)."""
    schedule: str = "1f1b"
    """Pipeline schedule: `1f1b` or `gpipe` (`interleaved_1f1b` is not modelled)."""
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
        """Features this layout needs that mopc does not have yet (none since pipelines and
        full recompute, `recompute="full"`, run)."""
        return ()

    @property
    def invalid(self) -> tuple[str, ...]:
        """Runtime restrictions this layout breaks (`mopc.parallelize` would refuse it)."""
        out = []
        if self.pp > 1:
            if self.schedule not in ("1f1b", "gpipe"):
                out.append(f"schedule {self.schedule!r} is not modelled (1f1b, gpipe)")
            if self.schedule == "1f1b" and self.microbatches < self.pp:
                out.append(f"1F1B needs microbatches >= pp (got {self.microbatches} < {self.pp})")
            if self.offload_optimizer:
                out.append("optimizer offload with pipeline parallelism (refused by mopc)")
        elif self.microbatches != 1:
            out.append("micro-batches without pipeline parallelism")
        if self.recompute == "full" and self.offload_activations:
            out.append("expert-activation offload with full recompute (nothing of the experts is saved)")
        if self.world % (self.pp * self.tp * self.cp) or (self.world // self.pp) % self.ep:
            out.append("degrees do not divide the world (or a stage's ranks, for ep)")
        return tuple(out)

    @property
    def runnable(self) -> bool:
        return not self.missing and not self.invalid

    def label(self) -> str:
        parts = [f"dp{self.dp}", f"tp{self.tp}", f"ep{self.ep}"]
        if self.pp > 1:
            parts.append(f"pp{self.pp}x{self.microbatches}mb" + ("-gpipe" if self.schedule == "gpipe" else ""))
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
    stages: tuple[dict[str, Any], ...] = ()
    """Under pipeline parallelism, every stage's layers and bytes (the fields above are the
    stage with the largest peak)."""

    def as_dict(self) -> dict[str, Any]:
        c = self.candidate
        out = {"layout": c.label(), "dp": c.dp, "tp": c.tp, "ep": c.ep, "pp": c.pp, "cp": c.cp,
               "microbatches": c.microbatches, "schedule": c.schedule, "vocab_parallel": c.vocab_parallel, "dtype": c.dtype,
               "reduce_dtype": c.grad_dtype,
               "recompute": c.recompute, "offload_activations": c.offload_activations,
               "offload_optimizer": c.offload_optimizer, "runnable": c.runnable, "needs": list(c.missing),
               "invalid": list(c.invalid)}
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


def _token_comm(probes: ProbeSet, info: ModelInfo, c: Candidate, tokens: int, skew: float,
                stage: Stage | None = None) -> dict[str, float]:
    """Bytes this rank sends per step in token collectives, by axis (`tp`, `ep`, `world`):
    tensor- and expert-parallel ones from the `split` probe (when the candidate uses that
    degree), the vocabulary loss's from `base`; each rescaled to the candidate's group size
    (a stage's ranks under pipelines), for the layers of `stage` (default: every layer)."""
    count = stage.count if stage is not None else info.count
    world = c.world // c.pp
    out: dict[str, float] = {}
    wanted = {"tp": (probes.split, c.tp) if c.tp > 1 else None,
              "ep": (probes.split, c.ep) if c.ep > 1 else None,
              "world": (probes.base, world)}
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
                scale = tokens / probe.tokens * _rescale(op, size_from, size_to) * count(kind)
                out[axis_name] = out.get(axis_name, 0.0) + sent * scale * (skew if axis_name == "ep" else 1.0)
    return out


def _flops_by_kind(probes: ProbeSet, tokens: int, seq_len: int, cp: int) -> dict[str, float]:
    """Step flops of `tokens` tokens on a rank through ONE layer of each kind (and the head)."""
    base = probes.base
    out = {}
    for kind in ("head", "dense", "moe"):
        costs = base.layers.get(kind)
        if costs is None:
            continue
        linear = costs.flops / base.tokens * tokens
        # attention core: per sequence ~ seq_len^2; a rank holds tokens/seq_len sequences (1/cp of each)
        per_seq = costs.attention_core_flops / base.batch / base.seq_len ** 2
        core = per_seq * seq_len ** 2 * (tokens * cp / seq_len) / cp
        out[kind] = linear + core
    return out


def _flops(probes: ProbeSet, info: ModelInfo, tokens: int, seq_len: int, cp: int) -> float:
    return sum(f * info.count(kind) for kind, f in _flops_by_kind(probes, tokens, seq_len, cp).items())


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: its layers by kind, whether it holds the embedding (first) and
    the head with the loss (last)."""

    index: int
    num_dense: int
    num_moe: int
    first: bool
    last: bool

    def count(self, kind: str) -> int:
        return {"head": int(self.last), "dense": self.num_dense, "moe": self.num_moe}[kind]


def pipeline_stages(info: ModelInfo, probes: ProbeSet, pp: int, *, seq_len: int = 4096, cp: int = 1) -> list[Stage]:
    """The stages `mopc.parallelize` cuts for `pp` (`mopc.plan.stages.balance`: contiguous
    layers minimising the most expensive stage; the embedding on the first stage, the head
    and loss on the last), weighed here by the probes' step flops per layer and head.

    The runtime weighs each node by its roofline time on the device it runs on
    (`mopc.plan.stages.roofline_seconds`: max(flops / peak, bytes moved / bandwidth)), which
    the probes do not record. The cuts agree where flops decide (`tiny` pp 2, `small` pp 2
    on CPU and H200; `small` pp 4 on H200: 0, 2, 4, 7); where memory-bound nodes tip a tie
    they may not (`small` pp 4 on CPU: the runtime cuts 0, 2, 5, 7, the stage with most
    layers then being pipeline rank 1 instead of 2)."""
    if pp <= 1:
        return [Stage(0, info.num_dense, info.num_moe, True, True)]
    flops = _flops_by_kind(probes, 1 << 12, seq_len, cp)
    return list(_stages(info.num_dense, info.num_moe, pp, *(round(flops.get(k, 0.0)) for k in ("dense", "moe", "head"))))


@functools.lru_cache(maxsize=4096)
def _stages(num_dense: int, num_moe: int, pp: int, dense: int, moe: int, head: int) -> tuple[Stage, ...]:
    from mopc.plan.stages import balance

    kinds = ["dense"] * num_dense + ["moe"] * num_moe
    firsts = balance([dense if k == "dense" else moe for k in kinds], pp, tail=head)
    out = []
    for s, first in enumerate(firsts):
        end = firsts[s + 1] if s + 1 < pp else len(kinds)
        part = kinds[first:end]
        out.append(Stage(s, part.count("dense"), part.count("moe"), s == 0, s == pp - 1))
    return tuple(out)


def in_flight(c: Candidate, stage: int) -> tuple[int, int]:
    """Micro-batches whose saved activations pipeline rank `stage` holds at once, and how
    many of them while the gradients exist (from the first backward on):
    1F1B: pp - r (at most `microbatches`), all of them again in the steady state when there
    are more micro-batches than that, else one fewer (the last backward runs alone);
    GPipe: every micro-batch, one fewer once gradients exist. Without pipelines: 1, 0."""
    if c.pp <= 1:
        return 1, 0
    m = c.microbatches
    n = m if c.schedule == "gpipe" else min(c.pp - stage, m)
    return n, (n if c.schedule != "gpipe" and m > n else n - 1)


def estimate(info: ModelInfo, probes: ProbeSet, hw: HardwareSpec, c: Candidate, *, global_batch: int | None,
             seq_len: int, skew_z: float = 2.326, skew: float | None = None) -> Estimate:
    """The memory and step-time estimate of candidate `c` (see the module docstring); under
    pipeline parallelism, of its worst stage (the largest peak), all stages in `stages`."""
    cfg = info.config
    stage_ranks = c.world // c.pp
    m = max(c.microbatches, 1)
    if global_batch is None:  # one sequence per context-parallel group and micro-batch
        global_batch = stage_ranks // c.cp * m
    # a sequence is split over cp ranks; the ranks of one pipeline share the batch
    rows_per_rank = global_batch * c.cp / stage_ranks
    tokens_per_rank = int(global_batch * seq_len // stage_ranks)  # per step, all micro-batches
    mb_tokens = tokens_per_rank // m
    if skew is None:
        skew = routing_skew(mb_tokens * c.ep, cfg.top_k, cfg.num_experts, c.ep, skew_z)
    lay: LayoutBytes = layout_bytes(info, stage_ranks, c.tp, c.ep, c.vocab_parallel)
    item, grad_item = ITEMSIZE[c.dtype], ITEMSIZE[c.grad_dtype]
    act_scale = dtype_scale(probes.base, c.dtype)
    split = {k: _saved_split(probes, k, c.tp, c.ep, skew) for k in ("dense", "moe")}
    per_layer = {k: total * act_scale for k, (total, _) in split.items()}
    per_layer_offload = {k: offload * act_scale for k, (_, offload) in split.items()}
    head = _saved_split(probes, "head", c.tp, c.ep, skew, stage_ranks)[0] * act_scale
    stages = pipeline_stages(info, probes, c.pp, seq_len=seq_len, cp=c.cp) if c.pp > 1 else [
        Stage(0, info.num_dense, info.num_moe, True, True)]
    flops_by_kind = _flops_by_kind(probes, tokens_per_rank, seq_len, c.cp)
    # transient: a layer's gathered weights and the next one's (or its full gradient), the
    # biggest token buffers of a collective or of cp attention, reserved
    gathered_numel = lay.gathered_bytes_max_layer / 4
    gathered = gathered_numel * item + gathered_numel * max(item, grad_item)
    token_buffers = max(c.tp * mb_tokens * cfg.dim * item,
                        2 * mb_tokens * cfg.top_k * cfg.dim * item * skew if c.ep > 1 else 0,
                        cp_attention_transient(cfg, c, mb_tokens * c.cp / seq_len, seq_len))
    per_stage = [_stage_memory(info, lay, c, st, mb_tokens, per_layer, per_layer_offload, head, item)
                 for st in stages]
    worst = max(per_stage, key=lambda d: (d["live_peak"] + d["reload"], d["host"]))
    transient = gathered + token_buffers + worst["reload"] + hw.reserved_bytes
    params, grads, opt_device = worst["params"], worst["grads"], worst["optimizer"]
    activations, host_act, host_opt = worst["activations"], worst["host_activations"], worst["host_optimizer"]
    host = max(d["host"] for d in per_stage)
    live_peak = worst["live_peak"]
    peak = live_peak + transient
    host_limit = hw.host_memory_bytes_per_node / min(hw.devices_per_node, c.world) * 0.9
    why = list(c.invalid)
    if peak > hw.device_memory_bytes:
        why.append("device memory")
    if host > host_limit:
        why.append("host memory")
    if c.cp > 1 and seq_len % (2 * c.cp):
        why.append(f"sequence length {seq_len} not divisible by 2*cp={2 * c.cp}")
    if rows_per_rank < 1 or rows_per_rank != int(rows_per_rank):
        why.append(f"global batch {global_batch} does not split into whole sequences over {stage_ranks // c.cp} "
                   f"rank groups{'' if c.cp > 1 else ' (needs context parallelism)'}")
    elif c.pp > 1 and int(rows_per_rank) % m:
        why.append(f"{int(rows_per_rank)} rows per pipeline do not cut into {m} micro-batches")
    if c.pp > info.num_dense + info.num_moe:
        why.append(f"pp={c.pp} stages for {info.num_dense + info.num_moe} layers")
    # time: the slowest stage's compute, the bubble, communication
    stage_flops = [sum(flops_by_kind.get(k, 0.0) * st.count(k) for k in ("head", "dense", "moe")) for st in stages]
    flops = max(stage_flops)
    if c.recompute == "full":
        flops *= 4 / 3  # one more forward
    compute_s = flops / (hw.peak_flops(c.dtype) * hw.mfu)
    comm_total: dict[str, float] = {}
    for key, sent in _stage_param_comm(info, lay, stages).items():  # ZeRO-3: gathers in param_dtype,
        axis, kind = key.split(":")                                  # reduce-scatters in reduce_dtype,
        scale = (item if kind == "all_gather" else grad_item) / 4    # once per micro-batch
        comm_total[axis] = comm_total.get(axis, 0.0) + sent * scale * m
    slowest = stages[stage_flops.index(max(stage_flops))]
    for axis, sent in _token_comm(probes, info, c, tokens_per_rank, skew, slowest if c.pp > 1 else None).items():
        comm_total[axis] = comm_total.get(axis, 0.0) + sent * act_scale
    if c.cp > 1:
        comm_total["cp"] = cp_comm_bytes(cfg, c, tokens_per_rank, max(st.num_dense + st.num_moe for st in stages))
    if c.pp > 1:  # each micro-batch's activation forward and its gradient back, through a middle rank's link
        comm_total["pp"] = 2 * tokens_per_rank * cfg.dim * item
    comm_s = 0.0
    gpn = hw.devices_per_node
    for axis, sent in comm_total.items():
        size = {"tp": c.tp, "ep": c.ep, "cp": c.cp, "world": stage_ranks, "dp": stage_ranks // c.tp,
                "edp": stage_ranks // c.ep, "pp": 2}.get(axis, stage_ranks)
        # cp ranks are strided by tp; pipeline neighbours by a stage's ranks
        span = {"tp": c.tp, "ep": c.ep, "cp": c.cp * c.tp, "pp": stage_ranks + 1}.get(axis, stage_ranks)
        spans = span > gpn
        comm_s += sent / hw.link_bandwidth(size, spans)
    bubble_s = compute_s * (c.pp - 1) / m if c.pp > 1 else 0.0
    offload_s = 0.0
    if host_act:
        offload_s += max(0.0, 2 * host_act / hw.host_device_bandwidth - compute_s)  # overlapped with compute
    if c.offload_optimizer:  # gradients out, parameters back, the update at host memory speed
        offload_s += (grads + params) / hw.host_device_bandwidth + host_opt * 1.5 / (hw.hbm_bandwidth / 40)
    step = compute_s + comm_s + bubble_s + offload_s
    parts = {"compute": compute_s, "communication": comm_s, "pipeline bubble": bubble_s, "offload": offload_s}
    stage_rows = tuple({"stage": st.index, "dense_layers": st.num_dense, "moe_layers": st.num_moe,
                        "embedding": st.first, "head": st.last, **{k: int(v) for k, v in d.items()},
                        "flops": f} for st, d, f in zip(stages, per_stage, stage_flops, strict=True)) if c.pp > 1 else ()
    return Estimate(candidate=c, tokens_per_rank=tokens_per_rank, params=int(params), grads=int(grads),
                    optimizer=int(opt_device), activations=int(activations), live_peak=int(live_peak),
                    transient=int(transient), peak=int(peak), host_bytes=int(host), fits=not why,
                    why_not=", ".join(why), compute_s=compute_s, comm_s=comm_s, bubble_s=bubble_s,
                    offload_s=offload_s, step_time_s=step,
                    tokens_per_s_per_gpu=global_batch * seq_len / step / c.world if step else 0.0,
                    comm_by_axis={k: int(v) for k, v in comm_total.items()},
                    dominant=max(parts, key=parts.get), host_activations=int(host_act),
                    host_optimizer=int(host_opt), stages=stage_rows)


def _stage_memory(info: ModelInfo, lay: LayoutBytes, c: Candidate, st: Stage, mb_tokens: int,
                  per_layer: dict[str, float], per_layer_offload: dict[str, float], head: float,
                  item: int) -> dict[str, float]:
    """Per-rank bytes of one stage (the whole model without pipelines).

    Saved activations per micro-batch: the stage's layers and, on the last stage, the head.
    A stage after the first also saves the activation it receives and does not save the one
    its last layer sends, one [tokens, dim] each; the probe counts the embedding's output
    to the head and every layer's output to that layer, so these cancel on every stage."""
    if c.pp > 1 and lay.parts:
        parts = lay.parts
        params = (sum(parts[k].param_bytes * st.count(k) for k in ("dense", "moe") if k in parts)
                  + (parts["embedding"].param_bytes if st.first else 0) + (parts["head"].param_bytes if st.last else 0))
        tensors = (sum(parts[k].num_tensors * st.count(k) for k in ("dense", "moe") if k in parts)
                   + (parts["embedding"].num_tensors if st.first else 0) + (parts["head"].num_tensors if st.last else 0))
    else:
        params, tensors = lay.param_bytes, lay.num_tensors
    # fp32 shards, fp32 shard gradients and fp32 moments in every dtype (bf16 keeps no other master copy)
    shard_numel = params / 4
    grads = params
    optimizer = shard_numel * 8 + 4 * tensors
    n, n_grads = in_flight(c, st.index)
    kinds = [k for k in ("dense", "moe") if st.count(k)]
    reload = 0.0
    head_mb = mb_tokens * head if st.last else 0.0
    if c.recompute == "full":  # layer inputs kept; backward rebuilds one layer's saved values at a time,
        # inside the compiled backward, after `MemoryTracker` stopped counting the saved ones: transient
        cfg = info.config
        heads = cfg.num_heads / c.tp
        head_dim = cfg.head_dim or cfg.dim // cfg.num_heads
        # the layer's input, and attention's output and fp32 log-sum-exp: under mopc.parallelize
        # the pass leaves attention untagged (torch's partitioner mishandles its RNG state with
        # DeviceMesh inputs), so attention is saved as under min-cut
        kept = cfg.dim * item + heads * head_dim * item + heads * 4
        per_mb = mb_tokens * sum(st.count(k) for k in kinds) * kept + head_mb
        per_mb_host = 0.0
        reload = mb_tokens * max((per_layer[k] for k in kinds), default=0.0)
    else:
        per_mb = mb_tokens * sum(per_layer[k] * st.count(k) for k in kinds) + head_mb
        per_mb_host = 0.0
        if c.offload_activations:
            per_mb_host = mb_tokens * sum(per_layer_offload[k] * st.count(k) for k in kinds)
            per_mb -= per_mb_host
            # backward frees the head's saved values first, then reloads one layer's share at a
            # time: on the device next to the saved values still unused. `MemoryTracker` no longer
            # counts those (a compiled backward takes all its saved tensors when it starts), so
            # this is a transient term, not a live one
            reload = max(0.0, mb_tokens * max((per_layer_offload[k] for k in kinds), default=0.0) - head_mb)
    activations = n * per_mb
    with_grads = n_grads * per_mb
    opt_device, host_opt = optimizer, 0.0
    if c.offload_optimizer:  # HostAdamW: moments, step and an fp32 master copy of each shard
        opt_device, host_opt = 0.0, optimizer + shard_numel * 4
    host_act = n * per_mb_host
    live_peak = params + opt_device + max(activations, grads + with_grads)
    return {"params": params, "grads": grads, "optimizer": opt_device, "activations": activations,
            "host_activations": host_act, "host_optimizer": host_opt, "host": host_act + host_opt,
            "live_peak": live_peak, "reload": reload}


def _stage_param_comm(info: ModelInfo, lay: LayoutBytes, stages: list[Stage]) -> dict[str, float]:
    """ZeRO-3 bytes one micro-batch of the busiest stage sends (the whole model without pipelines)."""
    if len(stages) == 1 or not lay.parts:
        return dict(lay.comm_bytes)
    best: dict[str, float] = {}
    for st in stages:
        out: dict[str, float] = {}
        for part, count in (("embedding", int(st.first)), ("head", int(st.last)), ("dense", st.num_dense),
                            ("moe", st.num_moe)):
            for key, sent in lay.parts[part].comm_bytes.items() if part in lay.parts else ():
                out[key] = out.get(key, 0.0) + sent * count
        if sum(out.values()) > sum(best.values()):
            best = out
    return best
