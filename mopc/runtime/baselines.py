"""The baselines mop is measured against: FSDP2 and DDP on the same model and data.

- `fsdp2`: `torch.distributed.fsdp.fully_shard` on every transformer block, then on the
  root (embedding, final norm, output), over a 1-D CPU mesh of all ranks. Parameters,
  gradients and optimizer state are sharded (ZeRO-3); blocks are gathered before use.
- `ddp`: `torch.nn.parallel.DistributedDataParallel`: every rank holds everything, and
  gradients are all-reduced in buckets during backward. `gradient_as_bucket_view=True`:
  the gradients are views into the communication buckets, so the buckets are what the
  memory report counts as gradients (without it DDP holds a second, uncounted copy).

On gloo, FSDP2 all-reduces gradients instead of reduce-scattering them (gloo has no
reduce-scatter), so its gradient traffic is that of DDP; on NCCL it reduce-scatters.

Both are compiled with `backend="aot_eager"` (the CPU analogue of what mop lowers to);
`wrap_baseline(..., compile=False)` runs them eagerly instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("mopc")

__all__ = ["BASELINES", "Baseline", "apply_ddp", "apply_fsdp2", "wrap_baseline"]

Baseline = Literal["fsdp2", "ddp"]
BASELINES: tuple[str, ...] = ("fsdp2", "ddp")


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: `model.layers` when present, else none."""
    layers = getattr(model, "layers", None)
    return list(layers) if isinstance(layers, (nn.ModuleList, nn.Sequential)) else []


def apply_fsdp2(model: nn.Module) -> nn.Module:
    """Shard `model` with FSDP2 over all ranks: each block, then the root. In place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from mopc.plan.mesh import device_type

    mesh = init_device_mesh(device_type(), (dist.get_world_size(),))
    blocks = _blocks(model)
    if not blocks:
        log.warning("fsdp2 baseline: %s has no `layers`; sharding the root module only",
                    type(model).__name__)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def apply_ddp(model: nn.Module) -> nn.Module:
    """Replicate `model` with DDP (bucketed all-reduce of gradients)."""
    return nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)


def wrap_baseline(model: nn.Module, baseline: str, *, compile: bool = True,
                  compile_backend: str = "aot_eager") -> tuple[nn.Module, Callable[..., torch.Tensor], str]:
    """Apply `baseline` to `model`.

    Returns (the module whose `parameters()` the optimizer takes, the callable a step
    runs, how it runs: the compile backend or "eager"). Call it with the default process
    group initialised.
    """
    if not dist.is_initialized():
        raise RuntimeError(f"--baseline {baseline} needs torch.distributed initialised (run under torchrun)")
    if baseline == "fsdp2":
        wrapped = apply_fsdp2(model)
    elif baseline == "ddp":
        wrapped = apply_ddp(model)
    else:
        raise ValueError(f"unknown baseline {baseline!r}; choose one of {', '.join(BASELINES)}")
    if not compile:
        return wrapped, wrapped, "eager"
    return wrapped, torch.compile(wrapped, backend=compile_backend), compile_backend
