"""The collectives of a graph, as a table: kind, group, sizes, bytes, role, layer, pass.

Read from the graph (what the compiled program *will* run), so it works on fake process
groups at any world size. Rows an expert-parallel rank receives are known only at run
time: those sizes are counted as the rows sent (what balanced routing gives), and a
spilling lend/return as its whole [local + borrowed experts] tensor (an upper bound). The
measured counterpart for real runs is `mopc.runtime.comm` (the flight recorder).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

_KINDS = {
    "all_gather_into_tensor": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "all_reduce": "all_reduce",
    "all_to_all_single": "all_to_all",
    "broadcast": "broadcast",
}


@dataclass(frozen=True)
class Collective:
    """One functional collective of a graph."""

    kind: str
    group: str
    group_size: int
    numel_in: int
    numel_out: int
    bytes_in: int
    bytes_out: int
    role: str
    layer: int | None
    created_by: str
    node: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# mopc's expert-parallel exchange ops (mopc/runtime/experts.py): all-to-alls inside an op,
# because how many rows each rank receives is known only at run time; the EP group is
# their fourth argument.
_EP_OPS = {"mopc.ep_dispatch", "mopc.ep_combine", "mopc.ep_lend_weights", "mopc.ep_return_grads"}
# The compressed gradient reduction (mopc/runtime/compression.py): an all-to-all of codes or
# rows, or PowerSGD's all-reduces; its group is the fourth argument too. The bytes listed are
# the gradient's (uncompressed) size: what travels is known only at run time.
_COMPRESSED = "mopc.compressed_reduce_grad"
_GROUP_ARG3 = _EP_OPS | {_COMPRESSED}


def _kind(node: Node) -> str | None:
    if node.op != "call_function":
        return None
    name = str(node.target)
    if name.rsplit(".", 1)[0] in _EP_OPS:
        return "all_to_all"
    if name.rsplit(".", 1)[0] == _COMPRESSED:
        return "all_reduce" if node.args[4] == "powersgd" else "all_to_all"
    if not name.startswith("_c10d_functional."):
        return None
    return _KINDS.get(name.split(".")[1])


def _numel(val: object, fallback: int) -> int:
    """Elements of a value; a data-dependent size (expert dispatch) counts as `fallback`."""
    if not isinstance(val, torch.Tensor):
        return 0
    try:
        return int(val.numel())
    except Exception:  # noqa: BLE001 - unbacked symbolic size
        return fallback


def _group_size(node: Node, kind: str) -> int:
    if str(node.target).rsplit(".", 1)[0] in _GROUP_ARG3:
        from mopc.plan.mesh import group_size

        return group_size(node.args[3])
    if kind in ("all_gather", "reduce_scatter"):
        return int(node.args[-2])
    from mopc.plan.mesh import group_size

    try:
        return group_size(node.args[-1])
    except Exception:  # noqa: BLE001 - the group may be gone when a dump is read later
        return -1


def graph_collectives(gm: GraphModule) -> list[Collective]:
    """Every `_c10d_functional` collective of `gm` in graph order."""
    out = []
    for node in gm.graph.nodes:
        kind = _kind(node)
        if kind is None:
            continue
        src = node.args[0]
        val_in = src.meta.get("val") if isinstance(src, Node) else None
        val_out = node.meta.get("val")
        numel_in = _numel(val_in, 0)
        numel_out = _numel(val_out, numel_in)
        numel_in = numel_in or numel_out
        size = val_out.element_size() if isinstance(val_out, torch.Tensor) else 0
        group = node.args[3] if str(node.target).rsplit(".", 1)[0] in _GROUP_ARG3 else node.args[-1]
        out.append(Collective(
            kind=kind, group=str(group), group_size=_group_size(node, kind),
            numel_in=int(numel_in), numel_out=int(numel_out), bytes_in=int(numel_in * size),
            bytes_out=int(numel_out * size), role=node.meta.get("mopc_role", "other"),
            layer=node.meta.get("mopc_layer"), created_by=node.meta.get("mopc_created_by", "capture"),
            node=node.name,
        ))
    return out
