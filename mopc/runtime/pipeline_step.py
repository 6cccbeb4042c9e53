"""The compiled call under pipeline parallelism: one whole training step per call.

`mopc.backend` hands a Dynamo graph here when the model was parallelized with `pp > 1`.
The graph is cut into stage graphs (`passes/rewrite/pipeline_split.py`); this rank compiles
only its stages, each through the usual pass pipeline as its own forward/backward pair.
Each call then cuts the batch into micro-batches (dim 0 of every data input), runs the
schedule (`runtime/pipeline.py`: forward, loss and backward of every micro-batch, with
activations and their gradients sent point to point), and returns the mean loss over the
micro-batches, broadcast from the last stage so that every rank returns the same value.
The gradients are already on the parameter shards; the `loss.backward()` the user calls
afterwards reaches no parameter (the returned loss is a leaf).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.fx import GraphModule

from mopc.config import MoPConfig, MoPConfigError

log = logging.getLogger("mopc")


class PipelineStep:
    """Stage graphs of this rank compiled; `__call__(*dynamo_inputs)` runs one step."""

    def __init__(self, gm: GraphModule, example_inputs: Sequence[Any], config: MoPConfig,
                 compile_stage: Callable[[int, GraphModule, list[Any]], Callable], data_inputs: Sequence[bool]) -> None:
        from torch._guards import detect_fake_mode

        from mopc.passes.rewrite.pipeline_split import node_layer, split_stages
        from mopc.plan.mesh import MeshSpec, build_meshes, rank_device
        from mopc.plan.stages import StagePlan
        from mopc.runtime.pipeline import Stage, stage_rank

        self.config = config
        spec = MeshSpec.from_config(config, dist.get_world_size())
        meshes = build_meshes(spec)
        self.pp, self.pp_rank = spec.pp, spec.pipeline_rank(dist.get_rank())
        self.group = _resolve(meshes.pp_group)
        self.microbatches = config.num_microbatches
        self.data_inputs = list(data_inputs)
        _check_whole_step(gm)
        num_layers = 1 + max((node_layer(n) or 0) for n in gm.graph.nodes)
        plan = StagePlan(config.pp * config.pp_virtual, (0, *config.pp_split), num_layers)
        device = rank_device()
        # Inputs Dynamo never saw (a micro-batch slice, a received activation) would be given
        # symbolic sizes by AOTAutograd under Dynamo's shape environment: hand it static fakes.
        fake_mode = detect_fake_mode(example_inputs)
        static = (lambda t: fake_mode.from_tensor(t, static_shapes=True) if isinstance(t, torch.Tensor) else t) \
            if fake_mode is not None else (lambda t: t)
        start = time.perf_counter()
        graphs = split_stages(gm, plan.stage_of_layer, plan.num_stages)
        self.stages: list[Stage] = []
        for sg in graphs:
            if stage_rank(sg.index, self.pp) != self.pp_rank:
                continue
            received = tuple(_meta(n) for n in sg.received)
            sent = tuple(_meta(n) for n in sg.sent)
            example = [static(self._micro(example_inputs[i], i, 0)) if self.data_inputs[i] else example_inputs[i]
                       for i in sg.inputs]
            example += [static(torch.empty(t.shape, dtype=t.dtype, device=device)).requires_grad_(t.requires_grad)
                        for t in received]
            fn = compile_stage(sg.index, sg.gm, example)
            self.stages.append(Stage(index=sg.index, run=self._runner(fn, sg.inputs), inputs=received,
                                     outputs=sent))
        log.info("mop: pipeline rank %d compiled stage(s) %s in %.1f s (%d micro-batches, schedule %s)",
                 self.pp_rank, [s.index for s in self.stages], time.perf_counter() - start, self.microbatches,
                 config.schedule)
        self._args: Sequence[Any] = ()

    def _micro(self, value: Any, index: int, mb: int) -> Any:
        if not self.data_inputs[index] or not isinstance(value, torch.Tensor) or value.dim() == 0:
            return value
        return value.chunk(self.microbatches, dim=0)[mb]

    def _runner(self, fn: Callable, inputs: list[int]) -> Callable:
        def run(mb: int, received: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            args = [self._micro(self._args[i], i, mb) for i in inputs]
            return tuple(fn(*args, *received))

        return run

    def __call__(self, *args: Any) -> list[torch.Tensor]:
        from mopc.runtime.pipeline import mean_loss, run_pipeline

        self._args = args
        try:
            with torch.enable_grad():
                result = run_pipeline(self.stages, pp=self.pp, pp_rank=self.pp_rank, group=self.group,
                                      microbatches=self.microbatches, schedule=self.config.schedule,
                                      virtual=self.config.pp_virtual, loss_scale=1.0 / self.microbatches)
        finally:
            self._args = ()
        loss = mean_loss(result, pp=self.pp, group=self.group).float()
        _record(self, result)
        return [loss.requires_grad_()]  # a leaf: the user's loss.backward() finds nothing left to do


_LAST: dict[str, Any] = {}


def _record(step: PipelineStep, result) -> None:
    busy = sum(t.end - t.start - t.wait for t in result.timeline)
    span = (max(t.end for t in result.timeline) - min(t.start for t in result.timeline)) if result.timeline else 0.0
    _LAST.clear()
    _LAST.update({
        "schedule": step.config.schedule, "pp": step.pp, "pp_rank": step.pp_rank,
        "microbatches": step.microbatches, "virtual": step.config.pp_virtual,
        "stages": [s.index for s in step.stages],
        "max_in_flight": {str(k): v for k, v in result.max_in_flight.items()},
        "step_s": span, "busy_s": busy, "bubble_fraction": result.bubble_fraction(),
        "actions": len(result.timeline),
        "p2p_bytes_sent": {"activations": result.bytes_sent[0], "gradients": result.bytes_sent[1]},
        "p2p_messages_sent": result.messages_sent,
    })


def pipeline_stats() -> dict[str, Any]:
    """This rank's last pipeline step: schedule, its stages, the most micro-batches in flight
    per stage, seconds computing (`busy_s`) against the step's span (`step_s`), the bubble
    fraction 1 - busy / span (time waiting for a neighbour), and the bytes sent point to point
    (activations forward, gradients back). Empty before the first step."""
    return dict(_LAST)


def _resolve(name: str | None) -> dist.ProcessGroup:
    from mopc.plan.mesh import resolve_group

    assert name is not None
    return resolve_group(name)


def _check_whole_step(gm: GraphModule) -> None:
    """Under pp one Dynamo graph must be the whole step: the model's forward returning one loss."""
    outputs = gm.graph.find_nodes(op="output")[0].args[0]
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    values = [o.meta.get("example_value") if hasattr(o, "meta") else o for o in outputs]
    if len(values) != 1 or not isinstance(values[0], torch.Tensor) or values[0].dim() != 0:
        shapes = [tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for v in values]
        raise MoPConfigError(
            f"mop option pp: the compiled graph returns {shapes}, but under pipeline parallelism the compiled call "
            "runs the whole step, so the model's forward must return one scalar loss in one graph (pass the labels "
            "to the model, or wrap it so it returns the loss; a graph break splits the step: compile with "
            "fullgraph=True to find it)")


def _meta(node):
    """Shape, dtype and requires_grad of a value crossing a stage boundary (the graph was
    traced on one micro-batch, see `pipelined_forward`)."""
    from mopc.runtime.pipeline import TensorMeta

    value = node.meta.get("example_value", node.meta.get("val"))
    if not isinstance(value, torch.Tensor):
        raise MoPConfigError(f"mop option pp: the value {node.name} crossing a pipeline stage boundary is a "
                             f"{type(value).__name__}, not a tensor; cut the model where only tensors flow")
    return TensorMeta(tuple(int(d) for d in value.shape), value.dtype, bool(value.requires_grad))


def first_microbatch(value: Any, microbatches: int) -> Any:
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    if value.shape[0] % microbatches:
        raise MoPConfigError(
            f"mop option microbatches={microbatches}: this rank's batch holds {value.shape[0]} sequences, which do "
            f"not split into {microbatches} equal micro-batches; pass a batch that is a multiple of {microbatches}")
    return value[: value.shape[0] // microbatches]


def pipelined_forward(forward: Callable) -> Callable:
    """The forward of a model parallelized with pp > 1: under torch.compile it runs `forward`
    on the first micro-batch of every batched input (dim 0), so Dynamo captures one
    micro-batch's graph; the compiled call then feeds it each micro-batch in turn (the
    slice is the identity on a micro-batch). Called eagerly it refuses: a rank holds only
    its stages' parameters."""
    import functools

    @functools.wraps(forward)
    def run(self, *args: Any, **kwargs: Any) -> Any:
        m = self._mopc_microbatches
        args = tuple(first_microbatch(a, m) for a in args)  # a batch that does not split: that error first
        kwargs = {k: first_microbatch(v, m) for k, v in kwargs.items()}
        if not torch.compiler.is_compiling():
            raise RuntimeError(
                f"this model was parallelized with pp={self._mopc_pp}: each rank holds only its pipeline stages' "
                "parameters, so it runs only compiled; call torch.compile(model, backend='mop')(...) instead")
        return forward(self, *args, **kwargs)

    return run
