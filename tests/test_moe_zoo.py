"""Sanity tests for the MoE model zoo (tests/moe_zoo).

These check the zoo itself, not the role classifier: every case builds a small fp32 CPU model
that runs forward+backward, and ``expected_roles`` names exactly its parameters with allowed
roles.  The aot_eager compile checks take several seconds per case and are marked slow.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from moe_zoo import ROLES, ZOO, ZooCase  # noqa: E402

CASES = sorted(ZOO)
MAX_PARAMS = 2_000_000

# Parameters that are deliberately requires_grad=False (and so get no gradient).  Every other
# parameter of every case must receive a gradient from one forward/backward.
FROZEN: dict[str, set[str]] = {
    # DeepSeek-V3-style selection bias: added to the scores before topk only, updated outside autograd.
    "batched_einsum": {"blocks.1.ffn.router.bias", "blocks.2.ffn.router.bias"},
}

# Whether torch.compile(model, backend="aot_eager") on a freshly built model graph-breaks
# (torch 2.13, transformers 5.24; see each case's notes for the reasons).
GRAPH_BREAKS: dict[str, bool] = {
    "loop_linear": True,  # .tolist() + torch.where/nonzero + branch on counts
    "batched_einsum": False,
    "hf_mixtral": False,
    "hf_qwen2_moe": True,  # first call only: output_router_logits hook install under a Lock
    "hf_deepseek_v3": False,
    "hf_qwen3_moe": False,
    "hf_olmoe": True,  # experts_implementation="eager": nonzero loop
    "hf_gpt_oss": False,
}


def _build(name: str) -> ZooCase:
    if name.startswith("hf_"):
        pytest.importorskip("transformers")
    return ZOO[name]()


def test_zoo_has_required_cases():
    required = {"loop_linear", "batched_einsum", "hf_mixtral", "hf_qwen2_moe", "hf_deepseek_v3"}
    assert required <= set(ZOO)
    assert any(n in ZOO for n in ("hf_qwen3_moe", "hf_olmoe", "hf_gpt_oss"))
    assert set(GRAPH_BREAKS) == set(ZOO)


@pytest.mark.parametrize("name", CASES)
def test_case_shape(name):
    case = _build(name)
    assert case.name == name
    model = case.model
    assert isinstance(model, torch.nn.Module)
    assert model.training
    n_params = sum(p.numel() for p in model.parameters())
    assert 0 < n_params < MAX_PARAMS
    for pname, p in model.named_parameters():
        assert p.dtype == torch.float32, pname
        assert p.device.type == "cpu", pname
    assert case.example_inputs and all(
        isinstance(v, torch.Tensor) for v in case.example_inputs.values()
    )
    assert "labels" in case.example_inputs
    assert case.notes


@pytest.mark.parametrize("name", CASES)
def test_expected_roles_cover_exactly_the_parameters(name):
    case = _build(name)
    names = [n for n, _ in case.model.named_parameters()]
    assert len(names) == len(set(names))
    missing = set(names) - set(case.expected_roles)
    extra = set(case.expected_roles) - set(names)
    assert not missing, f"parameters without an expected role: {sorted(missing)}"
    assert not extra, f"expected roles for non-parameters: {sorted(extra)}"
    bad = {n: r for n, r in case.expected_roles.items() if r not in ROLES}
    assert not bad, bad
    # every case is an MoE: it has a router and routed experts
    roles = set(case.expected_roles.values())
    assert {"router", "expert", "embedding", "attention", "norm"} <= roles


@pytest.mark.parametrize("name", CASES)
def test_frozen_parameters_are_exactly_the_listed_ones(name):
    case = _build(name)
    frozen = {n for n, p in case.model.named_parameters() if not p.requires_grad}
    assert frozen == FROZEN.get(name, set())


@pytest.mark.parametrize("name", CASES)
def test_eager_forward_backward(name):
    case = _build(name)
    model = case.model
    loss = case.loss_fn(model(**case.example_inputs))
    assert isinstance(loss, torch.Tensor)
    assert loss.ndim == 0
    assert math.isfinite(loss.item())
    loss.backward()
    no_grad = {
        n for n, p in model.named_parameters() if p.requires_grad and p.grad is None
    }
    assert no_grad == set(case.params_without_grad), sorted(no_grad)
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), n
    # FROZEN parameters really get nothing
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n


@pytest.mark.parametrize("name", CASES)
def test_builds_deterministically(name):
    a, b = _build(name), _build(name)
    for (na, pa), (nb, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert na == nb
        assert torch.equal(pa, pb), na
    for k in a.example_inputs:
        assert torch.equal(a.example_inputs[k], b.example_inputs[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_aot_eager_compile_matches_eager(name):
    from torch._dynamo.backends.debugging import aot_eager

    ref = _build(name)
    ref_loss = ref.loss_fn(ref.model(**ref.example_inputs))
    ref_loss.backward()

    case = _build(name)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(case.model, backend=counting_backend)
    loss = case.loss_fn(compiled(**case.example_inputs))
    loss.backward()
    torch._dynamo.reset()

    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    grads = dict(case.model.named_parameters())
    for n, p in ref.model.named_parameters():
        if p.grad is None:
            assert grads[n].grad is None, n
        else:
            torch.testing.assert_close(grads[n].grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)
    assert (len(graphs) > 1) == GRAPH_BREAKS[name], f"{len(graphs)} graphs"
