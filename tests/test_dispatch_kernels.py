"""MoE dispatch/combine ops (mopc/codegen/dispatch.py) and their Triton kernels.

Tiers:
  - the torch references against plain-torch formulations written independently here
    (loops, `argsort(stable=True)`, `index_add`), edge cases included;
  - autograd (`gradcheck` in fp64) and tracing (`torch.compile(fullgraph=True)`, `make_fx`);
  - `test_triton_interpret_*`: the Triton kernels under `TRITON_INTERPRET=1` in one
    subprocess (the interpreter is chosen when `@triton.jit` decorates, so it must be set
    before triton loads), compared with the references; skipped without triton.
    Select them with `-k triton_interpret`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from mopc.codegen import dispatch
from mopc.codegen.dispatch import (
    moe_combine_rows,
    moe_dispatch_indices,
    moe_gather_rows,
    moe_inverse_perm,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("MOPC_DISPATCH_KERNELS", "torch")


def make_ids(kind: str, num_tokens: int, top_k: int, num_experts: int, seed: int = 0) -> torch.Tensor:
    """Flat ids [T*k]; each token's k experts distinct unless k > E."""
    g = torch.Generator().manual_seed(seed)
    if kind == "one_expert":
        return torch.full((num_tokens * top_k,), num_experts - 1, dtype=torch.int64)
    if kind == "skewed":  # experts 0 and 2 get nothing
        pool = torch.tensor([e for e in range(num_experts) if e not in (0, 2)])
        return pool[torch.randint(0, len(pool), (num_tokens * top_k,), generator=g)]
    scores = torch.rand(num_tokens, num_experts, generator=g)
    if top_k <= num_experts:
        return scores.topk(top_k, dim=-1).indices.reshape(-1)
    return torch.randint(0, num_experts, (num_tokens * top_k,), generator=g)


def plain_dispatch(ids: torch.Tensor, num_experts: int, align: int):
    """Host loop over experts: each expert's slots in increasing order, then padding."""
    rows: list[int] = []
    counts, ends = [], []
    for e in range(num_experts):
        slots = (ids == e).nonzero().flatten().tolist()
        counts.append(len(slots))
        rows += slots + [-1] * (-len(slots) % align)
        ends.append(len(rows))
    rows += [-1] * (ids.numel() + num_experts * (align - 1) - len(rows))
    return torch.tensor(rows, dtype=torch.int64), torch.tensor(ends, dtype=torch.int32), torch.tensor(counts)


def plain_gather(x, perm, top_k, gate):
    out = torch.zeros(perm.numel(), x.shape[1], dtype=x.dtype)
    for i, s in enumerate(perm.tolist()):
        if s >= 0:
            out[i] = x[s // top_k] if gate is None else x[s // top_k] * gate[s]
    return out


def plain_combine(y, perm, weights, num_tokens, top_k):
    valid = perm >= 0
    slots = perm[valid]
    out = torch.zeros(num_tokens, y.shape[1], dtype=torch.float64)
    return out.index_add_(0, slots // top_k, y[valid].double() * weights[slots].double().unsqueeze(-1))


CASES = [  # (kind, T, k, E, align)
    ("random", 6, 2, 4, 1),
    ("random", 6, 2, 4, 4),
    ("random", 7, 1, 4, 1),
    ("random", 7, 1, 4, 4),
    ("random", 5, 3, 4, 4),
    ("random", 9, 3, 5, 1),
    ("one_expert", 6, 2, 4, 1),
    ("one_expert", 6, 2, 4, 4),
    ("skewed", 8, 2, 5, 4),
    ("skewed", 8, 3, 5, 1),
]
CASE_IDS = [f"{kind}-T{t}-k{k}-E{e}-a{a}" for kind, t, k, e, a in CASES]


# ---------------------------------------------------------------- dispatch indices


@pytest.mark.parametrize(("kind", "num_tokens", "top_k", "num_experts", "align"), CASES, ids=CASE_IDS)
def test_dispatch_indices_matches_plain_loop(kind, num_tokens, top_k, num_experts, align):
    ids = make_ids(kind, num_tokens, top_k, num_experts)
    perm, offsets, counts = moe_dispatch_indices(ids, num_experts, align)
    want_perm, want_offsets, want_counts = plain_dispatch(ids, num_experts, align)
    assert perm.dtype == torch.int64 and offsets.dtype == torch.int32 and counts.dtype == torch.int64
    assert torch.equal(perm, want_perm)
    assert torch.equal(offsets, want_offsets)
    assert torch.equal(counts, want_counts)
    assert sorted(perm[perm >= 0].tolist()) == list(range(ids.numel()))  # every slot exactly once
    if align == 1:
        assert torch.equal(perm, torch.argsort(ids, stable=True))


def test_dispatch_indices_no_tokens():
    perm, offsets, counts = moe_dispatch_indices(torch.zeros(0, dtype=torch.int64), 3, 4)
    assert perm.tolist() == [-1] * 9 and offsets.tolist() == [0, 0, 0] and counts.tolist() == [0, 0, 0]


def test_inverse_perm_inverts():
    ids = make_ids("skewed", 8, 2, 5)
    perm, _, _ = moe_dispatch_indices(ids, 5, 4)
    inv = moe_inverse_perm(perm, ids.numel())
    assert torch.equal(perm[inv], torch.arange(ids.numel()))


# ---------------------------------------------------------------- gather / combine forward


@pytest.mark.parametrize(("kind", "num_tokens", "top_k", "num_experts", "align"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("with_gate", [False, True], ids=["nogate", "gate"])
def test_gather_rows_matches_plain_loop(kind, num_tokens, top_k, num_experts, align, with_gate):
    ids = make_ids(kind, num_tokens, top_k, num_experts)
    perm, _, _ = moe_dispatch_indices(ids, num_experts, align)
    x = torch.randn(num_tokens, 8)
    gate = torch.rand(num_tokens * top_k) if with_gate else None
    assert torch.equal(moe_gather_rows(x, perm, top_k, gate), plain_gather(x, perm, top_k, gate))


@pytest.mark.parametrize(("kind", "num_tokens", "top_k", "num_experts", "align"), CASES, ids=CASE_IDS)
def test_combine_rows_matches_index_add(kind, num_tokens, top_k, num_experts, align):
    ids = make_ids(kind, num_tokens, top_k, num_experts)
    perm, _, _ = moe_dispatch_indices(ids, num_experts, align)
    y = torch.randn(perm.numel(), 8)
    weights = torch.rand(num_tokens * top_k)
    out = moe_combine_rows(y, perm, weights, num_tokens, top_k)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), plain_combine(y, perm, weights, num_tokens, top_k), rtol=1e-6, atol=1e-6)


def test_ops_equal_the_reference_moe_forward_bitwise():
    """gather -> expert -> combine is bit-identical to MoE.forward's argsort/index/sum(1) in fp32."""
    num_tokens, top_k, num_experts = 10, 3, 4
    ids = make_ids("random", num_tokens, top_k, num_experts)
    x = torch.randn(num_tokens, 8)
    weights = torch.rand(num_tokens, top_k)
    w_expert = torch.randn(8, 8)

    order = torch.argsort(ids, stable=True)
    y_perm = torch.tanh(x[order // top_k] @ w_expert)
    inverse = torch.empty_like(order).scatter(0, order, torch.arange(ids.numel()))
    want = (y_perm[inverse].view(num_tokens, top_k, 8) * weights.unsqueeze(-1)).sum(dim=1)

    perm, _, _ = moe_dispatch_indices(ids, num_experts, 1)
    got = moe_combine_rows(torch.tanh(moe_gather_rows(x, perm, top_k, None) @ w_expert), perm, weights.reshape(-1),
                           num_tokens, top_k)
    assert torch.equal(got, want)


def test_bf16_gate_product_rounds_once_and_combine_accumulates_in_fp32():
    ids = make_ids("random", 6, 2, 4)
    perm, _, _ = moe_dispatch_indices(ids, 4, 4)
    x = torch.randn(6, 8).bfloat16()
    gate = torch.rand(12)
    out = moe_gather_rows(x, perm, 2, gate)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, plain_gather(x.float(), perm, 2, gate).bfloat16())
    y = torch.randn(perm.numel(), 8).bfloat16()
    combined = moe_combine_rows(y, perm, gate, 6, 2)
    assert combined.dtype == torch.bfloat16
    assert torch.equal(combined, plain_combine(y.float(), perm, gate, 6, 2).float().bfloat16())


# ---------------------------------------------------------------- autograd


@pytest.mark.parametrize(("top_k", "align"), [(1, 1), (2, 4), (3, 1)])
def test_gather_rows_gradcheck(top_k, align):
    ids = make_ids("skewed", 5, top_k, 5)
    perm, _, _ = moe_dispatch_indices(ids, 5, align)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    gate = torch.rand(5 * top_k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, g: moe_gather_rows(x, perm, top_k, g), (x, gate))
    assert torch.autograd.gradcheck(lambda x: moe_gather_rows(x, perm, top_k, None), (x,))


@pytest.mark.parametrize(("top_k", "align"), [(1, 4), (2, 1), (3, 4)])
def test_combine_rows_gradcheck(top_k, align):
    ids = make_ids("random", 5, top_k, 4)
    perm, _, _ = moe_dispatch_indices(ids, 4, align)
    y = torch.randn(perm.numel(), 4, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(5 * top_k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, w: moe_combine_rows(y, perm, w, 5, top_k), (y, weights))


def test_padding_rows_get_zero_gradient():
    ids = make_ids("random", 6, 2, 4)
    perm, _, _ = moe_dispatch_indices(ids, 4, 4)
    y = torch.randn(perm.numel(), 8, requires_grad=True)
    moe_combine_rows(y, perm, torch.rand(12), 6, 2).sum().backward()
    assert (y.grad[perm < 0] == 0).all() and (y.grad[perm >= 0] != 0).any()


# ---------------------------------------------------------------- tracing


def _moe_step(x, ids, gate, w_expert, num_experts: int, top_k: int, align: int):
    perm, offsets, counts = moe_dispatch_indices(ids, num_experts, align)
    rows = moe_gather_rows(x, perm, top_k, None)
    y = torch.nn.functional.silu(rows @ w_expert)
    out = moe_combine_rows(y, perm, gate, x.shape[0], top_k)
    return out, offsets, counts


@pytest.mark.parametrize("align", [1, 4])
def test_ops_compile_fullgraph_with_backward(align):
    num_tokens, top_k, num_experts = 6, 2, 4
    ids = make_ids("random", num_tokens, top_k, num_experts)
    x = torch.randn(num_tokens, 8, requires_grad=True)
    gate = torch.rand(num_tokens * top_k, requires_grad=True)
    w_expert = torch.randn(8, 8, requires_grad=True)

    def run(fn):
        out, offsets, counts = fn(x, ids, gate, w_expert, num_experts, top_k, align)
        grads = torch.autograd.grad(out.square().sum(), (x, gate, w_expert))
        return (out, offsets, counts, *grads)

    eager = run(_moe_step)
    compiled = run(torch.compile(_moe_step, backend="aot_eager", fullgraph=True))
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def test_fake_impls_trace_symbolic_shapes():
    def f(x, ids, gate):
        perm, offsets, counts = moe_dispatch_indices(ids, 4, 4)
        rows = moe_gather_rows(x, perm, 2, gate)
        return moe_combine_rows(rows, perm, gate, x.shape[0], 2), offsets, counts

    ids = make_ids("random", 6, 2, 4)
    gm = make_fx(f, tracing_mode="symbolic")(torch.randn(6, 8), ids, torch.rand(12))
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert {torch.ops.mopc.moe_dispatch_indices.default, torch.ops.mopc.moe_gather_rows.default,
            torch.ops.mopc.moe_combine_rows.default} <= targets
    node = next(n for n in gm.graph.nodes if n.target is torch.ops.mopc.moe_dispatch_indices.default)
    num_rows = node.meta["val"][0].shape[0]  # T*k + E*(align-1), symbolic in T
    assert isinstance(num_rows, torch.SymInt) and str(num_rows).endswith("+ 12"), num_rows
    x, ids2 = torch.randn(5, 8), make_ids("random", 5, 2, 4, seed=1)
    gate = torch.rand(10)
    want = f(x, ids2, gate)
    for a, b in zip(gm(x, ids2, gate), want):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- kernel switch


def test_kernel_switch_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("MOPC_DISPATCH_KERNELS", "cuda")
    with pytest.raises(ValueError, match="auto, torch, triton"):
        moe_dispatch_indices(torch.zeros(4, dtype=torch.int64), 2, 1)


def test_kernel_switch_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("MOPC_DISPATCH_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        moe_dispatch_indices(torch.zeros(4, dtype=torch.int64), 2, 1)


def test_auto_uses_reference_on_cpu(monkeypatch):
    monkeypatch.setenv("MOPC_DISPATCH_KERNELS", "auto")
    assert not dispatch._use_triton(torch.zeros(1))


# ---------------------------------------------------------------- Triton kernels (interpreter)

_TRITON_SCRIPT = r'''
"""Runs under TRITON_INTERPRET=1; prints one JSON object {check: "" if it passed else the error}."""
import json
import os
import traceback

import torch

from mopc.codegen import dispatch as d
from mopc.codegen import triton_dispatch as td
from tests.test_dispatch_kernels import CASES, make_ids

results = {}


def check(name):
    def wrap(fn):
        try:
            fn()
            results[name] = ""
        except Exception:  # noqa: BLE001
            results[name] = traceback.format_exc(limit=4)
    return wrap


def use(kernels):
    os.environ["MOPC_DISPATCH_KERNELS"] = kernels


def dispatched(kind, num_tokens, top_k, num_experts, align):
    ids = make_ids(kind, num_tokens, top_k, num_experts)
    return ids, d.dispatch_indices_reference(ids, num_experts, align)[0]


@check("dispatch_indices")
def _():
    use("triton")
    for kind, num_tokens, top_k, num_experts, align in CASES + [("random", 0, 2, 3, 4)]:
        ids = make_ids(kind, num_tokens, top_k, num_experts)
        want = d.dispatch_indices_reference(ids, num_experts, align)
        # several blocks per expert, and a scan over them in several steps
        for block_m, block_b in ((4, 2), (16, None)):
            got = td.dispatch_indices(ids, num_experts, align, block_m=block_m, block_b=block_b)
            for g, w in zip(got, want):
                assert g.dtype == w.dtype and torch.equal(g, w), (kind, num_tokens, top_k, align, block_m, block_b, g, w)
        got = torch.ops.mopc.moe_dispatch_indices(ids, num_experts, align)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        inv = torch.ops.mopc.moe_inverse_perm(want[0], ids.numel())
        assert torch.equal(inv, d.inverse_perm_reference(want[0], ids.numel()))


@check("gather")
def _():
    use("triton")
    for case, dtypes in ((CASES[1], (torch.float32, torch.bfloat16, torch.float64)), (CASES[2], (torch.float32,)),
                         (CASES[4], (torch.float32,)), (CASES[8], (torch.float32,))):
        _, perm = dispatched(*case)
        num_tokens, top_k = case[1], case[2]
        for dtype in dtypes:
            x = torch.randn(num_tokens, 8).to(dtype)
            for gate in (None, torch.rand(num_tokens * top_k)):
                got = torch.ops.mopc.moe_gather_rows(x, perm, top_k, gate)
                want = d.gather_rows_reference(x, perm, top_k, gate)
                if dtype == torch.bfloat16 and gate is not None:
                    # the interpreter casts fp32 -> bf16 by truncation (GPUs round to nearest
                    # even, like torch): compare with the truncated fp32 product
                    product = d.gather_rows_reference(x.float(), perm, top_k, gate)
                    want = (product.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)
                assert got.dtype == want.dtype and torch.equal(got, want), (case, dtype, got, want)


@check("combine")
def _():
    use("triton")
    for case in CASES:
        _, perm = dispatched(*case)
        num_tokens, top_k = case[1], case[2]
        for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float64, 1e-12)):
            y = torch.randn(perm.numel(), 8).to(dtype)
            weights = torch.rand(num_tokens * top_k)
            got = torch.ops.mopc.moe_combine_rows(y, perm, weights, num_tokens, top_k)
            want = d.combine_rows_reference(y, perm, weights, num_tokens, top_k)
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@check("backward")
def _():
    for case in (CASES[1], CASES[3], CASES[4], CASES[8]):
        _, perm = dispatched(*case)
        num_tokens, top_k = case[1], case[2]
        x0 = torch.randn(num_tokens, 8)
        gate0 = torch.rand(num_tokens * top_k)
        grads = {}
        for kernels in ("torch", "triton"):
            use(kernels)
            x, gate = x0.clone().requires_grad_(), gate0.clone().requires_grad_()
            rows = torch.ops.mopc.moe_gather_rows(x, perm, top_k, gate)
            out = torch.ops.mopc.moe_combine_rows(rows * 1.5, perm, gate, num_tokens, top_k)
            grads[kernels] = torch.autograd.grad(out.square().sum(), (x, gate))
        for a, b in zip(grads["triton"], grads["torch"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


print(json.dumps(results))
'''


@pytest.fixture(scope="module")
def triton_interpret_results() -> dict[str, str]:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "MOPC_DISPATCH_KERNELS": "triton",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], cwd=REPO, env=env, capture_output=True, check=False,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("check", ["dispatch_indices", "gather", "combine", "backward"])
def test_triton_interpret_kernels_match_reference(triton_interpret_results, check):
    assert triton_interpret_results[check] == "", triton_interpret_results[check]


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("align", [1, 16])
def test_cuda_kernels_match_reference(monkeypatch, align):
    """Compiled kernels at a moderate shape: multi-block dispatch, D not a power of two, bf16 and fp32."""
    num_tokens, top_k, num_experts, dim = 1000, 8, 64, 520
    ids = make_ids("random", num_tokens, top_k, num_experts).cuda()
    want = dispatch.dispatch_indices_reference(ids, num_experts, align)
    monkeypatch.setenv("MOPC_DISPATCH_KERNELS", "triton")
    got = moe_dispatch_indices(ids, num_experts, align)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    perm = want[0]
    gate = torch.rand(num_tokens * top_k, device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(num_tokens, dim, device="cuda").to(dtype)
        y = torch.randn(perm.numel(), dim, device="cuda").to(dtype)
        for g in (None, gate):
            assert torch.equal(moe_gather_rows(x, perm, top_k, g), dispatch.gather_rows_reference(x, perm, top_k, g))
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(moe_combine_rows(y, perm, gate, num_tokens, top_k),
                                   dispatch.combine_rows_reference(y, perm, gate, num_tokens, top_k), rtol=tol, atol=tol)
    grads = {}
    for kernels in ("torch", "triton"):
        monkeypatch.setenv("MOPC_DISPATCH_KERNELS", kernels)
        x = torch.randn(num_tokens, dim, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        x.requires_grad_()
        w = gate.clone().requires_grad_()
        out = moe_combine_rows(moe_gather_rows(x, perm, top_k, w) * 1.5, perm, w, num_tokens, top_k)
        grads[kernels] = torch.autograd.grad(out.square().sum(), (x, w))
    for a, b in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
