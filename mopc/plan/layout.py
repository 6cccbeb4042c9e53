"""The plan: a layout per parameter, chosen per component from the analysed roles.

Rules (DESIGN.md's table, the parts built so far):
- every parameter: ZeRO-3 over all ranks (`flat`), the reference program;
- the vocabulary projection, when `vocab_parallel`: one block of vocabulary rows per rank
  (`vocab`), so the vocab-parallel loss uses the shard in place and never gathers it;
- attention and dense MLP, when `tp > 1`: chunks over the tensor-parallel group
  (column-parallel q/k/v and up/gate projections, row-parallel output projections),
  each chunk ZeRO-3-sharded over the data-parallel ranks (`tp`).
Shapes are checked against the mesh here, before anything is allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from mopc.config import MoPConfig, MoPConfigError
from mopc.plan.mesh import MeshSpec
from mopc.runtime.ownership import ParamLayout

# Which weight dim a tensor-parallel chunk cuts, by the last name component: output
# features (dim 0) for column-parallel projections, input features (dim 1) for row-parallel.
_COLUMN_PARALLEL = ("wq", "wk", "wv", "q_proj", "k_proj", "v_proj", "w1", "w3", "gate_proj", "up_proj")
_ROW_PARALLEL = ("wo", "o_proj", "w2", "down_proj")


@dataclass(frozen=True)
class ModelDims:
    """The model sizes that layouts must divide, read from the model's config."""

    num_heads: int | None = None
    num_kv_heads: int | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None

    @staticmethod
    def of(model: torch.nn.Module) -> ModelDims:
        cfg = getattr(model, "config", None)

        def pick(*names: str) -> int | None:
            for name in names:
                value = getattr(cfg, name, None)
                if isinstance(value, int):
                    return value
            return None

        heads = pick("num_heads", "num_attention_heads", "n_head")
        return ModelDims(
            num_heads=heads,
            num_kv_heads=pick("num_kv_heads", "num_key_value_heads") or heads,
            vocab_size=pick("vocab_size"),
            hidden_size=pick("dim", "hidden_size", "n_embd"),
        )


@dataclass(frozen=True)
class Plan:
    """What `mopc.parallelize` decided; attached to the model as `model.mopc_plan`."""

    spec: MeshSpec
    config: MoPConfig
    layouts: Mapping[str, ParamLayout]
    param_roles: Mapping[str, str]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def summary(self) -> str:
        by_kind: dict[str, list[str]] = {}
        for fqn, layout in self.layouts.items():
            by_kind.setdefault(layout.kind, []).append(fqn)
        lines = [f"mesh: world {self.spec.world_size} = dp {self.spec.dp} x tp {self.spec.tp}"]
        for kind, fqns in sorted(by_kind.items()):
            numel = sum(math.prod(self.layouts[f].shape) for f in fqns)
            lines.append(f"  {kind:6s} {len(fqns):4d} tensors, {numel:,} elements")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _tp_dim(fqn: str, role: str) -> int | None:
    if role not in ("attention", "dense_mlp"):
        return None
    parts = fqn.split(".")
    owner = parts[-2] if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts[-1]
    if owner in _COLUMN_PARALLEL:
        return 0
    if owner in _ROW_PARALLEL and parts[-1] == "weight":
        return 1
    return None


def check_dims(dims: ModelDims, spec: MeshSpec, config: MoPConfig) -> None:
    """Errors name the option, the model size and the fix."""
    tp = spec.tp
    if tp > 1:
        for name, value in (("attention heads", dims.num_heads), ("key/value heads", dims.num_kv_heads),
                            ("hidden size", dims.hidden_size)):
            if value is not None and value % tp:
                ok = [d for d in range(1, value + 1) if value % d == 0 and spec.world_size % d == 0]
                raise MoPConfigError(
                    f"mop option tp={tp} does not divide the model's {name} ({value}); "
                    f"choose tp from {ok}"
                )
    if config.vocab_parallel and dims.vocab_size is not None and dims.vocab_size % spec.world_size:
        raise MoPConfigError(
            f"mop option vocab_parallel=True needs the vocabulary ({dims.vocab_size}) divisible by the "
            f"world size {spec.world_size}; pad the vocabulary to a multiple of {spec.world_size} "
            "or pass vocab_parallel=False"
        )


def make_plan(model: torch.nn.Module, param_roles: Mapping[str, str], spec: MeshSpec,
              config: MoPConfig) -> Plan:
    """A layout for every parameter (after `check_dims`)."""
    dims = ModelDims.of(model)
    check_dims(dims, spec, config)
    layouts: dict[str, ParamLayout] = {}
    notes: list[str] = []
    seen: dict[int, str] = {}
    for fqn, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen[id(param)] = fqn
        role = param_roles.get(fqn, "other")
        shape = tuple(param.shape)
        layout = ParamLayout(fqn=fqn, shape=shape, world_size=spec.world_size)
        tp_dim = _tp_dim(fqn, role) if spec.tp > 1 else None
        if role == "vocab_projection" and config.vocab_parallel and len(shape) == 2:
            if shape[0] % spec.world_size == 0:
                layout = ParamLayout(fqn=fqn, shape=shape, chunk_dim=0, num_chunks=spec.world_size,
                                     world_size=spec.world_size, kind="vocab")
            else:
                notes.append(f"{fqn}: {shape[0]} rows not divisible by {spec.world_size}; kept ZeRO-3")
        elif tp_dim is not None and shape[tp_dim] % spec.tp == 0:
            layout = ParamLayout(fqn=fqn, shape=shape, chunk_dim=tp_dim, num_chunks=spec.tp,
                                 world_size=spec.world_size, kind="tp")
        layout.validate()
        layouts[fqn] = layout
    return Plan(spec=spec, config=config, layouts=layouts, param_roles=dict(param_roles), notes=tuple(notes))


def describe(plan: Plan) -> dict[str, Any]:
    return {fqn: {"kind": lay.kind, "shape": list(lay.shape), "chunk_dim": lay.chunk_dim,
                  "num_chunks": lay.num_chunks, "piece_numel": lay.piece_numel}
            for fqn, lay in plan.layouts.items()}
