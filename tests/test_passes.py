"""Pass infrastructure: registry, build-time ordering checks, dumps with diffs, verifier."""

import json

import pytest
import torch
import torch.nn as nn

from mopc import MoPConfig, MoPConfigError
from mopc.analysis import trace_step
from mopc.passes.dump import op_counts
from mopc.passes.pipeline import PassContext, build_pipeline
from mopc.passes.registry import register_pass, unregister_pass
from mopc.passes.verify import GraphInvariantError

aten = torch.ops.aten


@pytest.fixture
def toy_pass():
    """A real rewrite registered for the test: relu(x) -> clamp_min(x, 0)."""

    @register_pass(kind="rewrite", requires=("annotate_roles",), order=10_000)
    def relu_to_clamp(gm, ctx):
        """Replace relu by clamp_min(x, 0).

        Algorithm: for every aten.relu node insert clamp_min on its input, move users.
        """
        for node in list(gm.graph.nodes):
            if node.target is aten.relu.default:
                with gm.graph.inserting_after(node):
                    new = gm.graph.call_function(aten.clamp_min.default, (node.args[0], 0.0))
                new.meta.update({k: v for k, v in node.meta.items() if k != "mopc_created_by"})
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
        return gm

    yield "relu_to_clamp"
    unregister_pass("relu_to_clamp")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _ctx(traced, config):
    return PassContext(config=config, example_inputs=(), param_fqns=traced.param_fqns,
                       trainable=traced.trainable, num_fwd_outputs=1)


def test_default_pipeline_is_flat_and_ordered():
    pipeline = build_pipeline(MoPConfig())
    assert pipeline.names == ["classify_roles", "count_costs", "annotate_roles", "vocab_parallel_loss",
                              "gather_params"]
    with_tp = build_pipeline(MoPConfig(tp=2, vocab_parallel=False))
    assert with_tp.names == ["classify_roles", "count_costs", "annotate_roles", "tensor_parallel", "gather_params"]


def test_requirement_checked_when_built(toy_pass):
    with pytest.raises(MoPConfigError, match="'\\w+' requires pass 'annotate_roles', but it is disabled"):
        build_pipeline(MoPConfig(disable_passes=("annotate_roles",)))


def test_unknown_disabled_pass_is_an_error():
    with pytest.raises(MoPConfigError, match="unknown pass.*'no_such_pass'.*known passes: annotate_roles"):
        build_pipeline(MoPConfig(disable_passes=("no_such_pass",)))


def test_rewrite_is_dumped_with_op_diff_and_creator(toy_pass, tmp_path):
    model = _mlp()
    traced = trace_step(model, (torch.randn(3, 4),))
    config = MoPConfig(dump_dir=str(tmp_path), debug=True)
    pipeline = build_pipeline(config)
    assert pipeline.names[-1] == "relu_to_clamp"
    ctx = _ctx(traced, config)
    gm = pipeline.run(traced.gm, ctx, pipeline.make_writer(ctx))
    assert op_counts(gm)["aten.clamp_min"] == 1 and op_counts(gm)["aten.relu"] == 0
    created = [n for n in gm.graph.nodes if n.meta.get("mopc_created_by") == "relu_to_clamp"]
    assert [n.target for n in created] == [aten.clamp_min.default]
    index = json.loads((tmp_path / "graph" / "index.json").read_text())
    last = index[-1]
    assert last["pass"] == "relu_to_clamp" and last["op_count_diff"] == {"aten.clamp_min": 1, "aten.relu": -1}
    text = (tmp_path / "graph" / last["file"]).read_text()
    assert "# op-count diff: +1 aten.clamp_min, -1 aten.relu" in text
    assert "by=relu_to_clamp" in text
    # the rewritten graph still computes the same loss and gradients as eager
    x = torch.randn(3, 4)
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    loss, grads = gm(state, (x,), {})
    want = model(x).mean()
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    torch.testing.assert_close(loss, want)
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("breakage", ["inplace", "collective_without_wait", "no_val"])
def test_verifier_names_the_pass_that_broke_an_invariant(breakage):
    import torch.distributed as dist

    @register_pass(kind="rewrite", requires=("annotate_roles",), order=10_001)
    def break_graph(gm, ctx):
        """Deliberately break one invariant (test only).

        Algorithm: insert one offending node after the first mm.
        """
        mm = next(n for n in gm.graph.nodes if n.target is aten.mm.default)
        with gm.graph.inserting_after(mm):
            if breakage == "inplace":
                bad = gm.graph.call_function(aten.add_.Tensor, (mm, mm))
                bad.meta["val"] = mm.meta["val"]
            elif breakage == "collective_without_wait":
                bad = gm.graph.call_function(torch.ops._c10d_functional.all_reduce.default, (mm, "sum", "0"))
                bad.meta["val"] = mm.meta["val"]
                with gm.graph.inserting_after(bad):
                    user = gm.graph.call_function(aten.neg.default, (bad,))
                user.meta["val"] = mm.meta["val"]
                gm.graph.output_node().args = ((*gm.graph.output_node().args[0], user),)
            else:
                bad = gm.graph.call_function(aten.neg.default, (mm,))
                gm.graph.output_node().args = ((*gm.graph.output_node().args[0], bad),)
        for n in gm.graph.nodes:
            n.meta.setdefault("mopc_role", "other")
        return gm

    try:
        traced = trace_step(_mlp(), (torch.randn(3, 4),))
        pipeline = build_pipeline(MoPConfig(debug=True))
        expected = {"inplace": "in-place op on an intermediate", "collective_without_wait": "wait_tensor",
                    "no_val": "no meta\\['val'\\]"}[breakage]
        with pytest.raises(GraphInvariantError, match=f"after pass 'break_graph': .*{expected}"):
            pipeline.run(traced.gm, _ctx(traced, MoPConfig(debug=True)))
    finally:
        unregister_pass("break_graph")
        assert not dist.is_initialized()
