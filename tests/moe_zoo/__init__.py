"""A zoo of small, random, independently written MoE models.

Each entry of :data:`ZOO` builds a :class:`ZooCase`: a model (fp32, CPU, train mode,
< 2M parameters, built under ``torch.manual_seed(0)``), keyword inputs that make it
return a loss, a ``loss_fn`` that turns the output into that scalar loss, and the
hand-written role of every parameter.  The role classifier in ``mopc`` is tested
against ``expected_roles``; nothing here imports ``mopc``.

Cases
-----
* ``loop_linear``      hand-written Mixtral-style: per-expert ``nn.Linear`` SwiGLU modules,
                       softmax+topk router, ``.tolist()`` token counts and a Python loop.
* ``batched_einsum``   hand-written: 3-D expert weights, capacity-padded one_hot dispatch,
                       einsum/bmm, sigmoid router with a (frozen) selection bias, shared expert,
                       a leading dense MLP layer, SDPA attention.
* ``hf_mixtral``, ``hf_qwen2_moe``, ``hf_deepseek_v3``, ``hf_qwen3_moe``, ``hf_olmoe``,
  ``hf_gpt_oss``       Hugging Face ``transformers`` 5.x models from tiny random configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

ROLES: frozenset[str] = frozenset(
    {
        "embedding",
        "attention",
        "norm",
        "dense_mlp",
        "router",
        "expert",
        "shared_expert",
        "vocab_projection",
        "other",
    }
)


@dataclass
class ZooCase:
    name: str
    model: torch.nn.Module
    example_inputs: dict[str, torch.Tensor]
    loss_fn: Callable[[Any], torch.Tensor]
    expected_roles: dict[str, str]
    notes: str
    # Parameters that have requires_grad=True but are *expected* to get no gradient
    # from one forward/backward on ``example_inputs`` (e.g. an expert no token reached).
    # Parameters with requires_grad=False are simply not checked.  Empty for every
    # current case; see each case's notes.
    params_without_grad: frozenset[str] = field(default_factory=frozenset)


def _registry() -> dict[str, Callable[[], ZooCase]]:
    from . import batched_einsum, hf_models, loop_linear

    zoo: dict[str, Callable[[], ZooCase]] = {
        "loop_linear": loop_linear.build,
        "batched_einsum": batched_einsum.build,
    }
    zoo.update(hf_models.CASES)
    return zoo


ZOO: dict[str, Callable[[], ZooCase]] = _registry()

__all__ = ["ROLES", "ZOO", "ZooCase"]
