"""`mopc.parallelize(model, example_inputs, **options)`: plan on fakes, shard at rest.

    model = mopc.parallelize(model, batch, tp=2)           # every rank, under torchrun
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)   # sees only this rank's shards
    step = torch.compile(model, backend="mop")
    for batch in data:                                     # this rank's own batch
        loss = step(**batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # global norm
        opt.step(); opt.zero_grad()

Data semantics are DDP's: each rank passes its own batch, the returned loss is the
rank's own, and the gradients are those of the concatenated global batch (the mean over
ranks of the rank losses).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mopc.config import MoPConfig, MoPConfigError
from mopc.plan.layout import ModelDims, Plan, check_dims, make_plan
from mopc.plan.mesh import MeshSpec, build_meshes, ensure_process_group, rank_device
from mopc.runtime.guard import install_step_guard
from mopc.runtime.ownership import shard_module_params

log = logging.getLogger("mopc")

InitFn = Callable[[str, torch.Tensor], torch.Tensor]


def _fake_inputs(example_inputs: tuple | dict, model: nn.Module) -> tuple | dict:
    """Example inputs for planning (which traces with fake tensors, so values are never read):
    on the meta device when the model is, else on the model's device."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("meta")
    to_device = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x
    if isinstance(example_inputs, Mapping):
        return {k: to_device(v) for k, v in example_inputs.items()}
    return tuple(to_device(x) for x in example_inputs)


def _tokens_per_rank(example_inputs: tuple | dict) -> int | None:
    """Tokens in this rank's batch: the elements of the first integer input (token ids)."""
    values = example_inputs.values() if isinstance(example_inputs, Mapping) else example_inputs
    for value in values:
        if isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dim() >= 1:
            return value.numel()
    return None


def _analyze(model: nn.Module, example_inputs: tuple | dict, loss_fn: Callable | None):
    from mopc.analysis import analyze

    return analyze(model, _fake_inputs(example_inputs, model), loss_fn)


def _stage_plan(model: nn.Module, analysis, config: MoPConfig):
    """The pipeline stages (layers per stage, balanced by the analysis's roofline time) and the
    parameters each stage holds; tied parameters used on two stages are refused."""
    from mopc.passes.analysis.role_defs import layer_of
    from mopc.plan.stages import make_stage_plan, roofline_seconds
    from mopc.planner.hardware import device_hardware

    layers = sorted({layer_of(fqn) for fqn in analysis.param_roles} - {None})
    if not layers:
        raise MoPConfigError(f"mop option pp={config.pp}: no `layers.N` blocks were found in this model, so there "
                             "is no sequential stack to cut into pipeline stages; drop pp")
    seconds = roofline_seconds(analysis, device_hardware(rank_device()), config.param_dtype)
    stages = make_stage_plan(config, len(layers), [seconds.get(f"layer {i}", 0.0) for i in range(len(layers))],
                             head_cost=seconds.get("embedding", 0.0), tail_cost=seconds.get("head", 0.0))
    seen_layer, where, owners = False, {}, {}
    for fqn, param in model.named_parameters(remove_duplicate=False):
        seen_layer = seen_layer or layer_of(fqn) is not None
        stage = stages.stage_of_param(fqn, after_layers=seen_layer)
        if id(param) in owners and owners[id(param)][1] != stage:
            first, other = owners[id(param)]
            raise MoPConfigError(
                f"mop option pp={config.pp}: parameter {fqn} is the same tensor as {first} (tied weights), used on "
                f"pipeline stages {other} and {stage}; untie them (e.g. tie_embeddings=False) or drop pp")
        owners.setdefault(id(param), (fqn, stage))
        where[fqn] = stage
    return stages, where


def _materialize_buffers(model: nn.Module, init_fn: InitFn | None, device: torch.device) -> None:
    for mod_name, module in model.named_modules():
        for name, buf in list(module._buffers.items()):
            if buf is None or not buf.is_meta:
                continue
            fqn = f"{mod_name}.{name}" if mod_name else name
            if init_fn is None:
                raise ValueError(f"mopc.parallelize: buffer {fqn} is on the meta device; pass init_fn=...")
            module._buffers[name] = init_fn(fqn, buf).to(device=device, dtype=buf.dtype)


def parallelize(
    model: nn.Module,
    example_inputs: tuple | dict,
    *,
    init_fn: InitFn | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    **options: Any,
) -> nn.Module:
    """Shard `model`'s parameters over the ranks, in place, and attach the plan.

    `example_inputs` is one rank's batch (tuple of positional or dict of keyword
    arguments; only shapes matter). `options` are :class:`mopc.MoPConfig` fields
    (`tp`, `dp`, `vocab_parallel`, `bucket_mb`, ...), validated against the world size
    and the model's shapes before anything is allocated. A model built on `meta` needs
    `init_fn(fqn, meta_tensor) -> full values`; only one full parameter exists at a time
    and each rank keeps just its shard (`mopc.models.make_init_fn(model, seed)` gives the
    values `init_weights` would).
    """
    config = MoPConfig.from_options(options)
    if getattr(model, "mopc_plan", None) is not None:
        raise MoPConfigError("mopc.parallelize: this model is already parallelized (it has a mopc_plan); "
                             "call it once per model (build a new model for another layout)")
    ensure_process_group()
    spec = MeshSpec.from_config(config, dist.get_world_size())
    has_meta = any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    if has_meta and init_fn is None:
        raise ValueError(
            "mopc.parallelize: the model is on the meta device; pass init_fn=(fqn, tensor) -> values "
            "(for mopc's models: mopc.models.make_init_fn(model, seed))"
        )
    check_dims(ModelDims.of(model), spec, config)  # sizes the mesh must divide, before tracing anything
    config.check_expert_options()
    if config.expert_bias_update_rate > 0 and spec.ep == 1:
        raise MoPConfigError(
            f"mop option expert_bias_update_rate={config.expert_bias_update_rate} balances the expert-parallel "
            "dispatch (its token counts drive the update), but ep=1; pass ep > 1 or expert_bias_update_rate=0"
        )
    if config.expert_bias_update_rate > 0:
        from mopc.runtime.experts import expert_bias_buffers

        if not expert_bias_buffers(model):
            raise MoPConfigError(
                f"mop option expert_bias_update_rate={config.expert_bias_update_rate} needs router correction-bias "
                "buffers (named `expert_bias` or `e_score_correction_bias`), and this model has none; build the "
                "router with a bias (MoEModelConfig.router_bias=True) or pass expert_bias_update_rate=0"
            )
    _check_precision(config)
    _check_sequence(example_inputs, spec)
    if spec.pp > 1:
        from mopc.runtime.pipeline_step import first_microbatch

        values = example_inputs.values() if isinstance(example_inputs, Mapping) else example_inputs
        for value in values:
            first_microbatch(value, config.num_microbatches)
    config = config.replace(dp=spec.data_parallel)  # resolved, so torch.compile(options={"dp": ...}) can agree
    analysis = _analyze(model, example_inputs, loss_fn)
    rank = dist.get_rank()
    held = None  # parameters this rank's pipeline stages use (None: every parameter)
    if spec.pp > 1:
        stages, param_stage = _stage_plan(model, analysis, config)
        from mopc.runtime.pipeline import stage_rank

        mine = {s for s in range(stages.num_stages) if stage_rank(s, spec.pp) == spec.pipeline_rank(rank)}
        held = {fqn for fqn, s in param_stage.items() if s in mine}
        config = config.replace(pp_split=stages.first_layer[1:])  # resolved: the backend cuts the graph there
        log.info("mopc.parallelize: pipeline %s", stages.describe())
    plan = make_plan(model, dict(analysis.param_roles), spec, config, _tokens_per_rank(example_inputs))  # raises first
    meshes = build_meshes(spec)
    device = rank_device()

    def full_value(fqn: str, param: torch.Tensor) -> torch.Tensor | None:
        if held is not None and fqn not in held:  # another pipeline stage's: no storage here
            return None
        if not param.is_meta:
            return param.detach()
        values = init_fn(fqn, param)  # type: ignore[misc]
        if not isinstance(values, torch.Tensor) or tuple(values.shape) != tuple(param.shape):
            got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(f"mopc.parallelize: init_fn returned {got} for {fqn}; expected a tensor of shape "
                             f"{tuple(param.shape)}")
        return values

    with torch.no_grad():
        shard_module_params(model, dict(plan.layouts), rank=spec.stage_rank(rank), world_mesh=meshes.world,
                            group_name=meshes.world_group, full_value=full_value, device=device,
                            precision=config.mixed_precision())
        _materialize_buffers(model, init_fn, device)
    for param in model.parameters():  # the backend reads the layout options from its inputs
        param._mopc_config = config  # type: ignore[attr-defined]
    model.mopc_plan = plan  # type: ignore[assignment]
    if spec.pp > 1:  # Dynamo captures one micro-batch; the compiled call runs the whole step
        from mopc.runtime.pipeline_step import pipelined_forward

        cls = type(model)
        model.__class__ = type(f"Pipelined{cls.__name__}", (cls,), {"forward": pipelined_forward(cls.forward)})
        model._mopc_pp, model._mopc_microbatches = spec.pp, config.num_microbatches  # type: ignore[assignment]
    if config.expert_bias_update_rate > 0:
        _balance_after_each_step(model, config.expert_bias_update_rate, meshes.edp_group)
    groups = (meshes.world_group, meshes.dp_group, meshes.tp_group, meshes.ep_group, meshes.edp_group,
              *(g for g in (meshes.cp_group, meshes.pp_group) if g))
    install_step_guard(model, groups, check=config.nan_guard,
                       collective_timeout_s=config.collective_timeout_s,
                       first_step_timeout_s=config.first_step_timeout_s)
    log.info("mopc.parallelize: %s", plan.summary().replace("\n", "; "))
    return model


def _check_sequence(example_inputs: tuple | dict, spec: MeshSpec) -> None:
    """Under context parallelism a rank's tokens are two equal chunks of every sequence."""
    if spec.cp == 1:
        return
    values = example_inputs.values() if isinstance(example_inputs, Mapping) else example_inputs
    for value in values:
        if isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dim() >= 2:
            local = value.shape[1]
            if local % 2:
                raise MoPConfigError(
                    f"mop option cp={spec.cp}: the example batch holds {local} tokens per sequence on this rank "
                    f"(a sequence length of {local * spec.cp}), but each rank holds two equal chunks, so the "
                    f"sequence length must be divisible by 2*cp={2 * spec.cp}; pad the sequences to a multiple "
                    f"of {2 * spec.cp} and pass this rank's part (mopc.shard_sequence)")
            return


def data_parallel_rank(model: nn.Module) -> tuple[int, int]:
    """(index, count) of the batch this rank reads: ranks of one context-parallel group read
    the same sequences (each keeps its chunks, `shard_sequence`); every other rank its own.

        index, count = mopc.data_parallel_rank(model)
        sampler = DistributedSampler(dataset, num_replicas=count, rank=index)
    """
    part = _data_part(model)
    return part.index, part.count


def shard_sequence(batch: Any, model: nn.Module, dim: int = 1) -> Any:
    """This rank's part of its context-parallel group's sequences: for every tensor of
    `batch` (a tensor, or a tuple/list/dict of them) with a sequence on `dim`, the two
    chunks (of 2·cp) this rank holds, an early and a late one. With cp=1, `batch` itself.

    Cut token ids and labels (already shifted) alike: positions inside the model are
    made global by the compiler, so the model sees the same sequence as on one device."""
    from mopc.runtime.context_parallel import shard_sequence as cut

    part = _data_part(model)
    if part.cp == 1:
        return batch
    one = lambda t: cut(t, part.cp, part.cp_rank, dim) if isinstance(t, torch.Tensor) and t.dim() > dim else t
    if isinstance(batch, Mapping):
        return {k: one(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(one(v) for v in batch)
    return one(batch)


def _data_part(model: nn.Module):
    from mopc.runtime.context_parallel import data_part

    plan = plan_of(model)
    if plan is None:
        raise ValueError("this model was not parallelized; call mopc.parallelize(model, ...) first")
    spec = plan.spec
    return data_part(spec.stage_rank(dist.get_rank()), spec.world_size, spec.cp, spec.tp)


def _check_precision(config: MoPConfig) -> None:
    """bf16 needs a device that computes in it (every CPU does; CUDA from Ampere on)."""
    if "bf16" not in (config.param_dtype, config.reduce_dtype):
        return
    device = rank_device()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = "param_dtype" if config.param_dtype == "bf16" else "reduce_dtype"
        raise MoPConfigError(f"mop option {name}='bf16' is not supported by {torch.cuda.get_device_name(device)}; "
                             f"use {name}='fp32'")


def _balance_after_each_step(model: nn.Module, rate: float, edp_group: str) -> None:
    """Aux-loss-free balancing: after every optimizer step over this model's parameters, move
    each MoE layer's router correction bias by the step's global token counts (outside any
    compiled region, so graphs and guards are untouched)."""
    import weakref

    from torch.optim.optimizer import register_optimizer_step_post_hook

    from mopc.runtime.experts import expert_bias_buffers, update_expert_bias

    biases = expert_bias_buffers(model)
    param_ids = {id(p) for p in model.parameters()}  # ids: Tensor equality is elementwise
    alive = weakref.ref(model)

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if alive() is None:
            return
        if any(id(p) in param_ids for group in optimizer.param_groups for p in group["params"]):
            update_expert_bias(biases, rate, edp_group)

    model._mopc_balance_hook = register_optimizer_step_post_hook(hook)  # type: ignore[assignment]


def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for a parallelized model: the norm of the whole
    model's gradient. Without pipeline parallelism this is torch's (the gradient shards are
    DTensors over all ranks); under `pp > 1` each rank holds its stages' shards only, so the
    stages' norms are combined over the pipeline ranks before clipping. Returns the norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    plan = plan_of(model)
    if plan is None or plan.spec.pp == 1:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
    from mopc.plan.mesh import build_meshes, resolve_group

    norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type) if params else torch.zeros(())
    norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).detach().double()
    group = resolve_group(build_meshes(plan.spec).pp_group)
    if norm_type == float("inf"):
        dist.all_reduce(norm, op=dist.ReduceOp.MAX, group=group)
    else:
        norm = norm ** norm_type
        dist.all_reduce(norm, group=group)
        norm = norm ** (1.0 / norm_type)
    coef = min(1.0, max_norm / (norm.item() + 1e-6))
    if coef < 1.0:
        with torch.no_grad():
            for p in params:
                p.grad.mul_(coef)
    return norm.float()


def plan_of(model: nn.Module) -> Plan | None:
    return getattr(model, "mopc_plan", None)
