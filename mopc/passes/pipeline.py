"""The flat pass pipeline: `build_pipeline(config)` lists the passes top to bottom.

Ordering constraints (`requires`) are checked when the pipeline is built, after
`MOPC_DISABLE_PASSES=a,b` and the `disable_passes` option have removed passes, so a
pipeline that only works by accident cannot be built.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from torch.fx import GraphModule

from mopc.config import MoPConfig, MoPConfigError
from mopc.logs import trace_graph
from mopc.passes.dump import (
    DumpWriter,
    format_graph,
    op_count_diff,
    op_counts,
    resolve_dump_dir,
)
from mopc.passes.registry import PASSES, PassSpec
from mopc.passes.verify import verify_graph

log = logging.getLogger("mopc.passes")


@dataclass
class PassContext:
    """What a pass may read: config, example inputs, parameter names, earlier results."""

    config: MoPConfig
    example_inputs: Sequence[Any]
    param_fqns: Mapping[str, str]
    """placeholder name -> parameter/buffer path"""
    trainable: frozenset[str]
    num_fwd_outputs: int
    graph_id: str = "graph"
    plan: Any = None
    results: dict[str, Any] = field(default_factory=dict)

    def result(self, pass_name: str) -> Any:
        if pass_name not in self.results:
            raise KeyError(f"no result from pass {pass_name!r}; ran: {', '.join(self.results) or 'none'}")
        return self.results[pass_name]


# The default pipeline, top to bottom. Passes registered elsewhere (extensions, tests)
# run after these, in their registered `order`.
PIPELINE: tuple[str, ...] = (
    "classify_roles",   # analysis: the role and layer of every parameter and node
    "count_costs",      # analysis: flops and bytes per node, bytes the backward reads
    "annotate_roles",   # meta: roles and layers into node.meta for later passes and dumps
    "tensor_parallel",  # attention / dense MLP on local heads, tokens of the tp group
    "context_parallel",  # attention over the cp group's keys/values; global positions
    "expert_parallel",  # routed experts on their owners; tokens travel by all-to-all
    "fuse_dispatch",    # codegen: token dispatch/combine as fused ops (Triton on CUDA)
    "vocab_parallel_loss",  # projection + cross-entropy on vocabulary shards
    "compress_grads",   # opt-in: expert (or all) gradient reductions from compressed messages
    "gather_params",    # reference program: bucketed all-gather / reduce-scatter of shards
    "full_recompute",   # recompute="full": layers keep only their input; after every pass that adds forward nodes
)
ROLES_ANNOTATED_BY = "annotate_roles"


def _load_passes() -> None:
    # importing the pass modules registers them
    import mopc.passes.analysis.costs  # noqa: F401
    import mopc.passes.analysis.roles  # noqa: F401
    import mopc.passes.rewrite.annotate_roles  # noqa: F401
    import mopc.passes.rewrite.compress_grads  # noqa: F401
    import mopc.passes.rewrite.context_parallel  # noqa: F401
    import mopc.passes.rewrite.expert_parallel  # noqa: F401
    import mopc.passes.rewrite.fuse_dispatch  # noqa: F401
    import mopc.passes.rewrite.gather_params  # noqa: F401
    import mopc.passes.rewrite.recompute  # noqa: F401
    import mopc.passes.rewrite.tensor_parallel  # noqa: F401
    import mopc.passes.rewrite.vocab_parallel  # noqa: F401


def disabled_from_env() -> tuple[str, ...]:
    raw = os.environ.get("MOPC_DISABLE_PASSES", "")
    return tuple(p.strip() for p in raw.split(",") if p.strip())


@dataclass(frozen=True)
class Pipeline:
    passes: tuple[PassSpec, ...]
    bound: tuple[Callable[..., Any], ...]
    debug: bool
    dump_dir: str | None

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def make_writer(self, ctx: PassContext) -> DumpWriter | None:
        """A dump writer for this graph when dumps are on (option or MOPC_DUMP_DIR)."""
        root = resolve_dump_dir(self.dump_dir)
        return DumpWriter(root, ctx.graph_id, dict(ctx.param_fqns)) if root else None

    def run(self, gm: GraphModule, ctx: PassContext, writer: DumpWriter | None = None) -> GraphModule:
        """Run every pass in order; dump and verify after each as configured."""
        for node in gm.graph.nodes:
            node.meta.setdefault("mopc_created_by", "capture")
        if writer:
            writer.write("captured", gm, kind="input", seconds=0.0, diff=None,
                         note=f"{len(ctx.param_fqns)} parameters/buffers as inputs")
        roles_done = False
        for index, (spec, fn) in enumerate(zip(self.passes, self.bound, strict=True), start=1):
            before = op_counts(gm) if writer else None
            start = time.perf_counter()
            if spec.kind == "analysis":
                ctx.results[spec.name] = fn(gm, ctx)
            else:
                existing = set(gm.graph.nodes)
                out = fn(gm, ctx)
                if not isinstance(out, GraphModule):
                    raise TypeError(f"rewrite pass {spec.name!r} returned {type(out).__name__}, not a GraphModule")
                gm = out
                for node in gm.graph.nodes:  # new nodes, even ones that copied another node's meta
                    if node not in existing:
                        node.meta["mopc_created_by"] = spec.name
                gm.recompile()
            seconds = time.perf_counter() - start
            roles_done = roles_done or spec.name == ROLES_ANNOTATED_BY
            log.debug("pass %s on %s: %.2f ms", spec.name, ctx.graph_id, seconds * 1e3)
            if self.debug:
                verify_graph(gm, after_pass=spec.name, roles_required=roles_done)
            if writer:
                writer.write(spec.name, gm, kind=spec.kind, seconds=seconds,
                             diff=op_count_diff(before, op_counts(gm)), roles=ctx.results.get("classify_roles"))
            if spec.kind != "analysis":  # TORCH_TRACE / tlparse; the text is built only when tracing is on
                trace_graph(f"mopc_{ctx.graph_id}_{index:02d}_{spec.name}",
                            functools.partial(_traced_text, spec.name, seconds, gm, ctx))
        return gm


def _traced_text(name: str, seconds: float, gm: GraphModule, ctx: PassContext) -> str:
    header = f"# mopc pass {name} on graph {ctx.graph_id}: {seconds * 1e3:.2f} ms\n"
    return header + format_graph(gm, dict(ctx.param_fqns), ctx.results.get("classify_roles"))


def build_pipeline(config: MoPConfig, extra_disabled: Sequence[str] = ()) -> Pipeline:
    """The passes for `config`, in order, with options bound and constraints checked."""
    _load_passes()
    disabled = set(config.disable_passes) | set(disabled_from_env()) | set(extra_disabled)
    unknown = sorted(disabled - set(PASSES))
    if unknown:
        raise MoPConfigError(
            f"disable_passes names unknown pass(es) {', '.join(map(repr, unknown))}; "
            f"known passes: {', '.join(sorted(PASSES))}"
        )
    extra = sorted((p for p in PASSES.values() if p.name not in PIPELINE), key=lambda p: p.order)
    ordered = [PASSES[name] for name in PIPELINE] + extra
    chosen = [p for p in ordered if p.name not in disabled and p.enabled(config)]
    seen: set[str] = set()
    for spec in chosen:
        for req in spec.requires:
            if req not in seen:
                why = "it is disabled" if req in disabled else "it is not earlier in the pipeline"
                raise MoPConfigError(
                    f"pass {spec.name!r} requires pass {req!r}, but {why}; "
                    f"enable {req!r} or also disable {spec.name!r}"
                )
        seen.add(spec.name)
    bound = tuple(functools.partial(p.fn, **p.options_from_config(config)) for p in chosen)
    return Pipeline(tuple(chosen), bound, debug_enabled(config), config.dump_dir)


def debug_enabled(config: MoPConfig) -> bool:
    """`debug=True` or `MOPC_DEBUG=1`: verify after every pass, and let rewrites raise on
    blocks they have no rule for instead of keeping them on the reference layout."""
    return config.debug or os.environ.get("MOPC_DEBUG", "") not in ("", "0")
