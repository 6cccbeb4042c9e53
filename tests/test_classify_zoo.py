"""Role classification on independently written MoE implementations (tests/moe_zoo).

Every parameter of every case must get the role written by hand in the case; the styles
covered: per-expert nn.Linear loops with routing masks and `.tolist()` counts, batched
3-D expert weights with einsum/bmm and capacity, Hugging Face Mixtral, Qwen2-MoE
(shared expert and its gate), DeepSeek-V3 (sigmoid router with correction bias,
group-limited top-k, MLA), Qwen3-MoE (batched mm, tied embeddings), OLMoE (per-expert
loop that graph-breaks) and gpt-oss (expert biases, attention sinks).
"""

import pytest

from mopc.analysis import analyze
from tests.moe_zoo import ZOO


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_parameter_gets_its_role(name):
    case = ZOO[name]()
    analysis = analyze(case.model, case.example_inputs, case.loss_fn)
    wrong = {
        fqn: f"got {analysis.param_roles.get(fqn)} want {want} ({analysis.roles.evidence.get(fqn)})"
        for fqn, want in case.expected_roles.items()
        if analysis.param_roles.get(fqn) != want
    }
    assert not wrong, "\n".join(f"{k}: {v}" for k, v in wrong.items())
    assert set(analysis.param_roles) == set(case.expected_roles)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_moe_blocks_found_with_expert_counts(name):
    case = ZOO[name]()
    analysis = analyze(case.model, case.example_inputs, case.loss_fn)
    routed_layers = {fqn.split(".mlp.")[0].split(".ffn.")[0].split(".moe.")[0]
                     for fqn, role in case.expected_roles.items() if role == "router"}
    assert len(analysis.roles.moe_blocks) == len(routed_layers)
    for block in analysis.roles.moe_blocks:
        assert block.num_experts >= 2 and block.top_k >= 1
        assert block.expert_params, f"block at layer {block.layer} has no expert parameters"
