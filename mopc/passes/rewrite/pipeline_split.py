"""Pipeline split: cut a Dynamo graph into stage graphs at layer boundaries.

Unlike the other rewrites this pass runs on the Dynamo graph, before AOTAutograd: a
pipeline schedule interleaves the forward and backward of micro-batches, so each stage
must become its own forward/backward pair, compiled by the usual pipeline (ownership, TP,
EP, offload, ...) over that stage's ranks.

Algorithm:
1. Every node inside a `layers.N` module (Dynamo's `nn_module_stack`) belongs to the stage
   of layer N. A block is never cut: whole layers go to one stage.
2. Nodes that depend on no layer (the embedding lookup, rotary tables, a parameter's
   gather, ...) are *replicated*: each stage that uses one computes its own copy, so
   nothing but activations crosses a boundary (a gather of a parameter lands on the one
   stage that holds the parameter).
3. Every other node (the final norm, vocabulary projection and loss) goes to the latest
   stage among its inputs; the graph's output (the loss) to the last stage.
4. A value produced on stage p and used up to stage c travels p -> p+1 -> ... -> c: every
   stage in between receives it and sends it on (its gradient comes back the same way).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from torch.fx import Graph, GraphModule, Node

from mopc.passes.analysis.role_defs import layer_of

log = logging.getLogger("mopc")

_ROOT = re.compile(r"^(?:L|G)\[['\"][^'\"]+['\"]\]\.?")


@dataclass
class StageGraph:
    """One stage's graph: original inputs it reads, then the values it receives."""

    index: int
    gm: GraphModule
    inputs: list[int]
    """Indices (into the Dynamo graph's placeholders) of the original inputs this stage reads,
    in the order of its first placeholders."""
    received: list[Node]
    """Nodes of the Dynamo graph whose values this stage receives from the previous stage
    (its last placeholders, in this order)."""
    sent: list[Node]
    """Nodes of the Dynamo graph whose values it sends to the next stage (its outputs), or
    empty for the last stage, whose outputs are the graph's."""


def node_layer(node: Node) -> int | None:
    """The `layers.N` module a Dynamo node was traced in (None: outside every layer)."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in stack.values():
        if isinstance(path, str):
            layer = layer_of(_ROOT.sub("", path))
            if layer is not None:
                return layer
    return None


def assign_stages(gm: GraphModule, stage_of_layer) -> tuple[dict[Node, int], dict[Node, set[int]]]:
    """(stage of every non-replicated node, stages of every replicated node)."""
    fixed: dict[Node, int] = {}
    free: set[Node] = set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        layer = node_layer(node)
        inputs = [a for a in node.all_input_nodes if a.op != "placeholder"]
        if layer is not None:
            fixed[node] = stage_of_layer(layer)
        elif all(a in free for a in inputs):
            free.add(node)
        else:
            fixed[node] = max(fixed[a] for a in inputs if a in fixed)
    last = max(fixed.values(), default=0)
    output = gm.graph.find_nodes(op="output")[0]
    for arg in output.all_input_nodes:
        if arg in fixed and fixed[arg] != last:
            raise ValueError(f"mopc pipeline split: graph output {arg.name} is computed on stage {fixed[arg]}, not "
                             f"on the last stage {last}; under pp the model must return the loss")
    copies: dict[Node, set[int]] = {}
    for node in reversed(gm.graph.nodes):
        if node not in free:
            continue
        where: set[int] = set()
        for user in node.users:
            if user.op == "output":
                where.add(last)
            elif user in free:
                where |= copies[user]
            else:
                where.add(fixed[user])
        copies[node] = where
    return fixed, copies


def split_stages(gm: GraphModule, stage_of_layer, num_stages: int) -> list[StageGraph]:
    """Cut `gm` into `num_stages` stage graphs (see the module docstring)."""
    fixed, copies = assign_stages(gm, stage_of_layer)
    used = set(fixed.values())
    if used != set(range(num_stages)):
        missing = sorted(set(range(num_stages)) - used)
        raise ValueError(f"mopc pipeline split: stages {missing} received no layer; the graph has layers on "
                         f"stages {sorted(used)}")
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    output = gm.graph.find_nodes(op="output")[0]
    last = num_stages - 1
    # the last stage that reads each non-replicated value
    reach: dict[Node, int] = {}
    for node, stage in fixed.items():
        users = [last if u.op == "output" else fixed[u] if u in fixed else max(copies[u], default=stage)
                 for u in node.users]
        reach[node] = max([stage, *users])
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    stages = []
    for s in range(num_stages):
        graph = Graph()
        env: dict[Node, Node] = {}
        body = [n for n in gm.graph.nodes if fixed.get(n) == s or s in copies.get(n, ())]
        needed = {a for n in body for a in n.all_input_nodes} | (set(output.all_input_nodes) if s == last else set())
        inputs = [i for i, ph in enumerate(placeholders) if ph in needed]
        for i in inputs:
            env[placeholders[i]] = graph.node_copy(placeholders[i])
        received = sorted((n for n, p in fixed.items() if p < s <= reach[n]), key=order.__getitem__)
        for node in received:
            env[node] = graph.placeholder(f"recv_{node.name}")
            env[node].meta = {k: v for k, v in node.meta.items() if k in ("example_value", "val", "tensor_meta")}
        for node in body:
            env[node] = graph.node_copy(node, env.__getitem__)
        if s == last:
            graph.output(tuple(env[a] if isinstance(a, Node) else a for a in _flat_outputs(output)))
            sent = []
        else:
            sent = sorted((n for n, p in fixed.items() if p <= s < reach[n]), key=order.__getitem__)
            graph.output(tuple(env[n] for n in sent))
        stage_gm = GraphModule(gm, graph, class_name=f"Stage{s}")
        stage_gm.graph.lint()
        stages.append(StageGraph(s, stage_gm, inputs, received, sent))
        log.info("mop: pipeline stage %d: %d nodes, %d inputs, receives %s, sends %s", s, len(body), len(inputs),
                 [n.name for n in received], [n.name for n in sent])
    return stages


def _flat_outputs(output: Node) -> list:
    args = output.args[0]
    if isinstance(args, (tuple, list)):
        return list(args)
    return [args]
