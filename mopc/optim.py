"""`HostAdamW`: AdamW whose state lives in host memory, updated per parameter shard.

    optimizer = mopc.optim.HostAdamW(model.parameters(), lr=3e-4)
    model = torch.compile(model, backend="mop", options={"optimizer_offload": True})

What lives where, per parameter shard: on the device only the parameter and its gradient;
on host the AdamW moments, the step count and an fp32 master copy of the parameter. The
update runs on host (`torch.optim.adam.adam`, the single-tensor AdamW that
`torch.optim.AdamW` runs on CPU, so the result is the same as `torch.optim.AdamW`'s) and
writes the new value back into the device shard.

When is each update computed? With `optimizer_offload` the compiled backward hands each
gradient shard to this optimizer as soon as it is reduced (`mopc::grad_ready`), and a
worker thread computes that parameter's update into staging buffers while backward goes
on. `step()` then only checks that every staged update is still the right one and
commits it; the next forward waits, per parameter, for that parameter's commit
(`mopc::await_update`) instead of for the whole step. The result is always exact:

- a staged update is used only if its gradient is what `p.grad` holds at `step()` (same
  tensor, not modified in place since backward: `clip_grad_norm_`, a second backward that
  accumulated, a hook that scaled it all make it recompute from `p.grad`), and only if
  the group's hyperparameters did not change in between;
- a refused `step()` (the step guard's non-finite check) leaves state and parameters as
  they were: staged updates are dropped, never committed.

Without the option every update runs in `step()` (still on host, still per shard).
Reading parameters outside the compiled model between `step()` and the next forward
waits for the pending updates when it goes through mopc (`mopc::unshard`,
`mopc.runtime.ownership.full_parameters`, `mopc.checkpoint`); other readers call
`optimizer.synchronize()` first.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.adam import adam as _adam

from mopc.runtime import host_optim
from mopc.runtime.memory import local_tensor
from mopc.runtime.offload import HOST_TIER_ATTR

__all__ = ["HostAdamW"]

log = logging.getLogger("mopc.optim")

_HYPER = ("lr", "betas", "eps", "weight_decay")


def _hyper(group: dict[str, Any]) -> tuple:
    return tuple(group[k] for k in _HYPER)


def _host_empty_like(t: torch.Tensor, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=dtype, device="cpu", pin_memory=pin)
    setattr(out, HOST_TIER_ATTR, True)
    return out


def _to_host(t: torch.Tensor, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A host-tier copy of `t` (never a view of it)."""
    out = _host_empty_like(t, dtype, pin)
    out.copy_(t.detach())
    return out


@dataclass
class _Staged:
    """One parameter's update computed ahead of `step()`."""

    hyper: tuple
    future: Future
    seen: tuple[int, int] | None = None
    """(id, version) of the local gradient `p.grad` held when autograd accumulated it."""
    hooks: int = 0


@dataclass
class _Pending:
    commit: Future
    """Its result: None, or on CUDA the event after the copy back into the device shard."""


@dataclass
class _Stats:
    staged_in_backward: int = 0
    used_staged: int = 0
    recomputed: int = 0


class HostAdamW(torch.optim.Optimizer):
    """AdamW with host-resident state and per-shard updates (module docstring).

    Arguments are `torch.optim.AdamW`'s (`amsgrad`, `maximize`, `foreach`, `fused` and
    `capturable` are not offered). `state_dict()` has `torch.optim.AdamW`'s layout (`step`,
    `exp_avg`, `exp_avg_sq` per parameter, plus `master` for parameters that are not fp32).
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"HostAdamW: lr={lr!r} must be >= 0")
        if not 0.0 <= eps:
            raise ValueError(f"HostAdamW: eps={eps!r} must be >= 0")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"HostAdamW: betas[{i}]={beta!r} must be in [0, 1)")
        if not 0.0 <= weight_decay:
            raise ValueError(f"HostAdamW: weight_decay={weight_decay!r} must be >= 0")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self._worker = host_optim.UpdateWorker("mopc-host-adamw")
        self._staged: dict[int, _Staged] = {}
        self._pending: dict[int, _Pending] = {}
        self._master: dict[int, torch.Tensor] = {}  # fp32 parameters' master copies (not in state)
        self._master_version: dict[int, int] = {}
        self._stats = _Stats()
        self._hooks = []
        self._group_by_id: dict[int, dict[str, Any]] = {}  # id(param) -> its group (hot: every gradient)
        for group in self.param_groups:
            for p in group["params"]:
                self._adopt(p, group)

    # ------------------------------------------------------------------ setup

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_hooks"):  # after __init__: a group added later
            for p in self.param_groups[-1]["params"]:
                self._adopt(p, self.param_groups[-1])

    def _adopt(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        self._group_by_id[id(p)] = group
        host_optim.set_owner(p, self)
        if p.requires_grad:  # weakly: a parameter must not keep an optimizer it outlives alive
            method = weakref.WeakMethod(self._on_accumulated)

            def hook(param: torch.Tensor) -> None:
                fn = method()
                if fn is not None:
                    fn(param)

            self._hooks.append(p.register_post_accumulate_grad_hook(hook))

    def _group_of(self, p: torch.Tensor) -> dict[str, Any] | None:
        return self._group_by_id.get(id(p))

    @staticmethod
    def _pin(p: torch.Tensor) -> bool:
        return local_tensor(p).is_cuda

    def _ensure_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """This parameter's host state, created or brought to host (after a load) as needed."""
        state = self.state[p]
        local = local_tensor(p)
        pin = self._pin(p)
        step = state.get("step", 0.0)
        if not (isinstance(step, torch.Tensor) and getattr(step, HOST_TIER_ATTR, False)):
            state["step"] = torch.tensor(float(step), dtype=torch.float32)
            setattr(state["step"], HOST_TIER_ATTR, True)
        names = ["exp_avg", "exp_avg_sq"] + (["master"] if local.dtype != torch.float32 else [])
        for name in names:
            value = state.get(name)
            if value is None:
                state[name] = (_to_host(local, torch.float32, pin) if name == "master"
                               else _host_empty_like(local, torch.float32, pin).zero_())
                continue
            value = local_tensor(value)
            if not getattr(value, HOST_TIER_ATTR, False) or value.dtype != torch.float32:
                value = _to_host(value, torch.float32, pin)
            state[name] = value
        if local.dtype == torch.float32 and self._master_version.get(id(p)) != local._version:
            self._master[id(p)] = _to_host(local, torch.float32, pin)  # new, or the shard was written by others
            self._master_version[id(p)] = local._version
        return state

    def _master_of(self, p: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return state["master"] if "master" in state else self._master[id(p)]

    # ------------------------------------------------------------------ the update (worker thread)

    def _submit_update(self, p: torch.Tensor, grad: torch.Tensor, hyper: tuple) -> Future:
        state = self._ensure_state(p)
        master = self._master_of(p, state)
        event = None
        if grad.is_cuda:  # copy to pinned host memory on a side stream, after the gradient exists
            from mopc.runtime.offload import _side_stream

            side = _side_stream(grad.device)
            side.wait_stream(torch.cuda.current_stream(grad.device))
            host_grad = _host_empty_like(grad, grad.dtype, True)
            with torch.cuda.stream(side):
                host_grad.copy_(grad, non_blocking=True)
                event = torch.cuda.Event()
                event.record(side)
            grad.record_stream(side)
            grad = host_grad
        lr, (beta1, beta2), eps, weight_decay = hyper

        def compute() -> tuple[torch.Tensor, ...]:
            if event is not None:
                event.synchronize()
            g = grad if grad.dtype == torch.float32 else grad.float()
            step, exp_avg, exp_avg_sq = (state["step"].clone(), state["exp_avg"].clone(),
                                         state["exp_avg_sq"].clone())
            new_master = master.clone()
            for t in (step, exp_avg, exp_avg_sq, new_master):
                setattr(t, HOST_TIER_ATTR, True)
            _adam([new_master], [g], [exp_avg], [exp_avg_sq], [], [step], foreach=False, capturable=False,
                  differentiable=False, fused=None, grad_scale=None, found_inf=None, has_complex=False,
                  decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=lr,
                  weight_decay=weight_decay, eps=eps, maximize=False)
            return step, exp_avg, exp_avg_sq, new_master

        return self._worker.submit(compute)

    def _commit(self, p: torch.Tensor, update: Future, after: Any = None) -> Callable[[], Any]:
        """The job that installs `update` in the state and the parameter. On CUDA the copy
        into the shard waits for `after`, an event recorded at `step()` on the compute
        stream, so it cannot overwrite a value that backward's kernels still read."""

        def run() -> Any:
            step, exp_avg, exp_avg_sq, master = update.result()
            state = self.state[p]
            state["step"], state["exp_avg"], state["exp_avg_sq"] = step, exp_avg, exp_avg_sq
            local = local_tensor(p)
            if "master" in state:
                state["master"] = master
            else:
                self._master[id(p)] = master
            event = None
            if local.is_cuda:
                from mopc.runtime.offload import _side_stream

                side = _side_stream(local.device)
                if after is not None:
                    side.wait_event(after)
                with torch.cuda.stream(side):
                    local.copy_(master, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(side)
            else:
                local.copy_(master)
            if "master" not in state:
                self._master_version[id(p)] = local._version
            return event

        return run

    # ------------------------------------------------------------------ hand-off from backward

    def on_grad_ready(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        """`mopc::grad_ready`: `grad` is this backward's reduced gradient shard of `param`."""
        self._staged.pop(id(param), None)
        group = self._group_of(param)
        if group is None or param.grad is not None:  # accumulating into an existing p.grad: step() will do it
            return
        self.wait_for(param)  # last step's commit of this parameter (normally long done)
        hyper = _hyper(group)
        self._staged[id(param)] = _Staged(hyper=hyper, future=self._submit_update(param, grad, hyper))
        self._stats.staged_in_backward += 1

    def _on_accumulated(self, param: torch.Tensor) -> None:
        staged = self._staged.get(id(param))
        if staged is None:
            return
        staged.hooks += 1
        g = local_tensor(param.grad) if param.grad is not None else None
        staged.seen = (id(g), g._version) if g is not None else None

    def _staged_is_valid(self, p: torch.Tensor, staged: _Staged, group: dict[str, Any]) -> bool:
        if staged.hooks != 1 or staged.seen is None or p.grad is None or _hyper(group) != staged.hyper:
            return False
        g = local_tensor(p.grad)
        return (id(g), g._version) == staged.seen

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        updates: list[tuple[torch.Tensor, Future]] = []
        for group in self.param_groups:
            for p in group["params"]:
                staged = self._staged.pop(id(p), None)
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("HostAdamW does not support sparse gradients")
                if staged is not None and self._staged_is_valid(p, staged, group):
                    self._stats.used_staged += 1
                    updates.append((p, staged.future))
                    continue
                if staged is not None:
                    self._stats.recomputed += 1
                self.wait_for(p)
                updates.append((p, self._submit_update(p, local_tensor(p.grad), _hyper(group))))
        after = None
        if any(local_tensor(p).is_cuda for p, _ in updates):
            after = torch.cuda.Event()
            after.record()
        for p, update in updates:
            self._pending[id(p)] = _Pending(commit=self._worker.submit(self._commit(p, update, after)))
        if not all(host_optim.is_fenced(p) for p, _ in updates):
            self.synchronize()  # some reader of these parameters would not wait: finish now
        return loss

    # ------------------------------------------------------------------ waiting

    def wait_for(self, param: torch.Tensor) -> None:
        """Block until `param`'s committed update is in its shard (`mopc::await_update`)."""
        pending = self._pending.pop(id(param), None)
        if pending is None:
            return
        event = pending.commit.result()
        if event is not None:
            torch.cuda.current_stream(local_tensor(param).device).wait_event(event)

    def synchronize(self) -> None:
        """Block until every update `step()` started is in its parameter."""
        for group in self.param_groups:
            for p in group["params"]:
                self.wait_for(p)

    def state_dict(self) -> dict[str, Any]:
        self.synchronize()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.synchronize()
        self._staged.clear()
        super().load_state_dict(state_dict)  # tensors land on the parameters' device; moved to host on use
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.state:
                    self._ensure_state(p)

    # ------------------------------------------------------------------ accounting

    def host_tensors(self) -> list[torch.Tensor]:
        """Host-tier tensors this optimizer holds besides `state` (fp32 master copies)."""
        return list(self._master.values())

    def overlap_stats(self) -> dict[str, int]:
        """How many updates were staged in backward, used as staged, or recomputed in step()."""
        return {"staged_in_backward": self._stats.staged_in_backward, "used_staged": self._stats.used_staged,
                "recomputed": self._stats.recomputed}

    def __del__(self) -> None:
        for handle in getattr(self, "_hooks", ()):
            handle.remove()
        worker = getattr(self, "_worker", None)
        if worker is not None:
            worker.shutdown()
