"""A memory timeline of a training step, from its partitioned forward and backward graphs.

Walks the forward then the backward graph node by node and keeps, per category, the bytes
of the values alive after each node: each node's output (`meta["val"]`) lives until its
last use; a view, a `wait_tensor` or a `getitem` shares its input's storage. Read from the
graphs, so it works for any world size on a fake process group. An estimate: the
allocator's caching and fragmentation, and temporaries inside an op, are not modelled; the
measured counterpart of real steps is `mopc.runtime.memory.MemoryTracker`.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

__all__ = ["MemoryTimeline", "TimelinePoint", "memory_timeline"]


@dataclass(frozen=True)
class TimelinePoint:
    phase: str
    node: str
    params: int
    saved: int
    temporaries: int
    grads: int

    @property
    def total(self) -> int:
        return self.params + self.saved + self.temporaries + self.grads


@dataclass(frozen=True)
class MemoryTimeline:
    """Live bytes after each node of the forward then the backward graph (an estimate)."""

    graph: str
    points: tuple[TimelinePoint, ...]
    num_forward: int
    unknown_sizes: int
    """Tensors whose size is known only at run time (expert dispatch rows): counted as 0."""

    @property
    def peak(self) -> TimelinePoint:
        return max(self.points, key=lambda p: p.total)


_ALIAS_TARGETS = {"_c10d_functional.wait_tensor.default", "aten._unsafe_view.default", "aten.alias.default"}


def _is_alias(node: Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    return bool(getattr(node.target, "is_view", False)) or str(node.target) in _ALIAS_TARGETS


def _tensor_bytes(val: Any) -> tuple[int, int]:
    """(bytes, tensors of unknown size) of a node's value (tensors, or lists/tuples of them)."""
    if isinstance(val, torch.Tensor):
        try:
            return int(val.numel()) * val.element_size(), 0
        except Exception:  # noqa: BLE001 - an unbacked (data-dependent) size
            return 0, 1
    if isinstance(val, (list, tuple)):
        sizes = [_tensor_bytes(v) for v in val]
        return sum(s[0] for s in sizes), sum(s[1] for s in sizes)
    return 0, 0


class _Walk:
    """Roots (nodes owning storage; views and waits alias their input), their bytes and last use."""

    def __init__(self, gm: GraphModule) -> None:
        self.nodes = [n for n in gm.graph.nodes if n.op != "output"]
        self.output = next(iter(gm.graph.find_nodes(op="output")))
        self.root: dict[Node, Node] = {}
        self.bytes: dict[Node, int] = {}
        self.unknown = 0
        self.last_use: dict[Node, int] = {}
        for index, node in enumerate(self.nodes):
            if _is_alias(node) and isinstance(node.args[0], Node):
                self.root[node] = self.root[node.args[0]]
            else:
                self.root[node] = node
                self.bytes[node], unknown = _tensor_bytes(node.meta.get("val"))
                self.unknown += unknown
            self.last_use[self.root[node]] = index
            for arg in node.all_input_nodes:
                self.last_use[self.root[arg]] = index

    def outputs(self) -> list[Node]:
        flat: list[Node] = []
        torch.fx.node.map_arg(self.output.args, lambda n: flat.append(n) or n)
        return flat


def memory_timeline(graph_id: str, fw: GraphModule, bw: GraphModule) -> MemoryTimeline:
    """Live bytes per category after every node of `fw` then `bw`.

    Categories: parameter shards and inputs (the forward's placeholders, alive throughout),
    saved activations (forward values the backward reads: alive from their creation to
    their last use in the backward), gradient shards (the backward's outputs, alive to the
    end) and temporaries (everything else, freed after its last use). A view or a wait
    shares its input's storage. The allocator's caching and fragmentation are not modelled.

    Algorithm:
    1. per graph, map every node to the node owning its storage (views, waits and getitems
       to their input) and record each owner's bytes and last use;
    2. match the backward's non-tangent placeholders to the forward values they are (same
       names, as the partitioner keeps them): those are the saved activations;
    3. walk the forward: add each new owner's bytes, sample, free temporaries after their
       last use;
    4. walk the backward: likewise, with gradients (the outputs) kept to the end and each
       saved activation freed after the last use of any placeholder holding it.
    """
    f, b = _Walk(fw), _Walk(bw)
    fw_by_name = {n.name: n for n in f.nodes}
    tangents = {n for n in b.nodes if n.op == "placeholder" and n.name.startswith("tangents")}
    # backward placeholder -> the forward root that holds its storage
    saved_from = {n: f.root[fw_by_name[n.name]] for n in b.nodes
                  if n.op == "placeholder" and n not in tangents and n.name in fw_by_name}
    params = {n for n in f.nodes if n.op == "placeholder"}
    saved_roots = {r for r in saved_from.values() if r not in params}
    saved_last = defaultdict(int)  # forward root -> last backward use of any placeholder holding it
    for ph, root in saved_from.items():
        saved_last[root] = max(saved_last[root], b.last_use.get(ph, 0))
    grad_roots = {b.root[n] for n in b.outputs()}
    points: list[TimelinePoint] = []
    live = {"params": sum(f.bytes[p] for p in params), "saved": 0, "temporaries": 0, "grads": 0}

    def sample(phase: str, node: Node) -> None:
        points.append(TimelinePoint(phase=phase, node=node.name, **live))

    for index, node in enumerate(f.nodes):
        root = f.root[node]
        if node.op != "placeholder" and root is node:
            live["saved" if node in saved_roots else "temporaries"] += f.bytes[node]
        sample("forward", node)
        for r in {f.root[a] for a in node.all_input_nodes} | {root}:
            if r not in params and r not in saved_roots and f.last_use.get(r) == index:
                live["temporaries"] -= f.bytes[r]
    live["temporaries"] = 0  # the forward's outputs other than saved values (the loss) are the caller's
    num_forward = len(points)
    for index, node in enumerate(b.nodes):
        root = b.root[node]
        if root is node and node.op != "placeholder":
            live["grads" if node in grad_roots else "temporaries"] += b.bytes[node]
        elif node in tangents:
            live["temporaries"] += b.bytes[node]
        sample("backward", node)
        for r in {b.root[a] for a in node.all_input_nodes} | {root}:
            if b.last_use.get(r) != index or r in grad_roots:
                continue
            if r in saved_from:
                continue  # a saved value: freed below, when its last holder is done
            if r.op != "placeholder" or r in tangents:
                live["temporaries"] -= b.bytes[r]
        for fw_root in [r for r in saved_roots if saved_last[r] == index]:
            live["saved"] -= f.bytes[fw_root]
            saved_roots = saved_roots - {fw_root}
    return MemoryTimeline(graph=graph_id, points=tuple(points), num_forward=num_forward,
                          unknown_sizes=f.unknown + b.unknown)
