"""Role analysis: what every parameter and node of a joint ATen graph *is*.

Roles come from graph structure first; module names only break ties (per-expert module
lists are recognised by their count matching the router's number of experts). Each
parameter's role carries the rule that decided it (`RoleAnalysis.evidence`), so a wrong
label can be traced to its cause.

Algorithm:
1. Split forward from backward (ancestors of the forward outputs, or nodes not marked
   `autograd_backward`).
2. Find the anchors: `embedding` lookups, the loss (`log_softmax`/`nll_loss`), matmul
   sites (a matmul-like op and the parameters it reads through views), attention cores
   (SDPA ops, or softmax between two activation x activation matmuls), and routers
   (a `topk` whose scores come, through elementwise ops only, from a matmul).
3. Label parameters in precedence order: embedding, vocab projection (the matmul feeding
   the loss), norms (1-D weights scaling an rsqrt-normalised tensor), router (the
   matmul and biases behind a routing `topk`), attention (matmuls in the region private to
   an attention core, and the output projection), experts (3-D weights in batched or
   grouped matmuls; matmuls fed by token rows gathered with routing indices; per-expert
   module lists whose count equals the router's), shared experts (matmuls reading the MoE
   block's input that are not routed), dense MLP (every other matmul), other.
4. Label nodes: anchors and matmul sites take their role; dispatch is the path from the
   routing indices to the token gather; combine runs from the last expert matmul to the
   first scatter/reduction; private regions of norms and attention; the rest inherits
   from its producers (then its users). Backward nodes take the role of the forward node
   with the same autograd sequence number.
"""

from __future__ import annotations

import operator
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping

import torch
from torch.fx import Graph, GraphModule, Node

from mopc.passes.analysis.role_defs import PARAM_ROLES, MoEBlockInfo, RoleAnalysis, layer_of
from mopc.passes.registry import register_pass
from mopc.passes.analysis.graph_utils import (
    COMBINE_OPS,
    EMBEDDING_OPS,
    INDEXING_OPS,
    LOG_SOFTMAX_OPS,
    LOSS_OPS,
    MATMUL_OPS,
    NORM_OPS,
    RSQRT_LIKE_OPS,
    SDPA_OPS,
    SOFTMAX_OPS,
    TOPK_OPS,
    VIEW_OPS,
    descendants,
    flatten_args,
    forward_nodes,
    is_op,
    is_unshard,
    live_forward,
    post_dominated,
    shape_hint,
    size_hint,
    tensor_inputs,
    tensor_meta,
    view_source,
    walk_back,
)

aten = torch.ops.aten

_SCALE_OPS = frozenset({aten.mul, aten.add, aten.addcmul, aten.sub})
_INDEX_SEGMENT_RE = re.compile(r"\.(\d+)\.")


_NORM_INTERNAL_OPS = frozenset({
    aten.pow, aten.mean, aten.var, aten.var_mean, aten.rsqrt, aten.sqrt, aten.div, aten.mul, aten.square,
    aten.reciprocal, aten._to_copy, aten.detach, aten.sub,
})


def _is_norm_internal(node: Node) -> bool:
    """Ops a normalisation is made of; `add` only with a constant (the epsilon)."""
    if _is_getitem(node):
        return True
    if node.op != "call_function":
        return False
    if is_op(node, _NORM_INTERNAL_OPS) or is_op(node, NORM_OPS):
        return True
    return is_op(node, frozenset({aten.add})) and sum(isinstance(a, Node) for a in node.args) == 1


def _is_getitem(node: Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


@dataclass
class _Site:
    """A matmul-like node and the parameters it reads as weights."""

    node: Node
    weights: list[str]
    acts: list[Node]


class _Classifier:
    def __init__(self, graph: Graph, param_fqns: Mapping[str, str], trainable: set[str],
                 num_fwd_outputs: int) -> None:
        self.graph = graph
        self.nodes = list(graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.fqn_of: dict[Node, str] = {
            n: param_fqns[n.name] for n in self.nodes if n.op == "placeholder" and n.name in param_fqns
        }
        self.placeholder_of = {f: n for n, f in self.fqn_of.items()}
        # A sharded parameter (mopc.parallelize) enters as its flat shard; the gathered
        # full tensor (`mopc::unshard`) is what the model computes with, so it stands
        # for the parameter in every rule below.
        for node in self.nodes:
            fqn = self.fqn_of.get(view_source(node.args[0])) if is_unshard(node) else None
            if fqn is not None:
                self.fqn_of[node] = fqn
                self.placeholder_of[fqn] = node
        self.trainable = trainable
        self.live = live_forward(graph, num_fwd_outputs)
        self.fwd = forward_nodes(graph, self.live)
        self.param_role: dict[str, str] = {}
        self.evidence: dict[str, str] = {}
        self.node_role: dict[Node, str] = {}
        self.sites: dict[Node, _Site] = {}
        self.blocks: list[MoEBlockInfo] = []

    # -- helpers ---------------------------------------------------------------------
    def param_of(self, node: object) -> str | None:
        """The parameter a value is a view of; rows of a weight picked by index count too."""
        if not isinstance(node, Node):
            return None
        src = view_source(node)
        if is_op(src, INDEXING_OPS) and isinstance(src.args[0], Node):
            base = view_source(src.args[0])
            val = tensor_meta(base)
            if base in self.fqn_of and val is not None and val.dim() >= 2:
                return self.fqn_of[base]
        return self.fqn_of.get(src)

    def set_param(self, fqn: str, role: str, why: str) -> None:
        if fqn not in self.param_role:
            self.param_role[fqn] = role
            self.evidence[fqn] = why

    def set_node(self, node: Node, role: str, force: bool = False) -> None:
        if force or node not in self.node_role:
            self.node_role[node] = role

    def site_role(self, site: _Site) -> str | None:
        roles = {self.param_role.get(w) for w in site.weights} - {None}
        return roles.pop() if len(roles) == 1 else None

    def _stop_walk(self, node: Node) -> bool:
        return (
            node in self.sites
            or is_op(node, MATMUL_OPS)
            or is_op(node, COMBINE_OPS)
            or is_op(node, SDPA_OPS)
            or is_op(node, TOPK_OPS)
            or is_op(node, EMBEDDING_OPS)
            or node.op == "placeholder"
        )

    def frontier(self, starts: list[Node]) -> tuple[set[Node], list[Node]]:
        return walk_back(starts, stop=self._stop_walk, allowed=lambda n: n in self.fwd)

    # -- anchors ---------------------------------------------------------------------
    def find_sites(self) -> None:
        for node in self.nodes:
            if node not in self.fwd or node.op != "call_function":
                continue
            ins = tensor_inputs(node)
            weights = [w for w in (self.param_of(i) for i in ins) if w]
            custom = not str(getattr(node.target, "namespace", "aten")) in ("aten", "prims")
            is_mm = is_op(node, MATMUL_OPS) or (
                custom and any(tensor_meta(view_source(i)) is not None
                               and tensor_meta(view_source(i)).dim() >= 2 and self.param_of(i)
                               for i in ins)
            )
            if not is_mm:
                continue
            acts = [i for i in ins if not self.param_of(i) and tensor_meta(i) is not None
                    and tensor_meta(i).is_floating_point()]
            self.sites[node] = _Site(node, list(dict.fromkeys(weights)), acts)

    def label_embeddings(self) -> None:
        for node in self.nodes:
            if node in self.fwd and is_op(node, EMBEDDING_OPS):
                fqn = self.param_of(node.args[0])
                if fqn:
                    self.set_param(fqn, "embedding", "structure: aten.embedding weight")
                self.set_node(node, "embedding")

    def label_loss_and_vocab(self) -> None:
        seeds = [n for n in self.nodes if n in self.fwd and (is_op(n, LOG_SOFTMAX_OPS) or is_op(n, LOSS_OPS))]
        for node in seeds:
            self.set_node(node, "loss")
        for node in descendants(seeds, allowed=lambda n: n in self.fwd):
            self.set_node(node, "loss")
        vocab_sites: list[_Site] = []
        for node in seeds:
            if not is_op(node, LOG_SOFTMAX_OPS):
                continue
            # logits reach log_softmax through views, dtype casts and soft-capping only
            _, front = walk_back([node.args[0]], stop=lambda n: n in self.sites or n.op == "placeholder",
                                 allowed=lambda n: n in self.fwd, max_nodes=64)
            vocab_sites += [self.sites[n] for n in front if n in self.sites and self.sites[n].weights]
        if not seeds:  # model returns logits: the last matmul whose width is the vocabulary
            vocab = self._vocab_size()
            outs = self.graph.find_nodes(op="output")[0].args[0]
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            for out in outs[:1]:
                if isinstance(out, Node):
                    src = view_source(out)
                    val = tensor_meta(src)
                    if src in self.sites and val is not None and vocab and size_hint(val.shape[-1]) == vocab:
                        vocab_sites.append(self.sites[src])
        for site in vocab_sites:
            for w in site.weights:
                self.set_param(w, "vocab_projection", "structure: matmul feeding the loss")
            self.set_node(site.node, "vocab_projection", force=True)

    def _vocab_size(self) -> int | None:
        for fqn, role in self.param_role.items():
            if role == "embedding":
                ph = self.placeholder_of[fqn]
                return size_hint(tensor_meta(ph).shape[0])
        return None

    def label_norms(self) -> None:
        for node in self.nodes:
            if node not in self.fwd or node.op != "call_function":
                continue
            one_d = [i for i in tensor_inputs(node) if self.param_of(i)
                     and tensor_meta(view_source(i)) is not None and tensor_meta(view_source(i)).dim() == 1]
            if not one_d:
                continue
            if node in self.sites:
                continue
            is_norm = is_op(node, NORM_OPS)
            if not is_norm and is_op(node, _SCALE_OPS):
                others = [i for i in tensor_inputs(node) if i not in one_d]
                near, _ = walk_back(others, stop=lambda n: n in self.sites or n.op == "placeholder",
                                    allowed=lambda n: n in self.fwd, max_nodes=12)
                is_norm = any(is_op(n, RSQRT_LIKE_OPS) or is_op(n, NORM_OPS) or self.node_role.get(n) == "norm"
                              for n in near)
            if is_norm:
                for i in one_d:
                    self.set_param(self.param_of(i), "norm", "structure: scales an rsqrt-normalised tensor")
                self.set_node(node, "norm")
                region = post_dominated(self.nodes, [node], self.live, allowed=_is_norm_internal)
                for n in region:
                    if n.op == "call_function":
                        self.set_node(n, "norm")

    def label_routers(self) -> None:
        scored: dict[Node, tuple[set[Node], list[_Site]]] = {}
        for node in self.nodes:
            if node not in self.fwd or not is_op(node, TOPK_OPS):
                continue
            visited, front = walk_back([node.args[0]], stop=lambda n: n in self.sites or n.op == "placeholder",
                                       allowed=lambda n: n in self.fwd)
            router_sites = [self.sites[n] for n in front if n in self.sites and self.sites[n].weights]
            if router_sites and not any(self.site_role(s) == "vocab_projection" for s in router_sites):
                scored[node] = (visited, router_sites)
        claimed: set[Node] = set()
        for node, (visited, router_sites) in scored.items():
            # in group-limited routing only the last topk of the chain picks experts
            if any(node in other_visited and {s.node for s in other_sites} == {s.node for s in router_sites}
                   for other, (other_visited, other_sites) in scored.items() if other is not node):
                continue
            # a later topk over gates already routed (an auxiliary balancing loss) is no block
            if claimed & {s.node for s in router_sites}:
                continue
            claimed |= {s.node for s in router_sites}
            site = router_sites[0]
            fqn = site.weights[0]
            num_experts = size_hint(tensor_meta(node.args[0]).shape[-1]) or -1
            for s in router_sites:
                for w in s.weights:
                    self.set_param(w, "router", "structure: matmul scored by a routing topk")
                self.set_node(s.node, "router", force=True)
            for n in visited | {node}:
                self.set_node(n, "router")
                for i in tensor_inputs(n):
                    if i.op == "placeholder" and self.fqn_of.get(i):
                        self.set_param(self.fqn_of[i], "router", "structure: bias on routing scores")
            for user in node.users:
                self.set_node(user, "router")
            block_input = view_source(site.acts[0]) if site.acts else site.node
            k = node.args[1] if len(node.args) > 1 else 1
            self.blocks.append(MoEBlockInfo(
                layer=layer_of(fqn), router_params=tuple(w for s in router_sites for w in s.weights),
                expert_params=(), shared_expert_params=(), num_experts=num_experts,
                top_k=int(k) if isinstance(k, int) else -1, topk_node=node.name,
                block_input_node=block_input.name,
            ))

    def _attention_cores(self) -> list[tuple[set[Node], list[Node], list[Node]]]:
        """(core nodes, q/k/v inputs, outputs) per attention core."""
        cores = []
        for node in self.nodes:
            if node not in self.fwd:
                continue
            if is_op(node, SDPA_OPS):
                ins = [a for a in node.args[:3] if isinstance(a, Node)]
                outs = [u for u in node.users if not _is_getitem(u) or u.args[1] == 0] or [node]
                cores.append(({node, *node.users}, ins, outs))
            elif is_op(node, SOFTMAX_OPS) and self.node_role.get(node) is None:
                _, front = self.frontier([node.args[0]])
                qk = [n for n in front if is_op(n, MATMUL_OPS) and not self.sites.get(n, _Site(n, [], [])).weights]
                pv = [u for u in descendants([node], allowed=lambda n: n in self.fwd and (
                    is_op(n, VIEW_OPS) or is_op(n, MATMUL_OPS) or _is_getitem(n) or "dropout" in str(n.target)))
                    if is_op(u, MATMUL_OPS) and not self.sites.get(u, _Site(u, [], [])).weights]
                if qk and pv:
                    score_path, _ = self.frontier([node.args[0]])
                    ins = [i for q in qk for i in tensor_inputs(q)]
                    ins += [i for p in pv for i in tensor_inputs(p) if i not in descendants([node])]
                    cores.append(({node, *qk, *pv, *score_path}, ins, pv))
        return cores

    def label_attention(self) -> None:
        for core, ins, outs in self._attention_cores():
            region = post_dominated(self.nodes, core, self.live)
            for n in region:
                if n in self.sites:
                    for w in self.sites[n].weights:
                        self.set_param(w, "attention", "structure: projection private to an attention core")
            for n in region:
                if n.op == "placeholder" and self.fqn_of.get(n):
                    self.set_param(self.fqn_of[n], "attention", "structure: input private to an attention core")
                if n.op == "call_function":
                    self.set_node(n, "attention")
            # output projection: reached from the core output through views only
            frontier = list(outs)
            seen: set[Node] = set()
            while frontier:
                n = frontier.pop()
                for u in n.users:
                    if u in seen or u not in self.fwd:
                        continue
                    seen.add(u)
                    if u in self.sites and self.sites[u].weights:
                        for w in self.sites[u].weights:
                            self.set_param(w, "attention", "structure: projection of an attention output")
                        self.set_node(u, "attention", force=True)
                    elif is_op(u, VIEW_OPS) or _is_getitem(u):
                        self.set_node(u, "attention")
                        frontier.append(u)
            for n in core:
                self.set_node(n, "attention", force=True)

    def label_experts(self) -> None:
        topks = [n for n in self.nodes if n.name in {b.topk_node for b in self.blocks}]
        route_dependent = descendants(topks, allowed=lambda n: n in self.fwd) | set(topks)
        dispatch = {
            n for n in self.nodes
            if n in self.fwd and is_op(n, INDEXING_OPS) and len(n.args) > 1
            and any(isinstance(a, Node) and a in route_dependent for a in flatten_args(n.args[1:]))
            and isinstance(n.args[0], Node) and tensor_meta(n.args[0]) is not None
            and tensor_meta(n.args[0]).is_floating_point() and not self.param_of(n.args[0])
        }
        self.dispatch_nodes = dispatch
        expert_sites: set[Node] = set()
        for node in self.nodes:
            site = self.sites.get(node)
            if site is None or not site.weights or self.site_role(site) is not None:
                continue
            if any(tensor_meta(self.placeholder_of[w]).dim() >= 3 for w in site.weights):
                for w in site.weights:
                    self.set_param(w, "expert", "structure: 3-D weight in a batched or grouped matmul")
                expert_sites.add(node)
                continue
            _, front = self.frontier(site.acts)
            if any(f in dispatch or f in expert_sites for f in front) or any(a in dispatch for a in site.acts):
                for w in site.weights:
                    self.set_param(w, "expert", "structure: matmul on tokens gathered by routing indices")
                expert_sites.add(node)
        self.expert_sites = expert_sites
        self._label_expert_siblings()

    def _label_expert_siblings(self) -> None:
        """Tie-breaker by names: an indexed module list, as long as the router's expert count."""
        for block in self.blocks:
            # search the router's enclosing modules, innermost first, up to its layer
            parts = block.router_params[0].split(".")[:-2]
            for depth in range(len(parts), 0, -1):
                if self._label_siblings_under(".".join(parts[:depth]) + ".", block.num_experts):
                    break
                if parts[depth - 1].isdigit():
                    break

    def _label_siblings_under(self, prefix: str, num_experts: int) -> bool:
        def pattern(fqn: str) -> tuple[str, str] | None:
            """`prefix.experts.3.w1.weight` -> (`.experts.*.w1.weight`, `3`)."""
            rest = "." + fqn[len(prefix):]
            match = _INDEX_SEGMENT_RE.search(rest)
            if not fqn.startswith(prefix) or not match:
                return None
            return rest[: match.start()] + ".*." + rest[match.end():], match.group(1)

        groups: dict[str, set[str]] = defaultdict(set)
        members: dict[str, list[str]] = defaultdict(list)
        for fqn in self.fqn_of.values():
            found = pattern(fqn) if fqn not in self.param_role else None
            if found:
                groups[found[0]].add(found[1])
                members[found[0]].append(fqn)
        matched = [key for key, idxs in groups.items() if len(idxs) == num_experts]
        for key in matched:
            for fqn in members[key]:
                self.set_param(fqn, "expert", "names: module list as long as the router's expert count")
        return bool(matched)

    def label_shared_and_dense(self) -> None:
        block_inputs = {b.block_input_node for b in self.blocks}
        shared_sites: set[Node] = set()
        for node in self.nodes:
            site = self.sites.get(node)
            if site is None or not site.weights:
                continue
            role = self.site_role(site)
            if role is not None:
                self.set_node(node, role, force=True)
                continue
            _, front = self.frontier(site.acts)
            reads_block = any(view_source(a).name in block_inputs for a in site.acts) or any(
                f in shared_sites for f in front)
            role = "shared_expert" if reads_block else "dense_mlp"
            why = "structure: unrouted matmul on the MoE block input" if reads_block else "structure: matmul outside attention and MoE"
            for w in site.weights:
                self.set_param(w, role, why)
            if reads_block:
                shared_sites.add(node)
            self.set_node(node, role, force=True)
        # per-channel biases and scales of a labelled matmul output take its role (a scalar,
        # such as a learned logit temperature, stays "other")
        for node in self.nodes:
            if node not in self.fwd or node.op != "call_function":
                continue
            for i in tensor_inputs(node):
                fqn = self.param_of(i)
                if not fqn or fqn in self.param_role:
                    continue
                val, out = shape_hint(tensor_meta(i)), shape_hint(tensor_meta(node))
                per_channel = bool(val and out and val[-1] == out[-1] and val[-1] not in (None, 1))
                if per_channel:
                    others = [self.node_role.get(view_source(o)) for o in tensor_inputs(node) if o is not i]
                    others = [r for r in others if r in PARAM_ROLES]
                    if others:
                        self.set_param(fqn, others[0], "structure: added to or scaling a labelled matmul output")

    def label_dispatch_and_combine(self) -> None:
        if not self.blocks:
            return
        topks = [n for n in self.nodes if n.name in {b.topk_node for b in self.blocks}]
        index_args = [a for d in self.dispatch_nodes for a in flatten_args(d.args[1:]) if isinstance(a, Node)]
        upstream, _ = walk_back(index_args, stop=lambda n: n in topks or n.op == "placeholder",
                                allowed=lambda n: n in self.fwd)
        for n in upstream | self.dispatch_nodes:
            if n.op == "call_function" and self.node_role.get(n) in (None, "router"):
                self.set_node(n, "dispatch", force=True)
        for site in self.expert_sites:
            self.set_node(site, "expert", force=True)
        # between expert matmuls: expert; after the last one up to a scatter/reduction: combine
        reach_expert = set()
        for site in self.expert_sites:
            v, _ = self.frontier(self.sites[site].acts)
            reach_expert |= v
        for site in self.expert_sites:
            stack, seen = [site], set()
            while stack:
                n = stack.pop()
                for u in n.users:
                    if u in seen or u not in self.fwd or u in self.sites or u in self.expert_sites:
                        continue
                    seen.add(u)
                    if u in reach_expert:
                        self.set_node(u, "expert")
                        stack.append(u)
                    elif self.node_role.get(u) in (None, "dispatch"):
                        self.set_node(u, "combine", force=True)
                        if not is_op(u, COMBINE_OPS):
                            stack.append(u)

    def inherit_rest(self) -> None:
        for node in self.nodes:  # views of a weight take the weight's role
            fqn = self.param_of(node) if node.op == "call_function" and node in self.fwd else None
            if fqn in self.param_role:
                self.set_node(node, self.param_role[fqn], force=True)
        for node in self.nodes:  # producers first
            if node in self.node_role or node.op == "output":
                continue
            if node.op == "placeholder" and self.fqn_of.get(node) in self.param_role:
                self.node_role[node] = self.param_role[self.fqn_of[node]]
                continue
            if node in self.fwd:
                roles = [self.node_role[i] for i in tensor_inputs(node) if i in self.node_role]
                if roles:
                    self.node_role[node] = roles[0]
        for node in reversed(self.nodes):  # then consumers, for constants and inputs
            if node in self.node_role or node.op == "output" or node not in self.fwd:
                continue
            roles = [self.node_role[u] for u in node.users if u in self.node_role]
            self.node_role[node] = roles[0] if roles else "other"

    def label_backward(self) -> None:
        by_seq: dict[int, str] = {}
        for node in self.nodes:
            seq = node.meta.get("seq_nr")
            if node in self.fwd and isinstance(seq, int) and seq >= 0 and node in self.node_role:
                role = self.node_role[node]
                if seq not in by_seq or by_seq[seq] == "other":
                    by_seq[seq] = role
        for node in self.nodes:
            if node in self.node_role or node.op == "output":
                continue
            seq = node.meta.get("seq_nr")
            ins = [i for i in tensor_inputs(node) if i in self.node_role]
            fwd_ins = [self.node_role[i] for i in ins if i in self.fwd]
            if isinstance(seq, int) and seq in by_seq:
                self.node_role[node] = by_seq[seq]
            elif fwd_ins:
                self.node_role[node] = fwd_ins[0]
            elif ins:
                self.node_role[node] = self.node_role[ins[0]]
            else:
                self.node_role[node] = "loss" if node.op == "placeholder" else "other"
        for node in self.nodes:
            if node.op == "placeholder" and node not in self.fwd and "tangent" in node.name:
                self.node_role[node] = "loss"

    def layers(self) -> dict[str, int | None]:
        layer: dict[Node, int | None] = {}
        by_seq: dict[int, int | None] = {}
        for node in self.nodes:
            if node.op == "output":
                continue
            fqn = self.fqn_of.get(node) or (
                self.sites[node].weights[0] if node in self.sites and self.sites[node].weights else None)
            if fqn is not None:
                layer[node] = layer_of(fqn)
            elif node in self.fwd:
                known = [layer[i] for i in tensor_inputs(node) if layer.get(i) is not None]
                layer[node] = max(known) if known else None
            else:
                seq = node.meta.get("seq_nr")
                layer[node] = by_seq.get(seq) if isinstance(seq, int) else None
                if layer[node] is None:
                    known = [layer[i] for i in tensor_inputs(node) if layer.get(i) is not None]
                    layer[node] = max(known) if known else None
            seq = node.meta.get("seq_nr")
            if node in self.fwd and isinstance(seq, int) and layer[node] is not None:
                by_seq.setdefault(seq, layer[node])
        return {n.name: layer.get(n) for n in self.nodes if n.op != "output"}

    def run(self) -> RoleAnalysis:
        self.find_sites()
        self.label_embeddings()
        self.label_loss_and_vocab()
        self.label_norms()
        self.label_routers()
        self.label_attention()
        self.label_experts()
        self.label_shared_and_dense()
        self.label_dispatch_and_combine()
        self.inherit_rest()
        self.label_backward()
        blocks = []
        for b in self.blocks:
            mine = [f for f in self.param_role if layer_of(f) == b.layer]
            blocks.append(MoEBlockInfo(
                layer=b.layer, router_params=b.router_params,
                expert_params=tuple(f for f in mine if self.param_role[f] == "expert"),
                shared_expert_params=tuple(f for f in mine if self.param_role[f] == "shared_expert"),
                num_experts=b.num_experts, top_k=b.top_k, topk_node=b.topk_node,
                block_input_node=b.block_input_node,
            ))
        params = {}
        buffers = {}
        for node, fqn in self.fqn_of.items():
            trainable = fqn in self.trainable
            # parameters no rule matched are "other"; buffers (RoPE tables, masks) take
            # the role of the nodes that read them
            role = self.param_role.get(fqn) or ("other" if trainable else self.node_role.get(node, "other"))
            if role not in PARAM_ROLES:
                role = "other"
            (params if trainable else buffers)[fqn] = role
            if fqn not in self.evidence:
                self.evidence[fqn] = "no rule matched" if trainable else "role of its readers"
        for node in self.nodes:
            if node.op == "placeholder" and self.fqn_of.get(node) in params:
                self.node_role[node] = params[self.fqn_of[node]]
        return RoleAnalysis(
            param_roles=dict(sorted(params.items())),
            buffer_roles=dict(sorted(buffers.items())),
            node_roles={n.name: r for n, r in self.node_role.items()},
            node_layers=self.layers(),
            evidence={k: self.evidence[k] for k in sorted(self.evidence)},
            moe_blocks=tuple(blocks),
            forward_nodes=frozenset(n.name for n in self.fwd),
        )


def classify_graph(
    gm: GraphModule,
    param_fqns: Mapping[str, str],
    trainable: set[str] | None = None,
    num_fwd_outputs: int = 1,
) -> RoleAnalysis:
    """Classify a joint (or forward-only) ATen graph.

    `param_fqns` maps placeholder names to module paths (parameters and buffers);
    `trainable` says which of those paths are trainable parameters (default: all).
    """
    trainable = set(param_fqns.values()) if trainable is None else set(trainable)
    return _Classifier(gm.graph, param_fqns, trainable, num_fwd_outputs).run()


@register_pass(kind="analysis")
def classify_roles(gm: GraphModule, ctx) -> RoleAnalysis:  # noqa: ANN001 - PassContext
    """Label every parameter and node with its role (see the module docstring).

    Algorithm: classify_graph over the joint graph with the context's parameter names.
    """
    return classify_graph(gm, ctx.param_fqns, set(ctx.trainable), ctx.num_fwd_outputs)
