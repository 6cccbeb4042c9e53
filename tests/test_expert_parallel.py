"""Expert parallelism: the route plan, the graphs the rewrite produces, and bad options.

Numerics on real gloo ranks are in test_parallelize_mp.py; here everything runs in one
process (the plan is pure integer logic, graphs use the fake process group).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mopc
from mopc.config import MoPConfigError
from mopc.models import PRESETS, MoETransformer, build_model, make_init_fn
from mopc.runtime.experts import route_plan
from mopc.runtime.trainer import synthetic_batch

PER_RANK, SEQ = 2, 16


def _local(world: int, rank: int) -> dict[str, torch.Tensor]:
    batch = synthetic_batch(0, world * PER_RANK, SEQ, 128)
    return {k: v[rank * PER_RANK:(rank + 1) * PER_RANK] for k, v in batch.items()}


# ------------------------------------------------------------------------ the route plan


@st.composite
def _routing(draw):
    ep = draw(st.sampled_from([1, 2, 4]))
    experts = ep * draw(st.integers(1, 3))
    skewed = draw(st.booleans())
    hi = draw(st.integers(0, 40))
    counts = [[draw(st.integers(0, hi)) if (not skewed or e < 2) else 0 for e in range(experts)] for _ in range(ep)]
    capacity = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0]))
    spill = draw(st.sampled_from([0.0, 1.0, 1.25, 2.0]))
    slots = draw(st.integers(1, 3))
    return tuple(map(tuple, counts)), capacity, spill, slots


@settings(max_examples=150, deadline=None)
@given(_routing())
def test_route_plan_sends_every_row_once_and_respects_drops_and_spills(routing):
    counts, capacity, spill, slots = routing
    plan = route_plan(counts, capacity, spill, slots)
    ep, experts = len(counts), len(counts[0])
    e_loc = experts // ep
    totals = [sum(c[e] for c in counts) for e in range(experts)]
    # every source row of every expert is covered exactly once, in order
    for s in range(ep):
        for e in range(experts):
            assert sum(rows for _, _, rows in plan.segments[s][e]) == counts[s][e]
    # drops: only beyond the capacity, in (source, row) order
    cap = math.ceil(capacity * sum(totals) / experts) if capacity else None
    kept = [min(t, cap) if cap is not None else t for t in totals]
    assert plan.dropped == sum(totals) - sum(kept)
    for e in range(experts):
        seen = 0
        for s in range(ep):
            for dst, _, rows in plan.segments[s][e]:
                assert (dst < 0) == (seen >= kept[e]), "dropped rows are the last ones"
                seen += rows
    # what each rank computes: its own experts' rows plus borrowed ones, in its slots
    for q in range(ep):
        received = plan.recv_slots(q)
        assert sum(rows for _, rows in received) == plan.rows_per_rank[q]
        for slot, _ in received:
            assert 0 <= slot < plan.num_slots
            if slot >= e_loc:
                lent = plan.lent[q][slot - e_loc]
                assert lent >= 0 and lent // e_loc != q, "a rank borrows only other ranks' experts"
    assert sum(plan.rows_per_rank) == sum(kept)
    if spill:
        bound = math.ceil(spill * sum(kept) / ep)
        for q in range(ep):  # a rank ends at or under the bound unless nobody could take more
            if plan.rows_per_rank[q] > bound:
                assert plan.rows_per_rank[q] <= plan.owner_rows_per_rank[q]
                others = [r for r in range(ep) if r != q]
                assert all(-1 not in plan.lent[r] or plan.rows_per_rank[r] >= bound for r in others)
    else:
        assert plan.rows_per_rank == plan.owner_rows_per_rank and plan.num_slots == e_loc


def test_spilling_balances_all_rows_on_one_rank():
    counts = ((40, 24, 0, 0, 0, 0, 0, 0),) * 4  # every row to experts 0 and 1, owned by rank 0
    plain = route_plan(counts, 0.0, 0.0, 1)
    assert plain.rows_per_rank == (256, 0, 0, 0)
    spilled = route_plan(counts, 0.0, 1.0, 1)
    assert spilled.rows_per_rank == (64, 64, 64, 64)
    assert spilled.stats()["imbalance"] == 1.0 and spilled.stats()["imbalance_without_spill"] == 4.0
    assert sorted(e for lent in spilled.lent for e in lent if e >= 0) == [0, 0, 1]


# ------------------------------------------------------------------------ graphs


def _compile(tmp_path, world: int, rank: int, **options):
    model = build_model("tiny", device="meta", seed=0)
    model = mopc.parallelize(model, _local(world, rank), init_fn=make_init_fn(model, 0), **options)
    step = torch.compile(model, backend="mop", options={"dump_dir": str(tmp_path)})
    step(**_local(world, rank)).backward()  # the fake group moves no data: shapes only
    graphs = [d for d in tmp_path.iterdir() if d.is_dir()]
    assert len(graphs) == 1
    index = {e["pass"]: e for e in json.loads((graphs[0] / "index.json").read_text())}
    return index["forward"], index["backward"], model.mopc_plan, graphs[0]


def test_expert_parallel_graph_at_world_64(tmp_path, fake_world_factory):
    world = fake_world_factory(64, 5)
    fwd, bwd, plan, folder = _compile(tmp_path, world, 5, ep=8, tp=2)
    experts = {f: lay for f, lay in plan.layouts.items() if lay.kind == "ep"}
    assert len(experts) == 6 and all(lay.num_chunks == 8 for lay in experts.values())
    ep_fwd = [c for c in fwd["collectives"] if c["created_by"] == "expert_parallel"]
    # per MoE layer: counts all-gathered over the ep group, tokens there and back by all-to-all
    assert [c["kind"] for c in ep_fwd] == ["all_gather", "all_to_all", "all_to_all"] * 2
    assert all(c["group_size"] == 8 for c in ep_fwd)
    tokens = PER_RANK * SEQ * 2  # top_k = 2 rows per token
    assert {c["numel_in"] for c in ep_fwd if c["kind"] == "all_to_all"} == {tokens * 64}
    # expert weights: only this rank's 1/8 gathered over the 8 ranks holding the same experts
    local = sum(8 * lay.piece_numel for lay in experts.values())
    expert_gathers = [c for c in fwd["collectives"] if c["kind"] == "all_gather" and c["role"] == "expert"]
    assert sum(c["numel_out"] for c in expert_gathers) == local
    assert all(c["group_size"] == 8 for c in expert_gathers)
    assert not [c for c in fwd["collectives"] + bwd["collectives"]
                if c["role"] == "expert" and c["group_size"] == 64], "no expert weight crosses the world"
    # backward: the incoming gradient dispatched, the input gradient combined, local grads reduced over edp
    ep_bwd = [c for c in bwd["collectives"] if c["created_by"] == "expert_parallel"]
    assert sorted(c["kind"] for c in ep_bwd) == ["all_to_all"] * 4
    assert sum(c["numel_in"] for c in bwd["collectives"]
               if c["kind"] == "reduce_scatter" and c["role"] == "expert") == local
    text = (folder / "04_expert_parallel.txt").read_text() if (folder / "04_expert_parallel.txt").exists() else \
        next(folder.glob("*_expert_parallel.txt")).read_text()
    assert "mopc.ep_dispatch" in text and "mopc.ep_combine" in text
    assert "mopc.grouped_mm(%ep_dispatch" in text.replace("_default", "")


def test_spilling_adds_borrowed_expert_slots_to_the_graph(tmp_path, fake_world_factory):
    world = fake_world_factory(8, 0)
    _, _, _, folder = _compile(tmp_path, world, 0, ep=4, expert_spill_factor=1.25, expert_spill_slots=2)
    text = next(folder.glob("*_forward.txt")).read_text()
    assert text.count("mopc.ep_lend_weights") == 6  # w1, w2, w3 of both MoE layers
    assert "f32[4, 64, 32] = mopc.ep_lend_weights" in text  # 2 own + 2 borrowed experts
    backward = next(folder.glob("*_backward.txt")).read_text()
    assert backward.count("mopc.ep_return_grads") == 6


# ------------------------------------------------------------------------ bad options


def _dense_tiny():
    with torch.device("meta"):
        return MoETransformer(dataclasses.replace(PRESETS["tiny"], num_dense_layers=3))


@pytest.mark.parametrize(
    ("world", "options", "message"),
    [
        (8, {"ep": 3}, r"ep=3 does not divide the world size 8; choose ep from \[1, 2, 4, 8\]"),
        (6, {"ep": 6, "vocab_parallel": False},
         r"ep=6 does not divide the model's number of experts \(8\); choose ep from \[1, 2\]"),
        (8, {"capacity_factor": 0.0}, r"capacity_factor=0.0 must be positive"),
        (8, {"expert_spill_factor": 0.5}, r"expert_spill_factor=0.5 must be >= 1"),
        (8, {"expert_spill_slots": 0}, r"expert_spill_slots=0 must be a positive integer"),
        (8, {"expert_bias_update_rate": 1e-3}, r"expert_bias_update_rate=0.001 .* but ep=1; pass ep > 1"),
        (8, {"ep": 2, "expert_bias_update_rate": -1.0}, r"expert_bias_update_rate=-1.0 must be >= 0"),
        (8, {"ep": 2, "capacity_factor": float("inf")}, r"capacity_factor=inf must be a finite number"),
        (8, {"expert_spill_factor": 1.25}, r"expert_spill_factor=1.25 act on the expert-parallel dispatch, but "
                                           r"ep=1; pass ep > 1"),
    ],
)
def test_bad_expert_options_fail_before_anything_is_allocated(fake_world_factory, world, options, message):
    fake_world_factory(world, 0)
    model = build_model("tiny", device="meta", seed=0)
    with pytest.raises(MoPConfigError, match=message):
        mopc.parallelize(model, _local(world, 0), init_fn=make_init_fn(model, 0), **options)
    assert all(p.is_meta for p in model.parameters()), "nothing allocated"


def test_ep_on_a_model_without_experts_is_refused(fake_world_factory):
    fake_world_factory(8, 0)
    model = _dense_tiny()
    with pytest.raises(MoPConfigError, match=r"ep=2 needs routed experts .* found none .* pass ep=1"):
        mopc.parallelize(model, _local(8, 0), init_fn=make_init_fn(model, 0), ep=2)
    assert all(p.is_meta for p in model.parameters())


def test_bias_update_needs_a_correction_bias(fake_world_factory):
    fake_world_factory(8, 0)
    with torch.device("meta"):
        model = MoETransformer(dataclasses.replace(PRESETS["tiny"], router_bias=False))
    with pytest.raises(MoPConfigError, match=r"needs router correction-bias buffers .*\(MoEModelConfig.router_bias=True\) or pass"):
        mopc.parallelize(model, _local(8, 0), init_fn=make_init_fn(model, 0), ep=2, expert_bias_update_rate=1e-3)
    assert all(p.is_meta for p in model.parameters())


# ------------------------------------------------------------------------ fused dispatch (codegen)


@pytest.mark.parametrize("mode", ["on", "auto"])
def test_fuse_dispatch_replaces_the_permutation_ops_and_keeps_the_numbers(tmp_path, mode):
    batch = synthetic_batch(0, 2, SEQ, 128)
    ref = build_model("tiny", seed=0)
    ref(**batch).backward()
    model = build_model("tiny", seed=0)
    step = torch.compile(model, backend="mop", fullgraph=True,
                         options={"fuse_dispatch": mode, "dump_dir": str(tmp_path)})
    loss = step(**batch)
    loss.backward()
    assert loss.item() == ref(**batch).item()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad), name  # same order of every sum on this model: bitwise
    forward = next(tmp_path.glob("*/*_forward.txt")).read_text()
    backward = next(tmp_path.glob("*/*_backward.txt")).read_text()
    if mode == "auto":  # CPU graphs keep the traced ops (the fused ops pay off with Triton on CUDA)
        assert "moe_dispatch_indices" not in forward and "aten.sort(" in forward
        return
    assert forward.count("= mopc.moe_dispatch_indices(") == 2 and "aten.sort(" not in forward
    assert forward.count("= mopc.moe_gather_rows(") == 2 and forward.count("= mopc.moe_combine_rows(") == 2
    assert backward.count("= mopc.moe_gather_rows(") == 2  # the routed gradient, gate-scaled
    assert backward.count("= mopc.moe_combine_rows(") == 2  # the token gradient
    assert backward.count("= mopc.moe_rows_dot_tokens(") == 2  # the routing-weight gradient
    assert "aten.index_put(" not in backward


# ------------------------------------------------------------------------ the ops on one rank


def test_capacity_drops_the_last_rows_of_an_overloaded_expert():
    """On a one-rank group the exchange is local: dispatch then combine returns the rows,
    except those beyond an expert's capacity (in row order), which come back as zeros."""
    import torch.distributed as dist

    from mopc.plan.mesh import ensure_process_group

    ensure_process_group()
    group = dist.group.WORLD.group_name
    counts = torch.tensor([6, 1, 0, 1])  # 8 rows, 4 experts: capacity 1.0 -> 2 rows per expert
    x = torch.arange(8 * 3, dtype=torch.float32).view(8, 3)
    counts_all = counts.view(1, -1)
    for factor, kept in ((0.0, 8), (1.0, 2), (2.0, 4)):
        x_loc = torch.ops.mopc.ep_dispatch(x, counts, counts_all, group, factor, 0.0, 1, -1)
        offsets = torch.ops.mopc.ep_local_offsets(counts, counts_all, group, factor, 0.0, 1)
        back = torch.ops.mopc.ep_combine(x_loc, counts, counts_all, group, factor, 0.0, 1, 8)
        expert0 = min(kept, 6)
        assert x_loc.shape[0] == expert0 + 2 and offsets.tolist() == [expert0, expert0 + 1, expert0 + 1, expert0 + 2]
        expected = x.clone()
        expected[expert0:6] = 0  # expert 0's rows beyond its capacity
        assert torch.equal(back, expected), factor
    assert mopc.expert_load_stats() is not None
