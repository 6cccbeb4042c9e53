"""Checkpoint round trips across layouts, under torchrun (gloo); writes OUT/<phase>_rank<R>.json.

    torchrun --standalone --nproc-per-node W tests/mp_checkpoint.py OUT CKPT PHASE LAYOUT [--compile]

`tiny` on the arithmetic-sequence batches of `mopc train` (global batch 4, sequence 16),
AdamW, steps 0..5. LAYOUT is `tp=2,ep=4`-style (or `none`). PHASE:

- `save`: train steps 0-2, save step 3, then train steps 3-5 uninterrupted; record all losses.
- `resume`: build at LAYOUT, load the newest checkpoint, train steps 3-5; record losses. Then
  a second save whose writer fails on the last rank midway: every rank must raise, `latest`
  must still name step 3, and loading again must give back the same step-3 parameters.

By default the parallelized model runs eagerly (the reference program: real all-gathers and
reduce-scatters, experts gathered); `--compile` runs it through `torch.compile(backend="mop")`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter

import mopc
import mopc.checkpoint as ckpt
from mopc.models import build_model, make_init_fn
from mopc.runtime.ownership import full_parameters
from mopc.runtime.trainer import rank_batch

BATCH, SEQ, LR = 4, 16, 3e-3
SAVE_AT, STEPS = 3, 6


def parse_layout(text: str) -> dict[str, int]:
    if text == "none":
        return {}
    return {k: int(v) for k, v in (item.split("=") for item in text.split(","))}


def data_rank(layout: dict[str, int], rank: int, world: int) -> tuple[int, int]:
    """(rank, world) for the batch arithmetic: the ranks of a pipeline read the same rows."""
    stage_world = world // layout.get("pp", 1)
    return rank % stage_world, stage_world


def build(layout: dict[str, int], rank: int, world: int, compile_: bool):
    model = build_model("tiny", device="meta", seed=0)
    example = rank_batch(0, BATCH, SEQ, model.config.vocab_size, 0, *data_rank(layout, rank, world))
    mopc.parallelize(model, example, init_fn=make_init_fn(model, 0), **layout)
    step_fn = torch.compile(model, backend="mop") if compile_ else model
    return model, step_fn, torch.optim.AdamW(model.parameters(), lr=LR)


def train(step_fn, opt, steps: range, rank: int, world: int, vocab: int, layout: dict[str, int]) -> list[float]:
    losses = []
    for step in steps:
        loss = step_fn(**rank_batch(step, BATCH, SEQ, vocab, 0, *data_rank(layout, rank, world)))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().reshape(1).to(torch.float64)
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
    return losses


def local_params(model) -> list[torch.Tensor]:
    return [p.detach().to_local().clone() for p in model.parameters()]


class FailingWriter(FileSystemWriter):
    """Writes nothing on the last rank: it raises, as a rank dying mid-save would leave things."""

    def write_data(self, plan, planner):
        if dist.get_rank() == dist.get_world_size() - 1:
            raise OSError("injected: disk full halfway through the save")
        return super().write_data(plan, planner)


def main() -> None:
    out, root, phase, layout_text = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    compile_ = "--compile" in sys.argv
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    layout = parse_layout(layout_text)
    model, step_fn, opt = build(layout, rank, world, compile_)
    vocab = model.config.vocab_size
    report: dict = {"rank": rank, "world": world, "layout": layout}
    if phase == "save":
        report["losses"] = train(step_fn, opt, range(SAVE_AT), rank, world, vocab, layout)
        saved = ckpt.save(root, model, opt, step=SAVE_AT, extra={"layout": layout_text})
        report["saved"] = str(saved)
        full = full_parameters(model)
        if rank == 0:
            torch.save(full, out / "saved_full.pt")
        report["losses"] += train(step_fn, opt, range(SAVE_AT, STEPS), rank, world, vocab, layout)
    elif phase == "resume":
        report["loaded_step"] = ckpt.load(root, model, opt)
        at_load = local_params(model)
        report["losses"] = train(step_fn, opt, range(SAVE_AT, STEPS), rank, world, vocab, layout)
        try:
            ckpt.save(root, model, opt, step=STEPS,
                      storage_writer=FailingWriter(root / f".step_{STEPS:08d}.partial"))
            report["failed_save"] = "no error"
        except Exception as err:  # noqa: BLE001 - recorded for the test to check
            report["failed_save"] = f"{type(err).__name__}: {err}"[:300]
        report["latest"] = (root / "latest").read_text().strip()
        again, _, opt2 = build(layout, rank, world, False)
        report["reloaded_step"] = ckpt.load(root, again, opt2)
        report["reload_equal"] = all(torch.equal(a, b) for a, b in zip(at_load, local_params(again), strict=True))
    else:
        raise SystemExit(f"unknown phase {phase!r}")
    (out / f"{phase}_rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
