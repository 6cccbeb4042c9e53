"""Pipeline-parallel schedules (mopc/runtime/pipeline.py): orders, checks, and real runs.

Schedule tests are pure and single-process. `run_pipeline` runs in-process at pp=1 (stage
boundaries through the local mailbox) and, in one torchrun launch at world 2, for gpipe,
1f1b and interleaved_1f1b against single-process eager. Run as a script (under torchrun)
this file is the per-rank side of that launch:

    torchrun --standalone --nproc-per-node 2 tests/test_pipeline_schedule.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mopc.runtime.pipeline import (
    Action,
    PipelineResult,
    Stage,
    TensorMeta,
    check_schedule,
    make_schedule,
    mean_loss,
    run_pipeline,
    schedule_in_flight,
    stage_rank,
)

# --------------------------------------------------------------------------- toy model

BATCH, DIM, NUM_BLOCKS = 8, 8, 4


def _toy(seed: int = 0) -> tuple[list[torch.nn.Linear], torch.Tensor, torch.Tensor, torch.Tensor]:
    """4 Linear+tanh blocks, inputs, MSE targets, and an int64 position tensor the blocks read."""
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(NUM_BLOCKS):
        lin = torch.nn.Linear(DIM, DIM)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(DIM, DIM, generator=gen) / DIM**0.5)
            lin.bias.copy_(torch.randn(DIM, generator=gen) * 0.1)
        blocks.append(lin)
    x = torch.randn(BATCH, DIM, generator=gen)
    y = torch.randn(BATCH, DIM, generator=gen)
    pos = torch.arange(BATCH * DIM).reshape(BATCH, DIM) % 5
    return blocks, x, y, pos


def _block(lin: torch.nn.Linear, h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return torch.tanh(lin(h) + 0.01 * pos.to(h.dtype))


def _reference(blocks, x, y, pos) -> tuple[float, list[torch.Tensor]]:
    """Loss and parameter gradients of the whole batch, eagerly, in one process."""
    h = x
    for lin in blocks:
        h = _block(lin, h, pos)
    loss = torch.nn.functional.mse_loss(h, y)
    params = [p for lin in blocks for p in lin.parameters()]
    grads = torch.autograd.grad(loss, params)
    return loss.item(), [g.clone() for g in grads]


def _stages(blocks, x, y, pos, *, pp: int, pp_rank: int, num_stages: int, microbatches: int) -> list[Stage]:
    """This rank's stages: stage k runs blocks [k*per, (k+1)*per); boundaries carry (h, pos)."""
    mb = BATCH // microbatches
    per = NUM_BLOCKS // num_stages
    boundary = (TensorMeta((mb, DIM), torch.float32, True), TensorMeta((mb, DIM), torch.int64, False))

    def make(k: int) -> Stage:
        def run(m: int, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            rows = slice(m * mb, (m + 1) * mb)
            h, p = (x[rows], pos[rows]) if k == 0 else inputs
            for lin in blocks[k * per:(k + 1) * per]:
                h = _block(lin, h, p)
            if k == num_stages - 1:
                return (torch.nn.functional.mse_loss(h, y[rows]),)
            return h, p

        return Stage(k, run, () if k == 0 else boundary, () if k == num_stages - 1 else boundary)

    return [make(k) for k in range(num_stages) if stage_rank(k, pp) == pp_rank]


def _grad_errors(blocks, ref_grads, owned: set[int]) -> list[float]:
    """Relative (norm) error of each parameter gradient of the blocks in `owned`."""
    errors = []
    params = [(i, p) for i, lin in enumerate(blocks) for p in lin.parameters()]
    for (i, p), ref in zip(params, ref_grads, strict=True):
        if i in owned:
            assert p.grad is not None, f"block {i} got no gradient"
            errors.append(((p.grad - ref).norm() / ref.norm()).item())
    return errors


# --------------------------------------------------------------------------- schedules

CASES = ([("gpipe", pp, m, 1) for pp in (1, 2, 3, 4) for m in (1, 2, 3, 5, 8)]
         + [("1f1b", pp, m, 1) for pp in (1, 2, 3, 4) for m in (pp, pp + 1, 2 * pp, 8)]
         + [("interleaved_1f1b", pp, k * pp, v) for pp in (1, 2, 3, 4) for v in (2, 3, 4) for k in (1, 2, 4)])


@pytest.mark.parametrize(("schedule", "pp", "microbatches", "virtual"), CASES,
                         ids=[f"{s}-pp{p}-m{m}-v{v}" for s, p, m, v in CASES])
def test_every_action_once_on_its_rank_and_the_orders_run(schedule, pp, microbatches, virtual):
    orders = make_schedule(schedule, pp, microbatches, virtual)
    num_stages = pp * virtual
    assert len(orders) == pp
    for rank, order in enumerate(orders):
        assert all(stage_rank(a.stage, pp) == rank for a in order)
        assert len(set(order)) == len(order)
    every = sorted((a.kind, a.stage, a.microbatch) for order in orders for a in order)
    assert every == sorted((k, s, m) for k in "FB" for s in range(num_stages) for m in range(microbatches))
    check_schedule(orders, num_stages, microbatches)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(schedule=st.sampled_from(["gpipe", "1f1b", "interleaved_1f1b"]), pp=st.integers(1, 8),
       k=st.integers(1, 6), virtual=st.integers(2, 5))
def test_check_schedule_accepts_every_generated_order(schedule, pp, k, virtual):
    if schedule == "interleaved_1f1b":
        microbatches = k * pp
    else:
        microbatches, virtual = (k + pp - 1 if schedule == "1f1b" else k), 1
    check_schedule(make_schedule(schedule, pp, microbatches, virtual), pp * virtual, microbatches)


@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize("virtual", [2, 3])
@pytest.mark.parametrize("factor", [1, 2, 4])
def test_interleaved_matches_megatron_warmup(pp, virtual, factor):
    microbatches = factor * pp
    orders = make_schedule("interleaved_1f1b", pp, microbatches, virtual)
    check_schedule(orders, pp * virtual, microbatches)
    total = microbatches * virtual
    for rank, order in enumerate(orders):
        warmup = total if microbatches == pp else min((pp - rank - 1) * 2 + (virtual - 1) * pp, total)
        first_b = next(i for i, a in enumerate(order) if a.kind == "B")
        assert first_b == min(warmup + 1, total), (rank, [str(a) for a in order])
        # The first forwards walk micro-batches 0..pp-1 through chunk 0, then chunk 1, ...
        assert [a.stage for a in order[:pp]] == [rank] * pp


@pytest.mark.parametrize("pp", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("microbatches", [1, 3, 6, 9])
def test_in_flight_1f1b_at_most_pp_minus_rank_and_gpipe_all(pp, microbatches):
    for rank, order in enumerate(make_schedule("gpipe", pp, microbatches)):
        assert schedule_in_flight(order) == {rank: microbatches}
    if microbatches < pp:
        return
    for rank, order in enumerate(make_schedule("1f1b", pp, microbatches)):
        assert schedule_in_flight(order) == {rank: pp - rank}


def test_check_schedule_rejects_a_deadlock_naming_the_ranks():
    f, b = (lambda s, m: Action("F", s, m)), (lambda s, m: Action("B", s, m))
    orders = [[f(0, 0), b(0, 0), f(0, 1), b(0, 1)],  # rank 0 waits on B(1,0) before sending F(0,1)
              [f(1, 0), f(1, 1), b(1, 0), b(1, 1)]]  # rank 1 needs F(0,1) before it runs B(1,0)
    with pytest.raises(ValueError, match="deadlocks") as err:
        check_schedule(orders, 2, 2)
    msg = str(err.value)
    assert "rank 0 blocks at action 1 B(stage=0, mb=0), waiting for B(stage=1, mb=0) on rank 1" in msg
    assert "rank 1 blocks at action 1 F(stage=1, mb=1), waiting for F(stage=0, mb=1) on rank 0" in msg


def test_check_schedule_rejects_missing_duplicated_misplaced_and_early_backward():
    good = make_schedule("1f1b", 2, 2)
    with pytest.raises(ValueError, match=r"rank 1: action B\(stage=1, mb=1\) is missing"):
        check_schedule([good[0], good[1][:-1]], 2, 2)
    with pytest.raises(ValueError, match=r"rank 0: action F\(stage=0, mb=0\) is duplicated"):
        check_schedule([[good[0][0], *good[0]], good[1]], 2, 2)
    with pytest.raises(ValueError, match=r"rank 0: action F\(stage=1, mb=0\) belongs on rank 1"):
        check_schedule([[Action("F", 1, 0), *good[0]], good[1]], 2, 2)
    early = [Action("B", 0, 0), *[a for a in good[0] if a != Action("B", 0, 0)]]
    with pytest.raises(ValueError, match=r"rank 0: action B\(stage=0, mb=0\) precedes its forward"):
        check_schedule([early, good[1]], 2, 2)
    with pytest.raises(ValueError, match="out of range"):
        check_schedule([good[0], [*good[1], Action("F", 1, 7)]], 2, 2)


@pytest.mark.parametrize(("args", "message"), [
    (("1f1b", 2, 1), ("microbatches=1 < pp=2: 1F1B needs at least pp micro-batches; pass microbatches>=2 "
                      "or schedule='gpipe'")),
    (("zb", 2, 4), "schedule='zb' is unknown"),
    (("interleaved_1f1b", 2, 3, 2), "microbatches=3 is not a multiple of pp=2.*pass microbatches=4"),
    (("interleaved_1f1b", 2, 4, 1), "virtual=1: interleaved_1f1b needs virtual >= 2"),
    (("gpipe", 2, 4, 2), "virtual=2: schedule='gpipe' runs one stage per rank"),
    (("1f1b", 2, 4, 3), "virtual=3: schedule='1f1b' runs one stage per rank"),
])
def test_invalid_arguments_name_the_field_value_and_fix(args, message):
    with pytest.raises(ValueError, match=message):
        make_schedule(*args)


# --------------------------------------------------------------------------- in-process runs (pp=1)


@pytest.mark.parametrize(("schedule", "virtual", "microbatches"),
                         [("gpipe", 1, 4), ("1f1b", 1, 2), ("interleaved_1f1b", 2, 4), ("interleaved_1f1b", 4, 2)])
def test_single_rank_pipeline_matches_eager(schedule, virtual, microbatches):
    blocks, x, y, pos = _toy()
    ref_loss, ref_grads = _reference(blocks, x, y, pos)
    stages = _stages(blocks, x, y, pos, pp=1, pp_rank=0, num_stages=virtual, microbatches=microbatches)
    result = run_pipeline(stages, pp=1, pp_rank=0, group=None, microbatches=microbatches, schedule=schedule,
                          virtual=virtual)
    assert len(result.losses) == microbatches and len(result.timeline) == 2 * microbatches * virtual
    assert mean_loss(result, pp=1, group=None).item() == pytest.approx(ref_loss, rel=1e-6)
    assert max(_grad_errors(blocks, ref_grads, set(range(NUM_BLOCKS)))) < 1e-6
    assert 0.0 <= result.bubble_fraction() < 1.0
    assert all(t.wait == 0.0 for t in result.timeline)  # local boundaries never block


def test_run_pipeline_rejects_stages_and_outputs_that_do_not_fit():
    blocks, x, y, pos = _toy()
    stages = _stages(blocks, x, y, pos, pp=1, pp_rank=0, num_stages=2, microbatches=2)
    with pytest.raises(ValueError, match=r"rank 0 got stages \[0\], .* puts \[0, 1\] here"):
        run_pipeline(stages[:1], pp=1, pp_rank=0, group=None, microbatches=2, schedule="interleaved_1f1b",
                     virtual=2)
    bad = Stage(0, stages[0].run, (), (TensorMeta((3, DIM), torch.float32, True),) * 2)
    with pytest.raises(ValueError, match=r"stage 0.outputs .* differ from stage 1.inputs"):
        run_pipeline([bad, stages[1]], pp=1, pp_rank=0, group=None, microbatches=2, schedule="interleaved_1f1b",
                     virtual=2)
    int_grad = (stages[1].inputs[0], TensorMeta((4, DIM), torch.int64, True))
    with pytest.raises(ValueError, match=r"stage 0.outputs\[1\]: requires_grad=True with dtype torch.int64"):
        run_pipeline([Stage(0, stages[0].run, (), int_grad), Stage(1, stages[1].run, int_grad, ())], pp=1,
                     pp_rank=0, group=None, microbatches=2, schedule="interleaved_1f1b", virtual=2)
    all_float = stages[1].inputs[:1] * 2  # the position tensor is int64
    wrong_first, wrong = Stage(0, stages[0].run, (), all_float), Stage(1, stages[1].run, all_float, ())
    with pytest.raises(ValueError, match=r"stage 0 micro-batch 0: output 1 is \(4, 8\) torch.int64, its metadata "
                                         r"says \(4, 8\) torch.float32"):
        run_pipeline([wrong_first, wrong], pp=1, pp_rank=0, group=None, microbatches=2,
                     schedule="interleaved_1f1b", virtual=2)


def test_bubble_fraction_counts_receive_waits_as_idle():
    from mopc.runtime.pipeline import ActionTiming

    a = Action("F", 0, 0)
    result = PipelineResult([], [ActionTiming(a, 0.0, 1.0, 0.5), ActionTiming(a, 2.0, 3.0, 0.0)], {0: 1})
    assert result.bubble_fraction() == pytest.approx(1 - 1.5 / 3.0)
    assert PipelineResult([], [], {}).bubble_fraction() == 0.0


# --------------------------------------------------------------------------- real gloo ranks

MP_CONFIGS = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2)]
MP_MICROBATCHES = 4


@pytest.mark.multiprocess
def test_two_gloo_ranks_match_eager_for_every_schedule(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
           str(Path(__file__).resolve()), str(tmp_path)]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for rank in range(2):
        log = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for schedule, virtual in MP_CONFIGS:
            r = log[schedule]
            name = f"rank {rank} {schedule}"
            assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6), name
            assert r["num_losses"] == (MP_MICROBATCHES if rank == 1 else 0), name
            assert len(r["grad_errors"]) == 2 * NUM_BLOCKS // 2, name  # weight and bias of this rank's blocks
            assert max(r["grad_errors"]) < 1e-6, (name, r["grad_errors"])
            assert 0.0 <= r["bubble"] < 1.0, name
            in_flight = {int(k): v for k, v in r["max_in_flight"].items()}
            assert sorted(in_flight) == [s for s in range(2 * virtual) if s % 2 == rank], name
            if schedule == "gpipe":
                assert in_flight == {rank: MP_MICROBATCHES}, name
            elif schedule == "1f1b":
                assert in_flight == {rank: 2 - rank}, name
            assert r["num_actions"] == 2 * MP_MICROBATCHES * virtual, name
            assert r["waited"] > 0.0, name  # every rank receives something across the boundary


def _main(out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, pp = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    log: dict = {}
    for schedule, virtual in MP_CONFIGS:
        blocks, x, y, pos = _toy()
        ref_loss, ref_grads = _reference(blocks, x, y, pos)
        num_stages = pp * virtual
        stages = _stages(blocks, x, y, pos, pp=pp, pp_rank=rank, num_stages=num_stages, microbatches=MP_MICROBATCHES)
        # The default group for gpipe; an explicit group (global ranks via get_global_rank) for the others.
        group = None if schedule == "gpipe" else dist.new_group(list(range(pp)))
        result = run_pipeline(stages, pp=pp, pp_rank=rank, group=group, microbatches=MP_MICROBATCHES,
                              schedule=schedule, virtual=virtual)
        per = NUM_BLOCKS // num_stages
        owned = {st.index * per + j for st in stages for j in range(per)}
        log[schedule] = {
            "loss": mean_loss(result, pp=pp, group=group).item(), "ref_loss": ref_loss,
            "num_losses": len(result.losses), "grad_errors": _grad_errors(blocks, ref_grads, owned),
            "bubble": result.bubble_fraction(), "max_in_flight": result.max_in_flight,
            "num_actions": len(result.timeline), "waited": sum(t.wait for t in result.timeline),
        }
    (out / f"rank{rank}.json").write_text(json.dumps(log))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _main(Path(sys.argv[1]))
