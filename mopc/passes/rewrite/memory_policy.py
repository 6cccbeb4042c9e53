"""Save, recompute or offload each tensor saved for backward, under a device budget (`offload="auto"`).

Runs inside the partitioner, around the split of the joint graph. The budget is
`memory_budget_gb` GiB per rank; the estimate it is held against is this rank's static
bytes (parameter shards, their gradients, AdamW's two fp32 moments per trainable
parameter element) plus the peak of saved activations: every tensor the backward takes
as a placeholder, each storage once, all alive at the end of forward. Parameters and
graph inputs (and views of them) are never candidates: they live anyway.

Each candidate gets the cheaper of two actions, timed on a roofline of the device (the
planner's hardware presets: `cpu` when the inputs are on CPU, or the preset
`memory_policy_hardware` names):

- recompute: rerun, in backward, the forward nodes between the tensor and the saved
  tensors or inputs it is computed from; seconds = sum over those nodes of
  max(flops / (peak flops x mfu), bytes read and written / memory bandwidth). Never for
  a chain that contains a collective (`_c10d_functional`, mopc's dispatch and gather
  ops), a random or data-dependent op, or a node an earlier pass marked MUST_SAVE;
- offload: copy to host after its producer and back before backward needs it
  (`offload_saved_activations`); seconds = 2 x bytes / host<->device bandwidth.

Algorithm:
1. split the joint graph as usual and read the saved tensors (`saved_tensors`);
2. estimate the rank's bytes (`estimate_memory`); under the budget: keep that split,
   every tensor saved (the graphs do not change);
3. otherwise rank the candidates by bytes freed per second of their cheaper action and
   take them in that order until the estimate meets the budget, then drop the ones the
   budget does not need after all (`choose_actions`); if all of them do not meet it,
   take all and log a warning (the real peak may differ from the estimate);
4. recompute the AOT way: tag the chosen chains `MUST_RECOMPUTE` and the tensors kept
   `MUST_SAVE` in the joint graph, and split it again, so the min-cut partitioner
   rebuilds them in backward (with `partitioner="default"`, which ignores the tags,
   only offload is used);
5. offload the chosen tensors on the new split;
6. log one line per layer (bytes saved, recomputed, offloaded) and a summary line
   (estimate before and after, budget) to `mopc.passes`; return a `MemoryPolicySummary`.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch.fx import GraphModule, Node
from torch.utils.checkpoint import CheckpointPolicy

from mopc.passes.analysis.costs import node_flops
from mopc.passes.analysis.graph_utils import node_bytes
from mopc.passes.rewrite.offload import offload_saved_activations
from mopc.planner.hardware import HardwareSpec, device_hardware, hardware

log = logging.getLogger("mopc.passes")

__all__ = ["MemoryEstimate", "MemoryPolicySummary", "SavedTensor", "apply_memory_policy", "choose_actions",
           "estimate_memory", "saved_tensors"]

GiB = 2**30
Action = Literal["save", "recompute", "offload"]

# mopc ops that only compute on their inputs (no communication, no side effects)
_PURE_MOPC_OPS = frozenset({"grouped_mm", "moe_dispatch_indices", "moe_inverse_perm", "moe_gather_rows",
                            "moe_combine_rows", "moe_rows_dot_tokens"})
_PURE_NAMESPACES = frozenset({"aten", "prims"})
_COLLECTIVE_NAMESPACES = frozenset({"_c10d_functional", "c10d", "c10d_functional", "_dtensor"})


def _is_alias(node: Node) -> bool:
    """Whether `node`'s output shares its first input's storage (a view, detach, _unsafe_view)."""
    if node.op != "call_function":
        return False
    target = node.target
    if target is operator.getitem:
        parent = node.args[0]
        return isinstance(parent, Node) and _is_alias(parent)
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return target.is_view or target.overloadpacket is torch.ops.aten._unsafe_view


def _storage_root(node: Node) -> Node:
    while _is_alias(node) and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return node


def _why_not_recomputable(node: Node) -> str | None:
    """Why a forward node may not be rerun in backward (None: it may)."""
    if node.op != "call_function":
        return f"{node.op} {node.name}"
    if node.meta.get("recompute") == CheckpointPolicy.MUST_SAVE:
        return f"{node.name} is marked MUST_SAVE"
    target = node.target
    if target is operator.getitem:
        return None
    if not isinstance(target, torch._ops.OpOverload):
        return f"{node.name} calls {getattr(target, '__name__', target)}, not an op"
    namespace, name = target.namespace, target._schema.name.split("::")[-1]
    if namespace in _COLLECTIVE_NAMESPACES:
        return f"{node.name} is a collective ({namespace}.{name})"
    if namespace == "mopc" and name not in _PURE_MOPC_OPS:
        return f"{node.name} is mopc::{name} (communicates or has side effects)"
    if namespace not in _PURE_NAMESPACES and namespace != "mopc":
        return f"{node.name} is the custom op {namespace}::{name}"
    tags = set(target.tags)
    if torch.Tag.nondeterministic_seeded in tags:
        return f"{node.name} is random ({name})"
    if tags & {torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape}:
        return f"{node.name} has a data-dependent output ({name})"
    return None


def _roofline_seconds(node: Node, spec: HardwareSpec) -> float:
    if _is_alias(node):
        return 0.0
    moved = node_bytes(node) + sum(node_bytes(i) for i in node.all_input_nodes)
    val = node.meta.get("val")
    dtype = "bf16" if isinstance(val, torch.Tensor) and val.dtype in (torch.bfloat16, torch.float16) else "fp32"
    return max(node_flops(node) / (spec.peak_flops(dtype) * spec.mfu), moved / spec.hbm_bandwidth)


# ---------------------------------------------------------------------------- analysis


@dataclass(frozen=True)
class SavedTensor:
    """One tensor the forward saves for backward (a placeholder of the backward)."""

    name: str
    nbytes: int
    """Bytes of the saved value (what an offload copies)."""
    storage: str
    """The node whose storage it is: itself, or the base it is a view of."""
    storage_bytes: int
    """Bytes freed when no saved tensor holds that storage any more."""
    layer: int | None
    is_input: bool
    """Its storage is a parameter or input of the graph: it lives anyway."""
    recompute: tuple[str, ...] = ()
    """Forward nodes rerun to rebuild it, in graph order (itself last)."""
    recompute_seconds: float = math.inf
    """inf: it may not be recomputed (`why_not_recompute`)."""
    offload_seconds: float = math.inf
    why_not_recompute: str | None = None


def saved_tensors(fw: GraphModule, bw: GraphModule, *, num_fwd_outputs: int,
                  spec: HardwareSpec) -> tuple[SavedTensor, ...]:
    """The tensors `fw` saves for `bw`, with the cost of recomputing or offloading each."""
    outs = fw.graph.find_nodes(op="output")[0].args[0]
    needed = {n.name for n in bw.graph.find_nodes(op="placeholder")}
    saved = [n for n in outs[num_fwd_outputs:]
             if isinstance(n, Node) and n.name in needed and isinstance(n.meta.get("val"), torch.Tensor)]
    boundary = set(saved) | set(fw.graph.find_nodes(op="placeholder"))
    order = {n: i for i, n in enumerate(fw.graph.nodes)}
    result = []
    for node in dict.fromkeys(saved):
        root = _storage_root(node)
        chain, stack, why = {node}, list(node.all_input_nodes), None
        while stack:
            n = stack.pop()
            if n in boundary or n in chain:
                continue
            chain.add(n)
            stack.extend(n.all_input_nodes)
        for n in chain:
            why = why or _why_not_recomputable(n)
        chain_nodes = sorted(chain, key=order.__getitem__)
        seconds = math.inf if why else sum(_roofline_seconds(n, spec) for n in chain_nodes)
        nbytes = node_bytes(node)
        result.append(SavedTensor(
            name=node.name, nbytes=nbytes, storage=root.name, storage_bytes=node_bytes(root),
            layer=node.meta.get("mopc_layer"), is_input=root.op == "placeholder",
            recompute=tuple(n.name for n in chain_nodes), recompute_seconds=seconds,
            offload_seconds=2 * nbytes / spec.host_device_bandwidth, why_not_recompute=why,
        ))
    return tuple(result)


@dataclass(frozen=True)
class MemoryEstimate:
    """A rank's estimated device bytes (static, and the peak of saved activations)."""

    params: int
    grads: int
    optimizer: int
    activations: int
    host: int = 0
    """Saved activations offloaded to host memory (not device bytes)."""

    @property
    def static(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.static + self.activations


def estimate_memory(params: Iterable[tuple[torch.Tensor, bool]], saved: Iterable[SavedTensor],
                    actions: Mapping[str, Action] | None = None, *,
                    optimizer_state_fp32: int = 2) -> MemoryEstimate:
    """This rank's device bytes: `params` are (shard value, trainable) pairs (fake or meta
    tensors do); each trainable one adds a gradient of its dtype and `optimizer_state_fp32`
    fp32 tensors of its size (AdamW: 2). Activations: each storage of `saved` once, unless
    it is an input or no saved tensor holding it is kept (`actions[name]` other than save)."""
    actions = actions or {}
    num_params = num_grads = num_optimizer = 0
    for value, trainable in params:
        nbytes = value.numel() * value.element_size()
        num_params += nbytes
        if trainable:
            num_grads += nbytes
            num_optimizer += optimizer_state_fp32 * value.numel() * 4
    kept: dict[str, int] = {}
    host = 0
    for t in saved:
        if t.is_input:
            continue
        action = actions.get(t.name, "save")
        if action == "save":
            kept[t.storage] = t.storage_bytes
        elif action == "offload":
            host += t.nbytes
    return MemoryEstimate(params=num_params, grads=num_grads, optimizer=num_optimizer,
                          activations=sum(kept.values()), host=host)


def choose_actions(saved: Sequence[SavedTensor], excess: int, *,
                   allow_recompute: bool = True) -> tuple[dict[str, Action], bool]:
    """The cheapest actions found that free `excess` bytes of saved storage, and whether
    they do (if not: every candidate's action). Candidates hold a storage of their own."""
    holders: dict[str, int] = {}
    for t in saved:
        holders[t.storage] = holders.get(t.storage, 0) + 1
    ranked = []
    for t in saved:
        if t.is_input or holders[t.storage] > 1 or t.storage_bytes <= 0:
            continue
        recompute = t.recompute_seconds if allow_recompute else math.inf
        action: Action = "recompute" if recompute < t.offload_seconds else "offload"
        seconds = min(recompute, t.offload_seconds)
        if math.isinf(seconds):
            continue
        ranked.append((t.storage_bytes / seconds if seconds > 0 else math.inf, t, action))
    ranked.sort(key=lambda r: (-r[0], r[1].name))
    chosen, freed = [], 0
    for _, t, action in ranked:
        if freed >= excess:
            break
        chosen.append((t, action))
        freed += t.storage_bytes
    if freed < excess:
        return {t.name: a for t, a in chosen}, False
    for t, action in reversed(list(chosen)):  # least efficient first: drop what the budget does not need
        if freed - t.storage_bytes >= excess:
            chosen.remove((t, action))
            freed -= t.storage_bytes
    return {t.name: a for t, a in chosen}, True


# ---------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class LayerMemory:
    layer: int | None
    saved: int
    recomputed: int
    offloaded: int


@dataclass(frozen=True)
class MemoryPolicySummary:
    """What `offload="auto"` chose for one graph (bytes per rank)."""

    graph_id: str
    budget: int
    hardware: str
    before: MemoryEstimate
    after: MemoryEstimate
    layers: tuple[LayerMemory, ...]
    recomputed: tuple[str, ...]
    offloaded: tuple[str, ...]
    met: bool

    def lines(self) -> list[str]:
        out = [f"layer {'-' if r.layer is None else r.layer}: saved {_mib(r.saved)}, recomputed "
               f"{_mib(r.recomputed)}, offloaded {_mib(r.offloaded)}" for r in self.layers]
        verdict = "meets" if self.after.total <= self.budget else "does NOT meet"
        out.append(f"estimate {_mib(self.before.total)} -> {_mib(self.after.total)} "
                   f"(static {_mib(self.after.static)} + activations {_mib(self.after.activations)}, "
                   f"host {_mib(self.after.host)}) {verdict} the budget {_mib(self.budget)}; "
                   f"{len(self.recomputed)} tensors recomputed, {len(self.offloaded)} offloaded "
                   f"(roofline: {self.hardware})")
        return out


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f} MiB"


def _layers(saved: Sequence[SavedTensor], actions: Mapping[str, Action]) -> tuple[LayerMemory, ...]:
    rows: dict[int | None, list[int]] = {}
    seen: set[str] = set()
    for t in saved:
        if t.is_input or t.storage in seen:
            continue
        seen.add(t.storage)
        row = rows.setdefault(t.layer, [0, 0, 0])
        row[("save", "recompute", "offload").index(actions.get(t.name, "save"))] += t.storage_bytes
    key = (lambda k: (k is None, k if k is not None else 0))
    return tuple(LayerMemory(layer, *rows[layer]) for layer in sorted(rows, key=key))


def _hardware_for(joint_inputs: Sequence[object], name: str = "device") -> HardwareSpec:
    if name != "device":
        return hardware(name)
    cuda = next((t for t in joint_inputs if isinstance(t, torch.Tensor) and t.is_cuda), None)
    return device_hardware(cuda.device if cuda is not None else torch.device("cpu"))


# ---------------------------------------------------------------------------- the rewrite


def _tag_joint(joint: GraphModule, saved: Sequence[SavedTensor], actions: Mapping[str, Action]) -> int:
    """MUST_RECOMPUTE on the chosen chains, MUST_SAVE on the saved tensors kept; nodes an
    earlier pass tagged keep their tag. Returns how many nodes were tagged."""
    nodes = {n.name: n for n in joint.graph.nodes}
    tagged = 0
    recompute = {name for t in saved if actions.get(t.name) == "recompute" for name in t.recompute}
    for name in recompute:
        node = nodes.get(name)
        if node is not None and "recompute" not in node.meta:
            node.meta.update({"recompute": CheckpointPolicy.MUST_RECOMPUTE, "ac_graph_id": 0})
            tagged += 1
    for t in saved:
        node = nodes.get(t.name)
        if (node is not None and node.op == "call_function" and t.name not in recompute
                and "recompute" not in node.meta):
            node.meta.update({"recompute": CheckpointPolicy.MUST_SAVE, "ac_graph_id": 0})
            tagged += 1
    return tagged


def apply_memory_policy(joint: GraphModule, split: Callable[[], tuple[GraphModule, GraphModule]], *,
                        joint_inputs: Sequence[object], num_fwd_outputs: int, budget_gb: float,
                        params: Sequence[tuple[torch.Tensor, bool]], allow_recompute: bool, prefetch: int,
                        graph_id: str = "graph", optimizer_on_host: bool = False, hardware_name: str = "device",
                        ) -> tuple[GraphModule, GraphModule, MemoryPolicySummary]:
    """Split `joint` (`split()` partitions it) under the budget; see the module docstring.
    `optimizer_on_host` (`optimizer_offload`): AdamW state takes no device memory."""
    state_fp32 = 0 if optimizer_on_host else 2
    spec = _hardware_for(joint_inputs, hardware_name)
    budget_bytes = int(budget_gb * GiB)
    fw, bw = split()
    probed = saved = saved_tensors(fw, bw, num_fwd_outputs=num_fwd_outputs, spec=spec)
    before = estimate_memory(params, saved, optimizer_state_fp32=state_fp32)
    actions: dict[str, Action] = {}
    reachable = before.total <= budget_bytes
    if not reachable:
        actions, reachable = choose_actions(saved, before.total - budget_bytes, allow_recompute=allow_recompute)
    still: set[str] = set()
    if any(a == "recompute" for a in actions.values()):
        tagged = _tag_joint(joint, saved, actions)
        log.debug("memory policy: graph %s: %d joint nodes tagged; splitting again", graph_id, tagged)
        fw, bw = split()
        saved = saved_tensors(fw, bw, num_fwd_outputs=num_fwd_outputs, spec=spec)
        names = {t.name for t in saved}
        still = {n for n, a in actions.items() if a == "recompute" and n in names}
        if still:
            log.warning("memory policy: graph %s: the partitioner still saves %s, chosen for recompute",
                        graph_id, ", ".join(sorted(still)))
    offload = frozenset(n for n, a in actions.items() if a == "offload")
    moved: tuple[str, ...] = ()
    if offload:
        moved = offload_saved_activations(fw, bw, num_fwd_outputs=num_fwd_outputs, prefetch=prefetch,
                                          names=offload).names
    final: dict[str, Action] = {n: "recompute" for n, a in actions.items() if a == "recompute" and n not in still}
    final |= {n: "offload" for n in moved}
    after = estimate_memory(params, saved, final, optimizer_state_fp32=state_fp32)
    summary = MemoryPolicySummary(
        graph_id=graph_id, budget=budget_bytes, hardware=spec.name, before=before, after=after,
        layers=_layers(probed, final), recomputed=tuple(sorted(n for n, a in final.items() if a == "recompute")),
        offloaded=moved, met=after.total <= budget_bytes,
    )
    for line in summary.lines():
        log.info("memory policy: graph %s: %s", graph_id, line)
    if not summary.met:
        how = "with every candidate recomputed or offloaded" if not reachable else "after the split"
        log.warning("memory policy: graph %s: estimated %s per rank (%s %s) exceeds memory_budget_gb=%g (%s); "
                    "running with that policy, the real peak may differ", graph_id, _mib(before.total),
                    _mib(after.total), how, budget_gb, _mib(budget_bytes))
    return fw, bw, summary
