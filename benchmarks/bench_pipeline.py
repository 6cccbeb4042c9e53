"""Pipeline parallelism on W CPU ranks (gloo): per-stage activation peaks and bubble fractions
of GPipe, 1F1B and interleaved 1F1B, side by side in the same processes.

    python benchmarks/bench_pipeline.py --world 2 --configs "gpipe:4,1f1b:4,interleaved_1f1b:4,gpipe:8,1f1b:8,interleaved_1f1b:8"
    python benchmarks/bench_pipeline.py --world 4 --layers 8 --configs "gpipe:8,1f1b:8"

One torchrun launch (pp = world, no data parallelism: every rank reads the same rows) runs
every configuration `schedule:M` in turn: build the model on meta, `mopc.parallelize` with
`pp=world, microbatches=M, schedule=...` (`pp_virtual=--virtual` for interleaved),
`torch.compile(backend="mop")`, then `--warmup` steps (the first compiles) and `--steps`
measured steps of AdamW with `mopc.clip_grad_norm_`, each under `MemoryTracker.step()`.
A batch is always M micro-batches of `--microbatch-size` sequences, so one micro-batch's
activations are the same whatever M.

Per rank: `activations_peak` (bytes of saved-for-backward storages live at once, the tracker
over the measured steps), `max_in_flight` and `bubble_fraction` (mean over the measured
steps) from `mopc.pipeline_stats()`, the pipeline's span (`step_s`) and the whole step's
wall time (pipeline + clipping + AdamW). Per micro-batch bytes = activations_peak /
(micro-batches in flight, summed over the rank's stages). Theory, as a fraction of the
step's span: (p-1)/(m+p-1) for GPipe and 1F1B, (p-1)/(v·m+p-1) for interleaved (the
bubble is (p-1)/m, resp. (p-1)/(v·m), of the ideal compute time). On CPU with gloo the
measured bubble also holds sends and receives, rank imbalance (the last stage computes the
head and the loss) and, when ranks outnumber cores, time-slicing.

Rank 0 writes benchmarks/results/pipeline_world<W>.json (or --out) with the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _report import git_state, render


def parse_configs(text: str) -> list[tuple[str, int]]:
    """"gpipe:4,1f1b:8" -> [("gpipe", 4), ("1f1b", 8)]."""
    out = []
    for item in (c.strip() for c in text.split(",") if c.strip()):
        schedule, _, m = item.partition(":")
        if schedule not in ("gpipe", "1f1b", "interleaved_1f1b") or not m.isdigit():
            raise SystemExit(f"--configs: {item!r} is not schedule:M with schedule gpipe, 1f1b or interleaved_1f1b")
        out.append((schedule, int(m)))
    return out


def held_at_once(schedule: str, pp: int, m: int, virtual: int) -> list[int]:
    """Per pipeline rank, the most micro-batches (summed over its stages) whose forward ran and
    backward had not at the same time, from the schedule's action order. Equals
    `max_in_flight` for one stage per rank; under interleaving the per-stage maxima need not
    coincide."""
    from mopc.runtime.pipeline import make_schedule

    out = []
    for actions in make_schedule(schedule, pp, m, virtual if schedule == "interleaved_1f1b" else 1):
        live = most = 0
        for action in actions:
            live += 1 if action.kind == "F" else -1
            most = max(most, live)
        out.append(most)
    return out


class _StagePlanLog(logging.Handler):
    """Keeps the stage plan `mopc.parallelize` logs (which layers each stage holds)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.plan = ""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("mopc.parallelize: pipeline "):
            self.plan = message.removeprefix("mopc.parallelize: pipeline ")


def theory(schedule: str, pp: int, m: int, virtual: int) -> float:
    """Bubble / span of an ideal pipeline with equal stages and free communication."""
    v = virtual if schedule == "interleaved_1f1b" else 1
    return (pp - 1) / (v * m + pp - 1)


# --------------------------------------------------------------------------- worker (under torchrun)


def run_config(schedule: str, m: int, args: argparse.Namespace) -> dict[str, Any]:
    import mopc
    from mopc.models import PRESETS, build_model, make_init_fn
    from mopc.runtime.memory import MemoryTracker
    from mopc.runtime.trainer import synthetic_batch

    torch._dynamo.reset()
    world = dist.get_world_size()
    base = PRESETS[args.model]
    config = dataclasses.replace(base, num_layers=args.layers, max_seq_len=max(args.seq_len, base.max_seq_len))
    model = build_model(config, device="meta", seed=0)
    batch = m * args.microbatch_size  # pp = world: every rank of the one pipeline reads the same rows
    options: dict[str, Any] = {"pp": world, "microbatches": m, "schedule": schedule}
    if schedule == "interleaved_1f1b":
        options["pp_virtual"] = args.virtual
    plan_log, logger = _StagePlanLog(), logging.getLogger("mopc")
    level = logger.level
    logger.addHandler(plan_log)
    logger.setLevel(min(level or logging.WARNING, logging.INFO))
    try:
        model = mopc.parallelize(model, synthetic_batch(0, batch, args.seq_len, config.vocab_size),
                                 init_fn=make_init_fn(model, 0), **options)
    finally:
        logger.removeHandler(plan_log)
        logger.setLevel(level)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    step_fn = torch.compile(model, backend="mop")
    tracker = None
    walls, stats, losses = [], [], []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:  # measure from here: the first step compiled
            tracker = MemoryTracker(model, opt)
        data = synthetic_batch(i, batch, args.seq_len, config.vocab_size)
        dist.barrier()
        start = time.perf_counter()
        if tracker is not None:
            with tracker.step():
                loss = step_fn(**data)
                loss.backward()  # a no-op under pp: the step already ran every backward
                mopc.clip_grad_norm_(model, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        else:
            loss = step_fn(**data)
            loss.backward()
            mopc.clip_grad_norm_(model, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        wall = time.perf_counter() - start
        losses.append(float(loss.detach()))
        if tracker is not None:
            walls.append(wall)
            stats.append(mopc.pipeline_stats())
    report = tracker.report()
    in_flight = stats[-1]["max_in_flight"]
    if any(s["max_in_flight"] != in_flight for s in stats):
        raise AssertionError(f"max_in_flight changed between steps: {[s['max_in_flight'] for s in stats]}")
    held = held_at_once(schedule, world, m, args.virtual)[stats[-1]["pp_rank"]]
    return {"stage_plan": plan_log.plan,
        "rank": dist.get_rank(), "pp_rank": stats[-1]["pp_rank"], "stages": stats[-1]["stages"],
        "max_in_flight": in_flight, "microbatches_held": held,
        "activations_peak": report["activations_peak"], "activations_per_microbatch": report["activations_peak"] / held,
        "params": report["params"], "grads": report["grads"], "optimizer": report["optimizer"],
        "peak": report["peak"], "peak_rss": report["peak_rss"],
        "bubble_fraction": statistics.mean(s["bubble_fraction"] for s in stats),
        "bubble_fractions": [s["bubble_fraction"] for s in stats],
        "pipeline_s": statistics.mean(s["step_s"] for s in stats),
        "busy_s": statistics.mean(s["busy_s"] for s in stats),
        "step_wall_s": statistics.mean(walls), "actions": stats[-1]["actions"], "losses": losses,
    }


def worker(args: argparse.Namespace) -> int:
    dist.init_process_group("gloo")
    torch.set_num_threads(args.threads)
    world, rank = dist.get_world_size(), dist.get_rank()
    runs = []
    for schedule, m in parse_configs(args.configs):
        start = time.perf_counter()
        mine = run_config(schedule, m, args)
        per_rank: list[Any] = [None] * world
        dist.all_gather_object(per_rank, mine)
        virtual = args.virtual if schedule == "interleaved_1f1b" else 1
        runs.append({"schedule": schedule, "microbatches": m, "pp": world, "virtual": virtual,
                     "theory_bubble_fraction": theory(schedule, world, m, args.virtual),
                     "wall_s": time.perf_counter() - start, "per_rank": per_rank})
        if rank == 0:
            print(f"   {schedule} M={m}: done in {runs[-1]['wall_s']:.0f}s", flush=True)
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps(runs, indent=2) + "\n")
    dist.destroy_process_group()
    return 0


# --------------------------------------------------------------------------- launcher


def format_table(runs: list[dict[str, Any]]) -> str:
    names = [f"{r['schedule'].replace('interleaved_1f1b', 'interl.')} M={r['microbatches']}" for r in runs]
    world = runs[0]["pp"]
    rows: list[tuple[str, list[str]]] = []

    def per_rank(label: str, fmt) -> None:
        for rank in range(world):
            rows.append((f"{label} r{rank}", [fmt(r["per_rank"][rank]) for r in runs]))

    def step_bubble(r: dict[str, Any]) -> float:  # the pipeline's idle share: mean busy over the longest span
        ranks = r["per_rank"]
        return 1 - statistics.mean(x["busy_s"] for x in ranks) / max(x["pipeline_s"] for x in ranks)

    def imbalance(r: dict[str, Any]) -> float:  # the idle share unequal stages alone would leave
        busy = [x["busy_s"] for x in r["per_rank"]]
        return 1 - statistics.mean(busy) / max(busy)

    per_rank("in flight/stage", lambda x: "+".join(str(v) for v in x["max_in_flight"].values()))
    per_rank("held at once", lambda x: str(x["microbatches_held"]))
    per_rank("act. peak MiB", lambda x: f"{x['activations_peak'] / 2**20:.2f}")
    per_rank("peak/held MiB", lambda x: f"{x['activations_per_microbatch'] / 2**20:.3f}")
    per_rank("busy s", lambda x: f"{x['busy_s']:.2f}")
    per_rank("bubble", lambda x: f"{x['bubble_fraction']:.3f}")
    rows.append(("step bubble", [f"{step_bubble(r):.3f}" for r in runs]))
    rows.append(("  imbalance part", [f"{imbalance(r):.3f}" for r in runs]))
    rows.append(("bubble theory", [f"{r['theory_bubble_fraction']:.3f}" for r in runs]))
    rows.append(("pipeline s (max)", [f"{max(x['pipeline_s'] for x in r['per_rank']):.2f}" for r in runs]))
    rows.append(("step s (max)", [f"{max(x['step_wall_s'] for x in r['per_rank']):.2f}" for r in runs]))
    return render(names, rows, min_col=8, fit_names=True)


def print_result(result: dict[str, Any]) -> None:
    s = result["settings"]
    print(f"\n{s['model']} with {s['layers']} layers, pp={s['world']} on {s['world']} CPU ranks (gloo), micro-batch "
          f"[{s['microbatch_size']}, {s['seq_len']}], {s['steps']} measured steps after {s['warmup']}")
    for r in result["runs"]:
        plan = r["per_rank"][0].get("stage_plan")
        if plan:
            print(f"  {r['schedule']} M={r['microbatches']}: {plan}")
    print()
    print(format_table(result["runs"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=2, help="ranks = pipeline stages per rank group (pp = world)")
    p.add_argument("--configs", default="gpipe:4,1f1b:4,interleaved_1f1b:4,gpipe:8,1f1b:8,interleaved_1f1b:8",
                   help="comma list of schedule:microbatches")
    p.add_argument("--virtual", type=int, default=2, help="pp_virtual of interleaved_1f1b")
    p.add_argument("--model", default="tiny")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--microbatch-size", type=int, default=2, help="sequences per micro-batch")
    p.add_argument("--warmup", type=int, default=2, help="steps before measuring (the first compiles)")
    p.add_argument("--steps", type=int, default=3, help="measured steps")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--out", default=None, help="default benchmarks/results/pipeline_world<W>.json")
    p.add_argument("--render", default=None, metavar="JSON", help="print the table of a saved result and exit")
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_out:
        return worker(args)
    if args.render:
        print_result(json.loads(Path(args.render).read_text()))
        return 0
    parse_configs(args.configs)  # fail before launching
    out = Path(args.out or f"benchmarks/results/pipeline_world{args.world}.json")
    shown = "python benchmarks/bench_pipeline.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    worker_out = out.with_suffix(".worker.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.world),
           "--master-port", str(29500 + os.getpid() % 1000), __file__, *(argv or sys.argv[1:]),
           "--worker-out", str(worker_out)]
    print(f"== {shown}\n   {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode != 0 or not worker_out.exists():
        print(f"bench_pipeline: torchrun exited with {proc.returncode}")
        return 1
    runs = json.loads(worker_out.read_text())
    worker_out.unlink()
    result = {"command": shown, "settings": {k: v for k, v in vars(args).items() if k not in ("worker_out", "render")},
              "wall_s": time.perf_counter() - start, "git": git_state(),
              "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                          "platform": platform.platform()},
              "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_result(result)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
