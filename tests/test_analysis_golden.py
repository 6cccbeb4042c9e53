"""Golden tests of the role analysis on small hand-built graphs (refresh: EXPECTTEST_ACCEPT=1)."""

import expecttest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mopc.analysis import analyze
from mopc.passes.dump import op_name


class _TinyMoE(nn.Module):
    """One block: RMS-normed input, a softmax top-2 router, experts as a 3-D weight."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.norm_w = nn.Parameter(torch.ones(8))
        self.gate = nn.Linear(8, 4, bias=False)
        self.w_in = nn.Parameter(torch.randn(4, 8, 8) * 0.1)
        self.head = nn.Linear(8, 16, bias=False)

    def forward(self, ids, labels):
        x = self.emb(ids).flatten(0, 1)
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_w
        weights, idx = torch.topk(self.gate(h).softmax(-1), 2)
        rows = h[idx.flatten() // 1 // 2 * 0 + torch.arange(h.shape[0]).repeat_interleave(2)]
        y = torch.bmm(rows.unsqueeze(1), self.w_in[idx.flatten()]).squeeze(1)
        out = (y.view(-1, 2, 8) * weights.unsqueeze(-1)).sum(1)
        return F.cross_entropy(self.head(x + out), labels.flatten())


def _analyze_tiny_moe():
    torch.manual_seed(0)
    model = _TinyMoE()
    ids = torch.randint(0, 16, (2, 3))
    return analyze(model, (ids, ids))


def _forward_listing(analysis):
    """`name: op -> role` for the forward nodes, in graph order."""
    fwd = analysis.roles.forward_nodes
    lines = []
    for node in analysis.graph.graph.nodes:
        if node.name in fwd and node.op == "call_function":
            lines.append(f"{node.name}: {op_name(node)} -> {analysis.roles.node_roles[node.name]}")
    return "\n".join(lines)


class TestGolden(expecttest.TestCase):
    def test_tiny_moe_param_roles(self):
        analysis = _analyze_tiny_moe()
        self.assertExpectedInline(
            "\n".join(f"{k}: {v} ({analysis.roles.evidence[k]})" for k, v in analysis.param_roles.items()),
            """\
norm_w: norm (structure: scales an rsqrt-normalised tensor)
w_in: expert (structure: 3-D weight in a batched or grouped matmul)
emb.weight: embedding (structure: aten.embedding weight)
gate.weight: router (structure: matmul scored by a routing topk)
head.weight: vocab_projection (structure: matmul feeding the loss)""",
        )

    def test_tiny_moe_node_roles(self):
        self.assertExpectedInline(_forward_listing(_analyze_tiny_moe()), """\
embedding: aten.embedding -> embedding
view: aten.view -> embedding
pow_1: aten.pow -> norm
mean: aten.mean -> norm
add: aten.add -> norm
rsqrt: aten.rsqrt -> norm
detach: aten.detach -> norm
mul: aten.mul -> norm
mul_1: aten.mul -> norm
t: aten.t -> router
mm: aten.mm -> router
_softmax: aten._softmax -> router
detach_1: aten.detach -> router
topk: aten.topk -> router
getitem: getitem -> router
getitem_1: getitem -> dispatch
view_1: aten.view -> dispatch
floor_divide: aten.floor_divide -> dispatch
floor_divide_1: aten.floor_divide -> dispatch
mul_2: aten.mul -> dispatch
arange: aten.arange -> dispatch
unsqueeze: aten.unsqueeze -> dispatch
expand: aten.expand -> dispatch
clone: aten.clone -> dispatch
view_2: aten.view -> dispatch
add_1: aten.add -> dispatch
index: aten.index -> dispatch
unsqueeze_1: aten.unsqueeze -> dispatch
view_3: aten.view -> dispatch
index_1: aten.index -> expert
bmm: aten.bmm -> expert
squeeze: aten.squeeze -> combine
view_4: aten.view -> combine
unsqueeze_2: aten.unsqueeze -> router
mul_3: aten.mul -> combine
sum_1: aten.sum -> combine
add_2: aten.add -> embedding
t_1: aten.t -> vocab_projection
mm_1: aten.mm -> vocab_projection
view_5: aten.view -> loss
_log_softmax: aten._log_softmax -> loss
detach_2: aten.detach -> loss
nll_loss_forward: aten.nll_loss_forward -> loss
getitem_2: getitem -> loss
getitem_3: getitem -> loss
ones_like: aten.ones_like -> loss""")


def test_expert_flops_count_grouped_matmuls_forward_and_backward():
    from mopc.models.presets import build_model

    model = build_model("tiny", seed=0)
    cfg = model.config
    batch, seq = 2, 16
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    analysis = analyze(model, {"input_ids": ids, "labels": ids})
    expert_flops = sum(analysis.costs.flops[n] for n, r in analysis.roles.node_roles.items()
                       if r == "expert" and analysis.roles.node_layers[n] == 1)
    routed_rows = batch * seq * cfg.top_k
    per_matmul = 2 * routed_rows * cfg.dim * cfg.moe_inter_dim
    # w1, w3, w2: one forward matmul, one input-gradient and one weight-gradient matmul each
    assert expert_flops == 3 * 3 * per_matmul


def test_analyze_under_no_grad_and_clear_error_when_frozen():
    import pytest

    from mopc.models.presets import build_model

    model = build_model("tiny", seed=0)
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        analysis = analyze(model, (ids, ids))
    assert analysis.param_roles["output.weight"] == "vocab_projection"
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        analyze(model, (ids, ids))


def test_analyze_reraises_user_errors_instead_of_running_for_real():
    import pytest

    model = nn.Linear(4, 2)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied|size mismatch|mat1 and mat2"):
        analyze(model, (torch.randn(3, 5),))
