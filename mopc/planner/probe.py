"""Probes: the real mop program of a reduced-depth model, compiled on fake tensors.

A probe builds a copy of the model with the same widths and fewer layers (at most one
dense layer and one MoE layer), `mopc.parallelize`s it at one layout on a `fake` process
group of `world` ranks, and compiles it with the `mop` backend, everything inside a
`FakeTensorMode`: shards, inputs and every intermediate are fake, so a probe of a
trillion-parameter model's layers allocates nothing, and the graphs it reads are exactly
the partitioned forward and backward graphs a real run of that layout executes (same
passes, same min-cut partitioner). Nothing runs: the compiled step is never called.

From those graphs a probe reads, per layer and for the head (embedding, final norm,
vocabulary projection and loss), at the probe's own token count:
- saved activations: the forward values the backward graph reads (each storage once, as
  `mopc.runtime.memory.MemoryTracker` counts them in a real step), with the part made by
  the MoE block and, within it, the part `offload="experts"` moves to host (by the
  producer's `mopc_role`: routed expert, dispatch, combine), and the part gathered over
  the whole world (it grows with the world size). The residual stream's adds carry the
  `embedding` role; inside a layer they count to that layer, so they scale with depth;
- flops of forward and backward (`mopc.passes.analysis.costs.node_flops`), with the
  attention core apart because it grows with the square of the sequence length;
- bytes sent per collective kind and mesh axis (`mopc.runtime.comm.bytes_sent`), split
  into token collectives (tensor parallelism, expert dispatch, vocabulary-parallel loss:
  they grow with tokens) and parameter collectives (ZeRO-3 gathers and gradient
  reduce-scatters: the estimator recomputes those from the layouts at the target world).

Rows an expert-parallel rank receives have a size known only at run time (an unbacked
symbol in the graph); a probe evaluates them at the rows a rank receives under balanced
routing (`tokens x top_k`), and the estimator scales that part by the routing skew.

Algorithm:
1. make a fake default process group of `world` ranks (none may exist, or a fake one);
2. build the reduced model on `meta`, create the meshes outside fake mode, then under one
   `FakeTensorMode` parallelize it (init values are fake) and compile it with a recording
   copy of the backend; calling the compiled step compiles it, and running it (fake) stops
   at the first value read back to Python, which is caught;
3. walk the recorded forward and backward graphs: attribute every saved storage, flop
   and collective to its node's layer (`meta["mopc_layer"]`), or to the head.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.distributed as dist
from torch.fx import GraphModule, Node

log = logging.getLogger("mopc.planner")

__all__ = ["LayerCosts", "ProbeResult", "probe_config", "run_probe"]

_PARAM_PASSES = ("gather_params", "compress_grads")
_MOE_ROLES = ("router", "expert", "shared_expert", "dispatch", "combine")


@dataclass
class LayerCosts:
    """Costs of one layer (or the head) of a probe, at the probe's tokens per rank."""

    saved_bytes: int = 0
    saved_bytes_ep_rows: int = 0
    """Part of `saved_bytes` in tensors sized by the rows an EP rank receives."""
    saved_bytes_moe: int = 0
    """Part of `saved_bytes` made by the MoE block (router, dispatch, experts, combine, shared
    experts); the rest is attention, dense MLP and norms."""
    saved_bytes_offload: int | None = None
    """Part of `saved_bytes` made by routed-expert, dispatch and combine nodes: what
    `offload="experts"` moves to host (`mopc.passes.rewrite.offload.EXPERT_ROLES`). None in
    a probe that did not read it (the estimator then derives it, see `estimate.py`)."""
    saved_bytes_offload_ep_rows: int = 0
    """Part of `saved_bytes_offload` in tensors sized by the rows an EP rank receives."""
    saved_bytes_world: int = 0
    """Part of `saved_bytes` gathered from every rank of the world (the vocabulary-parallel
    loss's hidden states): per token it grows with the world size."""
    flops: int = 0
    """Forward + backward flops of this rank, except the attention core."""
    attention_core_flops: int = 0
    """Forward + backward flops of scaled-dot-product attention (grow with seq_len^2 per sequence)."""
    token_comm: dict[str, int] = field(default_factory=dict)
    """`axis:kind` -> bytes this rank sends in collectives that move tokens."""
    param_comm: dict[str, int] = field(default_factory=dict)
    """`axis:kind` -> bytes this rank sends in ZeRO-3 gathers and gradient reduce-scatters."""


@dataclass(frozen=True)
class ProbeResult:
    """What a probe measured on its graphs; `layers` by kind: `dense`, `moe`, `head`."""

    model_config: Any
    world: int
    tp: int
    ep: int
    batch: int
    seq_len: int
    options: Mapping[str, Any]
    layers: Mapping[str, LayerCosts]
    layer_kinds: Mapping[int, str]
    """Probe layer index -> `dense` or `moe`."""
    param_roles: Mapping[str, str]
    """Roles of the probe's parameters (from `mopc.analyze`, as `mopc.parallelize` computed them)."""
    seconds: float
    unknown_sizes: int
    """Tensors whose size depends on run-time routing (evaluated at balanced routing)."""

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


def probe_config(config: Any) -> Any:
    """The reduced-depth copy of a `MoEModelConfig`: <= 1 dense layer and 1 MoE layer.

    Every layer's output is saved by the next one (its norm's input): the probe's MoE layer
    hands its output to the head as an interior layer hands it to the next layer.
    """
    num_dense = min(config.num_dense_layers, 1)
    num_moe = min(config.num_layers - config.num_dense_layers, 1)
    return dataclasses.replace(config, num_layers=num_dense + num_moe, num_dense_layers=num_dense)


def _fake_process_group(world: int) -> bool:
    """A fake default group of `world` ranks; True when this call created it."""
    if dist.is_initialized():
        if dist.get_backend() == "fake" and dist.get_world_size() == world:
            return False
        if dist.get_backend() != "fake":
            raise RuntimeError(f"mopc planner: a {dist.get_backend()} process group exists; probes need a fake one "
                               f"of {world} ranks (plan in a process without a real group)")
        dist.destroy_process_group()
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    return True


def _expr(value: Any) -> sympy.Expr | int:
    if isinstance(value, torch.SymInt):
        return value.node.expr
    return int(value)


def _bytes(val: Any, rows: int) -> tuple[int, int]:
    """(bytes, bytes that depend on unbacked sizes) of a node's value; unbacked symbols = `rows`."""
    if isinstance(val, torch.Tensor):
        numel = _expr(val.numel())
        if isinstance(numel, int):
            return numel * val.element_size(), 0
        value = int(numel.subs({s: rows for s in numel.free_symbols}))
        return value * val.element_size(), value * val.element_size()
    if isinstance(val, (list, tuple)):
        parts = [_bytes(v, rows) for v in val]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)
    return 0, 0


def _root(node: Node, roots: dict[Node, Node]) -> Node:
    from mopc.passes.analysis.memory_timeline import _is_alias

    if _is_alias(node) and isinstance(node.args[0], Node):
        return roots[node.args[0]]
    return node


def _layer_key(node: Node, kinds: Mapping[int, str]) -> str:
    """The layer a node belongs to, or `head`. The residual stream carries the `embedding`
    role through every layer: its adds inside a layer are that layer's (one per block)."""
    layer = node.meta.get("mopc_layer")
    role = node.meta.get("mopc_role", "other")
    if layer is None or role in ("vocab_projection", "loss"):
        return "head"
    return f"layer{layer}"


def _gathered_over(node: Node, world: int) -> bool:
    """Whether `node` all-gathers over all `world` ranks (its size per rank grows with the world)."""
    return "all_gather_into_tensor" in str(node.target) and len(node.args) > 1 and node.args[1] == world


def _walk(fw: GraphModule, bw: GraphModule, rows: int, kinds: Mapping[int, str],
          per_layer: dict[str, LayerCosts], axes: Mapping[str, str], world: int) -> int:
    """Add the saved bytes, flops and collectives of one compiled graph to `per_layer`."""
    from mopc.passes.analysis.collectives import graph_collectives
    from mopc.passes.analysis.costs import node_flops
    from mopc.passes.rewrite.offload import EXPERT_ROLES
    from mopc.runtime.comm import bytes_sent

    roots: dict[Node, Node] = {}
    for node in fw.graph.nodes:
        roots[node] = _root(node, roots)
    fw_by_name = {n.name: n for n in fw.graph.nodes}
    fw_inputs = {n for n in fw.graph.nodes if n.op == "placeholder"}
    saved = {roots[fw_by_name[n.name]] for n in bw.graph.nodes
             if n.op == "placeholder" and not n.name.startswith("tangents") and n.name in fw_by_name}
    unknown = 0
    for root in saved - fw_inputs:
        nbytes, dynamic = _bytes(root.meta.get("val"), rows)
        unknown += dynamic > 0
        costs = per_layer[_layer_key(root, kinds)]
        costs.saved_bytes += nbytes
        costs.saved_bytes_ep_rows += dynamic
        if _gathered_over(root, world):
            costs.saved_bytes_world += nbytes
        role = root.meta.get("mopc_role")
        if role in _MOE_ROLES:
            costs.saved_bytes_moe += nbytes
        if role in EXPERT_ROLES:
            costs.saved_bytes_offload = (costs.saved_bytes_offload or 0) + nbytes
            costs.saved_bytes_offload_ep_rows += dynamic
    for gm in (fw, bw):
        for node in gm.graph.nodes:
            flops = node_flops(node)
            if flops:
                costs = per_layer[_layer_key(node, kinds)]
                if "scaled_dot_product" in str(node.target):
                    costs.attention_core_flops += flops
                else:
                    costs.flops += flops
        by_node = {n.name: n for n in gm.graph.nodes}
        for c in graph_collectives(gm):
            node = by_node[c.node]
            bytes_in, _ = _bytes(_first_tensor_input(node), rows)
            sent = bytes_sent(c.kind, bytes_in or c.bytes_in, c.group_size)
            key = f"{axes.get(c.group, '?')}:{c.kind}"
            costs = per_layer[_layer_key(node, kinds)]
            target = costs.param_comm if c.created_by in _PARAM_PASSES else costs.token_comm
            target[key] = target.get(key, 0) + sent
    return unknown


def _first_tensor_input(node: Node) -> Any:
    for arg in node.args:
        if isinstance(arg, Node) and isinstance(arg.meta.get("val"), torch.Tensor):
            return arg.meta["val"]
    return None


class _GraphRecorder:
    """A dump writer that keeps the partitioned forward and backward graphs."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.dir = getattr(inner, "dir", None)
        self.forward_graph: GraphModule | None = None
        self.backward_graph: GraphModule | None = None

    def write(self, step_name: str, gm: GraphModule, *, kind: str, **kwargs: Any) -> None:
        if kind == "partition" and step_name == "forward":
            self.forward_graph = gm
        elif kind == "partition" and step_name == "backward":
            self.backward_graph = gm


def _graph_recording_backend(records: list[_GraphRecorder]) -> Any:
    from mopc.backend import _Compilation
    from mopc.config import MoPConfig
    from mopc.passes.pipeline import Pipeline

    @dataclass(frozen=True)
    class RecordingPipeline(Pipeline):
        def make_writer(self, ctx: Any) -> Any:
            recorder = _GraphRecorder(super().make_writer(ctx))
            records.append(recorder)
            return recorder

    def backend(gm: GraphModule, example_inputs: Any) -> Any:
        compilation = _Compilation(gm, example_inputs, MoPConfig.from_options({}), {})
        fields = {f.name: getattr(compilation.pipeline, f.name) for f in dataclasses.fields(Pipeline)}
        compilation.pipeline = RecordingPipeline(**fields)
        return compilation.compile(gm, example_inputs)

    return backend


def run_probe(config: Any, *, world: int, tp: int = 1, ep: int = 1, batch: int = 1, seq_len: int = 64,
              options: Mapping[str, Any] | None = None, reduce_depth: bool = True) -> ProbeResult:
    """Compile the mop program of (the reduced-depth copy of) `config` at one layout, on fakes.

    `batch` rows of `seq_len` tokens per rank. `options` are further `MoPConfig` layout
    fields (`vocab_parallel`, `bucket_mb`, ...). See the module docstring.
    """
    import mopc
    from mopc.config import MoPConfig
    from mopc.models import build_model
    from mopc.plan.mesh import MeshSpec, build_meshes
    from mopc.report import _group_axes

    start = time.perf_counter()
    probe_cfg = probe_config(config) if reduce_depth else config
    options = {k: v for k, v in (options or {}).items() if k != "dump_dir"}
    layout = {"tp": tp, "ep": ep, **options, "check_inputs": False, "nan_guard": False}
    made = _fake_process_group(world)
    torch._dynamo.reset()
    try:
        spec = MeshSpec.from_config(MoPConfig.from_options(layout), world)
        build_meshes(spec)  # device meshes cannot be made under fake mode
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        model = build_model(probe_cfg, device="meta")
        records: list[Any] = []
        with mode:
            ids = torch.zeros(batch, seq_len, dtype=torch.long)
            example = {"input_ids": ids, "labels": ids}

            def init_fn(fqn: str, t: torch.Tensor) -> torch.Tensor:
                return torch.zeros(t.shape, dtype=t.dtype)

            model = mopc.parallelize(model, example, init_fn=init_fn, **layout)
            step = torch.compile(model, backend=_graph_recording_backend(records))
            try:
                step(**example)
            except Exception as err:
                if not records or records[-1].backward_graph is None:
                    raise
                log.debug("probe: the fake step stopped after compiling (%s)", type(err).__name__)
        kinds = {i: ("dense" if i < probe_cfg.num_dense_layers else "moe") for i in range(probe_cfg.num_layers)}
        rows = batch * seq_len * config.top_k
        per_layer: dict[str, LayerCosts] = defaultdict(LayerCosts)
        axes = _group_axes()
        unknown = 0
        for rec in records:
            fw = rec.forward_graph
            bw = rec.backward_graph
            if fw is not None and bw is not None:
                unknown += _walk(fw, bw, rows, kinds, per_layer, axes, world)
        plan = model.mopc_plan
        layers = {"head": per_layer.get("head", LayerCosts())}
        dense_ids = [i for i, k in kinds.items() if k == "dense"]
        moe_ids = [i for i, k in kinds.items() if k == "moe"]
        if dense_ids:
            layers["dense"] = per_layer.get(f"layer{dense_ids[-1]}", LayerCosts())
        if moe_ids:
            layers["moe"] = per_layer.get(f"layer{moe_ids[-1]}", LayerCosts())
        for costs in layers.values():  # read from the roles: none saved is 0, not unknown
            costs.saved_bytes_offload = costs.saved_bytes_offload or 0
        return ProbeResult(model_config=probe_cfg, world=world, tp=tp, ep=ep, batch=batch, seq_len=seq_len,
                           options=dict(options), layers=layers, layer_kinds=kinds,
                           param_roles=dict(plan.param_roles), seconds=time.perf_counter() - start,
                           unknown_sizes=unknown)
    finally:
        torch._dynamo.reset()
        if made:
            dist.destroy_process_group()
