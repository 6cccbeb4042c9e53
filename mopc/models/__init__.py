"""Reference MoE models that mopc compiles, tests and benchmarks against."""

from mopc.models.moe_transformer import (
    Attention,
    FeedForward,
    GroupedExperts,
    MoE,
    MoEModelConfig,
    MoETransformer,
    RMSNorm,
    Router,
    TransformerBlock,
    init_weights,
    make_init_fn,
)
from mopc.models.presets import PRESETS, build_model

__all__ = [
    "PRESETS",
    "Attention",
    "FeedForward",
    "GroupedExperts",
    "MoE",
    "MoEModelConfig",
    "MoETransformer",
    "RMSNorm",
    "Router",
    "TransformerBlock",
    "build_model",
    "init_weights",
    "make_init_fn",
]
