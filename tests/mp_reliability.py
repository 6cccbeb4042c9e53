"""Failures injected into a real gloo run; each rank writes what it saw to OUT/rank{R}.json.

    RANK=r WORLD_SIZE=4 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/mp_reliability.py OUT [mode]

Started by tests/test_reliability_mp.py without torchrun (whose agent would tear the other
ranks down itself when one dies, hiding what mopc does). `mode`:

- `train` (world 4, `tiny` with one MoE layer, ep 2, AdamW through torch.compile):
  1. a normal step;
  2. rank 1's batch has every label ignored (-100), so its loss is NaN: every rank's `optimizer.step()`
     must raise NonFiniteError naming step 2 and rank 1, with parameters and optimizer
     state unchanged;
  3. a normal step again (training goes on after zero_grad);
  4. rank 2 passes one sequence instead of two: every rank must raise InputMismatchError
     before any other collective;
  5. the last rank kills itself (SIGKILL) instead of calling the step: the others must
     raise CollectiveError within the collective timeout.
- `diverge` (world 2, no compile): rank 1 stops calling collectives (sleeps); rank 0's
  step guard must raise CollectiveError after `collective_timeout_s`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

import mopc
from mopc.models import PRESETS, build_model, make_init_fn
from mopc.runtime.trainer import synthetic_batch

SEQ, PER_RANK = 16, 2
TIMEOUT_S = 60.0  # train: rank 2 recompiles for its odd batch while the others wait in the input check
DIVERGE_TIMEOUT_S = 5.0


def _local_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [p.detach().to_local().clone() for p in model.parameters()]
    for state in opt.state.values():
        tensors += [t.to_local().clone() if hasattr(t, "to_local") else t.clone() for t in state.values()
                    if torch.is_tensor(t)]
    return tensors


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


class Log:
    def __init__(self, out: Path, rank: int) -> None:
        self.path, self.data = out / f"rank{rank}.json", {"rank": rank}

    def __setitem__(self, key: str, value: object) -> None:
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=1))  # kept up to date: a rank may die


def _expect(log: Log, key: str, error: type, fn) -> None:
    start = time.time()
    try:
        fn()
        log[key] = {"raised": None}
    except error as err:
        log[key] = {"raised": type(err).__name__, "message": str(err), "seconds": time.time() - start,
                    "at": time.time()}
    except Exception as err:  # noqa: BLE001 - recorded for the test to show
        log[key] = {"raised": type(err).__name__, "message": "".join(traceback.format_exception(err))[-3000:]}


def train(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    log = Log(out, rank)
    config = dataclasses.replace(PRESETS["tiny"], num_layers=1, num_dense_layers=0)  # one MoE layer: quick to compile
    model = build_model(config, device="meta", seed=0)
    vocab = config.vocab_size

    def batch(step: int, per_rank: int = PER_RANK) -> dict[str, torch.Tensor]:
        full = synthetic_batch(step, world * PER_RANK, SEQ, vocab)
        return {k: v[rank * PER_RANK:rank * PER_RANK + per_rank] for k, v in full.items()}

    model = mopc.parallelize(model, batch(0), init_fn=make_init_fn(model, 0), ep=2,
                             collective_timeout_s=TIMEOUT_S, first_step_timeout_s=300.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = torch.compile(model, backend="mop")

    def run(n: int, masked: bool = False, per_rank: int = PER_RANK) -> float:
        inputs = batch(n, per_rank)
        if masked:  # every label ignored: the mean over no tokens is NaN, as in eager
            inputs["labels"] = torch.full_like(inputs["labels"], -100)
        loss = step(**inputs)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    log["losses"] = [run(1)]
    before = _local_state(model, opt)
    _expect(log, "nan", mopc.NonFiniteError, lambda: run(2, masked=rank == 1))
    log["nan_state_unchanged"] = _same(before, _local_state(model, opt))
    opt.zero_grad()
    log["losses"] = [*log.data["losses"], run(3)]
    before = _local_state(model, opt)
    _expect(log, "mismatch", mopc.InputMismatchError, lambda: run(4, per_rank=1 if rank == 2 else PER_RANK))
    log["mismatch_state_unchanged"] = _same(before, _local_state(model, opt))
    opt.zero_grad()
    if rank == world - 1:
        log["killed_at"] = time.time()
        os.kill(os.getpid(), signal.SIGKILL)
    _expect(log, "dead_peer", mopc.CollectiveError, lambda: run(5))
    os._exit(0)  # the group is broken: skip destroy_process_group


def diverge(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    log = Log(out, rank)
    model = build_model(dataclasses.replace(PRESETS["tiny"], num_layers=1, num_dense_layers=0), seed=0)
    model = mopc.parallelize(model, synthetic_batch(0, PER_RANK, SEQ, 128), collective_timeout_s=DIVERGE_TIMEOUT_S,
                             first_step_timeout_s=DIVERGE_TIMEOUT_S)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    if rank == 1:  # takes another path: never reaches the step's collectives
        log["diverged_at"] = time.time()
        time.sleep(DIVERGE_TIMEOUT_S + 3)
        os._exit(0)
    _expect(log, "diverged_peer", mopc.CollectiveError, opt.step)
    os._exit(0)


if __name__ == "__main__":
    out, mode = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "train"
    {"train": train, "diverge": diverge}[mode](out)
