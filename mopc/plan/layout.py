"""The plan: a layout per parameter, chosen per component from the analysed roles.

Rules (DESIGN.md's table, the parts built so far):
- every parameter: ZeRO-3 over all ranks (`flat`), the reference program;
- the vocabulary projection, when `vocab_parallel`: one block of vocabulary rows per rank
  (`vocab`), so the vocab-parallel loss uses the shard in place and never gathers it;
- attention and dense MLP, when `tp > 1`: chunks over the tensor-parallel group
  (column-parallel q/k/v and up/gate projections, row-parallel output projections),
  each chunk ZeRO-3-sharded over the data-parallel ranks (`tp`);
- routed experts, when `ep > 1`: experts (dim 0 of the 3-D weights) split into `ep`
  chunks over an expert-parallel group, each chunk ZeRO-3-sharded over the ranks holding
  the same experts (`ep`); tokens travel to them, the weights never do.
Shapes are checked against the mesh here, before anything is allocated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

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
    num_experts: int | None = None

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
            num_experts=pick("num_experts", "num_local_experts", "n_routed_experts"),
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
        mesh = (f"dp {self.spec.data_parallel} x cp {self.spec.cp} x tp {self.spec.tp}" if self.spec.cp > 1
                else f"dp {self.spec.dp} x tp {self.spec.tp}")
        lines = [f"mesh: world {self.spec.world_size} = {mesh}"
                 + (f"; experts: ep {self.spec.ep} x edp {self.spec.world_size // self.spec.ep}"
                    if self.spec.ep > 1 else "")]
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
        for name, value in (("attention heads", dims.num_heads), ("key/value heads", dims.num_kv_heads)):
            if value is not None and value % tp:
                ok = [d for d in range(1, value + 1) if value % d == 0 and spec.world_size % d == 0]
                raise MoPConfigError(
                    f"mop option tp={tp} does not divide the model's {name} ({value}); "
                    f"choose tp from {ok}"
                )
    if config.cp_attention == "all_to_all":
        for name, value in (("attention heads", dims.num_heads), ("key/value heads", dims.num_kv_heads)):
            if value is not None and (value // tp) % spec.cp:
                ok = [d for d in range(1, value // tp + 1) if (value // tp) % d == 0 and spec.dp % d == 0]
                raise MoPConfigError(
                    f"mop option cp_attention='all_to_all' with cp={spec.cp} splits the model's {name} ({value}"
                    f"{f' / tp={tp}' if tp > 1 else ''}) over the cp ranks, and {value // tp} is not divisible by "
                    f"{spec.cp}; choose cp from {ok} or cp_attention='all_gather'"
                )
    if spec.ep > 1 and dims.num_experts is not None and dims.num_experts % spec.ep:
        ok = [d for d in range(1, dims.num_experts + 1) if dims.num_experts % d == 0 and spec.world_size % d == 0]
        raise MoPConfigError(
            f"mop option ep={spec.ep} does not divide the model's number of experts ({dims.num_experts}); "
            f"choose ep from {ok}"
        )
    if config.vocab_parallel and dims.vocab_size is not None and dims.vocab_size % spec.world_size:
        raise MoPConfigError(
            f"mop option vocab_parallel=True needs the vocabulary ({dims.vocab_size}) divisible by the "
            f"world size {spec.world_size}; pad the vocabulary to a multiple of {spec.world_size} "
            "or pass vocab_parallel=False"
        )


def _block_of(fqn: str, role: str) -> tuple[str, str]:
    """(block path, role): `layers.3.attention.wq.weight` -> (`layers.3.attention`, attention)."""
    parts = fqn.split(".")
    return ".".join(parts[:-2]) if len(parts) > 2 else fqn, role


def tp_worth_it(weight_bytes: int, token_bytes: int, spec: MeshSpec) -> tuple[bool, int, int]:
    """Whether a block moves fewer bytes per rank under tensor parallelism than ZeRO-3.

    ZeRO-3 over all W ranks: gather the weights in forward and again in backward, reduce-
    scatter the gradient: 3 x weight_bytes x (W-1)/W. Tensor parallel of degree T over
    D = W/T data-parallel ranks: the same for the 1/T weight chunk over D ranks, plus five
    token collectives of the block's activations (forward gather and reduce-scatter; backward
    gather of the gradient, re-gather of the input, reduce-scatter): 5 x token_bytes x (T-1).
    """
    w, t, d = spec.world_size, spec.tp, spec.dp
    reference = 3 * weight_bytes * (w - 1) // w
    tensor_parallel = 3 * (weight_bytes // t) * (d - 1) // d + 5 * token_bytes * (t - 1)
    return tensor_parallel < reference, reference, tensor_parallel


def make_plan(model: torch.nn.Module, param_roles: Mapping[str, str], spec: MeshSpec,
              config: MoPConfig, tokens_per_rank: int | None = None) -> Plan:
    """A layout for every parameter (after `check_dims`).

    With `plan="auto"`, a block stays on the reference layout when tensor parallelism would
    move more bytes per rank (`tp_worth_it`, from `tokens_per_rank` of the example batch).
    """
    dims = ModelDims.of(model)
    check_dims(dims, spec, config)
    layouts: dict[str, ParamLayout] = {}
    notes: list[str] = []
    skip_blocks: set[tuple[str, str]] = set()
    if config.plan == "auto" and spec.tp > 1 and tokens_per_rank and dims.hidden_size:
        block_bytes: dict[tuple[str, str], int] = {}
        for fqn, param in model.named_parameters():
            role = param_roles.get(fqn, "other")
            if _tp_dim(fqn, role) is not None:
                key = _block_of(fqn, role)
                block_bytes[key] = block_bytes.get(key, 0) + param.numel() * param.element_size()
        element = next(model.parameters()).element_size()  # activations in the parameters' dtype
        token_bytes = tokens_per_rank * dims.hidden_size * element
        for key, nbytes in sorted(block_bytes.items()):
            worth, ref, tp_bytes = tp_worth_it(nbytes, token_bytes, spec)
            if not worth:
                skip_blocks.add(key)
            notes.append(f"{key[0]}: {'tensor parallel' if worth else 'reference (ZeRO-3)'} "
                         f"(moves {tp_bytes:,} vs {ref:,} bytes per rank)")
    seen: dict[int, str] = {}
    for fqn, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen[id(param)] = fqn
        role = param_roles.get(fqn, "other")
        shape = tuple(param.shape)
        layout = ParamLayout(fqn=fqn, shape=shape, world_size=spec.world_size)
        if spec.ep > 1 and role == "expert":
            layout = _expert_layout(fqn, shape, spec, dims, notes)
            layout.validate()
            layouts[fqn] = layout
            continue
        tp_dim = _tp_dim(fqn, role) if spec.tp > 1 and _block_of(fqn, role) not in skip_blocks else None
        if role == "vocab_projection" and config.vocab_parallel and len(shape) == 2:
            if shape[0] % spec.world_size == 0:
                layout = ParamLayout(fqn=fqn, shape=shape, chunk_dim=0, num_chunks=spec.world_size,
                                     world_size=spec.world_size, kind="vocab")
            else:
                notes.append(f"{fqn}: {shape[0]} rows not divisible by {spec.world_size}; kept ZeRO-3")
        elif tp_dim is not None:
            if shape[tp_dim] % spec.tp:
                size = shape[tp_dim]
                ok = [d for d in range(1, size + 1) if size % d == 0 and spec.world_size % d == 0]
                raise MoPConfigError(
                    f"mop option tp={spec.tp} does not divide the {role} hidden size {size} (dim {tp_dim} of "
                    f"{fqn}), which tensor parallelism splits; choose tp from {ok}"
                )
            layout = ParamLayout(fqn=fqn, shape=shape, chunk_dim=tp_dim, num_chunks=spec.tp,
                                 world_size=spec.world_size, kind="tp")
        layout.validate()
        layouts[fqn] = layout
    if spec.ep > 1 and not any(lay.kind == "ep" for lay in layouts.values()):
        raise MoPConfigError(
            f"mop option ep={spec.ep} needs routed experts stored as 3-D weights [experts, ...], but the "
            "analysis found none in this model (no MoE block, or per-expert modules); pass ep=1"
        )
    return Plan(spec=spec, config=config, layouts=layouts, param_roles=dict(param_roles), notes=tuple(notes))


def _expert_layout(fqn: str, shape: tuple[int, ...], spec: MeshSpec, dims: ModelDims,
                   notes: list[str]) -> ParamLayout:
    """Experts (dim 0) split over the expert-parallel group; otherwise the reference layout."""
    num_experts = dims.num_experts if dims.num_experts is not None else (shape[0] if len(shape) == 3 else None)
    if len(shape) != 3 or shape[0] != num_experts:
        notes.append(f"{fqn}: not a [experts, ...] weight; kept ZeRO-3")
        return ParamLayout(fqn=fqn, shape=shape, world_size=spec.world_size)
    if shape[0] % spec.ep:
        ok = [d for d in range(1, shape[0] + 1) if shape[0] % d == 0 and spec.world_size % d == 0]
        raise MoPConfigError(
            f"mop option ep={spec.ep} does not divide the {shape[0]} experts of {fqn}; choose ep from {ok}"
        )
    return ParamLayout(fqn=fqn, shape=shape, chunk_dim=0, num_chunks=spec.ep, world_size=spec.world_size,
                       kind="ep")
