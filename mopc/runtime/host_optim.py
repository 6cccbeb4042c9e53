"""The runtime side of optimizer offload: parameter keys, the hand-off and fence ops, the worker.

`mopc.optim.HostAdamW` keeps the optimizer state (and an fp32 master copy of every
parameter shard) in host memory and runs the update there. With the `optimizer_offload`
option the `mop` backend threads the update through the compiled step:

- backward: `mopc::grad_ready(grad, key)` right after the op that produces the reduced
  gradient shard of the parameter registered under `key`. It hands the gradient to the
  optimizer that owns the parameter, whose worker thread starts that parameter's update
  (into staging buffers) while backward goes on with the layers below.
- forward: `mopc::await_update(key)` right before the first op that reads the
  parameter's shard (its all-gather). It waits for that parameter's update only, so
  the next forward's first layers start while the last layers' updates still run.

Keys are small integers bound to parameter objects here (weakly); the graphs carry the
key, the registry gives back the parameter and its owner at run time. A key with no
owner (no `HostAdamW` over that parameter, or a graph run without it) makes both ops
no-ops, so a graph compiled with the option still runs under any optimizer.

On CUDA the gradient copy to pinned host memory and the parameter copy back run on a
side stream with events (written for CUDA, not yet run on a GPU); on CPU "host" is a
separate pool of ordinary tensors marked host-tier for the memory accounting.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import torch

__all__ = ["UpdateOwner", "is_fenced", "key_of", "mark_fenced", "owner_of", "param_of", "register_param", "set_owner",
           "wait_all_updates"]


class UpdateOwner(Protocol):
    def on_grad_ready(self, param: torch.Tensor, grad: torch.Tensor) -> None: ...

    def wait_for(self, param: torch.Tensor) -> None: ...

    def synchronize(self) -> None: ...


_keys = itertools.count(1)
_lock = threading.Lock()
_key_of_id: dict[int, tuple[weakref.ref, int]] = {}  # id(param) -> (ref, key)
_param_of_key: dict[int, weakref.ref] = {}
_owner_of_key: dict[int, weakref.ref] = {}
_fenced: set[int] = set()  # keys whose reads a compiled forward fences with mopc::await_update


def register_param(param: torch.Tensor) -> int:
    """The key of `param` (a new one the first time it is seen)."""
    with _lock:
        entry = _key_of_id.get(id(param))
        if entry is not None and entry[0]() is param:
            return entry[1]
        key = next(_keys)

        def forget(_ref: Any, key: int = key, pid: int = id(param)) -> None:
            _param_of_key.pop(key, None)
            _owner_of_key.pop(key, None)
            _fenced.discard(key)
            if _key_of_id.get(pid, (None, None))[1] == key:
                _key_of_id.pop(pid, None)

        ref = weakref.ref(param, forget)
        _key_of_id[id(param)] = (ref, key)
        _param_of_key[key] = ref
        return key


def key_of(param: torch.Tensor) -> int | None:
    entry = _key_of_id.get(id(param))
    return entry[1] if entry is not None and entry[0]() is param else None


def param_of(key: int) -> torch.Tensor | None:
    ref = _param_of_key.get(key)
    return ref() if ref is not None else None


def set_owner(param: torch.Tensor, owner: UpdateOwner | None) -> int:
    """Make `owner` (an optimizer) receive `param`'s gradient and fence its reads."""
    key = register_param(param)
    with _lock:
        if owner is None:
            _owner_of_key.pop(key, None)
        else:
            _owner_of_key[key] = weakref.ref(owner)
    return key


def owner_of(key: int) -> UpdateOwner | None:
    ref = _owner_of_key.get(key)
    return ref() if ref is not None else None


def mark_fenced(key: int) -> None:
    """A compiled forward waits for parameter `key`'s update before reading it."""
    _fenced.add(key)


def is_fenced(param: torch.Tensor) -> bool:
    key = key_of(param)
    return key is not None and key in _fenced


def wait_all_updates() -> None:
    """Wait for every optimizer's pending parameter updates (before reading parameters
    outside a compiled step: checkpoints, full_parameters, evaluation in eager)."""
    owners = {id(o): o for o in (r() for r in list(_owner_of_key.values())) if o is not None}
    for owner in owners.values():
        owner.synchronize()


# ------------------------------------------------------------------------ the ops


@torch.library.custom_op("mopc::grad_ready", mutates_args=())
def grad_ready_op(grad: torch.Tensor, key: int) -> None:
    """Hand `grad` (the reduced gradient shard of parameter `key`) to its optimizer."""
    owner = owner_of(key)
    param = param_of(key)
    if owner is not None and param is not None:
        owner.on_grad_ready(param, grad)


@grad_ready_op.register_fake
def _grad_ready_fake(grad, key):
    return None


@torch.library.custom_op("mopc::await_update", mutates_args=())
def await_update_op(key: int) -> None:
    """Wait until parameter `key`'s pending update has been written into its shard."""
    owner = owner_of(key)
    param = param_of(key)
    if owner is not None and param is not None:
        owner.wait_for(param)


@await_update_op.register_fake
def _await_update_fake(key):
    return None


# Neither op returns anything a later op reads: tell FX (and Inductor) they must stay.
torch.fx.node.has_side_effect(torch.ops.mopc.grad_ready.default)
torch.fx.node.has_side_effect(torch.ops.mopc.await_update.default)


# ------------------------------------------------------------------------ the worker


class UpdateWorker:
    """One thread that runs an optimizer's per-parameter jobs in submission order.

    Jobs run under `torch.no_grad()` (grad mode is per thread). A job's exception is
    kept in its future and raised where the main thread waits for it.
    """

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def submit(self, fn: Callable[[], Any]) -> Future:
        def run() -> Any:
            with torch.no_grad():
                return fn()

        return self._pool.submit(run)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
