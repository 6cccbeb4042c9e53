"""The planner (mopc/planner): exact shard bytes, the estimate's composition, the search.

Fast tests use hand-made probe results (no compilation). Tests that compile probes of the
real program on fake tensors take 15-40 s each on 2 cores and are marked `large`.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from mopc.models.presets import PRESETS
from mopc.planner import Candidate, hardware, routing_skew
from mopc.planner.estimate import ProbeSet, estimate
from mopc.planner.model import ModelInfo, layout_bytes
from mopc.planner.probe import LayerCosts, ProbeResult, probe_config


@functools.cache
def _tiny_roles() -> dict[str, str]:
    """The roles mopc.analyze gives the tiny probe model (1 dense + 1 MoE layer), traced on fakes."""
    from mopc.analysis import analyze
    from mopc.models import build_model

    model = build_model(probe_config(PRESETS["tiny"]), device="meta")
    ids = torch.zeros(1, 16, dtype=torch.long, device="meta")
    return dict(analyze(model, {"input_ids": ids, "labels": ids}).param_roles)


def _info(config=None) -> ModelInfo:
    config = config or PRESETS["tiny"]
    return ModelInfo(config=config, probe_config=probe_config(config), param_roles=_tiny_roles(), itemsize=4)


def _probe(tp: int, ep: int, *, saved: int = 1000, moe: int = 400, rows: int = 100) -> ProbeResult:
    layer = LayerCosts(saved_bytes=saved, saved_bytes_moe=moe, saved_bytes_ep_rows=rows if ep > 1 else 0,
                       flops=10_000, attention_core_flops=1_000,
                       token_comm={"tp:all_gather": 64 * (tp > 1), "ep:all_to_all": 128 * (ep > 1)})
    head = LayerCosts(saved_bytes=500, flops=5_000, token_comm={"world:all_gather": 32})
    return ProbeResult(model_config=probe_config(PRESETS["tiny"]), world=2 * max(tp, ep), tp=tp, ep=ep, batch=1,
                       seq_len=64, options={}, layers={"head": head, "dense": layer, "moe": layer},
                       layer_kinds={0: "dense", 1: "moe"}, param_roles={}, seconds=0.0, unknown_sizes=0)


def test_layout_bytes_are_the_shards_parallelize_allocates():
    """Per-rank bytes from the probe model x layer counts == make_plan on the full model."""
    from mopc.config import MoPConfig
    from mopc.models import build_model
    from mopc.plan.layout import make_plan
    from mopc.plan.mesh import MeshSpec

    info = _info()
    full = build_model(PRESETS["tiny"], device="meta")
    full_roles = {}
    for fqn in dict(full.named_parameters()):
        parts = fqn.split(".")
        if parts[0] == "layers":
            layer = int(parts[1])
            parts[1] = "0" if layer < 1 else "1"
        full_roles[fqn] = info.param_roles[".".join(parts)]
    for world, tp, ep in ((4, 1, 1), (4, 2, 4), (8, 4, 2)):
        spec = MeshSpec(world_size=world, dp=world // tp, tp=tp, ep=ep)
        plan = make_plan(full, full_roles, spec, MoPConfig(tp=tp, ep=ep))
        expected = sum(lay.piece_numel * 4 for lay in plan.layouts.values())
        got = layout_bytes(info, world, tp, ep, True)
        assert got.param_bytes == expected
        assert got.num_tensors == len(plan.layouts)
        assert got.num_params == sum(p.numel() for p in full.parameters())


def test_measured_categories_follow_adamw():
    """params = grads; optimizer = 2 x params + a 4-byte step per tensor (as MemoryTracker counts AdamW)."""
    info = _info()
    probes = ProbeSet(base=_probe(1, 1), split=_probe(2, 2))
    est = estimate(info, probes, hardware("cpu"), Candidate(world=4, tp=2, ep=2), global_batch=8, seq_len=64)
    lay = layout_bytes(info, 4, 2, 2, True)
    assert est.params == est.grads == lay.param_bytes
    assert est.optimizer == 2 * lay.param_bytes + 4 * lay.num_tensors
    assert est.live_peak == est.params + est.optimizer + max(est.activations, est.grads)


def test_activations_scale_with_tokens_layers_and_skew():
    info = _info()
    probes = ProbeSet(base=_probe(1, 1), split=_probe(2, 2))
    hw = hardware("cpu")
    one = estimate(info, probes, hw, Candidate(world=2), global_batch=2, seq_len=64)
    two = estimate(info, probes, hw, Candidate(world=2), global_batch=4, seq_len=64)
    assert two.activations == 2 * one.activations
    # tiny: 1 dense + 2 MoE layers + head, per token from the probe (64 tokens)
    assert one.activations == 64 * (1000 + 2 * 1000 + 500) // 64
    skewed = estimate(info, probes, hw, Candidate(world=2, ep=2), global_batch=2, seq_len=64, skew=2.0)
    even = estimate(info, probes, hw, Candidate(world=2, ep=2), global_batch=2, seq_len=64, skew=1.0)
    assert skewed.activations - even.activations == 3 * 100  # received rows (every synthetic layer has them), doubled


def test_world_gathered_head_bytes_grow_with_the_world():
    """The vocabulary-parallel loss saves hidden states gathered from every rank: per token, x world."""
    info = _info()
    base = _probe(1, 1)  # world 2
    base.layers["head"] = dataclasses.replace(base.layers["head"], saved_bytes=500 + 128, saved_bytes_world=128)
    probes = ProbeSet(base=base, split=base)
    hw = hardware("cpu")
    two = estimate(info, probes, hw, Candidate(world=2), global_batch=2, seq_len=64)
    eight = estimate(info, probes, hw, Candidate(world=8), global_batch=8, seq_len=64)
    assert eight.tokens_per_rank == two.tokens_per_rank == 64
    assert eight.activations - two.activations == 128 * (8 / 2 - 1)


def test_routing_skew_percentile():
    assert routing_skew(1000, 8, 64, 1) == 1.0
    small, large = routing_skew(64, 2, 16, 4), routing_skew(1 << 20, 2, 16, 4)
    assert small > large > 1.0
    assert large < 1.01


def test_pipelines_and_full_recompute_are_runnable():
    # mopc.parallelize(pp=..., microbatches=..., recompute="full") with 1F1B
    c = Candidate(world=8, pp=2, cp=2, microbatches=2, dtype="bf16", recompute="full")
    assert c.runnable and not c.missing
    assert Candidate(world=8, pp=2, cp=2, microbatches=2, dtype="bf16").runnable
    assert not Candidate(world=8, recompute="full", offload_activations=True).runnable
    assert Candidate(world=8, tp=2, ep=4).runnable
    # mopc.parallelize(cp=..., param_dtype="bf16")
    assert Candidate(world=8, tp=2, ep=4, cp=2, dtype="bf16").runnable
    # mopc train --offload experts / --optimizer-offload
    assert Candidate(world=8, tp=2, ep=4, offload_activations=True, offload_optimizer=True).runnable


def test_optimizer_offload_moves_adamw_and_a_master_copy_to_host():
    """HostAdamW: no optimizer bytes on the device; host = 2 fp32 moments + fp32 master + a 4-byte step per tensor."""
    info = _info()
    probes = ProbeSet(base=_probe(1, 1), split=_probe(2, 2))
    hw = hardware("cpu")
    plain = estimate(info, probes, hw, Candidate(world=4, tp=2, ep=2), global_batch=8, seq_len=64)
    off = estimate(info, probes, hw, Candidate(world=4, tp=2, ep=2, offload_optimizer=True), global_batch=8,
                   seq_len=64)
    lay = layout_bytes(info, 4, 2, 2, True)
    assert off.optimizer == 0
    assert off.host_bytes == off.host_optimizer == 3 * lay.param_bytes + 4 * lay.num_tensors
    assert (off.params, off.grads, off.activations) == (plain.params, plain.grads, plain.activations)
    assert off.live_peak == plain.live_peak - plain.optimizer
    assert off.offload_s > 0 and off.step_time_s > plain.step_time_s
    d = off.as_dict()
    assert d["offload_optimizer"] and d["runnable"] and d["needs"] == [] and "opt-offload" in d["layout"]


def test_expert_offload_moves_the_expert_share_to_host():
    """offload="experts": the probe's expert/dispatch/combine share of every MoE layer goes to host
    (received rows scaled by the skew); the head's share is freed before backward reloads one layer's."""
    info = _info()  # tiny: 1 dense + 2 MoE layers
    base = _probe(1, 1)
    split = _probe(1, 2)
    for p in (base, split):  # of each layer's 400 MoE bytes, 300 are expert-role (100 of them received rows)
        p.layers["moe"] = dataclasses.replace(p.layers["moe"], saved_bytes_offload=300,
                                              saved_bytes_offload_ep_rows=100 * (p.ep > 1))
        p.layers["dense"] = dataclasses.replace(p.layers["dense"], saved_bytes_moe=0, saved_bytes_ep_rows=0,
                                                saved_bytes_offload=0)
    probes = ProbeSet(base=base, split=split)
    hw = hardware("cpu")
    kw = {"global_batch": 2, "seq_len": 64, "skew": 2.0}
    plain = estimate(info, probes, hw, Candidate(world=2, ep=2), **kw)
    off = estimate(info, probes, hw, Candidate(world=2, ep=2, offload_activations=True), **kw)
    assert off.host_bytes == off.host_activations == 2 * (200 + 100 * 2)  # per layer: 200 fixed + 100 rows x skew
    assert off.activations == plain.activations - off.host_bytes
    assert (off.params, off.optimizer, off.grads) == (plain.params, plain.optimizer, plain.grads)
    assert off.candidate.runnable and "act-offload" in off.candidate.label()
    # a probe without roles: the received-rows part is what moves (dispatched tokens, expert intermediates)
    legacy = ProbeSet(base=_probe(1, 1), split=_probe(1, 2))
    derived = estimate(info, legacy, hw, Candidate(world=2, ep=2, offload_activations=True), **kw)
    assert derived.host_activations == 3 * 100 * 2  # every synthetic layer has received rows, doubled


def test_search_chooses_offload_only_when_the_plain_layout_does_not_fit(monkeypatch):
    """Offloaded layouts are runnable candidates; the plain one wins while it fits, the
    offloaded one once only it fits (device memory shrunk below the plain layout's peak)."""
    from mopc.planner import search

    def probes(config, tp, ep, vp=True):
        base, split = _probe(1, 1, saved=100_000, moe=90_000), _probe(tp, ep, saved=100_000, moe=90_000)
        for p in (base, split):
            p.layers["moe"] = dataclasses.replace(p.layers["moe"], saved_bytes_offload=80_000)
            p.layers["dense"] = dataclasses.replace(p.layers["dense"], saved_bytes_moe=0, saved_bytes_ep_rows=0,
                                                    saved_bytes_offload=0)
        return ProbeSet(base=base, split=split)

    monkeypatch.setattr(search, "probes_for", probes)
    monkeypatch.setattr(search, "model_info", lambda config, probes: _info(config))
    monkeypatch.setattr(search, "RECOMPUTE", ("min_cut",))  # offload against saving, not against recompute
    kw = {"gpus": 4, "gpu": "h100", "seq_len": 4096, "projections": False}
    roomy = search.plan("tiny", **kw)
    kinds = {(e.candidate.offload_activations, e.candidate.offload_optimizer) for e in roomy.candidates}
    assert kinds == {(False, False), (True, False), (False, True), (True, True)}
    assert all(e.candidate.runnable for e in roomy.candidates)
    c = roomy.chosen.candidate
    assert roomy.chosen.fits and not c.offload_activations and not c.offload_optimizer

    def smallest_plain(result):
        return min(e.peak for e in result.candidates if not e.candidate.offload_activations
                   and not e.candidate.offload_optimizer)

    def smallest_offloaded(result):
        return min(e.peak for e in result.candidates if e.candidate.offload_activations)

    assert smallest_offloaded(roomy) < smallest_plain(roomy)
    budget = (smallest_offloaded(roomy) + smallest_plain(roomy)) // 2
    spec = dataclasses.replace(hardware("h100"), device_memory_bytes=budget)
    monkeypatch.setattr(search, "hardware", lambda name: spec)
    tight = search.plan("tiny", **kw)
    assert tight.chosen.fits and tight.chosen.candidate.offload_activations
    assert tight.chosen.host_activations > 0


@pytest.mark.parametrize("world", [64, 256])
def test_search_at_scale_with_given_probes(world, monkeypatch):
    """The search's choice at world 64 and 256 (probes given): runnable, fits, fastest of those that fit."""
    from mopc.planner import search

    monkeypatch.setattr(search, "probes_for", lambda config, tp, ep, vp=True: ProbeSet(base=_probe(1, 1),
                                                                                       split=_probe(tp, ep)))
    monkeypatch.setattr(search, "model_info", lambda config, probes: _info(config))
    result = search.plan("tiny", gpus=world, gpu="h100", seq_len=64)
    chosen = result.chosen
    assert chosen is not None and chosen.fits and chosen.candidate.runnable
    assert chosen.candidate.tp * chosen.candidate.cp * chosen.candidate.pp * chosen.candidate.dp == world
    fitting = [e for e in result.candidates if e.candidate.runnable and e.fits]
    # one sequence per cp group: candidates step over different batches, so throughput decides
    assert chosen.tokens_per_s_per_gpu == max(e.tokens_per_s_per_gpu for e in fitting)
    assert PRESETS["tiny"].num_experts % chosen.candidate.ep == 0
    out = result.to_json()
    assert {"dp", "tp", "ep", "pp", "peak_bytes_per_rank", "step_time_s", "fits"} <= set(out["chosen"])
    assert {"peak_bytes_per_rank", "fits", "max_seq_len_that_fits"} <= set(out["fsdp2"])
    assert all(not c["runnable"] for c in out["candidates"] if c["needs"])


def test_plan_cli_parser():
    from mopc.cli import build_parser

    args = build_parser().parse_args(["plan", "--model", "1t", "--gpus", "96", "--gpu", "h200", "--seq-len",
                                      "1048576", "--json", "x.json"])
    assert (args.gpus, args.gpu, args.seq_len, args.json) == (96, "h200", 1048576, "x.json")


@pytest.mark.large
def test_probe_saved_bytes_equal_the_measured_fake_step():
    """A probe of tiny (full depth) at world 2 saves exactly what MemoryTracker measured in the
    same program's fake-process-group step (mopc explain --nproc 2 --batch 4 --seq-len 64)."""
    from mopc.planner.probe import run_probe

    result = run_probe(PRESETS["tiny"], world=2, batch=4, seq_len=64, reduce_depth=False)
    total = sum(c.saved_bytes for c in result.layers.values())
    assert result.layer_kinds == {0: "dense", 1: "moe", 2: "moe"}
    # the per-layer table keeps the last MoE layer: add the first back
    assert total + result.layers["moe"].saved_bytes == 3_294_788


@pytest.mark.large
@pytest.mark.parametrize("world", [64, 256])
def test_plan_small_at_scale(world, tmp_path, monkeypatch):
    """The planner's choice for `small` at world 64 and 256 on H100s, with real probes."""
    from mopc.config import MoPConfig
    from mopc.plan.mesh import MeshSpec
    from mopc.planner import plan

    monkeypatch.setenv("MOPC_PLANNER_CACHE", str(tmp_path))
    result = plan("small", gpus=world, gpu="h100", seq_len=512, projections=False)
    c = result.chosen.candidate
    assert result.chosen.fits and c.runnable
    # a layout mopc.parallelize accepts
    MeshSpec.from_config(MoPConfig(tp=c.tp, ep=c.ep, cp=c.cp, pp=c.pp,
                                   microbatches=c.microbatches if c.pp > 1 else None), world)
    assert torch.distributed.is_initialized() is False


def test_fsdp2_gathers_whole_expert_layers():
    """FSDP2 gathers a whole MoE layer (every expert); mopc's EP layout gathers only its experts."""
    from mopc.planner.search import fsdp2_estimate

    info = _info(dataclasses.replace(PRESETS["tiny"]))
    assert (layout_bytes(info, 4, 1, 1, False).gathered_bytes_max_layer
            > layout_bytes(info, 4, 1, 4, True).gathered_bytes_max_layer)
    probes = ProbeSet(base=_probe(1, 1), split=_probe(1, 4))
    fsdp = fsdp2_estimate(info, probes, hardware("h100"), world=4, global_batch=4, seq_len=64, variant="fp32")
    assert fsdp.params == layout_bytes(info, 4, 1, 1, False).param_bytes


def test_cp_candidates_obey_the_mesh_and_sequence_constraints(monkeypatch):
    """cp divides world / tp (MeshSpec.from_config) and 2*cp divides the sequence length; the
    search offers cp > 1 as runnable layouts, in fp32 and bf16."""
    from mopc.config import MoPConfig
    from mopc.plan.mesh import MeshSpec
    from mopc.planner import search

    assert search.context_parallel_degrees(96, 8, 1 << 20) == [1, 2, 4]  # 12 = world / tp; 2^20 has no factor 3
    assert search.context_parallel_degrees(12, 1, 36) == [1, 2, 3, 6]
    assert search.context_parallel_degrees(8, 1, 64, global_batch=2) == [1, 4, 8]  # a sequence per cp group
    monkeypatch.setattr(search, "probes_for", lambda config, tp, ep, vp=True: ProbeSet(base=_probe(1, 1),
                                                                                       split=_probe(tp, ep)))
    monkeypatch.setattr(search, "model_info", lambda config, probes: _info(config))
    result = search.plan("tiny", gpus=8, gpu="h100", seq_len=24, projections=False)
    runnable = [e.candidate for e in result.candidates]
    assert all(c.runnable for c in runnable)
    assert {c.cp for c in runnable} == {1, 2, 4}  # cp=8 divides the world but 24 % 16 != 0
    assert {c.cp for c in runnable if c.tp == 4} == {1, 2}  # cp divides world / tp = 2
    assert {c.dtype for c in runnable} == {"fp32", "bf16"}
    for c in runnable:
        assert 24 % (2 * c.cp) == 0 and c.dp * c.cp * c.tp * c.pp == 8
        MeshSpec.from_config(MoPConfig(tp=c.tp, ep=c.ep, cp=c.cp, pp=c.pp,  # what mopc.parallelize accepts
                                       microbatches=c.microbatches if c.pp > 1 else None), 8)


def test_cp_collective_bytes_are_the_rewrites():
    """Per layer: K, V all-gathered in forward and again in backward, dK, dV reduce-scattered:
    6 (cp-1) x local K bytes. tiny at world 2, cp 2, 32 local tokens, fp32: a probe of the
    compiled program (`run_probe(..., options={"cp": 2})`) sent 16384 B in all-gathers and
    8192 B in reduce-scatters per layer (4 kv heads x 8 channels x 4 B x 32 tokens = 4096 B of K)."""
    from mopc.planner.estimate import cp_comm_bytes

    cfg = PRESETS["tiny"]
    assert cp_comm_bytes(cfg, Candidate(world=2, cp=2), tokens=32, num_layers=1) == 16384 + 8192
    assert cp_comm_bytes(cfg, Candidate(world=2), tokens=32, num_layers=1) == 0
    two, four = (cp_comm_bytes(cfg, Candidate(world=8, cp=c), tokens=64, num_layers=3) for c in (2, 4))
    assert four == 3 * two  # (cp - 1) at the same local tokens
    assert cp_comm_bytes(cfg, Candidate(world=8, cp=2, dtype="bf16"), tokens=64, num_layers=3) == two / 2
    assert cp_comm_bytes(cfg, Candidate(world=8, cp=2, tp=2), tokens=64, num_layers=3) == two / 2  # kv heads / tp
    # in the estimate: every layer (1 dense + 2 MoE), all tokens of the rank
    info = _info()
    probes = ProbeSet(base=_probe(1, 1), split=_probe(1, 1))
    est = estimate(info, probes, hardware("cpu"), Candidate(world=4, cp=2), global_batch=2, seq_len=64)
    assert est.tokens_per_rank == 32
    assert est.comm_by_axis["cp"] == 3 * (16384 + 8192)


def test_cp_keeps_per_token_activations_and_adds_attention_buffers():
    """Under cp a rank saves what cp=1 saves per local token (a cp=2 probe of tiny saves the
    same bytes per token as cp=1); attention's gathered K/V, prefix copies and fp32 dK/dV
    accumulators are transient, of the whole sequence."""
    from mopc.planner.estimate import cp_attention_transient

    info = _info()
    probes = ProbeSet(base=_probe(1, 1), split=_probe(1, 1))
    hw = hardware("cpu")
    plain = estimate(info, probes, hw, Candidate(world=4), global_batch=4, seq_len=32)
    cp = estimate(info, probes, hw, Candidate(world=4, cp=2), global_batch=2, seq_len=64)
    assert cp.tokens_per_rank == plain.tokens_per_rank == 32
    assert cp.activations == plain.activations
    cfg = PRESETS["tiny"]  # K of one 64-token sequence: 64 x 4 heads x 8 channels = 2048 elements
    c = Candidate(world=4, cp=2)
    forward = 2048 * 4 * 2 * (1 + 3 / 4)  # K, V whole + the 3-of-4-chunk prefix copies
    backward = 2048 * (2 * 4 + 2 * 4 + max(4 * 4 * 3 / 4, 4 + 2 * 4))  # K, V + fp32 dK, dV + prefix and pieces
    assert cp_attention_transient(cfg, c, 1, 64) == max(forward, backward) == 2048 * 28
    assert cp_attention_transient(cfg, Candidate(world=4), 1, 64) == 0
    assert cp_attention_transient(cfg, c, 2, 128) == 4 * cp_attention_transient(cfg, c, 1, 64)
    # in place of the largest token buffer (at tp 1, ep 1: the 32 x 64 fp32 hidden states)
    assert cp.transient - plain.transient == cp_attention_transient(cfg, c, 1, 64) - 32 * 64 * 4
    bf16 = cp_attention_transient(cfg, Candidate(world=4, cp=2, dtype="bf16"), 1, 64)
    assert bf16 == 2048 * (2 * 2 + 8 + max(4 * 2 * 3 / 4, 4 + 2 * 2))  # the fp32 accumulators stay fp32


def test_bf16_counts_bytes_by_dtype():
    """param_dtype="bf16": fp32 shards, fp32 shard gradients, fp32 moments and no other master
    copy; gathered weights and all-gathers in bf16; reduce-scatters in reduce_dtype;
    activations and token collectives from the fp32 probes, halved."""
    info = _info()
    probes = ProbeSet(base=_probe(1, 1), split=_probe(2, 2))
    hw = hardware("cpu")
    kw = {"global_batch": 8, "seq_len": 64}
    fp32 = estimate(info, probes, hw, Candidate(world=4, tp=2, ep=2), **kw)
    bf16 = estimate(info, probes, hw, Candidate(world=4, tp=2, ep=2, dtype="bf16"), **kw)
    up = estimate(info, probes, hw, Candidate(world=4, tp=2, ep=2, dtype="bf16", reduce_dtype="fp32"), **kw)
    lay = layout_bytes(info, 4, 2, 2, True)
    for e in (bf16, up):
        assert (e.params, e.grads, e.optimizer) == (fp32.params, fp32.grads, fp32.optimizer)
        assert e.candidate.runnable
    assert bf16.activations == pytest.approx(fp32.activations / 2, abs=1)
    gathered = lay.gathered_bytes_max_layer
    token_buffers = fp32.transient - 2 * gathered  # this layer's and the next's (or its gradient); no reserve on cpu
    assert bf16.transient == pytest.approx(gathered + token_buffers / 2, abs=1)
    assert up.transient - bf16.transient == gathered / 2  # the full gradient is cast up before its reduce-scatter
    gathers = {k: v for k, v in lay.comm_bytes.items() if k.endswith("all_gather")}
    scatters = {k: v for k, v in lay.comm_bytes.items() if k.endswith("reduce_scatter")}
    param_fp32 = sum(lay.comm_bytes.values())
    param_bf16 = sum(gathers.values()) / 2 + sum(scatters.values()) / 2
    param_up = sum(gathers.values()) / 2 + sum(scatters.values())
    token = sum(fp32.comm_by_axis.values()) - param_fp32
    assert sum(bf16.comm_by_axis.values()) == pytest.approx(param_bf16 + token / 2, abs=4)
    assert sum(up.comm_by_axis.values()) == pytest.approx(param_up + token / 2, abs=4)
    h100 = {d: estimate(info, probes, hardware("h100"), Candidate(world=4, dtype=d), **kw) for d in ("fp32", "bf16")}
    assert h100["bf16"].compute_s == pytest.approx(h100["fp32"].compute_s * 67 / 989)  # bf16 peak flops
    assert "bf16" in bf16.candidate.label() and "reduce-fp32" in up.candidate.label()


def test_cached_probes_compile_each_layout_once(monkeypatch, tmp_path):
    """probes_for compiles each missing layout once (base == split at tp 1, ep 1), stores it on
    disk, and a later process reads it back (marked cached). Workers: `test_plan_small_at_scale`."""
    from mopc.planner import search

    calls = []

    def compile_probe(config, layout):
        calls.append((layout["tp"], layout["ep"]))
        return _probe(layout["tp"], layout["ep"])

    monkeypatch.setenv("MOPC_PLANNER_CACHE", str(tmp_path))
    monkeypatch.setenv("MOPC_PLANNER_JOBS", "1")
    monkeypatch.setattr(search, "_compile_probe", compile_probe)
    monkeypatch.setattr(search, "_PROBES", {})
    config = PRESETS["tiny"]
    same = search.probes_for(config, 1, 1)
    assert calls == [(1, 1)] and same.base is same.split
    probes = search.probes_for(config, 2, 2)
    assert calls == [(1, 1), (2, 2)] and (probes.split.tp, probes.split.ep) == (2, 2)
    assert len(list(tmp_path.glob("probe_*.json"))) == 2
    monkeypatch.setattr(search, "_PROBES", {})  # a new process: from disk, nothing compiled
    again = search.probes_for(config, 2, 2)
    assert calls == [(1, 1), (2, 2)]
    assert again.split.layers["moe"] == probes.split.layers["moe"] and id(again.split) in search._CACHED


@pytest.mark.large
def test_cp_probe_matches_the_model():
    """A probe of tiny's compiled program at cp=2 (world 2, 32 local tokens): the same saved
    bytes per local token as cp=1, and cp collective bytes equal to `cp_comm_bytes`."""
    from mopc.planner.estimate import cp_comm_bytes
    from mopc.planner.probe import run_probe

    cfg = PRESETS["tiny"]
    plain = run_probe(cfg, world=2, batch=1, seq_len=32, options={"vocab_parallel": True})
    cp = run_probe(cfg, world=2, batch=1, seq_len=32, options={"vocab_parallel": True, "cp": 2})
    for kind in ("dense", "moe", "head"):
        assert cp.layers[kind].saved_bytes == plain.layers[kind].saved_bytes
    for kind in ("dense", "moe"):  # at world 2 the cp group is the world: the layers' only token collectives
        sent = sum(cp.layers[kind].token_comm.values()) - sum(plain.layers[kind].token_comm.values())
        assert sent == cp_comm_bytes(cfg, Candidate(world=2, cp=2), tokens=32, num_layers=1) == 24576


def _deep_tiny(num_layers: int = 9):
    """tiny's widths with more layers (1 dense + MoE layers), for pipelines of up to 8 stages."""
    return dataclasses.replace(PRESETS["tiny"], num_layers=num_layers)


def test_pipeline_stages_hold_their_layers_and_worst_rank_decides():
    """pp is runnable: each stage's shards are its layers' (the embedding on the first, the head
    on the last), at a fixed stage size per-rank state shrinks ~1/pp, 1F1B's first stage holds
    min(pp, microbatches) micro-batches, the step pays the bubble and the point-to-point bytes."""
    config = _deep_tiny()
    info = _info(config)
    probes = ProbeSet(base=_probe(1, 1), split=_probe(2, 2))
    hw = hardware("cpu")
    one = estimate(info, probes, hw, Candidate(world=2), global_batch=8, seq_len=64)
    params = {1: one.params}
    for pp in (2, 4, 8):
        c = Candidate(world=2 * pp, pp=pp, microbatches=2 * pp)
        assert c.runnable
        e = estimate(info, probes, hw, c, global_batch=8 * pp, seq_len=64)
        assert e.fits, e.why_not
        stages = e.stages
        assert len(stages) == pp and sum(s["dense_layers"] + s["moe_layers"] for s in stages) == 9
        assert stages[0]["embedding"] and stages[-1]["head"]
        assert sum(s["params"] for s in stages) == one.params  # every shard on exactly one stage
        params[pp] = e.params
        assert e.params <= one.params * (-(-9 // pp) + 1) / 9  # its layers (at most ceil(9/pp)), embedding, head
        # 1F1B: pipeline rank r holds pp - r micro-batches; equal layers -> rank 0 holds the most
        acts = [s["activations"] for s in stages]
        assert acts[0] == max(acts)
        mb_tokens = e.tokens_per_rank // (2 * pp)
        layers0 = stages[0]["dense_layers"] + stages[0]["moe_layers"]
        assert acts[0] == pytest.approx(pp * mb_tokens * layers0 * 1000 / 64)  # the probe: 1000 B per 64 tokens
        assert e.bubble_s == pytest.approx(e.compute_s * (pp - 1) / (2 * pp))
        # each micro-batch's activation [rows/M, S, D] forward and its gradient back
        assert e.comm_by_axis["pp"] == 2 * e.tokens_per_rank * config.dim * 4
    assert params[1] > params[2] > params[4] > params[8]
    gpipe = estimate(info, probes, hw, Candidate(world=4, pp=2, microbatches=4, schedule="gpipe"),
                     global_batch=16, seq_len=64)
    f1b = estimate(info, probes, hw, Candidate(world=4, pp=2, microbatches=4), global_batch=16, seq_len=64)
    assert gpipe.activations == pytest.approx(2 * f1b.activations)  # every micro-batch in flight vs pp of them


def test_runtime_restrictions_on_pipelines_are_never_produced(monkeypatch):
    """1F1B needs microbatches >= pp dividing the rows of a pipeline; mopc refuses optimizer
    offload with pp; stages <= layers: such layouts are invalid, and the search makes none."""
    from mopc.planner import search

    info = _info(_deep_tiny(5))
    probes = ProbeSet(base=_probe(1, 1), split=_probe(2, 2))
    hw = hardware("cpu")
    for bad in (Candidate(world=4, pp=2, microbatches=1), Candidate(world=4, pp=2, microbatches=2,
                                                                     offload_optimizer=True)):
        assert bad.invalid and not bad.runnable
        e = estimate(info, probes, hw, bad, global_batch=8, seq_len=64)
        assert not e.fits and bad.invalid[0] in e.why_not
    e = estimate(info, probes, hw, Candidate(world=8, pp=8, microbatches=8), global_batch=64, seq_len=64)
    assert not e.fits and "stages" in e.why_not
    e = estimate(info, probes, hw, Candidate(world=4, pp=2, microbatches=4), global_batch=4, seq_len=64)
    assert not e.fits and "micro-batches" in e.why_not  # 2 rows per pipeline

    monkeypatch.setattr(search, "probes_for", lambda config, tp, ep, vp=True: probes)
    monkeypatch.setattr(search, "model_info", lambda config, p: _info(config))
    for gb in (None, 32):
        result = search.plan(_deep_tiny(5), gpus=16, gpu="h100", seq_len=64, global_batch=gb)
        piped = [e for e in result.candidates if e.candidate.pp > 1]
        assert {e.candidate.pp for e in piped} == {2, 4}  # 8 > 5 layers
        assert {e.candidate.recompute for e in piped} == {"min_cut", "full"}
        for e in piped:
            c = e.candidate
            assert not c.invalid and c.microbatches >= c.pp and not c.offload_optimizer and c.runnable
        assert any(e.candidate.runnable and e.fits for e in piped)
