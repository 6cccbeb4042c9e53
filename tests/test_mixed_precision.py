"""Mixed precision as a policy (`param_dtype`, `reduce_dtype`, `master_dtype`), on a fake group.

What the compiled graphs move and compute in, read from the dump index and graphs: with
`param_dtype="bf16"` the parameter all-gathers move bf16, the gradient reduce-scatters move
`reduce_dtype`, the model's matmuls run in bf16, and the shards, their gradients and the
optimizer state stay fp32. Numerics against fp32 over 50 steps: tests/test_mixed_precision_mp.py.
"""

from __future__ import annotations

import json

import pytest
import torch

import mopc
from mopc.config import MoPConfig, MoPConfigError
from mopc.models import build_model, make_init_fn
from mopc.runtime.trainer import synthetic_batch

PER_RANK, SEQ, WORLD, RANK = 2, 16, 8, 1


def _compile(tmp_path, **options):
    batch = synthetic_batch(0, WORLD * PER_RANK, SEQ, 128)
    batch = {k: v[RANK * PER_RANK:(RANK + 1) * PER_RANK] for k, v in batch.items()}
    model = build_model("tiny", device="meta", seed=0)
    model = mopc.parallelize(model, batch, init_fn=make_init_fn(model, 0), **options)
    step = torch.compile(model, backend="mop", options={"dump_dir": str(tmp_path)})
    loss = step(**batch)  # the fake group moves no data: shapes and dtypes only
    loss.backward()
    (graph,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    index = {e["pass"]: e for e in json.loads((graph / "index.json").read_text())}
    text = {name: next(graph.glob(f"*_{name}.txt")).read_text() for name in ("forward", "backward")}
    return model, loss, index, text


def _bytes_per_element(index, graph: str, kind: str, created_by: str = "gather_params") -> set[float]:
    return {c["bytes_in"] / c["numel_in"] for c in index[graph]["collectives"]
            if c["kind"] == kind and c["created_by"] == created_by}


def _mm_dtypes(text: str) -> dict[str, set[str]]:
    """Role -> the dtypes of its matrix multiplies."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        if ("= aten.mm(" in line or "_grouped_mm(" in line) and "role=" in line:
            role = line.split("role=", 1)[1].split()[0]
            out.setdefault(role, set()).add(line.split(":", 1)[1].split("[", 1)[0].strip())
    return out


@pytest.mark.parametrize("reduce_dtype", [pytest.param(None, marks=pytest.mark.large), "fp32"])
def test_bf16_gathers_and_computes_in_bf16_and_keeps_fp32_shards(tmp_path, fake_world_factory, reduce_dtype):
    fake_world_factory(WORLD, RANK)
    options = {"param_dtype": "bf16"} | ({"reduce_dtype": reduce_dtype} if reduce_dtype else {})
    model, loss, index, text = _compile(tmp_path, **options)
    # the gathers move bf16 (2 bytes), before and again in backward (reshard after forward)
    assert _bytes_per_element(index, "forward", "all_gather") == {2.0}
    assert _bytes_per_element(index, "backward", "all_gather") == {2.0}
    # the reduce-scatters move reduce_dtype (default: param_dtype)
    assert _bytes_per_element(index, "backward", "reduce_scatter") == {4.0 if reduce_dtype == "fp32" else 2.0}
    # activations: every matmul in bf16 (attention, dense MLP, experts, the vocabulary
    # logits), but the router's, which moe_transformer computes in fp32 by design
    mms = _mm_dtypes(text["forward"] + text["backward"])
    assert {"attention", "dense_mlp", "expert", "shared_expert", "loss", "vocab_projection"} <= set(mms)
    assert all(dtypes == {"bf16"} for role, dtypes in mms.items() if role != "router"), mms
    assert mms["router"] == {"f32"}
    assert loss.dtype == torch.float32  # the loss upcasts
    # shards at rest, their gradients: fp32 (master_dtype), as the optimizer sees them
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in model.parameters()} == {torch.float32}
    # the same buckets as fp32: one gather per layer group and one reduce-scatter each
    assert len(index["backward"]["collectives"]) == 10


def test_default_policy_casts_nothing(tmp_path, fake_world_factory):
    fake_world_factory(WORLD, RANK)
    _, _, index, text = _compile(tmp_path)
    assert _bytes_per_element(index, "forward", "all_gather") == {4.0}
    assert _bytes_per_element(index, "backward", "reduce_scatter") == {4.0}
    assert "bf16" not in text["forward"] and "bf16" not in text["backward"]
    assert "_to_copy" not in "".join(line for line in text["forward"].splitlines() if "by=gather_params" in line)
    assert MoPConfig().mixed_precision() is None


@pytest.mark.parametrize("options", [pytest.param({"tp": 2}, marks=pytest.mark.large),
                                     pytest.param({"ep": 2}, marks=pytest.mark.large)])
def test_bf16_under_tensor_and_expert_parallelism(tmp_path, fake_world_factory, options):
    fake_world_factory(WORLD, RANK)
    model, _, index, text = _compile(tmp_path, param_dtype="bf16", **options)
    rewrite = "tensor_parallel" if "tp" in options else "expert_parallel"
    assert f"by={rewrite}" in text["forward"]  # the rewrite applied, not the reference layout
    assert _bytes_per_element(index, "forward", "all_gather") == {2.0}
    assert _bytes_per_element(index, "backward", "reduce_scatter") == {2.0}
    mms = _mm_dtypes(text["forward"] + text["backward"])
    assert all(dtypes == {"bf16"} for role, dtypes in mms.items() if role != "router"), mms
    assert {p.grad.dtype for p in model.parameters()} == {torch.float32}


def test_mixed_precision_options_are_layout_options():
    with pytest.raises(MoPConfigError, match="param_dtype='fp16' is not accepted"):
        MoPConfig(param_dtype="fp16")
    with pytest.raises(MoPConfigError, match="param_dtype='bf16' contradicts the layout"):
        MoPConfig.under_parallelize(MoPConfig(), {"param_dtype": "bf16"})
    with pytest.raises(MoPConfigError, match="set up by mopc.parallelize"):
        MoPConfig().check_no_layout({"param_dtype": "bf16"})
    policy = MoPConfig(param_dtype="bf16", reduce_dtype="fp32").mixed_precision()
    assert (policy.param, policy.reduce, policy.master) == (torch.bfloat16, torch.float32, torch.float32)


def test_memory_accounting_counts_bf16_activations_at_their_size(fake_world_factory):
    """The live-storage accounting counts bytes as stored: under param_dtype='bf16' the saved
    activations shrink (norms, router and loss stay fp32), the fp32 shards and gradients do not."""
    from mopc.runtime.memory import MemoryTracker

    fake_world_factory(2, 0)
    batch = {k: v[:PER_RANK] for k, v in synthetic_batch(0, 2 * PER_RANK, SEQ, 128).items()}
    reports = {}
    for dtype in ("fp32", "bf16"):
        model = build_model("tiny", device="meta", seed=0)
        model = mopc.parallelize(model, batch, init_fn=make_init_fn(model, 0), param_dtype=dtype)
        tracker = MemoryTracker(model, None, rank=0)
        with tracker.step():  # eagerly: mopc::unshard casts there as in the compiled graph
            model(**batch).backward()
        reports[dtype] = tracker.report()
    fp32, bf16 = reports["fp32"], reports["bf16"]
    assert bf16["params"] == fp32["params"] and bf16["grads"] == fp32["grads"], (fp32, bf16)
    assert 0.45 * fp32["activations_peak"] < bf16["activations_peak"] < 0.8 * fp32["activations_peak"], (fp32, bf16)
