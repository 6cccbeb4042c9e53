"""The `mop` torch.compile backend: capture -> passes -> partition -> lower.

`torch.compile(model, backend="mop", options={...})` resolves through the
`torch_dynamo_backends` entry point (no `import mopc` needed). Each Dynamo graph is
turned into a joint forward+backward ATen graph by AOTAutograd; mopc's pass pipeline
runs on that joint graph inside the partitioner, then the forward and backward graphs are
lowered: run op by op (like `aot_eager`) or compiled by Inductor.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from functorch.compile import (
    default_partition,
    make_boxed_func,
    min_cut_rematerialization_partition,
)
from torch._functorch.aot_autograd import aot_module_simplified
from torch.fx import GraphModule

from mopc.capture import GraphInputs, describe_inputs, joint_param_fqns, next_graph_id
from mopc.config import MoPConfig, MoPConfigError
from mopc.logs import trace_graph
from mopc.passes.dump import DumpWriter, format_graph
from mopc.passes.pipeline import PassContext, Pipeline, build_pipeline
from mopc.runtime.guard import check_input_shapes, record_loss, wrap_collective_errors

log = logging.getLogger("mopc")


def resolve_lowering(config: MoPConfig, example_inputs: Sequence[Any]) -> str:
    if config.lowering != "auto":
        return config.lowering
    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
    return "inductor" if on_cuda else "eager"


def _lower(lowering: str, graph_id: int, *, is_backward: bool = False, is_inference: bool = False) -> Callable:
    phase = "backward" if is_backward else "forward"
    if lowering == "inductor":
        from torch._inductor.compile_fx import compile_fx_inner

        def run_inductor(gm: GraphModule, example_inputs: Sequence[Any]) -> Callable:
            compiled = compile_fx_inner(gm, example_inputs, is_backward=is_backward, is_inference=is_inference)
            return wrap_collective_errors(compiled, graph_id=graph_id, phase=phase)

        return run_inductor

    def run_eagerly(gm: GraphModule, example_inputs: Sequence[Any]) -> Callable:
        return wrap_collective_errors(make_boxed_func(gm.forward), graph_id=graph_id, phase=phase)

    return run_eagerly


def _decompositions(lowering: str) -> dict:
    if lowering == "inductor":
        from torch._inductor.decomposition import select_decomp_table

        return select_decomp_table()
    return {}


def _param_keys(inputs: GraphInputs, example_inputs: Sequence[Any]) -> dict[str, int]:
    """Trainable parameter inputs -> their key in the optimizer hand-off registry."""
    from mopc.runtime import host_optim

    offset = len(inputs.names) - len(example_inputs)
    keys = {}
    for i, name in enumerate(inputs.names[offset:] if offset >= 0 else ()):
        value = example_inputs[i]
        if name in inputs.trainable and isinstance(value, torch.nn.Parameter):
            keys[name] = host_optim.register_param(value)
    return keys


class _Compilation:
    """State of one Dynamo graph's compilation (its id, inputs, pipeline and dumps)."""

    def __init__(self, gm: GraphModule, example_inputs: Sequence[Any], config: MoPConfig,
                 explicit: Mapping[str, Any] | None = None, *, stage: int | None = None) -> None:
        self.graph_id = next_graph_id() if stage is None else f"{next_graph_id()}_stage{stage}"
        self.stage = stage  # a pipeline stage's graph: compiled alone, run by the schedule
        self.explicit = explicit
        self.inputs: GraphInputs = describe_inputs(gm)
        if self.inputs.layout_config is not None:  # parameters sharded by mopc.parallelize
            config = MoPConfig.under_parallelize(self.inputs.layout_config, explicit or {})
            config.check_expert_options()
        else:
            config.check_no_layout(explicit or {})
        self.lowering = resolve_lowering(config, example_inputs)
        # the resolved lowering, so passes that depend on it (fuse_dispatch) are chosen by it
        self.config = config = config.replace(lowering=self.lowering)
        self.pipeline: Pipeline = build_pipeline(config)
        self.writer: DumpWriter | None = None
        self.param_keys: dict[str, int] = _param_keys(self.inputs, example_inputs) if config.optimizer_offload else {}

    def _run_pipeline(self, graph: GraphModule, inputs: Sequence[Any], num_fwd_outputs: int) -> GraphModule:
        fqns = joint_param_fqns(graph, self.inputs)
        ctx = PassContext(
            config=self.config, example_inputs=inputs, param_fqns=fqns, trainable=self.inputs.trainable,
            num_fwd_outputs=num_fwd_outputs, graph_id=self.graph_id,
        )
        self.writer = self.pipeline.make_writer(ctx)
        graph = self.pipeline.run(graph, ctx, self.writer)
        log.info("mop: graph %s: %d nodes after %d passes (%s)", self.graph_id, len(graph.graph.nodes),
                 len(self.pipeline.passes), ", ".join(self.pipeline.names))
        return graph

    def partition(self, joint: GraphModule, joint_inputs: Sequence[Any], *, num_fwd_outputs: int,
                  **kwargs: Any) -> tuple[GraphModule, GraphModule]:
        joint = self._run_pipeline(joint, joint_inputs, num_fwd_outputs)
        split = min_cut_rematerialization_partition if self.config.partitioner == "min_cut" else default_partition
        start = time.perf_counter()
        if self.config.offload == "auto":  # save, recompute or offload each saved tensor, under the budget
            from mopc.passes.rewrite.memory_policy import apply_memory_policy

            fqns = joint_param_fqns(joint, self.inputs)
            params = [(ph.meta["val"], fqns[ph.name] in self.inputs.trainable)
                      for ph in joint.graph.find_nodes(op="placeholder") if ph.name in fqns]
            fw, bw, self.memory_policy = apply_memory_policy(
                joint, functools.partial(split, joint, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs),
                joint_inputs=joint_inputs, num_fwd_outputs=num_fwd_outputs,
                budget_gb=self.config.memory_budget_gb, params=params,
                allow_recompute=self.config.partitioner == "min_cut", prefetch=self.config.offload_prefetch,
                graph_id=self.graph_id, optimizer_on_host=self.config.optimizer_offload,
                hardware_name=self.config.memory_policy_hardware)
        else:
            fw, bw = split(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)
        seconds = time.perf_counter() - start
        if self.config.offload == "experts":
            from mopc.passes.rewrite.offload import offload_saved_activations

            start = time.perf_counter()
            moved = offload_saved_activations(fw, bw, num_fwd_outputs=num_fwd_outputs, policy=self.config.offload,
                                              prefetch=self.config.offload_prefetch)
            log.info("mop: graph %s: offload=%s moves %d saved tensors (%d bytes) to host between forward and "
                     "backward", self.graph_id, self.config.offload, moved.tensors, moved.bytes)
            seconds += time.perf_counter() - start
        if self.param_keys:
            seconds += self._insert_update_handoffs(joint, fw, bw)
        for name, graph in (("forward", fw), ("backward", bw)):  # TORCH_TRACE / tlparse
            trace_graph(f"mopc_{self.graph_id}_{name}", functools.partial(format_graph, graph))
        if self.writer is not None:
            note = f"{self.config.partitioner} partitioner split the joint graph"
            self.writer.write("forward", fw, kind="partition", seconds=seconds, diff=None, note=note)
            self.writer.write("backward", bw, kind="partition", seconds=seconds, diff=None, note=note)
        return fw, bw

    def _insert_update_handoffs(self, joint: GraphModule, fw: GraphModule, bw: GraphModule) -> float:
        from mopc.passes.rewrite.optimizer_handoff import insert_update_handoffs

        start = time.perf_counter()
        fqns = joint_param_fqns(joint, self.inputs)
        primals = [ph.name for ph in joint.graph.find_nodes(op="placeholder") if ph.name.startswith("primals")]
        keys = {ph: self.param_keys[fqn] for ph, fqn in fqns.items() if fqn in self.param_keys}
        insert_update_handoffs(fw, bw, primal_names=primals, keys=keys, fence_forward=self.lowering == "eager")
        return time.perf_counter() - start

    def inference(self, gm: GraphModule, example_inputs: Sequence[Any]) -> Callable:
        num_outputs = len(gm.graph.find_nodes(op="output")[0].args[0])
        gm = self._run_pipeline(gm, example_inputs, num_outputs)
        return _lower(self.lowering, self.graph_id, is_inference=True)(gm, example_inputs)

    def compile(self, gm: GraphModule, example_inputs: Sequence[Any]) -> Callable:
        if self.config.pp > 1 and self.stage is None:
            compiled = self._compile_pipeline(gm, example_inputs)
        else:
            compiled = self._compile_graph(gm, example_inputs)
        if self.inputs.layout_config is None or self.stage is not None:
            return compiled
        config, graph_id = self.config, self.graph_id
        check_shapes = config.check_inputs and (config.tp > 1 or config.cp > 1 or config.vocab_parallel)
        placeholders = gm.graph.find_nodes(op="placeholder")
        state = self.inputs.names[len(self.inputs.names) - len(placeholders):]  # module path, or None for data
        names = [ph.name if fqn is None else None for ph, fqn in zip(placeholders, state, strict=True)]

        @functools.wraps(compiled)
        def run(*args: Any) -> Any:
            if check_shapes:
                check_input_shapes(args, names, graph_id)
            outputs = compiled(*args)
            if config.nan_guard:  # the step guard checks the loss this returns
                record_loss(outputs)
            return outputs

        return run

    def _compile_pipeline(self, gm: GraphModule, example_inputs: Sequence[Any]) -> Callable:
        """Cut the graph into pipeline stages, compile this rank's, return the whole-step call."""
        from mopc.runtime.pipeline_step import PipelineStep

        placeholders = gm.graph.find_nodes(op="placeholder")
        state = self.inputs.names[len(self.inputs.names) - len(placeholders):]
        explicit = self.explicit

        def compile_stage(index: int, stage_gm: GraphModule, stage_inputs: list[Any]) -> Callable:
            compilation = _Compilation(stage_gm, stage_inputs, self.config, explicit, stage=index)
            return compilation.compile(stage_gm, stage_inputs)

        return PipelineStep(gm, example_inputs, self.config, compile_stage, [fqn is None for fqn in state])

    def _compile_graph(self, gm: GraphModule, example_inputs: Sequence[Any]) -> Callable:
        return aot_module_simplified(
            gm,
            example_inputs,
            fw_compiler=_lower(self.lowering, self.graph_id),
            bw_compiler=_lower(self.lowering, self.graph_id, is_backward=True),
            inference_compiler=self.inference,
            partition_fn=self.partition,
            decompositions=_decompositions(self.lowering),
            keep_inference_input_mutations=True,
        )


def mop(gm: GraphModule, example_inputs: Sequence[Any], options: dict | MoPConfig | None = None,
        **kwargs: Any) -> Callable:
    """The `mop` Dynamo backend. `options` are :class:`mopc.MoPConfig` fields."""
    if kwargs:
        raise MoPConfigError(
            f"torch.compile(..., backend='mop') does not take {', '.join(f'{k}=' for k in kwargs)}; "
            "pass mop's settings as options={...} (fields of mopc.MoPConfig)"
        )
    config = MoPConfig.from_options(options)
    explicit = dict(options) if isinstance(options, Mapping) else config.non_default_fields()
    return _Compilation(gm, example_inputs, config, explicit).compile(gm, example_inputs)
