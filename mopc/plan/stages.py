"""Pipeline stages: which layers each stage holds, balanced by the cost model.

The sequential stack (the `layers.N` blocks) is cut at layer boundaries into `pp · pp_virtual`
contiguous stages. The embedding goes to the first stage; the final norm, vocabulary
projection and loss to the last. Unless the user names the cuts (`pp_split`), they minimise
the most expensive stage. A layer's cost is its training step's roofline time from the
analysis: every node of the joint graph takes max(flops / peak flops, bytes moved / memory
bandwidth) on the device's hardware spec (bytes moved: its inputs and output; views move
none), so memory-bound norms, rotary and routing weigh next to the matmuls (expert layers
are counted with their routed and shared experts). The embedding is added to the first
stage and the head with its loss to the last.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mopc.config import MoPConfig, MoPConfigError
from mopc.passes.analysis.role_defs import layer_of


@dataclass(frozen=True)
class StagePlan:
    """Which stage holds each layer; stage s lives on pipeline rank s % pp."""

    num_stages: int
    first_layer: tuple[int, ...]
    """First layer of every stage (stage 0 starts at layer 0)."""
    num_layers: int
    cost_s: tuple[float, ...] = ()
    """Estimated step seconds per stage, roofline (empty when the cuts were given)."""

    def stage_of_layer(self, layer: int) -> int:
        stage = 0
        for s, first in enumerate(self.first_layer):
            if layer >= first:
                stage = s
        return stage

    def stage_of_param(self, fqn: str, *, after_layers: bool) -> int:
        """The stage holding a parameter: its layer's, else the first stage (embedding) or,
        for parameters used after the layers (`after_layers`), the last."""
        layer = layer_of(fqn)
        if layer is not None:
            return self.stage_of_layer(layer)
        return self.num_stages - 1 if after_layers else 0

    def layers_of(self, stage: int) -> range:
        end = self.first_layer[stage + 1] if stage + 1 < self.num_stages else self.num_layers
        return range(self.first_layer[stage], end)

    def describe(self) -> str:
        parts = []
        for s in range(self.num_stages):
            layers = self.layers_of(s)
            what = f"layers {layers.start}-{layers.stop - 1}" if len(layers) > 1 else f"layer {layers.start}"
            if s == 0:
                what = "embedding, " + what
            if s == self.num_stages - 1:
                what += ", head, loss"
            cost = f" (~{self.cost_s[s] * 1e3:.3g} ms)" if self.cost_s else ""
            parts.append(f"stage {s}: {what}{cost}")
        return "; ".join(parts)


def balance(costs: Sequence[float], num_stages: int, *, head: float = 0, tail: float = 0) -> tuple[int, ...]:
    """First layer of each of `num_stages` contiguous stages over layers of `costs`, minimising
    the largest stage cost (`head` added to the first stage, `tail` to the last); ties go to
    the earliest cuts. Exact, by dynamic programming over (layers, stages)."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")

    def cost(i: int, j: int, s: int) -> float:  # layers [i, j) as stage s
        return prefix[j] - prefix[i] + (head if s == 0 else 0) + (tail if s == num_stages - 1 else 0)

    # best[s][j]: the smallest max-cost of cutting layers [0, j) into stages 0..s
    best = [[inf] * (n + 1) for _ in range(num_stages)]
    cut = [[0] * (n + 1) for _ in range(num_stages)]
    for j in range(1, n + 1):
        best[0][j] = cost(0, j, 0)
    for s in range(1, num_stages):
        for j in range(s + 1, n + 1):
            for i in range(s, j):
                value = max(best[s - 1][i], cost(i, j, s))
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    firsts, j = [], n
    for s in range(num_stages - 1, 0, -1):
        j = cut[s][j]
        firsts.append(j)
    return (0, *reversed(firsts))


def make_stage_plan(config: MoPConfig, num_layers: int, layer_costs: Sequence[float] | None = None,
                    head_cost: float = 0, tail_cost: float = 0) -> StagePlan:
    """The stages for `config` (`pp`, `pp_virtual`, `pp_split`) over `num_layers` layers."""
    stages = config.pp * config.pp_virtual
    if stages > num_layers:
        raise MoPConfigError(
            f"mop option pp={config.pp}" + (f" x pp_virtual={config.pp_virtual}" if config.pp_virtual > 1 else "")
            + f" asks for {stages} pipeline stages, but the model has {num_layers} layers (stages are cut at layer "
            f"boundaries); pass pp <= {num_layers // config.pp_virtual}")
    if config.pp_split is not None:
        if config.pp_split[-1] >= num_layers:
            raise MoPConfigError(
                f"mop option pp_split={config.pp_split!r} names layer {config.pp_split[-1]}, but the model has "
                f"layers 0-{num_layers - 1}; every stage needs at least one layer")
        return StagePlan(stages, (0, *config.pp_split), num_layers)
    costs = list(layer_costs) if layer_costs is not None else [1.0] * num_layers
    firsts = balance(costs, stages, head=head_cost, tail=tail_cost)
    plan = StagePlan(stages, firsts, num_layers)
    per_stage = tuple(sum(costs[i] for i in plan.layers_of(s)) + (head_cost if s == 0 else 0)
                      + (tail_cost if s == stages - 1 else 0) for s in range(stages))
    return StagePlan(stages, firsts, num_layers, per_stage)


def roofline_seconds(analysis, hw, dtype: str = "fp32") -> dict[str, float]:
    """Step seconds per group ("embedding", "layer N", "head": vocabulary projection and loss):
    each node max(flops / peak, bytes in and out / memory bandwidth) on `hw`; views move nothing."""
    costs, roles = analysis.costs, analysis.roles
    out: dict[str, float] = {}
    peak = hw.peak_flops(dtype)
    for node in analysis.graph.graph.nodes:
        if node.op != "call_function":
            continue
        flops = costs.flops.get(node.name, 0)
        moved = 0 if getattr(node.target, "is_view", False) else \
            costs.out_bytes.get(node.name, 0) + sum(costs.out_bytes.get(a.name, 0) for a in node.all_input_nodes)
        seconds = max(flops / peak, moved / hw.hbm_bandwidth)
        layer = roles.node_layers.get(node.name)
        role = roles.node_roles.get(node.name, "other")
        if role in ("vocab_projection", "loss") or (layer is None and role != "embedding"):
            key = "head"  # the roles analysis gives some head nodes the last layer's index
        else:
            key = "embedding" if role == "embedding" else f"layer {layer}"
        out[key] = out.get(key, 0.0) + seconds
    return out
