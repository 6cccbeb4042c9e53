"""Capture: what each input of a Dynamo graph is, and where it lands in the joint graph.

`mopc.backend` hands the Dynamo graph to AOTAutograd, whose joint forward+backward graph
reaches mopc's passes inside `partition_fn`. Passes need to know which joint-graph
inputs are which parameters; this module works that out from Dynamo's sources.
"""

from __future__ import annotations

import itertools
import logging
import re
from dataclasses import dataclass

import torch
from torch.fx import GraphModule

_ROOT_RE = re.compile(r"^(?:L|G)\[['\"][^'\"]+['\"]\]")
_PART_RE = re.compile(
    r"\._(?:modules|parameters|buffers)\[['\"]([^'\"]+)['\"]\]"
    r"|\.([A-Za-z_][A-Za-z0-9_]*)"
    r"|\[(\d+)\]"
    r"|\[['\"]([^'\"]+)['\"]\]"
)

_graph_counter = itertools.count()
log = logging.getLogger("mopc")


def fqn_from_source(source_name: str) -> str | None:
    """`L['self']._modules['layers']._modules['0']._parameters['weight']` -> `layers.0.weight`."""
    match = _ROOT_RE.match(source_name)
    if not match:
        return None
    rest = source_name[match.end():]
    parts = []
    pos = 0
    while pos < len(rest):
        m = _PART_RE.match(rest, pos)
        if not m:
            return None
        parts.append(next(g for g in m.groups() if g is not None))
        pos = m.end()
    return ".".join(parts) if parts else None


@dataclass(frozen=True)
class GraphInputs:
    """What each input of a Dynamo graph is: a parameter/buffer path or user data."""

    names: tuple[str | None, ...]
    """Per flattened input (AOT's `primals` order): module path, or None for user inputs."""
    trainable: frozenset[str]
    layout_config: object = None
    """The MoPConfig that `mopc.parallelize` sharded these parameters with, if it did."""


def describe_inputs(gm: GraphModule) -> GraphInputs:
    """Module paths of the graph's inputs, in the order AOTAutograd lifts them."""
    names: list[str | None] = []
    trainable: set[str] = set()
    layout_config = None
    # AOTAutograd lifts the GraphModule's own parameters and buffers first
    for name, p in gm.named_parameters(remove_duplicate=False):
        names.append(name)
        if p.requires_grad:
            trainable.add(name)
    for name, _ in gm.named_buffers(remove_duplicate=False):
        names.append(name)
    for ph in gm.graph.find_nodes(op="placeholder"):
        grapharg = ph.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        source_name = getattr(source, "name", None)
        if callable(source_name):  # a method on older torch releases, a property on newer
            source_name = source_name()
        fqn = fqn_from_source(source_name) if isinstance(source_name, str) else None
        example = getattr(grapharg, "example", None)
        is_module_state = fqn is not None and (
            isinstance(example, torch.nn.Parameter) or "_buffers[" in source_name or "_parameters[" in source_name)
        names.append(fqn if is_module_state else None)
        if is_module_state and isinstance(example, torch.nn.Parameter) and example.requires_grad:
            trainable.add(fqn)
        layout_config = getattr(example, "_mopc_config", None) or layout_config
    return GraphInputs(tuple(names), frozenset(trainable), layout_config)


def joint_param_fqns(joint: GraphModule, inputs: GraphInputs) -> dict[str, str]:
    """Joint-graph placeholder name (`primals_3`) -> module path, for module state only."""
    placeholders = joint.graph.find_nodes(op="placeholder")
    # A DTensor input (a sharded parameter) is flattened into its local tensor plus, on
    # newer torch, an opaque object holding its placement: keep tensor inputs only.
    primals = [ph for ph in placeholders if not ph.name.startswith("tangents")
               and isinstance(ph.meta.get("val"), torch.Tensor)]
    # AOTAutograd may put extra inputs (side-effect tokens) before the user's; the
    # user's inputs are the last len(names) primals
    offset = len(primals) - len(inputs.names)
    if offset < 0:
        log.warning("joint graph has %d primal inputs for %d graph inputs; parameter names not attached",
                    len(primals), len(inputs.names))
        return {}
    return {ph.name: name for ph, name in zip(primals[offset:], inputs.names) if name is not None}


def next_graph_id(kind: str = "g") -> str:
    return f"{kind}{next(_graph_counter)}"
