"""Pipeline parallelism, compiler side: stage balancing, the split pass, the options' errors,
and the stage graphs of a pp x tp x ep layout on a fake world (real ranks:
tests/test_pipeline_mp.py; the schedules: tests/test_pipeline_schedule.py)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mopc
from mopc.config import MoPConfig, MoPConfigError
from mopc.models import build_model, make_init_fn
from mopc.models.moe_transformer import init_weights
from mopc.passes.rewrite.pipeline_split import node_layer, split_stages
from mopc.plan.mesh import MeshSpec
from mopc.plan.stages import balance, make_stage_plan
from mopc.runtime.trainer import synthetic_batch


def _brute_force(costs: list[int], stages: int, head: int, tail: int) -> int:
    best = None
    for cuts in itertools.combinations(range(1, len(costs)), stages - 1):
        bounds = (0, *cuts, len(costs))
        worst = max(sum(costs[bounds[s]:bounds[s + 1]]) + (head if s == 0 else 0) + (tail if s == stages - 1 else 0)
                    for s in range(stages))
        best = worst if best is None else min(best, worst)
    return best


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=2, max_size=9), st.integers(2, 4), st.integers(0, 60),
       st.integers(0, 60))
def test_balance_minimises_the_most_expensive_stage(costs, stages, head, tail):
    stages = min(stages, len(costs))
    firsts = balance(costs, stages, head=head, tail=tail)
    assert firsts[0] == 0 and list(firsts) == sorted(set(firsts)) and len(firsts) == stages
    bounds = (*firsts, len(costs))
    worst = max(sum(costs[bounds[s]:bounds[s + 1]]) + (head if s == 0 else 0) + (tail if s == stages - 1 else 0)
                for s in range(stages))
    assert worst == _brute_force(costs, stages, head, tail)


def test_a_heavy_head_moves_layers_to_the_first_stage():
    # 8 equal layers, the vocabulary projection and loss as expensive as 4 of them
    plan = make_stage_plan(MoPConfig(pp=2), 8, [10] * 8, head_cost=0, tail_cost=40)
    assert plan.first_layer == (0, 6) and plan.cost_s == (60, 60)
    assert "stage 1: layers 6-7, head, loss (~6e+04 ms)" in plan.describe()
    given = make_stage_plan(MoPConfig(pp=2, pp_split=(3,)), 8)
    assert list(given.layers_of(0)) == [0, 1, 2] and given.stage_of_layer(3) == 1


@pytest.mark.parametrize(("options", "message"), [
    ({"pp": 2, "microbatches": 1}, r"microbatches=1 < pp=2: 1f1b needs at least pp micro-batches.*microbatches>=2"),
    ({"schedule": "gpipe"}, r"schedule='gpipe' act only with pipeline parallelism, but pp=1"),
    ({"pp": 2, "schedule": "interleaved_1f1b"}, r"needs pp_virtual >= 2"),
    ({"pp": 2, "pp_virtual": 2}, r"pp_virtual=2 .* acts only with schedule='interleaved_1f1b'"),
    ({"pp": 2, "schedule": "interleaved_1f1b", "pp_virtual": 2, "microbatches": 3}, r"multiple of pp=2.*microbatches=4"),
    ({"pp": 2, "pp_split": (3, 5)}, r"pp_split=\(3, 5\) must list .* 1 increasing layer indices"),
    ({"pp": 2, "schedule": "zigzag"}, r"schedule='zigzag' is not accepted"),
    ({"pp": 2, "optimizer_offload": True}, r"under pp=2 every micro-batch adds to the gradient; drop optimizer_off"),
])
def test_bad_pipeline_options_name_the_field_and_the_fix(options, message):
    with pytest.raises(MoPConfigError, match=message):
        MoPConfig(**options)


def test_the_roofline_weighs_the_head_apart_from_the_last_layer():
    """Layer costs from the analysis: every MoE layer of `small` costs the same, and the
    vocabulary projection and loss are the head's, not the last layer's."""
    import dataclasses

    from mopc.analysis import analyze
    from mopc.models import PRESETS
    from mopc.plan.stages import roofline_seconds
    from mopc.planner.hardware import hardware

    config = dataclasses.replace(PRESETS["small"], num_layers=4)
    model = build_model(config, device="meta", seed=0)
    batch = {k: v.to("meta") for k, v in synthetic_batch(0, 1, 64, config.vocab_size).items()}
    seconds = roofline_seconds(analyze(model, batch), hardware("cpu"))
    assert set(seconds) == {"embedding", "head", "layer 0", "layer 1", "layer 2", "layer 3"}
    moe = [seconds[f"layer {i}"] for i in (1, 2, 3)]  # layer 0 is dense in `small`
    assert max(moe) <= 1.02 * min(moe), seconds
    assert seconds["head"] > 0.3 * moe[0] and seconds["layer 0"] < moe[0], seconds


def test_pp_must_divide_the_world_and_the_stage_must_hold_the_other_axes():
    with pytest.raises(MoPConfigError, match=r"pp=3 does not divide the world size 8; choose pp from \[1, 2, 4, 8\]"):
        MeshSpec.from_config(MoPConfig(pp=3), 8)
    with pytest.raises(MoPConfigError, match=r"tp=4 does not divide the world size 8 / pp=4 = 2"):
        MeshSpec.from_config(MoPConfig(pp=4, tp=4), 8)
    spec = MeshSpec.from_config(MoPConfig(pp=2, tp=2, ep=2), 8)
    assert (spec.world_size, spec.dp, spec.tp, spec.pp, spec.total_ranks) == (4, 2, 2, 2, 8)
    assert [spec.pipeline_rank(r) for r in range(8)] == [0] * 4 + [1] * 4
    assert [spec.stage_rank(r) for r in range(8)] == [0, 1, 2, 3] * 2


def test_more_stages_than_layers_or_a_cut_past_the_last_layer_is_refused():
    with pytest.raises(MoPConfigError, match=r"asks for 4 pipeline stages, but the model has 3 layers"):
        make_stage_plan(MoPConfig(pp=4), 3)
    with pytest.raises(MoPConfigError, match=r"asks for 4 pipeline stages.*pass pp <= 1"):
        make_stage_plan(MoPConfig(pp=2, pp_virtual=2, schedule="interleaved_1f1b"), 3)
    with pytest.raises(MoPConfigError, match=r"names layer 3, but the model has layers 0-2"):
        make_stage_plan(MoPConfig(pp=2, pp_split=(3,)), 3)


def _dynamo_graph(model, *args):
    graphs = []

    def capture(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    loss = torch.compile(model, backend=capture)(*args)
    assert len(graphs) == 1
    return graphs[0][0], graphs[0][1], loss


@pytest.mark.parametrize("firsts", [(0, 2), (0, 1, 2)])
def test_split_stages_run_in_sequence_equal_the_whole_graph(firsts):
    model = build_model("tiny", device="cpu", seed=0)
    init_weights(model, 0)
    batch = synthetic_batch(0, 2, 16, model.config.vocab_size)
    gm, inputs, loss = _dynamo_graph(model, batch["input_ids"], batch["labels"])
    plan = make_stage_plan(MoPConfig(pp=len(firsts), pp_split=firsts[1:]), 3)
    stages = split_stages(gm, plan.stage_of_layer, plan.num_stages)
    received = ()
    for stage in stages:
        for node in stage.gm.graph.nodes:  # never inside a layer of another stage
            layer = node_layer(node)
            assert layer is None or plan.stage_of_layer(layer) == stage.index, (stage.index, node.name)
        if stage.index:  # only the hidden state [B, S, D] crosses a boundary
            assert [tuple(n.meta["example_value"].shape) for n in stage.received] == [(2, 16, 64)]
        received = stage.gm(*[inputs[i] for i in stage.inputs], *received)
    assert torch.equal(received[0], loss)
    # the rotary tables are computed on every stage (replicated), not sent
    assert all(any(n.target is torch.arange for n in s.gm.graph.nodes) for s in stages)


def test_pp_tp_ep_stage_graphs_on_a_fake_world_8(tmp_path, fake_world_factory):
    """World 8 = pp 2 x dp 2 x tp 2 with ep 2; rank 5 holds stage 1 (layer 2, head, loss)."""
    fake_world_factory(8, 5)
    per_rank, seq = 2, 16
    model = build_model("tiny", device="meta", seed=0)
    batch = synthetic_batch(0, per_rank, seq, 128)
    model = mopc.parallelize(model, batch, init_fn=make_init_fn(model, 0), pp=2, tp=2, ep=2, microbatches=2,
                             pp_split=(2,))
    held = {fqn for fqn, p in model.named_parameters() if not p._mopc_remote}
    assert held and all(f.startswith(("layers.2.", "norm.", "output.")) for f in held), sorted(held)
    for fqn, p in model.named_parameters():  # another stage's parameters take no memory here
        assert (p.to_local().numel() == 0) == (fqn not in held), fqn
    assert mopc.data_parallel_rank(model) == (1, 4)  # stage rank 1 of 4: the ranks of a pipeline read alike
    step = torch.compile(model, backend="mop", options={"dump_dir": str(tmp_path)})
    loss = step(**batch)  # the fake group moves no data: shapes only
    loss.backward()  # nothing left to do: the step ran forward and backward of both micro-batches
    stats = mopc.pipeline_stats()
    assert stats["stages"] == [1] and stats["max_in_flight"] == {"1": 1} and stats["actions"] == 4
    graphs = [d for d in tmp_path.iterdir() if d.is_dir()]
    assert len(graphs) == 1 and graphs[0].name.endswith("stage1"), graphs
    index = {e["pass"]: e for e in json.loads((graphs[0] / "index.json").read_text())}
    forward = "".join(p.read_text() for p in graphs[0].glob("*_forward.txt"))
    assert "by=tensor_parallel" in forward and "by=vocab_parallel_loss" in forward and "by=expert_parallel" in forward
    # one micro-batch: 1 sequence, the tp group's 2 sequences after the token gather
    assert forward.count("= aten._scaled_dot_product_flash_attention_for_cpu(") == 1
    kinds = {(c["kind"], c["group_size"]) for c in index["forward"]["collectives"]}
    assert ("all_to_all", 2) in kinds and ("all_gather", 2) in kinds, kinds
    assert all(size <= 4 for _, size in kinds), "every collective stays inside the stage's 4 ranks"


def test_eager_calls_and_tied_weights_are_refused(fake_world_factory):
    fake_world_factory(2, 0)
    model = build_model("tiny", device="meta", seed=0)
    batch = synthetic_batch(0, 2, 16, 128)
    model = mopc.parallelize(model, batch, init_fn=make_init_fn(model, 0), pp=2, microbatches=2)
    with pytest.raises(RuntimeError, match=r"parallelized with pp=2.*call torch.compile\(model, backend='mop'\)"):
        model(**batch)
    tied = build_model(mopc.models.PRESETS["tiny"].__class__(**{**mopc.models.PRESETS["tiny"].__dict__,
                                                                "tie_embeddings": True}), device="meta", seed=0)
    with pytest.raises(MoPConfigError, match=r"output.weight is the same tensor as tok_embeddings.weight"):
        mopc.parallelize(tied, batch, init_fn=make_init_fn(tied, 0), pp=2, microbatches=2)
    fresh = build_model("tiny", device="meta", seed=0)
    with pytest.raises(MoPConfigError, match=r"microbatches=4: this rank's batch holds 2 sequences"):
        mopc.parallelize(fresh, batch, init_fn=make_init_fn(fresh, 0), pp=2, microbatches=4)
    assert all(p.is_meta for p in fresh.parameters()), "nothing allocated"


def test_a_model_that_does_not_return_its_loss_is_refused_under_pp(fake_world_factory):
    fake_world_factory(2, 0)
    model = build_model("tiny", device="meta", seed=0)
    batch = synthetic_batch(0, 2, 16, 128)
    model = mopc.parallelize(model, batch, init_fn=make_init_fn(model, 0), pp=2, microbatches=2)
    step = torch.compile(model, backend="mop")
    with pytest.raises(Exception, match=r"returns \[\(1, 16, 128\)\].*must return one scalar loss"):
        step(batch["input_ids"])  # logits, no labels
