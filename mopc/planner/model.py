"""What the planner knows about a model: its parameters per layer and their layouts.

Only the reduced-depth probe model (`probe.probe_config`) is ever built, on `meta`: a
full-depth 1T model takes seconds just to construct. Every layer of the full model is a
copy of the probe's dense or MoE layer, so per-rank bytes are the probe's head plus its
layers times their counts. Layouts come from `mopc.plan.layout.make_plan` (the function
`mopc.parallelize` uses), so per-rank parameter, gradient and optimizer bytes are the
exact sizes of the shards a real run allocates.

Under pipeline parallelism a rank allocates only its stage's shards: `LayoutBytes.parts`
gives the bytes of one layer of each kind, of the embedding (the parameters before the
first layer: the first stage's) and of the head (after the layers: the last stage's), as
`mopc.parallelize` assigns parameters to stages (`stage_of_param`).
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from mopc.passes.analysis.role_defs import layer_of

__all__ = ["LayoutBytes", "ModelInfo", "PartBytes", "layout_bytes"]


@dataclass(frozen=True)
class ModelInfo:
    config: Any
    probe_config: Any
    param_roles: dict[str, str]
    """Roles of the probe model's parameters."""
    itemsize: int

    @property
    def num_dense(self) -> int:
        return self.config.num_dense_layers

    @property
    def num_moe(self) -> int:
        return self.config.num_layers - self.config.num_dense_layers

    def layer_kind(self, probe_layer: int | None) -> str:
        if probe_layer is None:
            return "head"
        return "dense" if probe_layer < self.probe_config.num_dense_layers else "moe"

    def count(self, kind: str) -> int:
        return {"head": 1, "dense": self.num_dense, "moe": self.num_moe}[kind]


@dataclass(frozen=True)
class PartBytes:
    """Per-rank shard bytes, tensor count and ZeRO-3 bytes sent of one part of the model."""

    param_bytes: int = 0
    num_tensors: int = 0
    comm_bytes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class LayoutBytes:
    """Per-rank bytes of the full model's parameters at one layout (fp32 shards, as mopc runs)."""

    param_bytes: int
    num_tensors: int
    num_params: int
    gathered_bytes_max_layer: int
    """The most bytes one layer gathers at once (its chunks, full size): ZeRO-3's working set."""
    comm_bytes: dict[str, int]
    """`axis:kind` -> bytes this rank sends per step in ZeRO-3 gathers (forward and, with
    resharding, again in backward) and gradient reduce-scatters."""
    parts: dict[str, PartBytes] = field(default_factory=dict)
    """`embedding`, `head` (final norm, vocabulary projection), and ONE `dense` / `moe` layer:
    what a pipeline stage holding them allocates and sends."""


@functools.lru_cache(maxsize=64)
def _probe_model(config: Any) -> Any:
    from mopc.models import build_model

    return build_model(config, device="meta")


def layout_bytes(info: ModelInfo, world: int, tp: int, ep: int, vocab_parallel: bool,
                 reshard_after_forward: bool = True) -> LayoutBytes:
    """Exact per-rank shard bytes of `info`'s full model at a layout (see the module doc)."""
    return _layout_bytes(info.config, info.probe_config, tuple(sorted(info.param_roles.items())), world, tp, ep,
                         vocab_parallel, reshard_after_forward)


@functools.lru_cache(maxsize=4096)
def _layout_bytes(config: Any, probe_cfg: Any, roles: tuple, world: int, tp: int, ep: int, vocab_parallel: bool,
                  reshard: bool) -> LayoutBytes:
    from mopc.config import MoPConfig
    from mopc.plan.layout import make_plan
    from mopc.plan.mesh import MeshSpec
    from mopc.runtime.comm import bytes_sent

    model = _probe_model(probe_cfg)
    spec = MeshSpec(world_size=world, dp=world // tp, tp=tp, ep=ep)
    plan = make_plan(model, dict(roles), spec, MoPConfig(tp=tp, ep=ep, vocab_parallel=vocab_parallel))
    itemsize = {fqn: p.element_size() for fqn, p in model.named_parameters()}
    num_dense = probe_cfg.num_dense_layers
    counts = {"head": 1, "dense": config.num_dense_layers, "moe": config.num_layers - config.num_dense_layers}
    totals = defaultdict(int)
    gathered_per_layer: dict[str, int] = defaultdict(int)
    comm: dict[str, int] = defaultdict(int)
    part_bytes: dict[str, int] = defaultdict(int)
    part_tensors: dict[str, int] = defaultdict(int)
    part_comm: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    axis_of = {"flat": "world", "tp": "dp", "ep": "edp"}
    seen_layer, part_of = False, {}
    for fqn, _ in model.named_parameters(remove_duplicate=False):  # as `parallelize._stage_plan` orders them
        layer = layer_of(fqn)
        seen_layer = seen_layer or layer is not None
        part_of[fqn] = ("head" if seen_layer else "embedding") if layer is None else (
            "dense" if layer < num_dense else "moe")
    for fqn, lay in plan.layouts.items():
        layer = layer_of(fqn)
        kind = "head" if layer is None else ("dense" if layer < num_dense else "moe")
        part = part_of.get(fqn, kind)
        n = counts[kind]
        size = itemsize[fqn]
        totals["bytes"] += n * lay.piece_numel * size
        totals["tensors"] += n
        totals["params"] += n * math.prod(lay.shape)
        part_bytes[part] += lay.piece_numel * size
        part_tensors[part] += 1
        if lay.kind == "vocab":
            continue
        gathered = lay.num_pieces * lay.piece_numel * size
        gathered_per_layer[kind if layer is not None else fqn] += gathered
        group = lay.num_pieces
        gathers = 2 if reshard else 1
        sent = {f"{axis_of[lay.kind]}:all_gather": gathers * bytes_sent("all_gather", lay.piece_numel * size, group),
                f"{axis_of[lay.kind]}:reduce_scatter": bytes_sent("reduce_scatter", gathered, group)}
        for key, value in sent.items():
            comm[key] += n * value
            part_comm[part][key] += value
    parts = {p: PartBytes(param_bytes=part_bytes[p], num_tensors=part_tensors[p],
                          comm_bytes={k: v for k, v in part_comm[p].items() if v})
             for p in ("embedding", "head", "dense", "moe")}
    return LayoutBytes(param_bytes=totals["bytes"], num_tensors=totals["tensors"], num_params=totals["params"],
                       gathered_bytes_max_layer=max(gathered_per_layer.values(), default=0),
                       comm_bytes={k: v for k, v in comm.items() if v}, parts=parts)
