"""Hugging Face ``transformers`` (5.x) MoE models built from tiny random configs.

No downloads: each case constructs ``XxxConfig(...)`` and ``XxxForCausalLM(config)`` under
``torch.manual_seed(0)``.  ``transformers`` is imported lazily so that the hand-written cases
still import without it.

Expected roles are written per model from the real ``named_parameters()`` of transformers 5.24:
a hand-written table of per-layer local names (``_layer_roles``) expanded over layer indices.

Experts implementation (``config._experts_implementation``) varies between cases:
* ``grouped_mm`` (the transformers 5.x default): sort by expert id, ``histc`` counts, ``cumsum``
  offsets, then ``torch._grouped_mm`` in eager on CPU / ``make_fx``; under Dynamo with fp32 weights
  transformers switches to its own custom op ``transformers::grouped_mm_fallback``.
* ``batched_mm``: gathers each (token, slot)'s expert weight matrix and calls ``bmm``.
* ``eager``: the original per-expert Python loop (``one_hot`` -> ``nonzero`` -> ``torch.where``
  -> ``index_add_``), which graph-breaks under Dynamo.
"""

from __future__ import annotations

from typing import Callable

import torch

VOCAB = 128
BATCH, SEQ = 2, 16
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _expand(n_layers: int, per_layer: Callable[[int], dict[str, str]], top: dict[str, str]):
    roles = dict(top)
    for i in range(n_layers):
        for k, v in per_layer(i).items():
            roles[f"model.layers.{i}.{k}"] = v
    return roles


_TOP = {
    "model.embed_tokens.weight": "embedding",
    "model.norm.weight": "norm",
    "lm_head.weight": "vocab_projection",
}
_NORMS = {
    "input_layernorm.weight": "norm",
    "post_attention_layernorm.weight": "norm",
}
_QKVO = {f"self_attn.{p}_proj.weight": "attention" for p in "qkvo"}
_QKV_BIAS = {f"self_attn.{p}_proj.bias": "attention" for p in "qkv"}


def _build(name, config, model_cls, roles, notes, loss_fn=lambda out: out.loss):
    from . import ZooCase

    torch.manual_seed(0)
    model = model_cls(config).float().train()
    return ZooCase(
        name=name,
        model=model,
        example_inputs=_inputs(),
        loss_fn=loss_fn,
        expected_roles=roles,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
def build_mixtral():
    import transformers as T

    n_layers = 2
    cfg = T.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, attn_implementation="eager", **_TOKENS,
    )

    def layer(i):
        return {
            **_QKVO, **_NORMS,
            "mlp.gate.weight": "router",
            "mlp.experts.gate_up_proj": "expert",  # [E, 2F, D]
            "mlp.experts.down_proj": "expert",  # [E, D, F]
        }

    return _build(
        "hf_mixtral", cfg, T.MixtralForCausalLM, _expand(n_layers, layer, _TOP),
        "transformers MixtralForCausalLM, eager attention. Softmax router (mlp.gate, 4 experts, "
        "k=2); experts are 3-D parameters gate_up_proj [E,2F,D] / down_proj [E,D,F] run by the "
        "default 'grouped_mm' experts implementation (sort + histc + cumsum offsets + "
        "torch._grouped_mm eagerly; transformers::grouped_mm_fallback custom op under Dynamo). "
        "aot_eager: one graph, no breaks.",
    )


# --------------------------------------------------------------------------------------------
def build_qwen2_moe(n_layers: int = 3):
    import transformers as T

    cfg = T.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_hidden_layers=n_layers, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
        mlp_only_layers=[0], output_router_logits=True, router_aux_loss_coef=0.01,
        max_position_embeddings=64, attn_implementation="sdpa", **_TOKENS,
    )

    def layer(i):
        roles = {**_QKVO, **_QKV_BIAS, **_NORMS}
        if i == 0:  # mlp_only_layers=[0]: dense Qwen2MoeMLP
            roles.update({f"mlp.{p}_proj.weight": "dense_mlp" for p in ("gate", "up", "down")})
        else:
            roles.update({
                "mlp.gate.weight": "router",
                "mlp.experts.gate_up_proj": "expert",
                "mlp.experts.down_proj": "expert",
                "mlp.shared_expert.gate_proj.weight": "shared_expert",
                "mlp.shared_expert.up_proj.weight": "shared_expert",
                "mlp.shared_expert.down_proj.weight": "shared_expert",
                "mlp.shared_expert_gate.weight": "shared_expert",  # sigmoid gate on the shared expert
            })
        return roles

    return _build(
        "hf_qwen2_moe", cfg, T.Qwen2MoeForCausalLM, _expand(n_layers, layer, _TOP),
        "transformers Qwen2MoeForCausalLM, sdpa attention with q/k/v biases. Layer 0 is dense "
        "(mlp_only_layers=[0], mlp.gate_proj/up_proj/down_proj -> dense_mlp: same leaf names as "
        "the shared expert). Layers 1-2: softmax router (4 experts, k=2, no renorm), 3-D experts "
        "via default grouped_mm, shared_expert MLP scaled by sigmoid(shared_expert_gate(x)) "
        "(a [1, D] Linear -> shared_expert). output_router_logits=True, so out.loss includes the "
        "load-balancing aux loss (router gets gradient from two paths). aot_eager: the FIRST "
        "call graph-breaks once (2 graphs) because output_router_logits makes transformers "
        "install forward hooks under a threading.Lock ('Unsupported context manager', "
        "utils/output_capturing.py); once the hooks exist (any earlier call, eager or compiled) "
        "it compiles to one graph.",
    )


# --------------------------------------------------------------------------------------------
def build_deepseek_v3(n_layers: int = 3):
    import transformers as T

    cfg = T.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=64,
        attn_implementation="eager", **_TOKENS,
    )

    def layer(i):
        roles = {
            # MLA: low-rank q and joint kv compression, with RMSNorms inside attention
            "self_attn.q_a_proj.weight": "attention",
            "self_attn.q_a_layernorm.weight": "norm",
            "self_attn.q_b_proj.weight": "attention",
            "self_attn.kv_a_proj_with_mqa.weight": "attention",
            "self_attn.kv_a_layernorm.weight": "norm",
            "self_attn.kv_b_proj.weight": "attention",
            "self_attn.o_proj.weight": "attention",
            **_NORMS,
        }
        if i < 1:  # first_k_dense_replace=1
            roles.update({f"mlp.{p}_proj.weight": "dense_mlp" for p in ("gate", "up", "down")})
        else:
            roles.update({
                "mlp.gate.weight": "router",  # e_score_correction_bias is a buffer, not a parameter
                "mlp.experts.gate_up_proj": "expert",
                "mlp.experts.down_proj": "expert",
                "mlp.shared_experts.gate_proj.weight": "shared_expert",
                "mlp.shared_experts.up_proj.weight": "shared_expert",
                "mlp.shared_experts.down_proj.weight": "shared_expert",
            })
        return roles

    return _build(
        "hf_deepseek_v3", cfg, T.DeepseekV3ForCausalLM, _expand(n_layers, layer, _TOP),
        "transformers DeepseekV3ForCausalLM, eager attention, MLA (q_a/q_b, kv_a_proj_with_mqa/"
        "kv_b, q_a_layernorm/kv_a_layernorm -> norm). Layer 0 dense (first_k_dense_replace=1). "
        "Layers 1-2: sigmoid router mlp.gate (weight is a bare nn.Parameter, F.linear in fp32) "
        "plus e_score_correction_bias (a BUFFER in transformers, so not in expected_roles), "
        "group-limited top-k (8 experts, n_group=4, topk_group=2, k=2, renorm, scaling 2.5), "
        "3-D experts via default grouped_mm, one shared expert (mlp.shared_experts). "
        "Parameter order differs: experts are registered before the gate. "
        "aot_eager: one graph, no breaks.",
    )


# --------------------------------------------------------------------------------------------
def build_qwen3_moe(experts_implementation: str = "batched_mm"):
    """`experts_implementation="grouped_mm"` (transformers' default) routes rows by offsets."""
    import transformers as T

    n_layers = 2
    cfg = T.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
        num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=64,
        tie_word_embeddings=True, attn_implementation="sdpa", experts_implementation=experts_implementation,
        **_TOKENS,
    )

    def layer(i):
        return {
            **_QKVO, **_NORMS,
            "self_attn.q_norm.weight": "norm",
            "self_attn.k_norm.weight": "norm",
            "mlp.gate.weight": "router",
            "mlp.experts.gate_up_proj": "expert",
            "mlp.experts.down_proj": "expert",
        }

    top = {k: v for k, v in _TOP.items() if k != "lm_head.weight"}  # tied: lm_head IS embed_tokens
    return _build(
        "hf_qwen3_moe", cfg, T.Qwen3MoeForCausalLM, _expand(n_layers, layer, top),
        "transformers Qwen3MoeForCausalLM, sdpa attention with per-head q_norm/k_norm, "
        "tie_word_embeddings=True (lm_head.weight is model.embed_tokens.weight, so only the "
        "embedding name appears; role embedding). Softmax router (8 experts, k=2, renorm); 3-D "
        "experts with experts_implementation='batched_mm' (index the [E,...] weights by each "
        "(token, slot)'s expert id, then bmm). aot_eager: one graph, no breaks.",
    )


# --------------------------------------------------------------------------------------------
def build_olmoe(experts_implementation: str = "eager"):
    """`experts_implementation="grouped_mm"` (transformers' default) compiles to one graph."""
    import transformers as T

    n_layers = 2
    cfg = T.OlmoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, attn_implementation="eager", experts_implementation=experts_implementation,
        **_TOKENS,
    )

    def layer(i):
        return {
            **_QKVO, **_NORMS,
            "self_attn.q_norm.weight": "norm",  # OLMoE q/k norms span the full projection width
            "self_attn.k_norm.weight": "norm",
            "mlp.gate.weight": "router",
            "mlp.experts.gate_up_proj": "expert",
            "mlp.experts.down_proj": "expert",
        }

    return _build(
        "hf_olmoe", cfg, T.OlmoeForCausalLM, _expand(n_layers, layer, _TOP),
        "transformers OlmoeForCausalLM, eager attention, q_norm/k_norm over the full q/k width. "
        "Softmax router (4 experts, k=2). 3-D expert parameters but experts_implementation="
        "'eager': transformers' original per-expert loop (one_hot -> nonzero over hit experts -> "
        "torch.where -> F.linear on gate_up_proj[e] / down_proj[e] -> index_add_). "
        "aot_eager graph-breaks in the experts loop: aten.nonzero ('Dynamic shape operator'); "
        "explain(): 12 graphs / 11 breaks; expert compute is aten.mm per hit expert. "
        "make_fx(tracing_mode='real') fails at F.one_hot (CPU range check calls .item()).",
    )


# --------------------------------------------------------------------------------------------
def build_gpt_oss():
    import transformers as T

    n_layers = 2
    cfg = T.GptOssConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=8, max_position_embeddings=64,
        rope_parameters={
            "rope_type": "yarn", "factor": 2.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "truncate": False, "original_max_position_embeddings": 32, "rope_theta": 150000.0,
        },
        attn_implementation="eager", **_TOKENS,
    )

    def layer(i):
        return {
            "self_attn.sinks": "attention",  # per-head attention-sink logits [H]
            **_QKVO,
            **{f"self_attn.{p}_proj.bias": "attention" for p in "qkvo"},
            **_NORMS,
            "mlp.router.weight": "router",
            "mlp.router.bias": "router",
            "mlp.experts.gate_up_proj": "expert",  # [E, D, 2F], interleaved gate/up columns
            "mlp.experts.gate_up_proj_bias": "expert",  # [E, 2F]
            "mlp.experts.down_proj": "expert",  # [E, F, D]
            "mlp.experts.down_proj_bias": "expert",  # [E, D]
        }

    return _build(
        "hf_gpt_oss", cfg, T.GptOssForCausalLM, _expand(n_layers, layer, _TOP),
        "transformers GptOssForCausalLM, eager attention (sdpa unsupported: attention sinks), "
        "alternating sliding/full layers, q/k/v/o biases and self_attn.sinks [H]. Router "
        "mlp.router (Linear with bias; topk then softmax over the k). 3-D experts stored "
        "transposed ([E, D, 2F], interleaved gate/up) with 2-D per-expert biases, clamped "
        "SwiGLU, default grouped_mm implementation. aot_eager: one graph, no breaks.",
    )


CASES: dict[str, Callable] = {
    "hf_mixtral": build_mixtral,
    "hf_qwen2_moe": build_qwen2_moe,
    "hf_deepseek_v3": build_deepseek_v3,
    "hf_qwen3_moe": build_qwen3_moe,
    "hf_olmoe": build_olmoe,
    "hf_gpt_oss": build_gpt_oss,
}
