"""The tensor-parallel rewrite's shape rules (mopc/passes/rewrite/tp_shapes.py), and the rewrite
on an unmodified Hugging Face attention (RoPE, grouped-query heads, a causal mask built
from sizes) on a fake process group.

Atoms are `(size in the reference program, size on tensor-parallel shapes)`; T = 2 here:
`(B, 2B)` is the tensor-parallel group's tokens stacked, `(H, H/2)` this rank's heads.
"""

from __future__ import annotations

import json

import pytest
import torch

from mopc.passes.rewrite.tp_shapes import Unsupported, canonical, new_size, view_dims


def _new(dims) -> list[int]:
    return [new_size(d) for d in dims]


def test_canonical_atoms_absorb_whole_inner_ranges():
    # a rank-major stack or a contiguous chunk over a whole inner range is one on the flat range
    assert canonical([(2, 4), (16, 16)]) == [(32, 64)]
    assert canonical([(4, 2), (8, 8)]) == [(32, 16)]
    assert canonical([(1, 1), (2, 4), (4, 2)]) == [(2, 4), (4, 2)]  # a stack then a chunk stays two


def test_merged_batch_and_heads_split_back_the_right_way_round():
    """Eager attention: [B, H, S, D] -> [B·H, S, D] -> bmm -> [B, H, S, S]. The merged dim keeps
    its size (2·4 = 4·2) while its batch grew and its heads shrank; splitting it back must
    give [2B, H/2], not [B, H] (the bug that made such blocks fail or fall back)."""
    q = [[(2, 4)], [(4, 2)], [(16, 16)], [(8, 8)]]
    merged = view_dims(q, [2, 4, 16, 8], [8, 16, 8])
    assert merged[0] == [(2, 4), (4, 2)] and _new(merged) == [8, 16, 8]
    scores = [merged[0], [(16, 16)], [(16, 16)]]  # bmm keeps the batch dim's atoms
    assert _new(view_dims(scores, [8, 16, 16], [2, 4, 16, 16])) == [4, 2, 16, 16]


def test_projection_columns_split_into_heads_and_tokens_unmerged():
    rows = [[(2, 4), (16, 16)], [(32, 16)]]  # mm of the gathered [B·S, D] tokens with a column chunk
    assert _new(view_dims(rows, [32, 32], [2, 16, 32])) == [4, 16, 16]
    heads = view_dims([[(2, 4)], [(16, 16)], [(32, 16)]], [2, 16, 32], [2, 16, 4, 8])
    assert _new(heads) == [4, 16, 2, 8]


def test_grouped_query_heads_repeat_and_its_backward():
    # repeat_kv's backward: [B, H, S, D] -> [B, KV, H/KV, S, D], with KV = 2 kv heads
    grad = [[(2, 4)], [(4, 2)], [(16, 16)], [(8, 8)]]
    assert _new(view_dims(grad, [2, 4, 16, 8], [2, 2, 2, 16, 8])) == [4, 1, 2, 16, 8]
    # 2 kv heads over tp = 4 ranks: no rank holds a whole kv head
    grad4 = [[(2, 8)], [(4, 1)], [(16, 16)], [(8, 8)]]
    with pytest.raises(Unsupported, match="unevenly"):
        view_dims(grad4, [2, 4, 16, 8], [2, 2, 2, 16, 8])


def test_a_batch_of_one_sequence_keeps_its_stack_outermost():
    tokens = [[(1, 2)], [(16, 16)], [(32, 32)]]
    flat = view_dims(tokens, [1, 16, 32], [16, 32])
    assert flat[0] == [(16, 32)] and _new(flat) == [32, 32]
    assert view_dims(flat, [16, 32], [1, 16, 32]) == [[(1, 2)], [(16, 16)], [(32, 32)]]


def test_a_view_that_cuts_a_changed_dim_across_pieces_is_refused():
    with pytest.raises(Unsupported):
        view_dims([[(6, 3)], [(4, 4)]], [6, 4], [4, 6])


@pytest.mark.large  # CI budget: tests/test_hf_e2e_mp.py checks the same on real ranks
def test_hf_mixtral_attention_runs_on_local_heads_on_a_fake_world(tmp_path, fake_world_factory, caplog):
    """transformers' Mixtral (eager attention, RoPE by rotate_half + cat, 4 heads / 2 kv heads,
    causal mask from sizes) at tp = 2 in a world of 4 (rank 3): every attention block is
    rewritten, none falls back; attention runs on 2 x 2 sequences and 4 / 2 heads; the mask
    (the same on every rank) is tiled to the group's sequences, not gathered."""
    pytest.importorskip("transformers")
    import mopc
    from tests.moe_zoo import hf_models

    world = fake_world_factory(4, 3)
    case = hf_models.build_mixtral()
    case.model.config.use_cache = False
    model = mopc.parallelize(case.model, case.example_inputs, loss_fn=case.loss_fn, tp=2)
    step = torch.compile(model, backend="mop", options={"dump_dir": str(tmp_path)})
    with caplog.at_level("WARNING", logger="mopc.passes"):
        case.loss_fn(step(**case.example_inputs)).backward()
    assert not [r.getMessage() for r in caplog.records if "kept the reference layout" in r.getMessage()]
    graph = next(p for p in tmp_path.iterdir() if p.is_dir())
    forward = next(graph.glob("*_forward.txt")).read_text()
    softmax = [line for line in forward.splitlines() if "= aten._softmax(" in line and "role=attention" in line]
    assert len(softmax) == 2 and all(": f32[4, 2, 16, 16] = aten._softmax(" in line for line in softmax), softmax
    assert forward.count("by=tensor_parallel") > 0 and "aten.cat([%where, %where])" in forward
    index = json.loads((graph / "index.json").read_text())
    fwd = next(e for e in index if e["pass"] == "forward")["collectives"]
    blocks = {(c["role"], c["layer"]) for c in fwd if c["created_by"] == "tensor_parallel"}
    assert blocks == {("attention", 0), ("attention", 1)} and world == 4
