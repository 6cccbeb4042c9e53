"""Compressed expert-gradient reduction: the quantizer, the PowerSGD fold, the graphs the
`compress_grads` pass produces, and bad options.

Numbers on real gloo ranks (exactness of `skip_idle`, bytes, error-feedback residuals)
are in test_compression_mp.py; here everything runs in one process (graphs on the fake
process group).
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mopc
from mopc.config import MoPConfig, MoPConfigError
from mopc.models import build_model, make_init_fn
from mopc.runtime.compression import (
    _from_matrix,
    _to_matrix,
    dequantize_blocks,
    fold_matrix,
    orthonormalize,
    quantize_blocks,
)
from mopc.runtime.trainer import synthetic_batch

PER_RANK, SEQ = 2, 16


# ------------------------------------------------------------------------ the math


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 4), size=st.integers(1, 300), block=st.sampled_from([1, 7, 64, 256]),
       seed=st.integers(0, 2**16), spread=st.floats(1e-6, 1e6))
def test_int8_blocks_round_to_the_nearest_code(rows, size, block, seed, spread):
    x = torch.randn(rows, size, generator=torch.Generator().manual_seed(seed)) * spread
    x[:, ::5] = 0.0
    codes, scales = quantize_blocks(x, block, "int8")
    assert codes.dtype == torch.int8 and scales.shape == (rows, -(-size // block))
    back = dequantize_blocks(codes, scales, size)
    step = scales.repeat_interleave(block, dim=1)[:, :size]  # one code step per value
    assert ((back - x).abs() <= 0.5 * step * (1 + 1e-5) + 1e-30).all()
    assert (back[:, ::5] == 0).all(), "zeros stay exactly zero"
    assert codes.abs().max() <= 127


@settings(max_examples=25, deadline=None)
@given(size=st.integers(1, 300), block=st.sampled_from([8, 128]), seed=st.integers(0, 2**16))
def test_fp8_blocks_keep_three_mantissa_bits(size, block, seed):
    x = torch.randn(2, size, generator=torch.Generator().manual_seed(seed))
    codes, scales = quantize_blocks(x, block, "fp8")
    assert codes.dtype == torch.float8_e4m3fn
    back = dequantize_blocks(codes, scales, size)
    step = scales.repeat_interleave(block, dim=1)[:, :size]
    # relative 2^-4 for normal codes; subnormal codes are 2^-9 apart
    assert ((back - x).abs() <= x.abs() * 2**-4 + step * 2**-10 + 1e-30).all()


@pytest.mark.parametrize(("shape", "how"), [((8, 32, 64), "rows"), ((8, 64, 32), "cols"), ((48, 16), "plain")])
def test_powersgd_folds_experts_onto_their_shared_dimension(shape, how):
    got, rows, cols = fold_matrix(shape)
    assert got == how
    x = torch.randn(shape)
    mat = _to_matrix(x, how)
    assert mat.shape == (rows, cols)
    assert torch.equal(_from_matrix(mat, how, x.shape), x)
    if how == "cols":  # column block e is expert e: [m, E*n]
        assert torch.equal(mat[:, 32:64], x[1])


def test_powersgd_step_is_exact_on_a_low_rank_mean():
    """Two 'ranks' whose gradients share a rank-2 column space: P = M Q, orthonormalize, Q = M^T P
    recovers the mean exactly, which is what lets error feedback converge."""
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(40, 2, generator=gen)
    grads = [basis @ torch.randn(2, 24, generator=gen) for _ in range(2)]
    q = torch.randn(24, 4, generator=gen)
    p = orthonormalize(sum(g @ q for g in grads))
    q = sum(g.T @ p for g in grads)
    assert torch.allclose(p @ q.T / 2, (grads[0] + grads[1]) / 2, atol=1e-4)


# ------------------------------------------------------------------------ graphs


def _local(world: int, rank: int) -> dict[str, torch.Tensor]:
    batch = synthetic_batch(0, world * PER_RANK, SEQ, 128)
    return {k: v[rank * PER_RANK:(rank + 1) * PER_RANK] for k, v in batch.items()}


def _backward_collectives(tmp_path, world: int, **options) -> tuple[list[dict], str]:
    model = build_model("tiny", device="meta", seed=0)
    layout = {k: v for k, v in options.items() if k == "ep"}
    model = mopc.parallelize(model, _local(world, 0), init_fn=make_init_fn(model, 0), **layout)
    compile_options = {k: v for k, v in options.items() if k != "ep"}
    step = torch.compile(model, backend="mop", options={"dump_dir": str(tmp_path), **compile_options})
    step(**_local(world, 0)).backward()  # the fake group moves no data: shapes only
    folder = next(d for d in tmp_path.iterdir() if d.is_dir())
    index = {e["pass"]: e for e in json.loads((folder / "index.json").read_text())}
    return index["backward"]["collectives"], next(folder.glob("*_backward.txt")).read_text()


def test_expert_gradients_reduce_over_their_group_and_dense_matrices_over_the_world(tmp_path, fake_world_factory):
    fake_world_factory(8, 0)
    collectives, text = _backward_collectives(tmp_path, 8, ep=2, grad_compression="powersgd",
                                              grad_compression_scope="all")
    compressed = [c for c in collectives if c["created_by"] == "compress_grads"]
    assert {c["kind"] for c in compressed} == {"all_reduce"} and "'powersgd'" in text
    # w1, w2, w3 of both MoE layers, each over the 4 ranks holding the same experts
    experts = [c for c in compressed if c["role"] == "expert"]
    assert len(experts) == 6 and {c["group_size"] for c in experts} == {4}
    assert not [c for c in collectives if c["kind"] == "reduce_scatter" and c["role"] == "expert"]
    # scope="all": dense matrices too, over the world
    dense = [c for c in compressed if c["role"] != "expert"]
    assert {c["role"] for c in dense} >= {"attention", "embedding", "dense_mlp"}
    assert {c["group_size"] for c in dense} == {8}
    # 1-D weights (norms) have no matrix to factor: still bucketed reduce-scatters
    assert [c for c in collectives if c["kind"] == "reduce_scatter" and c["role"] == "norm"]


# ------------------------------------------------------------------------ bad options


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"grad_compression": "zstd"}, r"grad_compression='zstd' is not accepted; use one of 'none', 'skip_idle'"),
        ({"grad_compression": "powersgd", "powersgd_rank": 0}, r"powersgd_rank=0 must be a positive integer"),
        ({"grad_compression": "int8", "grad_compression_block": 0},
         r"grad_compression_block=0 must be a positive integer"),
        ({"grad_compression": "powersgd", "powersgd_warmup_steps": -1}, r"powersgd_warmup_steps=-1 must be >= 0"),
        ({"grad_compression": "int8", "powersgd_rank": 8},
         r"powersgd_rank=8 acts only with grad_compression in \('powersgd',\), but grad_compression='int8'"),
        ({"grad_compression_scope": "all"}, r"grad_compression_scope='all' acts only with .* grad_compression='none'"),
        ({"grad_compression": "skip_idle", "grad_compression_block": 64},
         r"grad_compression_block=64 acts only with grad_compression in \('int8', 'fp8'\)"),
    ],
)
def test_bad_compression_options_name_the_field_and_the_fix(fake_world_factory, options, message):
    with pytest.raises(MoPConfigError, match=message):
        MoPConfig.from_options(options)
    fake_world_factory(4, 0)
    model = build_model("tiny", device="meta", seed=0)
    with pytest.raises(MoPConfigError, match=message):
        mopc.parallelize(model, _local(4, 0), init_fn=make_init_fn(model, 0), **options)
    assert all(p.is_meta for p in model.parameters()), "nothing allocated"
