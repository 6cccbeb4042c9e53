"""Activation offload: the ops the `offload` rewrite inserts, and their memory tiers.

`mopc::offload(t)` copies a tensor saved for backward into host memory right after its
producer; `mopc::reload(h)` brings it back in backward, `offload_prefetch` saved tensors
ahead of its first use. Both are exact copies: losses and gradients do not change.

- On CUDA the copies run on a side stream (one per device): the host copy goes into
  pinned memory after the compute stream's work so far (`wait_stream`), the device
  tensor is kept alive for the copy (`record_stream`), and `reload` makes the compute
  stream wait for its copy only at the point it was inserted, so the copy overlaps the
  backward work before that point. (Written for CUDA; not yet run on a GPU.)
- On CPU, "host" is a separate pool: the copy is an ordinary CPU tensor marked as
  host-tier, so `mopc.runtime.memory.MemoryTracker` counts it apart from device-tier
  memory (the device peak falls as it would on a GPU, and the host bytes are shown).

The tracker learns about reloaded tensors (backward temporaries it cannot see through
autograd's saved-tensor hooks) from `reload_listeners`, so a reload counts as device
memory from its copy until the backward drops it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["HOST_TIER_ATTR", "is_host_tier", "reload_listeners"]

HOST_TIER_ATTR = "_mopc_host_tier"

reload_listeners: list[Callable[[torch.Tensor], None]] = []
"""Called with every tensor `mopc::reload` returns (the memory tracker's hook)."""

_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def is_host_tier(t: torch.Tensor) -> bool:
    return bool(getattr(t, HOST_TIER_ATTR, False))


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


@torch.library.custom_op("mopc::offload", mutates_args=())
def offload_op(t: torch.Tensor) -> torch.Tensor:
    """A host-tier copy of `t` (pinned host memory on CUDA, the host pool on CPU)."""
    if t.is_cuda:
        side = _side_stream(t.device)
        side.wait_stream(torch.cuda.current_stream(t.device))
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        with torch.cuda.stream(side):
            host.copy_(t, non_blocking=True)
        t.record_stream(side)
    else:
        host = t.clone(memory_format=torch.contiguous_format)
    setattr(host, HOST_TIER_ATTR, True)
    return host


@offload_op.register_fake
def _offload_fake(t):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@torch.library.custom_op("mopc::reload", mutates_args=())
def reload_op(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` back on `device` (the compute stream waits for the copy here)."""
    if device.type == "cuda":
        side = _side_stream(device)
        with torch.cuda.stream(side):  # after the offload copy on the same stream
            out = host.to(device, non_blocking=True)
        current = torch.cuda.current_stream(device)
        current.wait_stream(side)
        out.record_stream(current)
    else:
        out = host.clone()
    for listener in reload_listeners:
        listener(out)
    return out


@reload_op.register_fake
def _reload_fake(host, device):
    return torch.empty_like(host, device=device)
