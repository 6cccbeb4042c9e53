"""Graph verifier: checks the invariants of `mopc/passes/README.md` after a pass.

Runs after every pass in debug mode (`debug=True` option or `MOPC_DEBUG=1`).
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from mopc.passes.analysis.role_defs import NODE_ROLES


class GraphInvariantError(AssertionError):
    """A pass broke a graph invariant; the message names the pass and the node."""


_COLLECTIVE_NS = ("_c10d_functional",)


def _is_collective(node: Node) -> bool:
    ns = getattr(node.target, "namespace", None)
    name = getattr(node.target, "__name__", "")
    return node.op == "call_function" and ns in _COLLECTIVE_NS and not name.startswith("wait_tensor")


def _is_wait(node: Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "namespace", None) in _COLLECTIVE_NS \
        and getattr(node.target, "__name__", "").startswith("wait_tensor")


def verify_graph(gm: GraphModule, *, after_pass: str, roles_required: bool) -> None:
    """Raise GraphInvariantError naming the pass and node if an invariant does not hold."""

    def fail(node: Node | None, msg: str) -> None:
        where = f" at node %{node.name} ({node.format_node()})" if node is not None else ""
        raise GraphInvariantError(f"after pass {after_pass!r}: {msg}{where}")

    try:
        gm.graph.lint()
    except Exception as err:  # noqa: BLE001
        fail(None, f"graph lint failed: {err}")
    for node in gm.graph.nodes:
        if node.op in ("output", "get_attr"):
            continue
        if "mopc_created_by" not in node.meta:
            fail(node, "node has no meta['mopc_created_by']")
        if roles_required:
            role = node.meta.get("mopc_role")
            if role not in NODE_ROLES:
                fail(node, f"meta['mopc_role']={role!r} is not one of {NODE_ROLES}")
        if node.op != "call_function":
            continue
        if node.target is not operator.getitem and "val" not in node.meta:
            fail(node, "node has no meta['val']")
        schema = getattr(node.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            # functionalized graphs only mutate graph inputs (AOT's input mutations)
            mutated = [a for a, s in zip(node.args, schema.arguments) if s.alias_info and s.alias_info.is_write]
            if not all(isinstance(a, Node) and a.op == "placeholder" for a in mutated):
                fail(node, "in-place op on an intermediate (graphs must stay functional)")
        if _is_collective(node):
            users = list(node.users)
            if not users or not all(_is_wait(u) or u.target is operator.getitem for u in users):
                fail(node, "functional collective must be consumed by wait_tensor")
            for u in users:
                if u.target is operator.getitem and not all(_is_wait(x) for x in u.users):
                    fail(u, "functional collective output must be consumed by wait_tensor")
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dtype is None:  # pragma: no cover - defensive
            fail(node, "meta['val'] has no dtype")
