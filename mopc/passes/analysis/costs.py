"""Cost analysis: flops and bytes per node of an ATen graph (read-only).

Flop formulas come from `torch.utils.flop_counter.flop_registry` (the ones
`FlopCounterMode` uses); the few ops it lacks (`_grouped_mm`, the CPU flash attention)
are counted here with the same conventions (2 flops per multiply-add).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch.fx import GraphModule, Node
from torch.utils.flop_counter import flop_registry

from mopc.passes.analysis.graph_utils import node_bytes, packet_of, shape_hint
from mopc.passes.registry import register_pass

aten = torch.ops.aten


def _shape(x: Any) -> tuple[int, ...] | None:
    if isinstance(x, Node):
        x = x.meta.get("val")
    shape = shape_hint(x)
    return None if shape is None or None in shape else shape  # type: ignore[return-value]


def _grouped_mm_flops(node: Node) -> int:
    a, b = _shape(node.args[0]), _shape(node.args[1])
    if a is None or b is None:
        return 0
    if len(a) == 2 and len(b) == 3:  # tokens [M, K] x weights [E, K, N]
        return 2 * a[0] * a[1] * b[2]
    if len(a) == 3 and len(b) == 2:  # [E, M, K] x [K, N] grouped
        return 2 * a[0] * a[1] * a[2] * b[1]
    if len(a) == 2 and len(b) == 2:  # [K, M] x [M, N] with groups along M (weight grads)
        return 2 * a[0] * a[1] * b[1]
    if len(a) == 3 and len(b) == 3:  # batched
        return 2 * a[0] * a[1] * a[2] * b[2]
    return 0


class _NoHint(Exception):
    pass


_ALIASES = {
    getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None): aten._scaled_dot_product_flash_attention,
    getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None):
        aten._scaled_dot_product_flash_attention_backward,
}


def node_flops(node: Node) -> int:
    """Flops of one call_function node from its `meta["val"]` shapes (0 if unknown)."""
    if node.op != "call_function":
        return 0
    packet = packet_of(node)
    name = getattr(packet, "_qualified_op_name", "")
    if name.endswith("grouped_mm_weight_grad"):  # mopc's dW: x [M, K], grad [M, N]
        x, g = _shape(node.args[0]), _shape(node.args[1])
        return 2 * x[0] * x[1] * g[1] if x and g else 0
    if "grouped_mm" in name:  # aten._grouped_mm, mopc::grouped_mm, transformers' fallback op
        return _grouped_mm_flops(node)
    packet = _ALIASES.get(packet, packet)
    formula = flop_registry.get(packet)
    if formula is None:
        return 0

    def val(x: Any) -> Any:
        v = x.meta.get("val") if isinstance(x, Node) else x
        if isinstance(v, torch.Tensor):  # concrete sizes, so no formula guards a symbolic one
            shape = shape_hint(v)
            if shape is None or None in shape:
                raise _NoHint
            return torch.empty(shape, dtype=v.dtype, device="meta")
        return v

    try:
        args = torch.utils._pytree.tree_map(val, node.args)
        kwargs = torch.utils._pytree.tree_map(val, node.kwargs)
        out = torch.utils._pytree.tree_map(val, node.meta.get("val"))
        return int(formula(*args, **kwargs, out_val=out))
    except Exception:  # no size hint, or a formula that does not fit this overload's arguments
        return 0


@dataclass(frozen=True)
class CostAnalysis:
    """Per-node costs; bytes are output bytes, flops include backward nodes."""

    flops: Mapping[str, int]
    out_bytes: Mapping[str, int]
    saved_bytes: Mapping[str, int] = field(default_factory=dict)
    """Forward nodes whose value the backward reads, by node name -> bytes."""

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())


def estimate_costs(gm: GraphModule, forward_nodes: frozenset[str] | set[str]) -> CostAnalysis:
    flops: dict[str, int] = {}
    out_bytes: dict[str, int] = {}
    saved: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        flops[node.name] = node_flops(node)
        out_bytes[node.name] = node_bytes(node)
        if node.name in forward_nodes and node.op == "call_function":
            if any(u.name not in forward_nodes and u.op != "output" for u in node.users):
                saved[node.name] = out_bytes[node.name]
    return CostAnalysis(flops=flops, out_bytes=out_bytes, saved_bytes=saved)


@register_pass(kind="analysis", requires=("classify_roles",))
def count_costs(gm: GraphModule, ctx) -> CostAnalysis:  # noqa: ANN001 - PassContext
    """Flops and output bytes of every node; bytes of forward values the backward reads.

    Algorithm:
    1. flops from torch's flop registry (plus grouped matmul and CPU attention formulas);
    2. bytes from each node's `meta["val"]`;
    3. saved bytes: forward nodes (per classify_roles) with a backward user.
    """
    return estimate_costs(gm, ctx.result("classify_roles").forward_nodes)


def human_bytes(num: float) -> str:
    if num <= 0:
        return "0 B"
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    power = min(int(math.log(num, 1024)), len(units) - 1)
    return f"{num / 1024 ** power:.1f} {units[power]}" if power else f"{int(num)} B"


def human_count(num: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(num) >= scale:
            return f"{num / scale:.2f}{unit}"
    return f"{num:.0f}"
