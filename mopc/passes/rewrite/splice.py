"""Insert the ATen graph of a plain PyTorch function into a graph being rewritten.

Rewrites describe what they insert as ordinary torch code (functional collectives,
views, arithmetic); `insert_traced` traces that code with `make_fx` on the fake values of
its graph arguments and copies the traced nodes in, so every inserted node carries a
correct `meta["val"]` (invariant 2) without hand-built metadata.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_flatten, tree_unflatten


def insert_traced(
    graph: Graph,
    fn: Callable[..., Any],
    args: Sequence[Node],
    *,
    before: Node,
    meta: dict[str, Any] | None = None,
) -> Any:
    """Trace `fn(*values of args)` and insert its nodes before `before`.

    `fn` takes tensors only (bind other values with a closure) and returns a tensor or a
    pytree of tensors; the result has the same structure with Nodes in place of tensors.
    `meta` entries are set on every inserted node (roles, layers, recompute tags).
    """
    values = [a.meta["val"] for a in args]
    with torch.fx.traceback.preserve_node_meta():
        sub = make_fx(fn, tracing_mode="real", _allow_non_fake_inputs=False)(*values)
    env: dict[Node, Node] = {}
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    for ph, arg in zip(placeholders, args, strict=True):
        env[ph] = arg
    out: Any = None
    with graph.inserting_before(before):
        for node in sub.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                flat, spec = tree_flatten(node.args[0])
                out = tree_unflatten([env[x] if isinstance(x, Node) else x for x in flat], spec)
                continue
            if node.op == "get_attr":
                raise ValueError(f"insert_traced: {fn.__name__} created a tensor constant ({node.target}); "
                                 "pass tensors as arguments")
            new = graph.node_copy(node, lambda x: env[x])
            new.meta = {k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")}
            if meta:
                new.meta.update(meta)
            env[node] = new
    return out
