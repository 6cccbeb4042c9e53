"""Tests of the reference MoE model (mopc/models)."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from mopc.models import (
    PRESETS,
    MoEModelConfig,
    MoETransformer,
    build_model,
    init_weights,
)

TINY = PRESETS["tiny"]

# Variants of tiny that between them switch every routing option on and off.
TINY_VARIANTS = {
    "tiny": TINY,
    "softmax_no_groups": dataclasses.replace(
        TINY, router="softmax", router_bias=False, num_expert_groups=1, topk_groups=1,
        route_scale=1.0,
    ),
    "sigmoid_unnormalized_no_shared": dataclasses.replace(
        TINY, norm_topk_prob=False, num_shared_experts=0, num_expert_groups=4,
        topk_groups=2,
    ),
    "tied_mha_all_moe": dataclasses.replace(
        TINY, tie_embeddings=True, num_kv_heads=8, num_dense_layers=0, top_k=3,
        num_expert_groups=1, topk_groups=1,
    ),
}


def _batch(config: MoEModelConfig, batch: int = 2, seq: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    labels = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    labels[0, :3] = -100
    return input_ids, labels


def _loss_and_grads(model, input_ids, labels, *, call=None):
    """Loss and gradients of `model`, run through `call` (e.g. its compiled wrapper)."""
    model.zero_grad(set_to_none=True)
    loss = (model if call is None else call)(input_ids, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_grads_close(actual, expected, atol):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=0, msg=name)


# ---------------------------------------------------------------------------- forward


def test_tiny_forward_backward_at_init():
    model = build_model("tiny", seed=0)
    input_ids, labels = _batch(TINY)

    logits = model(input_ids)
    assert logits.shape == (2, 16, TINY.vocab_size)

    loss = model(input_ids, labels)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert abs(loss.item() - math.log(TINY.vocab_size)) < 0.1
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name


def test_module_names_are_the_contract():
    model = build_model("tiny", device="meta")
    names = set(dict(model.named_parameters()))
    assert "tok_embeddings.weight" in names and "output.weight" in names
    assert "norm.weight" in names
    for w in ("wq", "wk", "wv", "wo"):
        assert f"layers.0.attention.{w}.weight" in names
    for w in ("w1", "w2", "w3"):
        assert f"layers.0.feed_forward.{w}.weight" in names
        assert f"layers.1.moe.experts.{w}" in names
        assert f"layers.1.moe.shared_experts.{w}.weight" in names
    assert "layers.1.moe.router.gate.weight" in names
    assert "layers.0.moe.router.gate.weight" not in names
    assert "layers.1.moe.router.expert_bias" in dict(model.named_buffers())
    E, D, inter = TINY.num_experts, TINY.dim, TINY.moe_inter_dim
    experts = model.layers[1].moe.experts
    assert experts.w1.shape == (E, D, inter) and experts.w3.shape == (E, D, inter)
    assert experts.w2.shape == (E, inter, D)


def test_tied_embeddings_share_one_parameter():
    model = build_model(dataclasses.replace(TINY, tie_embeddings=True))
    assert model.output.weight is model.tok_embeddings.weight


def test_sequence_longer_than_max_seq_len_is_rejected():
    model = build_model("tiny")
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, TINY.max_seq_len + 1, dtype=torch.long))


# ---------------------------------------------------------------------------- routing


def _naive_moe(moe, x_TD):
    """Per-token, per-choice reference of MoE.forward: no permutation at all."""
    weights, ids = moe.router(x_TD)
    experts = moe.experts
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            h = F.silu(x_TD[t] @ experts.w1[e]) * (x_TD[t] @ experts.w3[e])
            out[t] += weights[t, j] * (h @ experts.w2[e])
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(x_TD)
    return out


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_moe_dispatch_matches_per_token_reference(variant):
    model = build_model(TINY_VARIANTS[variant], seed=1)
    moe = next(layer.moe for layer in model.layers if layer.is_moe)
    x = torch.randn(2, 5, TINY.dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            moe(x).view(10, -1), _naive_moe(moe, x.view(10, -1)), atol=1e-6, rtol=1e-5
        )


@pytest.mark.parametrize(
    ("num_groups", "topk_groups", "top_k"), [(4, 2, 3), (8, 3, 2), (2, 1, 4)]
)
def test_router_group_limit_bias_and_scale(num_groups, topk_groups, top_k):
    config = dataclasses.replace(
        TINY, num_expert_groups=num_groups, topk_groups=topk_groups, top_k=top_k
    )
    router = build_model(config, seed=3).layers[1].moe.router
    router.expert_bias.copy_(torch.linspace(-0.05, 0.05, config.num_experts))
    x = torch.randn(64, config.dim, generator=torch.Generator().manual_seed(0))
    weights, ids = router(x)

    # Chosen experts lie in the topk_groups groups with the best biased scores, where a
    # group scores the sum of its two best experts (its only expert when size is one).
    scores = torch.sigmoid(x @ router.gate.weight.T)
    biased = (scores + router.expert_bias).view(64, num_groups, -1)
    group_scores = biased.topk(min(2, biased.shape[-1]), dim=-1).values.sum(-1)
    kept = group_scores.topk(topk_groups, dim=-1).indices
    group_size = config.num_experts // num_groups
    for row_ids, row_kept in zip(ids.tolist(), kept.tolist()):
        assert {e // group_size for e in row_ids} <= set(row_kept)
    # Within the kept groups, the best biased scores win.
    in_kept = torch.zeros(64, num_groups, dtype=torch.bool).scatter(1, kept, True)
    masked = biased.masked_fill(~in_kept.unsqueeze(-1), float("-inf")).view(64, -1)
    assert torch.equal(ids.sort(-1).values, masked.topk(top_k, -1).indices.sort(-1).values)
    # Weights come from the unbiased scores, normalized and scaled.
    expected = scores.gather(1, ids)
    expected = expected / expected.sum(-1, keepdim=True) * config.route_scale
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(weights.sum(-1), torch.full((64,), config.route_scale))


# ---------------------------------------------------------------------------- init


def test_same_seed_same_params_different_seed_differs():
    a = build_model("tiny", seed=0).state_dict()
    b = build_model("tiny", seed=0).state_dict()
    c = build_model("tiny", seed=1).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)
        is_constant = name.endswith("norm.weight") or name.endswith("expert_bias")
        assert is_constant == torch.equal(a[name], c[name]), name


def test_params_with_same_shape_get_different_values():
    model = build_model("tiny", seed=0)
    assert not torch.equal(model.layers[1].moe.experts.w1, model.layers[2].moe.experts.w1)
    assert not torch.equal(model.layers[1].moe.experts.w1, model.layers[1].moe.experts.w3)


def test_meta_to_empty_init_equals_direct_cpu_build():
    torch.manual_seed(123)  # direct construction runs default inits; they must not leak
    direct = MoETransformer(TINY)
    init_weights(direct, seed=7)

    with torch.device("meta"):
        deferred = MoETransformer(TINY)
    assert all(p.is_meta for p in deferred.parameters())
    deferred.to_empty(device="cpu")
    init_weights(deferred, seed=7)

    built = build_model("tiny", seed=7)
    ref = direct.state_dict()
    for other in (deferred.state_dict(), built.state_dict()):
        assert other.keys() == ref.keys()
        for name in ref:
            torch.testing.assert_close(other[name], ref[name], atol=0, rtol=0, msg=name)


def test_init_weights_on_meta_says_what_to_do():
    model = build_model("tiny", device="meta")
    with pytest.raises(ValueError, match="to_empty"):
        init_weights(model, seed=0)


# ---------------------------------------------------------------------------- impls


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_grouped_mm_and_loop_give_same_loss_and_grads(variant):
    config = TINY_VARIANTS[variant]
    input_ids, labels = _batch(config)
    grouped = build_model(dataclasses.replace(config, expert_impl="grouped_mm"), seed=2)
    loop = build_model(dataclasses.replace(config, expert_impl="loop"), seed=2)

    loss_g, grads_g = _loss_and_grads(grouped, input_ids, labels)
    loss_l, grads_l = _loss_and_grads(loop, input_ids, labels)
    torch.testing.assert_close(loss_g, loss_l, atol=1e-5, rtol=0)
    _assert_grads_close(grads_g, grads_l, atol=1e-5)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-12), (torch.bfloat16, 1e-2)])
def test_grouped_mm_matches_loop_in_other_dtypes(dtype, atol):
    # bf16 takes aten._grouped_mm; fp64, which aten rejects, takes mopc::grouped_mm.
    input_ids, labels = _batch(TINY)
    losses = []
    for impl in ("grouped_mm", "loop"):
        config = dataclasses.replace(TINY, expert_impl=impl)
        losses.append(_loss_and_grads(build_model(config, dtype=dtype), input_ids, labels)[0])
    assert losses[0].dtype == torch.promote_types(dtype, torch.float32)
    torch.testing.assert_close(losses[0], losses[1], atol=atol, rtol=0)


def test_compiled_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = build_model("tiny", seed=4)
    input_ids, labels = _batch(TINY)
    loss_eager, grads_eager = _loss_and_grads(model, input_ids, labels)

    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss_compiled, grads_compiled = _loss_and_grads(model, input_ids, labels, call=compiled)
    torch.testing.assert_close(loss_compiled, loss_eager, atol=1e-5, rtol=0)
    _assert_grads_close(grads_compiled, grads_eager, atol=1e-5)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("tiny", 1e5, 1e6),
        ("small", 50e6, 100e6),
        ("deepseek-v3", 671e9 * 0.97, 671e9 * 1.03),
        ("1t", 1.0e12 * 0.95, 1.0e12 * 1.05),
    ],
)
def test_preset_param_counts(name, low, high):
    model = build_model(name, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())
    counted = sum(p.numel() for p in model.parameters())
    config = PRESETS[name]
    assert counted == config.num_params()
    assert low <= counted <= high
    assert config.num_active_params() < config.num_params()


@pytest.mark.parametrize("name", ["deepseek-v3", "1t"])
def test_large_preset_runs_on_meta(name):
    # Two layers of the real widths: the shapes a planner traces, with no allocation.
    config = dataclasses.replace(PRESETS[name], num_layers=PRESETS[name].num_dense_layers + 1)
    model = build_model(config, device="meta", dtype=torch.bfloat16)
    input_ids = torch.zeros(1, 8, dtype=torch.long, device="meta")
    loss = model(input_ids, input_ids)
    loss.backward()
    assert loss.is_meta and loss.shape == ()
    experts = model.layers[-1].moe.experts
    assert experts.w1.grad.shape == (config.num_experts, config.dim, config.moe_inter_dim)


def test_num_active_params_counts_top_k_experts():
    config = dataclasses.replace(TINY, tie_embeddings=True)
    model = build_model(config, device="meta")
    expert_params = sum(
        p.numel() for n, p in model.named_parameters() if ".moe.experts." in n
    )
    skipped = expert_params * (config.num_experts - config.top_k) // config.num_experts
    assert config.num_active_params() == config.num_params() - skipped


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"num_heads": 6, "num_kv_heads": 2, "head_dim": None}, "num_heads"),
        ({"head_dim": 7}, "head_dim"),
        ({"top_k": 9}, "top_k"),
        ({"num_expert_groups": 3}, "num_expert_groups"),
        ({"topk_groups": 3}, "topk_groups"),
        ({"top_k": 5, "num_expert_groups": 2, "topk_groups": 1}, "top_k"),
        ({"num_dense_layers": 4}, "num_dense_layers"),
        ({"dense_inter_dim": 0}, "dense_inter_dim"),
        ({"num_shared_experts": -1}, "num_shared_experts"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"router": "relu"}, "router"),
        ({"expert_impl": "bmm"}, "expert_impl"),
        ({"norm_eps": 0.0}, "norm_eps"),
    ],
)
def test_validation_errors_name_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"MoEModelConfig\.{field}=") as info:
        dataclasses.replace(TINY, **changes)
    assert ";" in str(info.value)  # the value, then the fix


def test_head_dim_defaults_to_dim_over_heads():
    config = dataclasses.replace(TINY, head_dim=None, num_heads=4, num_kv_heads=2)
    assert config.head_dim == TINY.dim // 4


def test_build_model_rejects_unknown_preset():
    with pytest.raises(ValueError, match="tiny"):
        build_model("huge")
