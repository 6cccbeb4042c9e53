"""Write the role analysis into the graph, so that every later pass and every dump sees it."""

from __future__ import annotations

from torch.fx import GraphModule

from mopc.passes.registry import register_pass


@register_pass(kind="rewrite", requires=("classify_roles",))
def annotate_roles(gm: GraphModule, ctx) -> GraphModule:
    """Record each node's role and layer in `meta["mopc_role"]` / `meta["mopc_layer"]`.

    Algorithm:
    1. read the RoleAnalysis of `classify_roles`;
    2. for every node except the output, set `mopc_role` (default "other") and
       `mopc_layer`, and `mopc_param` for parameter inputs.
    """
    roles = ctx.result("classify_roles")
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        node.meta["mopc_role"] = roles.node_roles.get(node.name, "other")
        node.meta["mopc_layer"] = roles.node_layers.get(node.name)
        if node.name in ctx.param_fqns:
            node.meta["mopc_param"] = ctx.param_fqns[node.name]
    return gm
