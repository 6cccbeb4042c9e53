"""Failing safely: the non-finite guard, collective timeouts, and clear collective errors.

Three things `mopc.parallelize` installs (DESIGN.md: nothing a user had is lost):

- A step guard (`nan_guard`, on by default): before every `optimizer.step()` over the
  model's parameters, each rank reports whether its last loss and its local gradient
  shards are finite; one all-gather of three numbers per rank tells every rank about every
  other. If any is not finite, every rank raises :class:`NonFiniteError` naming the step
  and the ranks, before the optimizer touches a parameter.
- Timeouts on the process groups mopc uses: `first_step_timeout_s` until the first
  optimizer step has finished (ranks compile at different speeds), `collective_timeout_s`
  after that.
- Collective errors turned into :class:`CollectiveError`: when a rank dies, gloo fails the
  peers' next collective at once ("connection reset"); when a rank takes another path and
  stops calling collectives, the peers' wait ends at the timeout. Either way the compiled
  step raises an error that says which rank, graph and step saw it and what to look at.
"""

from __future__ import annotations

import datetime
import functools
import logging
import math
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from mopc.plan.mesh import all_gather_flat

log = logging.getLogger("mopc.guard")


class NonFiniteError(RuntimeError):
    """A loss or gradient was NaN or infinite on some rank; the optimizer step did not run."""


class CollectiveError(RuntimeError):
    """A collective failed or timed out: another rank died or stopped calling collectives."""


class InputMismatchError(ValueError):
    """Ranks called a compiled step with different input shapes that the layout cannot take."""


_COMM_FAILURE = ("connection closed by peer", "connection reset by peer", "timed out", "timeout",
                 "broken pipe", "nccl", "gloo", "processgroup", "socket")


def _is_comm_failure(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, (RuntimeError, dist.DistBackendError)) and any(s in text for s in _COMM_FAILURE)


class _State:
    """Process-wide: the last loss the compiled steps returned, and the step the guard is at."""

    last_loss: torch.Tensor | None = None
    step = 0  # optimizer.step() calls over the guarded parameters so far (the last guard's)
    timeout_s: float | None = None
    first_step_done = False
    input_check_seconds = 0.0  # time spent in check_input_shapes after the first step (trainer's report)
    input_checks = 0


def record_loss(outputs: Any) -> None:
    """Remember a compiled step's loss (its first output when that is a floating scalar)."""
    first = outputs[0] if isinstance(outputs, (list, tuple)) and outputs else outputs
    if isinstance(first, torch.Tensor) and first.dim() == 0 and first.is_floating_point():
        _State.last_loss = first.detach()


def current_step() -> int:
    """What messages call "step": 1 + the optimizer.step() calls so far (refused ones included)."""
    return _State.step + 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def wrap_collective_errors(fn: Callable, *, graph_id: int, phase: str) -> Callable:
    """A boxed compiled graph whose communication failures raise :class:`CollectiveError`."""

    @functools.wraps(fn)
    def run(args: list) -> Any:
        start = time.perf_counter()
        try:
            return fn(args)
        except CollectiveError:
            raise
        except Exception as err:
            if not _is_comm_failure(err):
                raise
            raise CollectiveError(_collective_message(err, f"the {phase} of compiled graph {graph_id}",
                                                      time.perf_counter() - start)) from err

    run._boxed_call = True  # type: ignore[attr-defined]
    return run


def _collective_message(err: BaseException, where: str, elapsed: float) -> str:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    timeout = f"{_State.timeout_s:g} s" if _State.timeout_s is not None else "the process group's default"
    which = "collective_timeout_s" if _State.first_step_done else "first_step_timeout_s"
    return (
        f"mopc: a collective failed on rank {_rank()} in {where} at step {current_step()}, after "
        f"{elapsed:.1f} s: {first_line}\n"
        f"Another rank died or stopped calling the same collectives (different control flow, or input "
        f"shapes that differ between ranks). The wait limit is {timeout} ({which} of mopc.parallelize). "
        "Look in the other ranks' logs for the first error; if a rank is only slow (compiling, loading "
        f"data), raise {which}."
    )


# ------------------------------------------------------------------------ input shapes


def _input_name(placeholder: str) -> str:
    """`l_input_ids_` (Dynamo's placeholder name) -> `input_ids`."""
    name = placeholder[2:] if placeholder[:2] in ("L_", "l_", "G_", "g_") else placeholder
    return name.removesuffix("_")


def check_input_shapes(args: Sequence[Any], names: Sequence[str | None], graph_id: int) -> None:
    """Stop every rank, before the step's first collective, if their input shapes differ.

    `names` are the graph's placeholder names, None for module state (parameters and
    buffers, the same on every rank). One all-gather of an 8-byte digest of the data
    inputs' shapes; the shapes themselves are exchanged only when the digests differ.
    """
    import zlib

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    shapes = [(_input_name(n), tuple(a.shape)) for a, n in zip(args, names, strict=True)
              if n is not None and isinstance(a, torch.Tensor)]
    digest = zlib.crc32(repr(shapes).encode())
    from mopc.plan.mesh import rank_device

    mine = torch.tensor([digest], dtype=torch.int64, device=rank_device())
    world = dist.get_world_size()
    every = torch.empty(world, dtype=torch.int64, device=mine.device)
    start = time.perf_counter()
    try:
        all_gather_flat(every, mine)
    except Exception as err:
        if not _is_comm_failure(err):
            raise
        raise CollectiveError(_collective_message(err, f"the input check of compiled graph {graph_id}",
                                                  time.perf_counter() - start)) from err
    same = len(set(every.tolist())) == 1
    if _State.first_step_done:  # before it, the wait is mostly other ranks still compiling
        _State.input_check_seconds += time.perf_counter() - start
        _State.input_checks += 1
    if same:
        return
    per_rank: list[Any] = [None] * world
    dist.all_gather_object(per_rank, shapes)
    differ = [r for r in range(world) if per_rank[r] != per_rank[0]]
    listed = "; ".join(f"rank {r}: " + ", ".join(f"{n} {list(s)}" for n, s in per_rank[r])
                       for r in [0, *differ[:3]])
    raise InputMismatchError(
        f"mopc: step {current_step()}: the ranks called the compiled step with different input shapes ({listed}). "
        "The layout gathers tokens from every rank (tensor parallelism, vocabulary-parallel loss), so every "
        "rank must pass the same shapes: drop the last incomplete batch (DataLoader(drop_last=True)) or pad "
        "it. Nothing ran; the parameters are unchanged."
    )


# ------------------------------------------------------------------------ timeouts


def set_group_timeouts(group_names: Iterable[str], seconds: float) -> None:
    """Set the wait limit of the default group and of every group in `group_names`."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    from mopc.plan.mesh import is_fake_group, resolve_group

    timeout = datetime.timedelta(seconds=seconds)
    groups = {id(g): g for g in [dist.group.WORLD, *(resolve_group(n) for n in group_names)]}
    for group in groups.values():
        if group is None or is_fake_group(group):
            continue
        _set_pg_timeout(timeout, group)
    _State.timeout_s = seconds


# ------------------------------------------------------------------------ the step guard


class StepGuard:
    """The pre-step check over one model's parameters, and the timeout switch after step 1."""

    def __init__(self, params: Sequence[torch.nn.Parameter], group_names: Sequence[str], *, check: bool,
                 collective_timeout_s: float, first_step_timeout_s: float) -> None:
        self.params = [weakref.ref(p) for p in params]
        self.param_ids = {id(p) for p in params}
        self.group_names = tuple(group_names)
        self.check_finite = check
        self.collective_timeout_s = collective_timeout_s
        self.first_step_timeout_s = first_step_timeout_s
        self.attempts = 0  # optimizer.step() calls over these parameters, refused ones included
        self.step = 0  # optimizer steps finished over these parameters
        self.seconds = 0.0  # time spent checking after the first step, for the trainer's report
        self.checks = 0

    def covers(self, optimizer: torch.optim.Optimizer) -> bool:
        return any(id(p) in self.param_ids for group in optimizer.param_groups for p in group["params"])

    def local_flags(self) -> torch.Tensor:
        """[loss value, loss finite, local gradient shards finite] of this rank, as float64."""
        grads = []
        for ref in self.params:
            p = ref()
            if p is not None and p.grad is not None:
                g = p.grad
                grads.append(g.to_local() if hasattr(g, "to_local") else g)
        grads_ok = True
        if grads:
            norms = torch._foreach_norm(grads)  # one kernel per dtype/device group, no sync yet
            grads_ok = torch.stack([n.float() for n in norms]).isfinite().all()
        loss = _State.last_loss
        loss_value = loss.float() if loss is not None else torch.tensor(0.0)
        device = grads[0].device if grads else loss_value.device
        return torch.stack([
            torch.as_tensor(loss_value, dtype=torch.float64, device=device),
            torch.as_tensor(loss_value.isfinite(), dtype=torch.float64, device=device),
            torch.as_tensor(grads_ok, dtype=torch.float64, device=device),
        ])

    def before_step(self) -> None:
        self.attempts += 1
        _State.step = self.attempts - 1  # messages name this step
        if not self.check_finite:
            return
        start = time.perf_counter()
        flags = self.local_flags()
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world > 1:
            gathered = torch.empty(world * 3, dtype=flags.dtype, device=flags.device)
            try:
                all_gather_flat(gathered, flags)
            except Exception as err:
                if not _is_comm_failure(err):
                    raise
                raise CollectiveError(_collective_message(err, "the non-finite check before optimizer.step()",
                                                          time.perf_counter() - start)) from err
            rows = gathered.view(world, 3).tolist()
        else:
            rows = [flags.tolist()]
        if self.step:  # before the first step the wait is mostly other ranks still compiling
            self.seconds += time.perf_counter() - start
            self.checks += 1
        bad_loss = [r for r, row in enumerate(rows) if row[1] == 0.0]
        bad_grad = [r for r, row in enumerate(rows) if row[2] == 0.0]
        if bad_loss or bad_grad:
            raise NonFiniteError(_non_finite_message(rows, bad_loss, bad_grad))

    def after_step(self) -> None:
        self.step += 1
        _State.step = self.attempts
        _State.first_step_done = True
        _State.last_loss = None
        if self.step == 1 and self.first_step_timeout_s != self.collective_timeout_s and dist.is_initialized():
            set_group_timeouts(self.group_names, self.collective_timeout_s)
            log.info("mopc: first step done; collectives now time out after %g s", self.collective_timeout_s)


def _non_finite_message(rows: list[list[float]], bad_loss: list[int], bad_grad: list[int]) -> str:
    parts = []
    if bad_loss:
        values = ", ".join(f"rank {r}: {_fmt(rows[r][0])}" for r in bad_loss)
        parts.append(f"the loss is not finite on rank{'s' if len(bad_loss) > 1 else ''} {_ranks(bad_loss)} ({values})")
    if bad_grad:
        parts.append(f"the gradient norm is not finite on rank{'s' if len(bad_grad) > 1 else ''} {_ranks(bad_grad)}")
    return (
        f"mopc: step {current_step()}: {'; '.join(parts)}. The optimizer step was skipped on every rank; "
        "the parameters and optimizer state are unchanged. Look for the cause (learning rate, a bad batch, "
        "overflow in low precision), then zero the gradients and go on, or reload the last checkpoint. "
        "nan_guard=False in mopc.parallelize turns this check off."
    )


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else f"{value:g}"


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks))


_GUARDS: list[weakref.ref[StepGuard]] = []
_HOOKS: list[Any] = []


def _guards_for(optimizer: torch.optim.Optimizer) -> list[StepGuard]:
    alive = [g for g in (ref() for ref in _GUARDS) if g is not None]
    return [g for g in alive if g.covers(optimizer)]


def _pre_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for guard in _guards_for(optimizer):
        guard.before_step()


def _post_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for guard in _guards_for(optimizer):
        guard.after_step()


def install_step_guard(model: torch.nn.Module, group_names: Sequence[str], *, check: bool,
                       collective_timeout_s: float, first_step_timeout_s: float) -> StepGuard:
    """Attach a :class:`StepGuard` to `model` (as `model._mopc_guard`) and set the first-step timeout."""
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    guard = StepGuard(list(model.parameters()), group_names, check=check,
                      collective_timeout_s=collective_timeout_s, first_step_timeout_s=first_step_timeout_s)
    model._mopc_guard = guard  # type: ignore[assignment]  # the model keeps it alive
    _GUARDS[:] = [ref for ref in _GUARDS if ref() is not None]
    _GUARDS.append(weakref.ref(guard))
    if not _HOOKS:  # one global pair of hooks serves every guarded model
        _HOOKS.append(register_optimizer_step_pre_hook(_pre_step))
        _HOOKS.append(register_optimizer_step_post_hook(_post_step))
    reset_guard_state()  # a new run: step 1, first-step timeout
    if dist.is_initialized():
        set_group_timeouts(group_names, first_step_timeout_s)
    return guard


def input_check_seconds() -> float | None:
    """Mean seconds per input-shape check after the first optimizer step (None if none ran)."""
    return _State.input_check_seconds / _State.input_checks if _State.input_checks else None


def reset_guard_state() -> None:
    """Forget the step count, the last loss and the timings (a new training run)."""
    _State.last_loss = None
    _State.step = 0
    _State.first_step_done = False
    _State.timeout_s = None
    _State.input_check_seconds = 0.0
    _State.input_checks = 0
