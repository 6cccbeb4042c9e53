"""Context parallelism: the chunked causal attention op, the sequence cut, the rewrite's graph
on a fake world, and the errors for layouts it cannot run.

Numerics on real ranks (losses and gradients against single-device eager) are in
tests/test_parallelize_mp.py; bf16 over 50 steps in tests/test_mixed_precision_mp.py.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mopc
from mopc.config import MoPConfigError
from mopc.models import build_model, make_init_fn
from mopc.parallelize import _check_sequence
from mopc.plan.mesh import MeshSpec
from mopc.runtime.context_parallel import (
    cp_attention,
    cp_attention_backward,
    global_positions,
    shard_sequence,
)
from mopc.runtime.trainer import synthetic_batch


@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-6), (torch.bfloat16, 5e-2)])
def test_chunked_attention_equals_causal_sdpa_on_the_whole_sequence(cp, dtype, tol):
    """Every rank's output and query gradient are the full causal attention's rows for its
    chunks; the key/value gradients summed over ranks are the full ones (GQA: 8 q, 4 kv heads)."""
    torch.manual_seed(0)
    B, L, D = 2, 32, 8
    q = torch.randn(B, 8, L, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, 4, L, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, 4, L, D, dtype=dtype, requires_grad=True)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    grad_out = torch.randn_like(ref)
    ref.backward(grad_out)
    cut = lambda t, r: shard_sequence(t.detach(), cp, r, dim=2)
    k_all = torch.cat([cut(k, r) for r in range(cp)])  # what the all-gather gives, rank-major
    v_all = torch.cat([cut(v, r) for r in range(cp)])
    dk_sum = torch.zeros(k_all.shape)
    dv_sum = torch.zeros(v_all.shape)
    for r in range(cp):
        out, lse = cp_attention(cut(q, r), k_all, v_all, cp, r)
        assert out.stride() == out.transpose(1, 2).contiguous().transpose(1, 2).stride()  # flash's layout
        torch.testing.assert_close(out, cut(ref, r), atol=tol, rtol=tol)
        dq, dk, dv = cp_attention_backward(cut(grad_out, r), cut(q, r), k_all, v_all, out, lse, cp, r)
        torch.testing.assert_close(dq, cut(q.grad, r), atol=tol * 4, rtol=tol)
        dk_sum += dk.float()
        dv_sum += dv.float()
    for r in range(cp):  # the reduce-scatter: rank r receives block r of the sum
        torch.testing.assert_close(dk_sum[r * B:(r + 1) * B], cut(k.grad, r).float(), atol=tol * 4, rtol=tol)
        torch.testing.assert_close(dv_sum[r * B:(r + 1) * B], cut(v.grad, r).float(), atol=tol * 4, rtol=tol)


def test_each_rank_holds_an_early_and_a_late_chunk():
    x = torch.arange(16).view(1, 16)
    assert shard_sequence(x, 2, 0).tolist() == [[0, 1, 2, 3, 12, 13, 14, 15]]
    assert shard_sequence(x, 2, 1).tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert global_positions(8, 2, 1) == [(4, 8), (8, 12)]
    # causal work per rank: chunk g attends to g + 1 chunks; every rank does 2·cp + 1 of them
    assert {sum(g + 1 for g in (r, 7 - r)) for r in range(4)} == {9}
    with pytest.raises(ValueError, match=r"sequence length 12 is not divisible by 2\*cp=8; pad the sequences"):
        shard_sequence(torch.zeros(1, 12), 4, 0)


@pytest.mark.parametrize(
    ("world", "options", "message"),
    [
        (8, {"cp": 3}, r"cp=3 does not divide the world size 8 / tp=1 = 8; choose cp from \[1, 2, 4, 8\]"),
        (8, {"cp": 4, "tp": 4}, r"cp=4 does not divide the world size 8 / tp=4 = 2; choose cp from \[1, 2\]"),
        (8, {"cp": 2, "dp": 3}, r"dp=3 x cp=2 x tp=1 = 6 ranks, but the world size is 8; set dp=4"),
        (8, {"cp": 0}, r"cp=0 must be a positive integer"),
    ],
)
def test_bad_context_parallel_layouts_are_refused(world, options, message):
    with pytest.raises(MoPConfigError, match=message):
        MeshSpec.from_config(mopc.MoPConfig(**options), world)


def test_sequence_length_must_split_into_two_chunks_per_rank(fake_world_factory):
    fake_world_factory(4, 0)
    spec = MeshSpec.from_config(mopc.MoPConfig(cp=4), 4)
    assert (spec.dp, spec.cp, spec.data_parallel) == (4, 4, 1)
    with pytest.raises(MoPConfigError, match=r"cp=4: the example batch holds 3 tokens per sequence on this rank "
                                             r"\(a sequence length of 12\).*divisible by 2\*cp=8"):
        _check_sequence({"input_ids": torch.zeros(2, 3, dtype=torch.long)}, spec)
    model = build_model("tiny", device="meta", seed=0)
    with pytest.raises(MoPConfigError, match=r"divisible by 2\*cp=8"):
        mopc.parallelize(model, {"input_ids": torch.zeros(2, 3, dtype=torch.long)}, init_fn=make_init_fn(model, 0),
                         cp=4)
    assert all(p.is_meta for p in model.parameters()), "nothing allocated"


def test_rewritten_graph_gathers_keys_and_values_over_the_cp_group(tmp_path, fake_world_factory):
    """Fake world 8 = dp 2 x cp 2 x tp 2, rank 5 (tp rank 1, cp rank 0: chunks 0 and 3)."""
    fake_world_factory(8, 5)
    per_rank, seq = 2, 16
    model = build_model("tiny", device="meta", seed=0)
    batch = synthetic_batch(0, 4 * per_rank, seq, 128)
    model = mopc.parallelize(model, {k: v[:per_rank, :seq // 2] for k, v in batch.items()},
                             init_fn=make_init_fn(model, 0), cp=2, tp=2)
    assert mopc.data_parallel_rank(model) == (3, 4)  # dp rank 1, tp rank 1
    mine = mopc.shard_sequence({k: v[:per_rank] for k, v in batch.items()}, model)
    assert mine["input_ids"].tolist() == torch.cat([batch["input_ids"][:per_rank, :4],
                                                    batch["input_ids"][:per_rank, 12:]], 1).tolist()
    step = torch.compile(model, backend="mop", options={"dump_dir": str(tmp_path)})
    step(**mine).backward()  # the fake group moves no data: shapes only
    graph = next(d for d in tmp_path.iterdir() if d.is_dir())
    index = {e["pass"]: e for e in json.loads((graph / "index.json").read_text())}
    ours = lambda phase: [c for c in index[phase]["collectives"] if c["created_by"] == "context_parallel"]
    # K and V of the tp group's 2 x 2 sequences, 8 local tokens, 4 / 2 kv heads, 8 channels
    kv = 2 * per_rank * 8 * 2 * 8
    assert [(c["kind"], c["group_size"], c["numel_out"]) for c in ours("forward")] == [("all_gather", 2, 2 * kv)] * 6
    assert sorted((c["kind"], c["numel_in"]) for c in ours("backward")) == \
        sorted([("all_gather", kv)] * 6 + [("reduce_scatter", 2 * kv)] * 6)
    forward = (graph / f"{index['forward']['index']:02d}_forward.txt").read_text() \
        if "index" in index["forward"] else "".join(p.read_text() for p in graph.glob("*_forward.txt"))
    assert forward.count("= mopc.cp_attention(") == 3 and "_scaled_dot_product_flash_attention" not in forward
    assert "by=tensor_parallel" in forward  # composed: tp's token gather feeds cp's K/V gather
    assert "aten.arange(0, 4," in forward and "aten.arange(12, 16," in forward  # rope positions of chunks 0, 3


class _NonCausal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.qkv = nn.Linear(8, 24, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.emb(input_ids)).unsqueeze(1).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v).mean()  # bidirectional: cannot be cut causally


def test_attention_it_cannot_split_is_refused_not_computed_per_chunk(fake_world_factory):
    fake_world_factory(2, 0)
    model = mopc.parallelize(_NonCausal(), (torch.zeros(1, 4, dtype=torch.long),), cp=2, vocab_parallel=False)
    step = torch.compile(model, backend="mop")
    with pytest.raises(Exception, match=r"cp > 1: attention in .* has is_causal=False; context parallelism "
                                        r"supports causal scaled_dot_product_attention"):
        step(torch.zeros(1, 4, dtype=torch.long))


def test_all_to_all_variant_needs_cp_and_heads_divisible_by_it():
    from mopc.plan.layout import ModelDims, check_dims

    with pytest.raises(MoPConfigError, match=r"cp_attention='all_to_all' acts only with cp > 1, but cp=1"):
        mopc.MoPConfig(cp_attention="all_to_all")
    model = build_model("tiny", device="meta", seed=0)  # 8 heads, 4 key/value heads
    config = mopc.MoPConfig(cp=8, cp_attention="all_to_all")
    with pytest.raises(MoPConfigError, match=r"cp_attention='all_to_all' with cp=8 splits the model's key/value heads "
                                             r"\(4\) over the cp ranks, and 4 is not divisible by 8; choose cp from "
                                             r"\[1, 2, 4\]"):
        check_dims(ModelDims.of(model), MeshSpec.from_config(mopc.MoPConfig(cp=8), 8), config)
    config = mopc.MoPConfig(cp=4, tp=2, cp_attention="all_to_all")
    with pytest.raises(MoPConfigError, match=r"key/value heads \(4 / tp=2\) over the cp ranks, and 2 is not divisible "
                                             r"by 4; choose cp from \[1, 2\] or cp_attention='all_gather'"):
        check_dims(ModelDims.of(model), MeshSpec.from_config(config, 8), config)


def test_all_to_all_with_one_key_value_head_per_rank(tmp_path, fake_world_factory):
    """cp 4 over tiny's 4 key/value heads: each rank attends with 1 kv head and 2 query heads
    over the whole sequence; the outputs come back in the flash kernels' memory layout (with
    one head per rank a reshape would silently give other strides and break the graph after)."""
    fake_world_factory(4, 0)
    batch = {k: shard_sequence(v, 4, 0) for k, v in synthetic_batch(0, 2, 16, 128).items()}
    model = build_model("tiny", device="meta", seed=0)
    model = mopc.parallelize(model, batch, init_fn=make_init_fn(model, 0), cp=4, cp_attention="all_to_all")
    step = torch.compile(model, backend="mop", options={"dump_dir": str(tmp_path)})
    step(**batch).backward()  # the fake group moves no data: shapes and strides only
    graph = next(d for d in tmp_path.iterdir() if d.is_dir())
    forward = next(graph.glob("*_forward.txt")).read_text()
    backward = next(graph.glob("*_backward.txt")).read_text()
    assert forward.count("= _c10d_functional.all_to_all_single(") == 3 * 5  # q, k, v there; out, lse back
    assert backward.count("= _c10d_functional.all_to_all_single(") == 3 * 7  # q, k, v, d_out; dq, dk, dv
    assert forward.count(": (f32[2, 2, 16, 8], f32[2, 2, 16]) = aten._scaled_dot_product_flash_attention_for_cpu(") == 3
    assert backward.count("f32[2, 1, 16, 8]) = aten._scaled_dot_product_flash_attention_for_cpu_backward(") == 3
