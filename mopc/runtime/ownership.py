"""Sharded ownership: each rank holds a shard of every parameter at rest.

A parameter's *layout* says how its values are spread over the world's ranks. It is cut
into `num_chunks` chunks along `chunk_dim` (one per tensor-parallel rank, or one per rank
for a vocabulary-sharded weight, or a single chunk), and each chunk is flattened, padded
and split into equal *pieces* over the remaining ranks. World rank `r` holds piece
`r // num_chunks` of chunk `r % num_chunks`; that matches a `(dp, tp)` device mesh in
row-major order (the tensor-parallel rank varies fastest).

The parameter stays a leaf the optimizer sees: an `nn.Parameter` wrapping a `DTensor`
sharded over a 1-D world mesh (global shape `[world * piece_numel]`, in the padded,
chunk-permuted order above), so `clip_grad_norm_`, `state_dict()` and Distributed
Checkpoint work on the shards; a checkpoint saved this way loads back at the same world
size and layout (resharding to another layout is the checkpoint issue's work). The
module's attribute (`linear.weight`) is turned into a property returning
`mopc::unshard(shard)`, the full parameter. Eagerly, reading that attribute is a
collective: every rank must read it, or the readers wait for the others. That op is the *reference program*'s
all-gather: eagerly it gathers for real; in a `mop`-compiled graph the `gather_params`
pass lowers it (and its backward `mopc::reduce_grad`, a mean reduce-scatter) into
functional collectives that other passes can bucket, overlap or replace.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mopc.plan.mesh import all_gather_flat, reduce_scatter_flat, resolve_group
from mopc.runtime.host_optim import wait_all_updates

__all__ = [
    "MixedPrecision",
    "ParamLayout",
    "full_parameters",
    "full_to_gathered",
    "gathered_to_full",
    "local_shard",
    "reduce_grad_op",
    "shard_module_params",
    "unshard_op",
]


@dataclass(frozen=True)
class ParamLayout:
    """How one parameter is spread over the world (see the module docstring)."""

    fqn: str
    shape: tuple[int, ...]
    chunk_dim: int = 0
    num_chunks: int = 1
    world_size: int = 1
    kind: str = "flat"
    """`flat` (ZeRO-3 over all ranks), `tp` (chunks over the tensor-parallel group,
    pieces over data-parallel ranks), `ep` (experts split over the expert-parallel group,
    pieces over the ranks holding the same experts) or `vocab` (one row block per rank)."""

    @property
    def num_pieces(self) -> int:
        return self.world_size // self.num_chunks

    @property
    def chunk_numel(self) -> int:
        return math.prod(self.shape) // self.num_chunks

    @property
    def piece_numel(self) -> int:
        return -(-self.chunk_numel // self.num_pieces)

    def validate(self) -> None:
        if self.world_size % self.num_chunks:
            raise ValueError(f"{self.fqn}: {self.num_chunks} chunks do not divide world size {self.world_size}")
        if self.shape and self.shape[self.chunk_dim] % self.num_chunks:
            raise ValueError(
                f"{self.fqn}: dim {self.chunk_dim} of shape {list(self.shape)} is not divisible by "
                f"{self.num_chunks}"
            )


# ------------------------------------------------------------------------ layout math
# Plain torch ops (reshape, movedim, pad), so the same functions serve the eager ops and
# the graph rewrite, which traces them.


def gathered_to_full(gathered: torch.Tensor, shape: list[int], chunk_dim: int, num_chunks: int,
                     world: int) -> torch.Tensor:
    """[world * piece_numel] in rank order -> the full parameter (inverse of full_to_gathered)."""
    numel = math.prod(shape)
    if num_chunks == 1:
        return gathered[:numel].view(shape)
    num_pieces = world // num_chunks
    chunk_numel = numel // num_chunks
    pieces = gathered.view(num_pieces, num_chunks, -1).transpose(0, 1).reshape(num_chunks, -1)
    chunk_shape = list(shape)
    chunk_shape[chunk_dim] //= num_chunks
    chunks = pieces[:, :chunk_numel].reshape(num_chunks, *chunk_shape)
    return chunks.movedim(0, chunk_dim).reshape(shape)


def full_to_gathered(full: torch.Tensor, chunk_dim: int, num_chunks: int, world_size: int) -> torch.Tensor:
    """The full parameter (or its gradient) -> [world * piece_numel] in rank order."""
    num_pieces = world_size // num_chunks
    chunk_numel = full.numel() // num_chunks
    piece_numel = -(-chunk_numel // num_pieces)
    pad = num_pieces * piece_numel - chunk_numel
    if num_chunks == 1:
        return F.pad(full.reshape(-1), (0, pad))
    shape = list(full.shape)
    split = shape[:chunk_dim] + [num_chunks, shape[chunk_dim] // num_chunks] + shape[chunk_dim + 1:]
    chunks = full.reshape(split).movedim(chunk_dim, 0).reshape(num_chunks, chunk_numel)
    chunks = F.pad(chunks, (0, pad))
    return chunks.view(num_chunks, num_pieces, piece_numel).transpose(0, 1).reshape(-1)


def local_shard(full: torch.Tensor, layout: ParamLayout, rank: int) -> torch.Tensor:
    """This rank's piece of `full` (a real tensor with the parameter's full shape)."""
    gathered = full_to_gathered(full.detach(), layout.chunk_dim, layout.num_chunks, layout.world_size)
    n = layout.piece_numel
    return gathered[rank * n:(rank + 1) * n].clone()


# ------------------------------------------------------------------------ the ops


@torch.library.custom_op("mopc::unshard", mutates_args=())
def unshard_op(shard: torch.Tensor, shape: list[int], chunk_dim: int, num_chunks: int, group_name: str,
               dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = None) -> torch.Tensor:
    """All-gather this rank's piece over `group_name` (the world) into the full parameter.

    Mixed precision (`param_dtype`, `reduce_dtype`): `dtype` casts the piece before the
    gather, so the gather moves and returns `dtype`; `reduce_dtype` is the dtype the
    backward reduce-scatters the gradient in (None: the gradient's own). The gradient of
    the shard is always returned in the shard's dtype. Both None (the default, fp32) add
    no cast.
    """
    wait_all_updates()  # an eager read after HostAdamW.step() sees the updated shard
    group = resolve_group(group_name)
    world = group.size()
    if dtype is not None:
        shard = shard.to(dtype)
    gathered = shard.new_empty(shard.numel() * world)
    all_gather_flat(gathered, shard.contiguous(), group=group)
    return gathered_to_full(gathered, shape, chunk_dim, num_chunks, world)


@unshard_op.register_fake
def _unshard_fake(shard, shape, chunk_dim, num_chunks, group_name, dtype=None, reduce_dtype=None):
    return shard.new_empty(shape, dtype=dtype or shard.dtype)


@torch.library.custom_op("mopc::reduce_grad", mutates_args=())
def reduce_grad_op(grad: torch.Tensor, chunk_dim: int, num_chunks: int, group_name: str) -> torch.Tensor:
    """Mean over the world of the full gradient, this rank's piece of it (reduce-scatter)."""
    group = resolve_group(group_name)
    world = group.size()
    gathered = full_to_gathered(grad, chunk_dim, num_chunks, world).contiguous()
    out = grad.new_empty(gathered.numel() // world)
    reduce_scatter_flat(out, gathered, group=group)
    return out.div_(world)


@reduce_grad_op.register_fake
def _reduce_grad_fake(grad, chunk_dim, num_chunks, group_name):
    world = resolve_group(group_name).size()
    chunk_numel = grad.numel() // num_chunks
    num_pieces = world // num_chunks
    return grad.new_empty(-(-chunk_numel // num_pieces))


def _unshard_setup(ctx, inputs, output):
    shard, _, ctx.chunk_dim, ctx.num_chunks, ctx.group_name, *dtypes = inputs
    ctx.shard_dtype = shard.dtype
    ctx.reduce_dtype = dtypes[1] if len(dtypes) > 1 else None


def _unshard_backward(ctx, grad):
    # the casts sit outside reduce_grad, so the collective moves reduce_dtype and the
    # optimizer gets a gradient in its shard's dtype (fp32 master)
    if ctx.reduce_dtype is not None and grad.dtype != ctx.reduce_dtype:
        grad = grad.to(ctx.reduce_dtype)
    shard_grad = torch.ops.mopc.reduce_grad(grad, ctx.chunk_dim, ctx.num_chunks, ctx.group_name)
    if shard_grad.dtype != ctx.shard_dtype:
        shard_grad = shard_grad.to(ctx.shard_dtype)
    return shard_grad, None, None, None, None, None, None


torch.library.register_autograd("mopc::unshard", _unshard_backward, setup_context=_unshard_setup)


# ------------------------------------------------------------------------ modules


@dataclass(frozen=True)
class MixedPrecision:
    """The dtypes of a mixed-precision policy (MoPConfig `param_dtype`, `reduce_dtype`,
    `master_dtype`): shards at rest in `master`, gathered and computed in `param`,
    gradients reduce-scattered in `reduce`."""

    param: torch.dtype
    reduce: torch.dtype
    master: torch.dtype = torch.float32


def _gather_dtypes(shard: torch.Tensor, precision: MixedPrecision | None) -> tuple[torch.dtype, ...]:
    """The extra `mopc::unshard` arguments of one shard: none when nothing is cast."""
    if precision is None or not shard.is_floating_point():
        return ()
    if precision.param == shard.dtype and precision.reduce == shard.dtype:
        return ()
    return (precision.param, precision.reduce)

def _gather_property(name: str) -> property:
    def fget(self: nn.Module) -> torch.Tensor:
        shape, chunk_dim, num_chunks, group_name, *dtypes = self._mopc_gather[name]
        local = self._parameters[name].to_local()  # every shard is a DTensor parameter
        # no dtype arguments under the default policy: the graphs stay as they were
        return torch.ops.mopc.unshard(local, shape, chunk_dim, num_chunks, group_name, *dtypes)

    return property(fget)


_SHARDED_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def _sharded_class(cls: type, names: tuple[str, ...]) -> type:
    """One subclass per (module class, sharded names): the layouts live on the instances, so
    every block of a model keeps one class (and Dynamo one type guard for all of them)."""
    key = (cls, names)
    if key not in _SHARDED_CLASSES:
        props = {name: _gather_property(name) for name in names}
        _SHARDED_CLASSES[key] = type(f"Sharded{cls.__name__}", (cls,), {"_mopc_sharded": names, **props})
    return _SHARDED_CLASSES[key]


def shard_module_params(
    model: nn.Module,
    layouts: dict[str, ParamLayout],
    *,
    rank: int,
    world_mesh,
    group_name: str,
    full_value: Callable[[str, torch.Tensor], torch.Tensor | None],
    device: torch.device,
    precision: MixedPrecision | None = None,
) -> None:
    """Replace each parameter of `layouts` by its shard (a DTensor parameter) in place.

    `full_value(fqn, param)` returns the full values of one parameter (the parameter
    itself for a materialised model, or a freshly initialised tensor for a `meta` model),
    or None for a parameter another pipeline stage holds (its shard here is empty);
    only one full parameter exists at a time. Tied parameters are sharded once.
    `precision` (mixed precision): floating-point shards are kept in its `master` dtype,
    gathered in its `param` dtype and their gradients reduced in its `reduce` dtype.
    """
    from torch.distributed.tensor import DTensor, Shard

    done: dict[int, nn.Parameter] = {}
    per_module: dict[nn.Module, dict[str, tuple[nn.Parameter, ParamLayout]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            fqn = f"{mod_name}.{name}" if mod_name else name
            key = id(param)
            if key not in done:
                layout = layouts.get(fqn)
                if layout is None:
                    continue
                full = full_value(fqn, param)
                dtype = precision.master if precision and param.is_floating_point() else param.dtype
                remote = full is None  # held by another pipeline stage: an empty shard keeps the module traceable
                if remote:
                    local = torch.empty((0, *layout.shape[1:]), dtype=dtype, device=device)
                else:
                    local = local_shard(full.to(device=device, dtype=dtype), layout, rank)
                del full
                dt = DTensor.from_local(local, world_mesh, [Shard(0)], run_check=False)
                new = nn.Parameter(dt, requires_grad=param.requires_grad)
                new._mopc_layout = layout  # type: ignore[attr-defined]
                new._mopc_remote = remote  # type: ignore[attr-defined]  # another pipeline stage's
                done[key] = new
            new = done[key]
            per_module.setdefault(module, {})[name] = (new, new._mopc_layout)  # type: ignore[attr-defined]
    for module, params in per_module.items():
        for name in params:
            del module._parameters[name]
        module.__class__ = _sharded_class(type(module), tuple(sorted(params)))
        module._mopc_gather = {name: (list(layout.shape), layout.chunk_dim, layout.num_chunks, group_name,
                                      *_gather_dtypes(new, precision))
                               for name, (new, layout) in params.items()}
        for name, (new, _) in params.items():
            module._parameters[name] = new


@torch.no_grad()
def full_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's full value by name (a copy). On a parallelized model this is a
    collective: reading a sharded attribute all-gathers it, so every rank must call it.
    Under pipeline parallelism: the parameters of this rank's stages only."""
    wait_all_updates()
    out = {}
    for fqn, param in model.named_parameters():
        if getattr(param, "_mopc_remote", False):
            continue
        owner, _, name = fqn.rpartition(".")
        out[fqn] = getattr(model.get_submodule(owner) if owner else model, name).detach().clone()
    return out
