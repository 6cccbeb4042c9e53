"""Named model configurations and the one way to build a model from them.

`tiny` is for tests, `small` for the demo and CPU benchmarks; `deepseek-v3` and `1t`
are for planning only: build them on the `meta` device, where they allocate nothing.
"""

from __future__ import annotations

import torch

from mopc.models.moe_transformer import MoEModelConfig, MoETransformer, Router, init_weights

__all__ = ["PRESETS", "build_model"]


PRESETS: dict[str, MoEModelConfig] = {
    # Every MoE feature on (dense + MoE layers, GQA, shared expert, sigmoid router with
    # correction bias, group-limited routing, route_scale), and heads, kv heads, experts
    # and vocab all divisible by 2 and 4 so every 2- and 4-way layout applies.
    # 0.19M parameters; a forward+backward on [2, 16] takes ~20 ms on CPU.
    "tiny": MoEModelConfig(
        vocab_size=128,
        dim=64,
        num_layers=3,
        num_dense_layers=1,
        dense_inter_dim=128,
        num_heads=8,
        num_kv_heads=4,
        num_experts=8,
        top_k=2,
        moe_inter_dim=32,
        num_shared_experts=1,
        router="sigmoid",
        router_bias=True,
        num_expert_groups=2,
        topk_groups=1,
        route_scale=2.5,
        max_seq_len=64,
    ),
    # 87.3M parameters (29.5M active). On 2 CPU threads a step at [4, 128] takes about
    # 1.2 s forward+backward, 1.8 s with AdamW.
    "small": MoEModelConfig(
        vocab_size=8192,
        dim=512,
        num_layers=8,
        num_dense_layers=1,
        dense_inter_dim=1536,
        num_heads=8,
        num_kv_heads=4,
        num_experts=16,
        top_k=2,
        moe_inter_dim=384,
        num_shared_experts=1,
        router="softmax",
        max_seq_len=32768,  # long-sequence benchmarks (context parallelism); rope is computed per forward, not stored
    ),
    # DeepSeek-V3 shapes with GQA in place of MLA. 128 query and 128 kv heads of 56
    # channels give 672.15B parameters, +0.17% over the published 671B (whose count
    # includes the 14B multi-token-prediction module we do not model), and 38.7B
    # active against the published 37B.
    "deepseek-v3": MoEModelConfig(
        vocab_size=129280,
        dim=7168,
        num_layers=61,
        num_dense_layers=3,
        dense_inter_dim=18432,
        num_heads=128,
        num_kv_heads=128,
        num_experts=256,
        top_k=8,
        moe_inter_dim=2048,
        num_shared_experts=1,
        router="sigmoid",
        router_bias=True,
        num_expert_groups=8,
        topk_groups=4,
        route_scale=2.5,
        rope_theta=10_000.0,
        max_seq_len=163840,
    ),
    # Kimi-K2-like: 1.028T parameters (+2.8% over 1.0T), 34.8B active.
    "1t": MoEModelConfig(
        vocab_size=163840,
        dim=7168,
        num_layers=61,
        num_dense_layers=1,
        dense_inter_dim=18432,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        num_experts=384,
        top_k=8,
        moe_inter_dim=2048,
        num_shared_experts=1,
        router="sigmoid",
        router_bias=True,
        route_scale=2.827,
        rope_theta=50_000.0,
        max_seq_len=131072,
    ),
}


def build_model(
    name_or_config: str | MoEModelConfig,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> MoETransformer:
    """Build a preset (by name) or a config, initialised from `seed`.

    The model is always constructed on `meta` first, so nothing is allocated twice; on
    `meta` it stays there uninitialised (for planning), elsewhere it is materialised
    with `to_empty` and filled by `init_weights`, whose values depend only on the seed
    and each parameter's name.
    """
    if isinstance(name_or_config, MoEModelConfig):
        config = name_or_config
    elif name_or_config in PRESETS:
        config = PRESETS[name_or_config]
    else:
        raise ValueError(
            f"unknown model preset {name_or_config!r}; choose one of {sorted(PRESETS)} "
            "or pass a MoEModelConfig."
        )
    with torch.device("meta"):
        model = MoETransformer(config).to(dtype)
    for module in model.modules():
        # The correction bias takes tiny updates; keep it in fp32 whatever the dtype.
        if isinstance(module, Router) and module.expert_bias is not None:
            module.expert_bias = module.expert_bias.float()
    if torch.device(device).type == "meta":
        return model
    model.to_empty(device=device)
    init_weights(model, seed)
    return model
