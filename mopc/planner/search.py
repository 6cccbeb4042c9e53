"""The search: every mixture mopc can run, plus projections, estimated; the fastest that fits.

Runnable candidates (what `mopc.parallelize` accepts today): `tp` dividing the world, the
heads and key/value heads, within a node; `ep` dividing the world and the expert count;
`cp` dividing world / tp, with the sequence length divisible by 2·cp; `dp = world / (tp·cp)`;
`vocab_parallel` when the vocabulary divides the world; `param_dtype` fp32 or bf16
(`reduce_dtype` = `param_dtype`; fp32 shards and AdamW state either way); mopc's min-cut
partitioner deciding save or recompute; each with and without expert-activation offload
(`offload="experts"`) and with AdamW on the device or in host memory
(`mopc.optim.HostAdamW`, `optimizer_offload`). A context-parallel group of cp ranks
shares its sequences, so the global batch must have at least one sequence per group
(default: exactly one). The chosen layout is the one with the highest throughput (tokens
per second per GPU; with a fixed global batch that is the shortest step) among those that
fit; on a tie, the one with fewer offloads.

Pipeline parallelism is runnable too: `pp` in 1, 2, 4, 8, 16 dividing the world, at most
one stage per layer, tp, ep and cp within a stage's world / pp ranks; 1F1B with pp, 2·pp
or 4·pp micro-batches (with no global batch, a pipeline reads one sequence per
micro-batch; with one, the micro-batches must divide the rows a pipeline reads), never
with optimizer offload (mopc refuses it).

Full activation recompute (`recompute="full"`) is runnable as well, with every layout
above except expert-activation offload (nothing of the experts is saved). Every layout the
planner models is runnable now: there are no projections left (`plan(projections=...)`
is kept for callers and does nothing).

The baseline: FSDP2 (ZeRO-3 over all ranks, each MoE layer's experts gathered whole),
as mopc's own baseline runs it (fp32, no recompute) and as a tuned run would (bf16 mixed
precision, full activation checkpointing, and with `CPUOffloadPolicy`), with the longest
sequence (one per rank) each variant fits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import pickle
import time
from collections.abc import Mapping
from concurrent.futures import BrokenExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mopc.planner.estimate import Candidate, Estimate, ProbeSet, estimate
from mopc.planner.hardware import HardwareSpec, hardware
from mopc.planner.model import ModelInfo, layout_bytes
from mopc.planner.probe import LayerCosts, ProbeResult, probe_config, run_probe

log = logging.getLogger("mopc.planner")

__all__ = ["PlanResult", "fsdp2_estimate", "load_model_config", "model_info", "plan", "probes_for"]

PROBE_SEQ_LEN = 64


def load_model_config(model: Any) -> Any:
    """A preset name, a path to a JSON of `MoEModelConfig` fields, or a `MoEModelConfig`."""
    from mopc.models.moe_transformer import MoEModelConfig
    from mopc.models.presets import PRESETS

    if isinstance(model, MoEModelConfig):
        return model
    if model in PRESETS:
        return PRESETS[model]
    path = Path(str(model))
    if path.suffix == ".json" and path.exists():
        fields = json.loads(path.read_text())
        return MoEModelConfig(**fields)
    raise ValueError(f"--model {model!r}: choose a preset ({', '.join(PRESETS)}) or a PATH.json of "
                     "MoEModelConfig fields")


# ---------------------------------------------------------------------------- probes (cached)

_PROBES: dict[str, ProbeResult] = {}


def _cache_dir() -> Path | None:
    root = os.environ.get("MOPC_PLANNER_CACHE", str(Path.home() / ".cache" / "mopc" / "planner"))
    return None if root in ("", "0") else Path(root)


def _probe_key(config: Any, **layout: Any) -> str:
    text = repr((dataclasses.asdict(config), sorted(layout.items()), 3))  # 3: offloaded share, residuals per layer
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _to_json(r: ProbeResult) -> dict:
    d = {f.name: getattr(r, f.name) for f in dataclasses.fields(r) if f.name != "model_config"}
    d["layers"] = {k: dataclasses.asdict(v) for k, v in r.layers.items()}
    d["layer_kinds"] = {str(k): v for k, v in r.layer_kinds.items()}
    return d


def _from_json(d: dict, config: Any) -> ProbeResult:
    d = dict(d)
    d["layers"] = {k: LayerCosts(**v) for k, v in d["layers"].items()}
    d["layer_kinds"] = {int(k): v for k, v in d["layer_kinds"].items()}
    return ProbeResult(model_config=probe_config(config), **d)


_CACHED: set[int] = set()
"""ids of the probes this process read from the disk cache (not compiled in this run)."""


def _cache_path(key: str) -> Path | None:
    root = _cache_dir()
    return root / f"probe_{key}.json" if root else None


def _lookup(config: Any, key: str) -> ProbeResult | None:
    if key in _PROBES:
        return _PROBES[key]
    path = _cache_path(key)
    if path is not None and path.exists():
        try:
            _PROBES[key] = _from_json(json.loads(path.read_text()), config)
            _CACHED.add(id(_PROBES[key]))
            return _PROBES[key]
        except (ValueError, TypeError, KeyError):
            pass
    return None


def _store(key: str, result: ProbeResult) -> None:
    _PROBES[key] = result
    path = _cache_path(key)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_to_json(result)))
        except OSError:
            pass


def _probe_layout(world: int, tp: int, ep: int, vocab_parallel: bool, seq_len: int) -> dict[str, Any]:
    return {"world": world, "tp": tp, "ep": ep, "vocab_parallel": vocab_parallel, "seq_len": seq_len}


def _compile_probe(config: Any, layout: Mapping[str, Any]) -> ProbeResult:
    layout = dict(layout)
    vocab_parallel = layout.pop("vocab_parallel")
    return run_probe(config, batch=1, options={"vocab_parallel": vocab_parallel}, **layout)


def _probe_job(config: Any, layout: Mapping[str, Any]) -> dict:
    """A probe compiled in a worker process, returned as the cache's JSON."""
    return _to_json(_compile_probe(config, layout))


def _num_jobs(missing: int) -> int:
    """Processes compiling probes at once: `MOPC_PLANNER_JOBS`, default the CPU count."""
    wanted = os.environ.get("MOPC_PLANNER_JOBS", "")
    jobs = int(wanted) if wanted.isdigit() and int(wanted) > 0 else (os.cpu_count() or 1)
    return max(1, min(jobs, missing))


def cached_probes(config: Any, layouts: list[Mapping[str, Any]]) -> list[ProbeResult]:
    """`run_probe` once per (model, layout); kept in memory and under `MOPC_PLANNER_CACHE`
    (default ~/.cache/mopc/planner; `0` turns the disk cache off).

    Probes that are not cached compile concurrently: a probe is single-threaded Python
    (Dynamo, AOT autograd and mopc's passes on fake tensors), so on a machine with two or
    more cores the second one compiles in a spawned worker process while this process
    compiles the first (`MOPC_PLANNER_JOBS=1` turns that off). A worker that fails is
    retried here."""
    keys = [_probe_key(config, **layout) for layout in layouts]
    missing = {}
    for key, layout in zip(keys, layouts, strict=True):
        if _lookup(config, key) is None:
            missing.setdefault(key, layout)
    todo = list(missing.items())
    jobs = _num_jobs(len(todo))
    futures = {}
    pool = None
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        try:
            pool = ProcessPoolExecutor(max_workers=jobs - 1, mp_context=multiprocessing.get_context("spawn"))
            futures = {key: pool.submit(_probe_job, config, layout) for key, layout in todo[1:]}
        except (OSError, RuntimeError) as err:  # no processes here: compile them one by one
            log.info("planner: probes compile in this process (%s)", err)
    try:
        for key, layout in todo:
            if key not in futures:
                _store(key, _compile_probe(config, layout))
        for key, future in futures.items():
            try:
                _store(key, _from_json(future.result(), config))
            except (BrokenExecutor, OSError, RuntimeError, pickle.PicklingError) as err:  # compile it here
                log.info("planner: probe worker failed (%s: %s); compiling it here", type(err).__name__, err)
                _store(key, _compile_probe(config, missing[key]))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return [_PROBES[key] for key in keys]


def cached_probe(config: Any, *, world: int, tp: int, ep: int, vocab_parallel: bool,
                 seq_len: int = PROBE_SEQ_LEN) -> ProbeResult:
    """One probe, through `cached_probes`."""
    return cached_probes(config, [_probe_layout(world, tp, ep, vocab_parallel, seq_len)])[0]


def _probe_world(config: Any, tp: int, ep: int) -> tuple[int, bool]:
    """A world where every axis of the layout is its own group (world > tp, ep), and whether
    the vocabulary divides it (the vocabulary-parallel loss needs that)."""
    world = 2 * math.lcm(tp, ep)
    return world, config.vocab_size % world == 0


def probes_for(config: Any, tp: int, ep: int, vocab_parallel: bool = True) -> ProbeSet:
    """The base probe (tp 1, ep 1) and the split probe at (tp, ep)."""
    seq = min(PROBE_SEQ_LEN, config.max_seq_len)
    layouts = []
    for t, e in ((1, 1), (tp, ep)):
        world, vp = _probe_world(config, t, e)
        layouts.append(_probe_layout(world, t, e, vocab_parallel and vp, seq))
    base, split = cached_probes(config, layouts)
    return ProbeSet(base=base, split=split)


def model_info(config: Any, probes: ProbeSet) -> ModelInfo:
    return ModelInfo(config=config, probe_config=probe_config(config), param_roles=dict(probes.base.param_roles),
                     itemsize=4)


# ---------------------------------------------------------------------------- FSDP2


def fsdp2_estimate(info: ModelInfo, probes: ProbeSet, hw: HardwareSpec, *, world: int, global_batch: int,
                   seq_len: int, variant: str) -> Estimate:
    """FSDP2: every parameter flat over the world, a layer gathered whole (all its experts).

    `fp32`: as `mopc train --baseline fsdp2` runs (fp32, activations as mopc's min-cut
    program at tp 1, ep 1, the [tokens, vocab] logits and their log-softmax saved);
    `tuned`: bf16 mixed precision (`MixedPrecisionPolicy`: fp32 sharded parameters, which
    are the master weights, fp32 sharded gradients and moments; gathers and reductions in
    bf16) and full activation checkpointing; `tuned+offload`: also `CPUOffloadPolicy` (parameters, gradients and
    optimizer state in host memory, one layer at a time on the device).
    """
    cfg = info.config
    lay = layout_bytes(info, world, 1, 1, False)
    tokens = global_batch * seq_len // world
    half = variant != "fp32"
    numel = lay.param_bytes / 4
    params = grads = numel * 4
    optimizer = numel * 8 + 4 * lay.num_tensors
    item = 2 if half else 4
    logits = tokens * cfg.vocab_size * (item + 4)  # logits, and the fp32 log-softmax the loss saves
    from mopc.planner.estimate import _flops, _saved_per_token

    per_layer = {k: _saved_per_token(probes, k, 1, 1, 1.0) * (0.5 if half else 1.0) for k in ("dense", "moe")}
    layers = info.num_dense + info.num_moe
    if variant == "fp32":
        activations = tokens * (per_layer.get("dense", 0) * info.num_dense + per_layer.get("moe", 0) * info.num_moe)
    else:
        activations = tokens * layers * cfg.dim * item + tokens * max(per_layer.values())
    activations += logits
    host = 0.0
    if variant == "tuned+offload":
        host = params + grads + optimizer
        params = grads = optimizer = 0.0
    live = params + optimizer + max(activations, grads)
    transient = 2 * lay.gathered_bytes_max_layer * (0.5 if half else 1.0) + hw.reserved_bytes
    peak = live + transient
    host_limit = hw.host_memory_bytes_per_node / min(hw.devices_per_node, world) * 0.9
    why = [w for w, bad in (("device memory", peak > hw.device_memory_bytes), ("host memory", host > host_limit))
           if bad]
    flops = _flops(probes, info, tokens, seq_len, 1) * (4 / 3 if half else 1.0)
    compute_s = flops / (hw.peak_flops("bf16" if half else "fp32") * hw.mfu)
    comm = sum(lay.comm_bytes.values()) * (0.5 if half else 1.0)
    comm_s = comm / hw.link_bandwidth(world, world > hw.devices_per_node)
    offload_s = (2 * numel * 4) / hw.host_device_bandwidth if variant == "tuned+offload" else 0.0
    step = compute_s + comm_s + offload_s
    cand = Candidate(world=world, vocab_parallel=False, dtype="bf16" if half else "fp32",
                     recompute="full" if half else "min_cut", offload_optimizer=variant == "tuned+offload")
    return Estimate(candidate=cand, tokens_per_rank=tokens, params=int(params), grads=int(grads),
                    optimizer=int(optimizer), activations=int(activations), live_peak=int(live),
                    transient=int(transient), peak=int(peak), host_bytes=int(host), fits=not why,
                    why_not=", ".join(why), compute_s=compute_s, comm_s=comm_s, bubble_s=0.0, offload_s=offload_s,
                    step_time_s=step, tokens_per_s_per_gpu=global_batch * seq_len / step / world,
                    comm_by_axis={"world": int(comm)}, dominant="compute" if compute_s > comm_s else "communication")


def _max_seq_fitting(fn: Any, limit: int = 1 << 24) -> int:
    """The largest sequence length (a multiple of 1024, one sequence per rank) for which fn(seq).fits."""
    if not fn(1024).fits:
        return 0
    lo, hi = 1024, 2048
    while hi <= limit and fn(hi).fits:
        lo, hi = hi, hi * 2
    if hi > limit:
        return lo
    while hi - lo > 1024:
        mid = (lo + hi) // 2 // 1024 * 1024
        if fn(mid).fits:
            lo = mid
        else:
            hi = mid
    return lo


# ---------------------------------------------------------------------------- search


@dataclass
class PlanResult:
    model: str
    world: int
    hardware: HardwareSpec
    seq_len: int
    global_batch: int | None
    """None: one sequence per context-parallel group (per candidate)."""
    candidates: list[Estimate]
    chosen: Estimate | None
    projection: Estimate | None
    fsdp2: dict[str, Any]
    explanation: list[str]
    seconds: float
    probes: list[str] = field(default_factory=list)
    max_seq_len: dict[str, int | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "gpus": self.world, "gpu": self.hardware.name, "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "candidates": [e.as_dict() for e in self.candidates],
            "chosen": ({**self.chosen.as_dict(), "max_seq_len_that_fits": self.max_seq_len.get("chosen")}
                       if self.chosen else None),
            "best_projection": ({**self.projection.as_dict(),
                                 "max_seq_len_that_fits": self.max_seq_len.get("best_projection")}
                                if self.projection else None),
            "fsdp2": self.fsdp2, "explanation": self.explanation, "seconds": self.seconds, "probes": self.probes,
        }


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


DTYPES = ("fp32", "bf16")
"""`param_dtype`s searched (`reduce_dtype` = `param_dtype`)."""

RECOMPUTE = ("min_cut", "full")
"""`recompute`: the min-cut partitioner's choice (`"auto"`) or full activation recompute."""


def context_parallel_degrees(world: int, tp: int, seq_len: int, global_batch: int | None = None) -> list[int]:
    """The cp degrees `mopc.parallelize` accepts for a layout: cp divides world / tp
    (`MeshSpec.from_config`) and the sequence length is divisible by 2·cp (two equal chunks
    per rank); with a given global batch, each of the world / cp groups gets whole sequences."""
    return [cp for cp in _divisors(world // tp) if seq_len % (2 * cp) == 0
            and (cp == 1 or global_batch is None or (global_batch * cp) % world == 0)]


PIPELINE_DEGREES = (1, 2, 4, 8, 16)
"""Pipeline degrees searched (those dividing the world, at most one stage per layer)."""


def pipeline_degrees(world: int, num_layers: int) -> list[int]:
    return [p for p in PIPELINE_DEGREES if world % p == 0 and p <= num_layers]


def microbatch_counts(world: int, pp: int, cp: int, global_batch: int | None) -> list[int]:
    """Micro-batches per step for a pipeline of `pp` stages under 1F1B (at least pp, dividing
    the rows each pipeline reads): pp, 2·pp and 4·pp (with no global batch given, a pipeline
    reads one sequence per micro-batch), or also the rows per pipeline when they are fewer.
    Without pipelines: 1."""
    if pp == 1:
        return [1]
    wanted = [pp, 2 * pp, 4 * pp]
    if global_batch is None:
        return wanted
    rows = global_batch * cp * pp / world
    if rows != int(rows):
        return [pp]  # reported as not splitting into whole sequences
    rows = int(rows)
    return [m for m in sorted({*wanted, rows}) if m >= pp and rows % m == 0] or [pp]


def runnable_degrees(config: Any, world: int, hw: HardwareSpec) -> tuple[list[int], list[int]]:
    head_dim = config.head_dim or config.dim // config.num_heads
    tps = [t for t in _divisors(world) if t <= hw.devices_per_node and config.num_heads % t == 0
           and config.num_kv_heads % t == 0 and (config.num_heads * head_dim) % t == 0
           and config.dense_inter_dim % t == 0 and config.dim % t == 0]
    eps = [e for e in _divisors(world) if config.num_experts % e == 0]
    return tps, eps


def plan(model: Any, *, gpus: int, gpu: str = "h200", seq_len: int = 4096, global_batch: int | None = None,
         host_mem_gb: float | None = None, skew_z: float = 2.326, projections: bool = True,
         max_tp_probe: int | None = None) -> PlanResult:
    """Estimate every candidate layout of `model` on `gpus` devices; choose the fastest that fits."""
    start = time.perf_counter()
    config = load_model_config(model)
    name = model if isinstance(model, str) else "config"
    hw = hardware(gpu)
    if host_mem_gb is not None:
        hw = dataclasses.replace(hw, host_memory_bytes_per_node=int(host_mem_gb * 2**30))
    world = gpus
    tps, eps = runnable_degrees(config, world, hw)
    vocab_parallel = config.vocab_size % world == 0
    tp_rep = max(t for t in tps if max_tp_probe is None or t <= max_tp_probe)
    ep_rep = min((e for e in eps if e > 1), default=1)
    probes = probes_for(config, tp_rep, ep_rep, vocab_parallel)
    info = model_info(config, probes)
    estimates: list[Estimate] = []
    offloads = (False, True)
    num_layers = info.num_dense + info.num_moe
    pps = pipeline_degrees(world, num_layers)
    for tp, ep, pp, dtype, rc, off_a, off_o in itertools.product(
            tps, eps, pps, DTYPES, RECOMPUTE, offloads if info.num_moe else (False,), offloads):
        if off_o and pp > 1:
            continue  # mopc refuses optimizer offload with pipelines
        if off_a and rc == "full":
            continue  # full recompute saves nothing of the experts to offload
        if (world // pp) % ep or (world // pp) % tp:
            continue
        for cp in context_parallel_degrees(world // pp, tp, seq_len, global_batch):
            for m in microbatch_counts(world, pp, cp, global_batch):
                cand = Candidate(world=world, tp=tp, ep=ep, pp=pp, cp=cp, microbatches=m, dtype=dtype,
                                 recompute=rc, vocab_parallel=vocab_parallel, offload_activations=off_a,
                                 offload_optimizer=off_o)
                estimates.append(estimate(info, probes, hw, cand, global_batch=global_batch, seq_len=seq_len,
                                          skew_z=skew_z))
    runnable = sorted(estimates, key=_rank)
    chosen = runnable[0] if runnable else None
    projected: list[Estimate] = []  # every modelled layout runs now (`projections` kept for callers)
    fitting = sorted((e for e in projected if e.fits), key=_rank)
    projection = fitting[0] if fitting else (min(projected, key=lambda e: e.peak) if projected else None)
    fsdp2 = {}
    for variant in ("fp32", "tuned", "tuned+offload"):
        est = fsdp2_estimate(info, probes, hw, world=world, global_batch=global_batch or world, seq_len=seq_len,
                             variant=variant)
        max_seq = _max_seq_fitting(lambda s, v=variant: fsdp2_estimate(info, probes, hw, world=world,
                                                                        global_batch=world, seq_len=s, variant=v))
        fsdp2[variant] = {**{k: v for k, v in est.as_dict().items() if k in (
            "params", "grads", "optimizer", "activations", "transient", "host_bytes", "step_time_s",
            "tokens_per_s_per_gpu", "why_not")}, "peak_bytes_per_rank": est.peak, "fits": est.fits,
            "max_seq_len_that_fits": max_seq}
    best = max(fsdp2.values(), key=lambda d: d["max_seq_len_that_fits"])
    fsdp2_out = {"peak_bytes_per_rank": fsdp2["tuned"]["peak_bytes_per_rank"],
                 "fits": any(d["fits"] for d in fsdp2.values()),
                 "max_seq_len_that_fits": best["max_seq_len_that_fits"], "variants": fsdp2}
    def longest(e: Estimate | None) -> int | None:
        if e is None:
            return None
        return _max_seq_fitting(lambda s: estimate(info, probes, hw, e.candidate, global_batch=None, seq_len=s,
                                                   skew_z=skew_z))

    max_seq = {"chosen": longest(chosen), "best_projection": longest(projection)}
    explanation = _explain(chosen, projection, runnable, fsdp2_out, hw)
    explanation.append(f"longest sequence (one per rank or context-parallel group) that fits: "
                       f"{chosen.candidate.label() if chosen else '-'}: {max_seq['chosen'] or 0:,}"
                       + (f"; projection {projection.candidate.label()}: {max_seq['best_projection'] or 0:,}"
                          if projection else ""))
    shown = runnable + sorted(projected, key=_rank)
    probes_text = [f"probe tp{p.tp} ep{p.ep} world {p.world}: {p.seconds:.1f}s"
                   + (" (cached)" if id(p) in _CACHED else "")
                   for p in {id(p): p for p in (probes.base, probes.split)}.values()]
    return PlanResult(model=name, world=world, hardware=hw, seq_len=seq_len, global_batch=global_batch,
                      candidates=shown, chosen=chosen, projection=projection, fsdp2=fsdp2_out,
                      explanation=explanation, seconds=time.perf_counter() - start, probes=probes_text,
                      max_seq_len=max_seq)


def _rank(e: Estimate) -> tuple:
    """Fitting first, highest throughput first (candidates of different cp step over different
    global batches when it is not given: one sequence per cp group); on a tie, fewer offloads
    (they cost host memory and PCIe traffic the step time may hide); layouts that do not fit
    by peak."""
    c = e.candidate
    return (not e.fits, -e.tokens_per_s_per_gpu if e.fits else e.peak, c.offload_activations + c.offload_optimizer)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _explain(chosen: Estimate | None, projection: Estimate | None, runnable: list[Estimate],
             fsdp2: Mapping[str, Any], hw: HardwareSpec) -> list[str]:
    lines = []
    if chosen is not None and chosen.fits:
        host = f", host {_gib(chosen.host_bytes)}" if chosen.host_bytes else ""
        lines.append(f"chosen (runnable): {chosen.candidate.label()}: peak {_gib(chosen.peak)} of "
                     f"{_gib(hw.device_memory_bytes)}{host}, step {chosen.step_time_s:.3g}s, dominated by "
                     f"{chosen.dominant}")
        others = [e for e in runnable if e.fits and e is not chosen]
        if others:
            lines.append(f"  next: {others[0].candidate.label()} at {others[0].step_time_s:.3g}s")
    elif chosen is not None:
        lines.append(f"no runnable layout fits: the smallest, {chosen.candidate.label()}, needs {_gib(chosen.peak)} "
                     f"per rank of {_gib(hw.device_memory_bytes)} (params {_gib(chosen.params)}, grads "
                     f"{_gib(chosen.grads)}, optimizer {_gib(chosen.optimizer)}, activations "
                     f"{_gib(chosen.activations)}; host {_gib(chosen.host_bytes)})"
                     f"{'; ' + chosen.why_not if chosen.why_not else ''}")
    if projection is not None:
        state = "fits" if projection.fits else "does not fit either"
        lines.append(f"best projection (NOT runnable, needs {', '.join(projection.candidate.missing)}): "
                     f"{projection.candidate.label()} {state}: peak {_gib(projection.peak)}, host "
                     f"{_gib(projection.host_bytes)}, step {projection.step_time_s:.3g}s")
    lines.append(f"FSDP2 estimate: {'fits' if fsdp2['fits'] else 'out of memory'} at this length; longest sequence "
                 f"it fits (one per rank): {fsdp2['max_seq_len_that_fits']:,} tokens")
    return lines


def estimate_layout(model: Any, *, world: int, tp: int = 1, ep: int = 1, cp: int = 1, pp: int = 1,
                    microbatches: int | None = None, schedule: str = "1f1b", recompute: str = "min_cut",
                    global_batch: int,
                    seq_len: int, vocab_parallel: bool = True, gpu: str = "cpu", skew: float | None = None,
                    offload_activations: bool = False, offload_optimizer: bool = False,
                    param_dtype: str = "fp32", reduce_dtype: str | None = None) -> Estimate:
    """The estimate of one runnable layout: what `mopc train --nproc world --tp .. --ep ..
    --cp .. --pp .. --microbatches .. --schedule .. --recompute full` runs (`recompute`:
    `min_cut`, mopc's default `auto`, or `full`), with `--offload experts`
    (`offload_activations`), `--optimizer-offload`, `--param-dtype` and `--reduce-dtype`.
    `microbatches` defaults to the runtime's 2·pp."""
    config = load_model_config(model)
    probes = probes_for(config, tp, ep, vocab_parallel)
    info = model_info(config, probes)
    cand = Candidate(world=world, tp=tp, ep=ep, cp=cp, pp=pp,
                     microbatches=(microbatches or 2 * pp) if pp > 1 else 1, schedule=schedule,
                     recompute="full" if recompute == "full" else "min_cut",
                     vocab_parallel=vocab_parallel, dtype=param_dtype,
                     reduce_dtype=reduce_dtype, offload_activations=offload_activations,
                     offload_optimizer=offload_optimizer)
    return estimate(info, probes, hardware(gpu), cand, global_batch=global_batch, seq_len=seq_len, skew=skew)


def format_plan(result: PlanResult) -> str:
    """The table of candidates, the chosen plan, the best projection and the FSDP2 estimate."""
    hw = result.hardware
    head = (f"mopc plan: {result.model} on {result.world} x {hw.name} ({hw.device_memory_bytes / 2**30:.0f} GiB each), "
            f"seq_len {result.seq_len:,}, global batch "
            f"{result.global_batch or 'one sequence per rank (per context-parallel group)'}; planned in "
            f"{result.seconds:.1f}s ({'; '.join(result.probes)})")
    cols = ("layout", "run?", "params", "grads", "optim", "activ", "transient", "peak", "host", "step s",
            "tok/s/GPU", "fits")
    rows = []
    runnable = [e for e in result.candidates if e.candidate.runnable][:12]
    projected = [e for e in result.candidates if not e.candidate.runnable][:12]
    hidden = len(result.candidates) - len(runnable) - len(projected)
    for e in runnable + projected:
        rows.append((e.candidate.label(), "yes" if e.candidate.runnable else "proj", _g(e.params), _g(e.grads),
                     _g(e.optimizer), _g(e.activations), _g(e.transient), _g(e.peak), _g(e.host_bytes),
                     f"{e.step_time_s:.3g}", f"{e.tokens_per_s_per_gpu:,.0f}",
                     "yes" if e.fits else f"no ({e.why_not})"))
    widths = [max(len(str(r[i])) for r in (cols, *rows)) for i in range(len(cols))]
    fmt = lambda r: "  ".join(str(c).rjust(w) if 1 < i < 11 else str(c).ljust(w)
                              for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
    lines = [head, "memory per rank in GiB; 'proj' would mark a projection (a layout mopc cannot run); none is left",
             fmt(cols), "  ".join("-" * w for w in widths), *map(fmt, rows)]
    if hidden:
        lines.append(f"({hidden} more candidates in --json)")
    lines.append("")
    lines += result.explanation
    lines.append("FSDP2 variants (ZeRO-3 over all ranks, experts gathered whole):")
    for variant, d in result.fsdp2["variants"].items():
        lines.append(f"  {variant:14s} peak {_g(d['peak_bytes_per_rank'])} GiB, host {_g(d['host_bytes'])} GiB, "
                     f"{'fits' if d['fits'] else 'OOM (' + d['why_not'] + ')'}; longest sequence that fits: "
                     f"{d['max_seq_len_that_fits']:,}")
    return "\n".join(lines) + "\n"


def _g(n: float) -> str:
    return f"{n / 2**30:.1f}"
