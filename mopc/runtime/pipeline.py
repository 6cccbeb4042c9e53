"""Pipeline-parallel schedule runtime: forward/backward actions over micro-batches.

The compiler side cuts the model into stages and hands this module one `Stage` per stage
that lives on this pipeline rank (stage s lives on rank s % pp). This module decides the
order of the actions (`make_schedule`), checks an order is complete and deadlock-free
(`check_schedule`), and runs it (`run_pipeline`) with point-to-point sends between ranks.

Contract with the compiler side:
- Each stage's `run(microbatch, inputs)` returns exactly the tensors its `outputs`
  metadata describes (shape and dtype are checked); the last stage returns `(loss,)`, a
  scalar. Outputs are sent as `t.detach().contiguous()` (a copy only if not contiguous).
- Received tensors are fresh leaves: the ones whose `TensorMeta.requires_grad` is True get
  `requires_grad_(True)`, and their `.grad` is sent back in the backward. Autograd never
  crosses a stage boundary, also between two stages on the same rank.
- The loss is scaled by `loss_scale` (default 1/microbatches) before backward, so the
  gradients of equal-sized micro-batches add up to the whole batch's mean-loss gradient.
  Gradients accumulate into `.grad` (zero them between steps).
- `PipelineResult.losses` (unscaled, detached) are filled on the rank holding the last
  stage (rank pp-1) only; `mean_loss` broadcasts their mean to every pipeline rank.

Messages: one tag per (direction, stage boundary, micro-batch, tensor), so a receive can
never match another message. Sends are `isend`s whose handles are dropped once complete
and all waited for at the end of `run_pipeline`; receives block and are timed as `wait`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("mopc")

__all__ = ["SCHEDULES", "Action", "ActionTiming", "PipelineResult", "Stage", "TensorMeta", "check_schedule",
           "make_schedule", "mean_loss", "run_pipeline", "schedule_in_flight", "stage_rank"]

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")

# Tags are c10d ints (gloo builds a 64-bit slot from them); keep them below 2**31.
_MAX_TENSORS_PER_BOUNDARY = 64
_MAX_TAG = 2**31 - 1


@dataclass(frozen=True)
class TensorMeta:
    """One tensor crossing a stage boundary (per micro-batch)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool
    """True: the receiver sets requires_grad and sends its gradient back."""


@dataclass(frozen=True)
class Action:
    kind: str
    """"F" (forward) or "B" (backward)."""
    stage: int
    """Global stage index, 0..num_stages-1."""
    microbatch: int

    def __str__(self) -> str:
        return f"{self.kind}(stage={self.stage}, mb={self.microbatch})"


@dataclass
class Stage:
    index: int
    """Global stage index."""
    run: Callable[[int, tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]
    """run(microbatch, inputs from the previous stage) -> outputs for the next stage. Stage 0 gets
    inputs=(); the last stage returns (loss,), a scalar whose graph reaches the parameters."""
    inputs: tuple[TensorMeta, ...]
    """What this stage receives (() for stage 0)."""
    outputs: tuple[TensorMeta, ...]
    """What it sends (() for the last stage)."""


@dataclass
class ActionTiming:
    action: Action
    start: float
    """time.perf_counter() seconds."""
    end: float
    wait: float
    """Seconds blocked receiving."""


@dataclass
class PipelineResult:
    losses: list[torch.Tensor]
    """The last stage's per-micro-batch losses (detached, unscaled), empty on other ranks."""
    timeline: list[ActionTiming]
    max_in_flight: dict[int, int]
    """Per local stage: the most micro-batches whose F ran and whose B had not."""
    bytes_sent: tuple[int, int] = (0, 0)
    """Bytes this rank sent to other pipeline ranks: (activations, gradients)."""
    messages_sent: int = 0
    """Point-to-point sends to other pipeline ranks."""

    def bubble_fraction(self) -> float:
        """1 - (time computing) / (first start to last end); waiting to receive is bubble."""
        if not self.timeline:
            return 0.0
        span = max(t.end for t in self.timeline) - min(t.start for t in self.timeline)
        if span <= 0:
            return 0.0
        busy = sum(t.end - t.start - t.wait for t in self.timeline)
        return min(1.0, max(0.0, 1.0 - busy / span))


def stage_rank(stage: int, pp: int) -> int:
    """The pipeline rank holding `stage`: stages are dealt round-robin (Megatron's layout)."""
    return stage % pp


# --------------------------------------------------------------------------- schedules


def _validate_schedule_args(schedule: str, pp: int, microbatches: int, virtual: int) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is unknown; pass one of {', '.join(map(repr, SCHEDULES))}")
    if pp < 1:
        raise ValueError(f"pp={pp} must be >= 1")
    if microbatches < 1:
        raise ValueError(f"microbatches={microbatches} must be >= 1")
    if schedule == "interleaved_1f1b":
        if virtual < 2:
            raise ValueError(f"virtual={virtual}: interleaved_1f1b needs virtual >= 2 stages per rank; "
                             "pass virtual>=2 or schedule='1f1b'")
        if microbatches % pp:
            raise ValueError(f"microbatches={microbatches} is not a multiple of pp={pp}: interleaved_1f1b "
                             f"runs micro-batches in groups of pp; pass microbatches={-(-microbatches // pp) * pp}")
        return
    if virtual != 1:
        raise ValueError(f"virtual={virtual}: schedule={schedule!r} runs one stage per rank; pass virtual=1 "
                         "or schedule='interleaved_1f1b'")
    if schedule == "1f1b" and microbatches < pp:
        raise ValueError(f"microbatches={microbatches} < pp={pp}: 1F1B needs at least pp micro-batches; "
                         f"pass microbatches>={pp} or schedule='gpipe'")


def _gpipe(pp: int, rank: int, microbatches: int) -> list[Action]:
    return ([Action("F", rank, m) for m in range(microbatches)]
            + [Action("B", rank, m) for m in range(microbatches)])


def _one_f_one_b(pp: int, rank: int, microbatches: int) -> list[Action]:
    num_warmup = min(pp - rank - 1, microbatches)
    num_steady = microbatches - num_warmup
    order = [Action("F", rank, m) for m in range(num_warmup)]
    for i in range(num_steady):
        order += [Action("F", rank, num_warmup + i), Action("B", rank, i)]
    order += [Action("B", rank, m) for m in range(num_steady, microbatches)]
    return order


def _interleaved(pp: int, rank: int, microbatches: int, virtual: int) -> list[Action]:
    """Megatron-LM's forward_backward_pipelining_with_interleaving, one rank's order.

    Virtual micro-batch k runs model chunk (k mod pp*virtual) // pp (reversed for the
    backward) on micro-batch (k // (pp*virtual)) * pp + k mod pp; chunk c on rank r is
    stage c*pp + r. With microbatches == pp every forward is warm-up.
    """
    total = microbatches * virtual
    if microbatches == pp:
        num_warmup = total
    else:
        num_warmup = min((pp - rank - 1) * 2 + (virtual - 1) * pp, total)

    def action(kind: str, k: int) -> Action:
        chunk = (k % (pp * virtual)) // pp
        if kind == "B":
            chunk = virtual - chunk - 1
        return Action(kind, chunk * pp + rank, (k // (pp * virtual)) * pp + k % pp)

    order = [action("F", k) for k in range(num_warmup)]
    for k in range(total - num_warmup):
        order += [action("F", num_warmup + k), action("B", k)]
    order += [action("B", k) for k in range(total - num_warmup, total)]
    return order


def make_schedule(schedule: str, pp: int, microbatches: int, virtual: int = 1) -> list[list[Action]]:
    """Per pipeline rank, the ordered actions.

    `schedule` is one of "gpipe" (all F then all B: every micro-batch in flight), "1f1b"
    (rank r runs min(pp-r-1, m) warm-up forwards, then one F one B, then the cooldown Bs: at
    most pp-r in flight) and "interleaved_1f1b" (Megatron's interleaved 1F1B over `virtual`
    stages per rank: rank r holds stages r, r+pp, ...). num_stages = pp * virtual.
    """
    _validate_schedule_args(schedule, pp, microbatches, virtual)
    if schedule == "gpipe":
        return [_gpipe(pp, r, microbatches) for r in range(pp)]
    if schedule == "1f1b":
        return [_one_f_one_b(pp, r, microbatches) for r in range(pp)]
    return [_interleaved(pp, r, microbatches, virtual) for r in range(pp)]


def _dependencies(action: Action, num_stages: int) -> list[Action]:
    """F(s,m) needs F(s-1,m); B(s,m) needs F(s,m) and B(s+1,m)."""
    s, m = action.stage, action.microbatch
    if action.kind == "F":
        return [Action("F", s - 1, m)] if s > 0 else []
    deps = [Action("F", s, m)]
    if s < num_stages - 1:
        deps.append(Action("B", s + 1, m))
    return deps


def check_schedule(actions: list[list[Action]], num_stages: int, microbatches: int) -> None:
    """Raise ValueError (naming the rank and action) unless the per-rank orders are runnable.

    Algorithm:
    1. every action is F or B of a stage in range on the rank holding it (rank = stage % pp,
       pp = len(actions)) and of a micro-batch in range;
    2. every F(s,m) and B(s,m) appears exactly once, and B(s,m) after F(s,m);
    3. simulate: each rank runs its next action once its dependencies are done (sends never
       block, receives do); when no rank can move and some have actions left, the orders
       deadlock: name each blocked rank, its action and what it waits for.
    """
    pp = len(actions)
    if pp < 1:
        raise ValueError("actions is empty: pass one list of actions per pipeline rank")
    if num_stages % pp:
        raise ValueError(f"num_stages={num_stages} is not a multiple of pp={pp} (len(actions))")
    seen: dict[Action, int] = {}
    for rank, order in enumerate(actions):
        for pos, a in enumerate(order):
            if a.kind not in ("F", "B"):
                raise ValueError(f"rank {rank}: action {pos} {a!r} has kind {a.kind!r}; use 'F' or 'B'")
            if not 0 <= a.stage < num_stages or not 0 <= a.microbatch < microbatches:
                raise ValueError(f"rank {rank}: action {a} is out of range "
                                 f"(num_stages={num_stages}, microbatches={microbatches})")
            if stage_rank(a.stage, pp) != rank:
                raise ValueError(f"rank {rank}: action {a} belongs on rank {stage_rank(a.stage, pp)} "
                                 f"(stage s lives on rank s % pp)")
            if a in seen:
                raise ValueError(f"rank {rank}: action {a} is duplicated (positions {seen[a]} and {pos})")
            if a.kind == "B" and Action("F", a.stage, a.microbatch) not in seen:
                raise ValueError(f"rank {rank}: action {a} precedes its forward F(stage={a.stage}, "
                                 f"mb={a.microbatch})")
            seen[a] = pos
    for s in range(num_stages):
        for m in range(microbatches):
            for kind in ("F", "B"):
                if Action(kind, s, m) not in seen:
                    raise ValueError(f"rank {stage_rank(s, pp)}: action {Action(kind, s, m)} is missing")

    done: set[Action] = set()
    cursor = [0] * pp
    progressed = True
    while progressed:
        progressed = False
        for rank, order in enumerate(actions):
            while cursor[rank] < len(order) and all(d in done for d in _dependencies(order[cursor[rank]], num_stages)):
                done.add(order[cursor[rank]])
                cursor[rank] += 1
                progressed = True
    blocked = [(rank, actions[rank][cursor[rank]]) for rank in range(pp) if cursor[rank] < len(actions[rank])]
    if blocked:
        lines = [f"rank {rank} blocks at action {cursor[rank]} {a}, waiting for "
                 + ", ".join(f"{d} on rank {stage_rank(d.stage, pp)}"
                             for d in _dependencies(a, num_stages) if d not in done)
                 for rank, a in blocked]
        raise ValueError("the schedule deadlocks: " + "; ".join(lines))


def schedule_in_flight(order: list[Action]) -> dict[int, int]:
    """Per stage in one rank's order, the most micro-batches whose F ran and whose B has not."""
    live: dict[int, int] = {}
    peak: dict[int, int] = {}
    for a in order:
        live[a.stage] = live.get(a.stage, 0) + (1 if a.kind == "F" else -1)
        peak[a.stage] = max(peak.get(a.stage, 0), live[a.stage])
    return peak


# --------------------------------------------------------------------------- runtime


def _tag(direction: int, boundary: int, microbatch: int, tensor: int, num_stages: int) -> int:
    """direction 0: activations over boundary s -> s+1; 1: gradients back over it."""
    tag = ((microbatch * num_stages + boundary) * _MAX_TENSORS_PER_BOUNDARY + tensor) * 2 + direction
    if tag > _MAX_TAG:
        raise ValueError(f"microbatches x num_stages too large for unique message tags "
                         f"(microbatch {microbatch}, {num_stages} stages)")
    return tag


class _Channel:
    """Point-to-point messages between stages: isend/irecv across ranks, a mailbox within one."""

    def __init__(self, pp: int, pp_rank: int, group: dist.ProcessGroup | None, num_stages: int,
                 device: torch.device) -> None:
        self.pp, self.pp_rank, self.num_stages, self.device = pp, pp_rank, num_stages, device
        self.group = group
        self.pending: list[tuple[dist.Work, torch.Tensor]] = []
        self.mailbox: dict[tuple[int, int, int, int], torch.Tensor] = {}
        self.bytes_sent = [0, 0]  # to other ranks: activations, gradients
        self.messages_sent = 0

    def _global(self, stage: int) -> int:
        rank = stage_rank(stage, self.pp)
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def send(self, tensor: torch.Tensor, *, to_stage: int, direction: int, boundary: int, microbatch: int,
             index: int) -> None:
        key = (direction, boundary, microbatch, index)
        data = tensor.detach()
        if stage_rank(to_stage, self.pp) == self.pp_rank:
            self.mailbox[key] = data
            return
        data = data.contiguous()
        tag = _tag(*key, self.num_stages)
        work = dist.isend(data, dst=self._global(to_stage), group=self.group, tag=tag)
        self.pending.append((work, data))  # the buffer must outlive the send
        self.bytes_sent[direction] += data.numel() * data.element_size()
        self.messages_sent += 1

    def recv(self, meta: TensorMeta, *, from_stage: int, direction: int, boundary: int, microbatch: int,
             index: int) -> tuple[torch.Tensor, float]:
        """The tensor and the seconds spent blocked on it."""
        key = (direction, boundary, microbatch, index)
        if stage_rank(from_stage, self.pp) == self.pp_rank:
            if key not in self.mailbox:
                raise RuntimeError(f"mopc pipeline: stage {from_stage}'s message {key} was never produced on "
                                   f"this rank; the schedule runs a consumer before its producer")
            return self.mailbox.pop(key), 0.0
        buf = torch.empty(meta.shape, dtype=meta.dtype, device=self.device)
        t0 = time.perf_counter()
        dist.irecv(buf, src=self._global(from_stage), group=self.group,
                   tag=_tag(*key, self.num_stages)).wait()
        return buf, time.perf_counter() - t0

    def reap(self) -> None:
        """Drop the handles (and buffers) of completed sends."""
        self.pending = [(w, t) for w, t in self.pending if not w.is_completed()]

    def drain(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()


def _check_tensors(tensors: tuple[torch.Tensor, ...], metas: tuple[TensorMeta, ...], what: str) -> None:
    if len(tensors) != len(metas):
        raise ValueError(f"{what}: returned {len(tensors)} tensors, its metadata describes {len(metas)}")
    for i, (t, meta) in enumerate(zip(tensors, metas, strict=True)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: output {i} is {type(t).__name__}, not a tensor")
        if tuple(t.shape) != tuple(meta.shape) or t.dtype != meta.dtype:
            raise ValueError(f"{what}: output {i} is {tuple(t.shape)} {t.dtype}, its metadata says "
                             f"{tuple(meta.shape)} {meta.dtype}")


def _default_device(group: dist.ProcessGroup | None, pp: int) -> torch.device:
    if pp > 1 and dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _validate_run(stages: list[Stage], pp: int, pp_rank: int, group: dist.ProcessGroup | None,
                  num_stages: int, schedule: str) -> None:
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pp_rank={pp_rank} is out of range for pp={pp}")
    mine = sorted(s.index for s in stages)
    expected = [s for s in range(num_stages) if stage_rank(s, pp) == pp_rank]
    if mine != expected:
        raise ValueError(f"stages: rank {pp_rank} got stages {mine}, {schedule!r} with {num_stages} stages over "
                         f"pp={pp} puts {expected} here (stage s lives on rank s % pp)")
    for st in stages:
        if st.index == 0 and st.inputs:
            raise ValueError("stage 0: inputs must be () (it reads its own data)")
        if st.index == num_stages - 1 and st.outputs:
            raise ValueError(f"stage {st.index} (the last): outputs must be () (it returns (loss,))")
        if len(st.inputs) > _MAX_TENSORS_PER_BOUNDARY or len(st.outputs) > _MAX_TENSORS_PER_BOUNDARY:
            raise ValueError(f"stage {st.index}: at most {_MAX_TENSORS_PER_BOUNDARY} tensors per boundary")
        for side, metas in (("inputs", st.inputs), ("outputs", st.outputs)):
            for i, meta in enumerate(metas):
                if meta.requires_grad and not (meta.dtype.is_floating_point or meta.dtype.is_complex):
                    raise ValueError(f"stage {st.index}.{side}[{i}]: requires_grad=True with dtype {meta.dtype}; "
                                     "only floating tensors carry gradients: pass requires_grad=False")
    by_index = {st.index: st for st in stages}
    for st in stages:  # a boundary inside this rank: both sides' metadata are here
        nxt = by_index.get(st.index + 1)
        if nxt is not None and nxt.inputs != st.outputs:
            raise ValueError(f"stage {st.index}.outputs {st.outputs} differ from stage {nxt.index}.inputs "
                             f"{nxt.inputs}")
    if pp > 1:
        if not dist.is_initialized():
            raise ValueError(f"pp={pp} needs an initialized process group (dist.init_process_group)")
        if dist.get_world_size(group) != pp:
            raise ValueError(f"group: has {dist.get_world_size(group)} ranks, pp={pp}; pass the group of "
                             "the pipeline ranks in pipeline-rank order")
        if dist.get_rank(group) != pp_rank:
            raise ValueError(f"pp_rank={pp_rank} but this process is rank {dist.get_rank(group)} of group")


def run_pipeline(stages: list[Stage], *, pp: int, pp_rank: int, group: dist.ProcessGroup | None,
                 microbatches: int, schedule: str, virtual: int = 1, loss_scale: float | None = None,
                 device: torch.device | None = None) -> PipelineResult:
    """Run one training step's forwards and backwards of this rank's `stages`.

    Algorithm:
    1. build every rank's order with `make_schedule` and `check_schedule` it;
    2. for each of this rank's actions:
       F(s,m): receive s's inputs (fresh leaves, requires_grad per metadata), call run(m, inputs),
       keep (inputs, outputs), isend the outputs to stage s+1;
       B(s,m): backward from loss * loss_scale (last stage) or from the outputs with the received
       gradients, isend the inputs' .grad (zeros if None) to stage s-1, drop what F kept;
    3. wait for the outstanding sends.
    Gradients accumulate into the parameters' .grad.
    """
    num_stages = pp * virtual
    _validate_schedule_args(schedule, pp, microbatches, virtual)
    _validate_run(stages, pp, pp_rank, group, num_stages, schedule)
    orders = make_schedule(schedule, pp, microbatches, virtual)
    check_schedule(orders, num_stages, microbatches)
    scale = 1.0 / microbatches if loss_scale is None else loss_scale
    channel = _Channel(pp, pp_rank, group, num_stages, device or _default_device(group, pp))
    by_index = {st.index: st for st in stages}
    last = num_stages - 1

    saved: dict[tuple[int, int], tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = {}
    losses: dict[int, torch.Tensor] = {}
    timeline: list[ActionTiming] = []
    live = dict.fromkeys(by_index, 0)
    peak = dict.fromkeys(by_index, 0)

    def forward(st: Stage, m: int) -> float:
        waited, inputs = 0.0, []
        for i, meta in enumerate(st.inputs):
            t, w = channel.recv(meta, from_stage=st.index - 1, direction=0, boundary=st.index - 1, microbatch=m,
                                index=i)
            waited += w
            inputs.append(t.requires_grad_(True) if meta.requires_grad else t)
        outputs = tuple(st.run(m, tuple(inputs)))
        if st.index == last:
            if len(outputs) != 1 or outputs[0].numel() != 1:
                raise ValueError(f"stage {st.index} (the last): run() must return (loss,) with a scalar loss, "
                                 f"got {[tuple(t.shape) for t in outputs]}")
            losses[m] = outputs[0].detach().reshape(())
        else:
            _check_tensors(outputs, st.outputs, f"stage {st.index} micro-batch {m}")
            for i, t in enumerate(outputs):
                channel.send(t, to_stage=st.index + 1, direction=0, boundary=st.index, microbatch=m, index=i)
        saved[(st.index, m)] = (tuple(inputs), outputs)
        return waited

    def backward(st: Stage, m: int) -> float:
        inputs, outputs = saved.pop((st.index, m))
        waited = 0.0
        if st.index == last:
            torch.autograd.backward(outputs[0].reshape(()) * scale)
        else:
            roots, grads = [], []
            for i, (t, meta) in enumerate(zip(outputs, st.outputs, strict=True)):
                if not meta.requires_grad:
                    continue
                g, w = channel.recv(meta, from_stage=st.index + 1, direction=1, boundary=st.index, microbatch=m,
                                    index=i)
                waited += w
                if t.requires_grad:  # an output that depends on nothing trainable has no graph
                    roots.append(t)
                    grads.append(g)
            if roots:
                torch.autograd.backward(roots, grads)
        for i, (t, meta) in enumerate(zip(inputs, st.inputs, strict=True)):
            if meta.requires_grad:
                g = t.grad if t.grad is not None else torch.zeros(meta.shape, dtype=meta.dtype, device=t.device)
                channel.send(g, to_stage=st.index - 1, direction=1, boundary=st.index - 1, microbatch=m, index=i)
        return waited

    for action in orders[pp_rank]:
        st = by_index[action.stage]
        start = time.perf_counter()
        if action.kind == "F":
            waited = forward(st, action.microbatch)
            live[st.index] += 1
            peak[st.index] = max(peak[st.index], live[st.index])
        else:
            waited = backward(st, action.microbatch)
            live[st.index] -= 1
        timeline.append(ActionTiming(action, start, time.perf_counter(), waited))
        channel.reap()
    channel.drain()  # not on an error: a send to a dead peer would hang here
    log.debug("pipeline rank %d: %s, %d actions, bubble %.3f", pp_rank, schedule, len(timeline),
              PipelineResult([], timeline, peak).bubble_fraction())
    return PipelineResult([losses[m] for m in sorted(losses)], timeline, peak, tuple(channel.bytes_sent),
                          channel.messages_sent)


def mean_loss(result: PipelineResult, *, pp: int, group: dist.ProcessGroup | None,
              device: torch.device | None = None) -> torch.Tensor:
    """The mean of the micro-batch losses, as float64, on every pipeline rank (broadcast from
    rank pp-1, which holds the last stage for every schedule here)."""
    if result.losses:
        value = torch.stack(result.losses).mean()
    else:
        value = torch.zeros((), device=device or _default_device(group, pp))
    buf = value.detach().to(torch.float64).reshape(1).clone()
    if pp > 1:
        src = pp - 1 if group is None else dist.get_global_rank(group, pp - 1)
        dist.broadcast(buf, src=src, group=group)
    return buf[0]
