"""The vocabulary of role analysis: roles, per-block facts and the frozen result."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

PARAM_ROLES = (
    "embedding", "attention", "norm", "dense_mlp", "router", "expert", "shared_expert",
    "vocab_projection", "other",
)
NODE_ROLES = PARAM_ROLES + ("dispatch", "combine", "loss")

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|decoder_layers)\.(\d+)(?:\.|$)")


def layer_of(fqn: str) -> int | None:
    """The transformer layer index in a parameter name (`layers.3.attention.wq` -> 3)."""
    match = _LAYER_RE.search(fqn)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class MoEBlockInfo:
    """One routed MoE block found in the graph."""

    layer: int | None
    router_params: tuple[str, ...]
    expert_params: tuple[str, ...]
    shared_expert_params: tuple[str, ...]
    num_experts: int
    top_k: int
    topk_node: str
    block_input_node: str


@dataclass(frozen=True)
class RoleAnalysis:
    """Result of :func:`classify_roles`. Frozen: rewrites read it, never change it."""

    param_roles: Mapping[str, str]
    """Every trainable parameter's FQN -> one of PARAM_ROLES."""
    buffer_roles: Mapping[str, str]
    """Every non-trainable graph input with a module path (buffers) -> role."""
    node_roles: Mapping[str, str]
    """Every graph node's name -> one of NODE_ROLES."""
    node_layers: Mapping[str, int | None]
    """Every graph node's name -> transformer layer index (None outside layers)."""
    evidence: Mapping[str, str]
    """Parameter FQN -> the rule that decided its role."""
    moe_blocks: tuple[MoEBlockInfo, ...] = ()
    forward_nodes: frozenset[str] = field(default_factory=frozenset)
