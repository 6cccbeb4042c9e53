"""The longest sequence that fits a fixed per-rank device budget: mop vs FSDP2, on W CPU ranks (gloo).

    python benchmarks/bench_max_seq.py                                # budget 400 MiB, every program
    python benchmarks/bench_max_seq.py --budget-mib 380 --programs fsdp2,mop_ep4
    python benchmarks/bench_max_seq.py --programs fsdp2,mop_cp4_offload_optoff --granularity 128 \
        --out benchmarks/results/max_seq_cp.json                      # context parallelism vs FSDP2
    python benchmarks/bench_max_seq.py --render                       # the table again, from the JSON

Every run is `mopc train --nproc W --batch B --seq-len L ... --json`, same model, seed and
steps for every program. The global batch B depends on the program: one sequence per rank
(B = W) for FSDP2 and the programs without context parallelism, and one sequence per
context-parallel group (B = W / cp) for a `--cp` program, whose cp ranks each hold two of
the 2·cp chunks of that sequence. Either way every rank reads one sequence of length L (or
its 1/cp share). A length L *fits* when the device-tier peak
of the live-storage accounting (mopc/runtime/memory.py; `memory.peak_bytes`, max over
ranks) is at most the budget. Host-tier bytes (offloaded activations, `host_peak`; AdamW
state in host memory, `optimizer_host`) are reported beside it and do not count.

Search, per program, over multiples of --granularity up to the model's max_seq_len:
1. measure at a first length (--first-seq-len, else the program's hint in FIRST_SEQ_LEN,
   else half the limit), then at twice it, or the limit if that is shorter (or, if the
   first does not fit, at half of it); the hint only decides where the search starts;
2. fit a line peak(L) through the two measured lengths closest to the boundary (the
   longest that fits and the shortest that does not, when both exist) and run the longest
   multiple the line predicts to fit; a prediction outside the open interval between the
   longest fitting and the shortest failing length so far is replaced by its midpoint
   (the peak is flat at short lengths, where gradients outweigh saved activations), and a
   prediction equal to the longest fitting length by the next multiple;
3. stop when a fitting length and the next multiple that does not fit have both been run,
   when the model's limit fits, when the granularity itself does not fit, or after
   --max-runs runs. Every decision reads a measured peak; the line only picks the next run.

Prints one table and writes every run to benchmarks/results/max_seq.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from _report import git_state, mib, render, run_train

PROGRAMS = {  # program name: its `mopc train` flags; add more here
    "fsdp2": ["--baseline", "fsdp2"],
    "mop_ep4": ["--ep", "4"],
    # expert activations to host between forward and backward, AdamW state on host (mopc.optim.HostAdamW)
    "mop_ep4_offload_optoff": ["--ep", "4", "--offload", "experts", "--optimizer-offload"],
    # context parallelism alone, then with both memory passes: one sequence per group of 4 ranks
    "mop_cp4_ep4": ["--cp", "4", "--ep", "4"],
    "mop_cp4_offload_optoff": ["--cp", "4", "--ep", "4", "--offload", "experts", "--optimizer-offload"],
}
REFERENCE = "fsdp2"  # the ratio column divides by this program's longest fitting length
FIRST_SEQ_LEN = {  # where the search starts (a hint from earlier runs: fewer slow runs); the default: half the limit
    "fsdp2": 256, "mop_ep4": 256, "mop_ep4_offload_optoff": 1024, "mop_cp4_ep4": 1024, "mop_cp4_offload_optoff": 4096,
}


def context_parallel(program: str) -> int:
    """The `--cp` degree of a program's flags (1 without)."""
    flags = PROGRAMS[program]
    return int(flags[flags.index("--cp") + 1]) if "--cp" in flags else 1


def global_batch(program: str, nproc: int) -> int:
    """One sequence per rank, or per context-parallel group (its ranks share the sequence)."""
    return nproc // context_parallel(program)


def _max_over_ranks(report: dict[str, Any], key: str) -> int:
    return max(m.get(key, 0) for m in report["memory"]["per_rank"])


def measure(program: str, seq_len: int, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """One run of `program` at `seq_len`: its device-tier peak, host tiers and whether it fits."""
    settings = SimpleNamespace(**{**vars(args), "seq_len": seq_len, "batch": global_batch(program, args.nproc)})
    report = run_train(f"{program}_seq{seq_len}", settings, out_dir, PROGRAMS[program])
    run: dict[str, Any] = {"seq_len": seq_len, "batch": settings.batch, "wall_s": round(report["wall_s"], 1),
                           "command": report["command"]}
    if "error" in report:
        return {**run, "error": report["error"]}
    peak = report["memory"]["peak_bytes"]
    run.update(peak_bytes=peak, fits=peak <= args.budget_mib * 2**20,
               host_peak_bytes=_max_over_ranks(report, "host_peak"),
               optimizer_host_bytes=_max_over_ranks(report, "optimizer_host"),
               per_rank=report["memory"]["per_rank"], losses=report["losses"],
               step_time_s=report["step_time_s"], first_step_s=report["first_step_s"])
    print(f"   seq {seq_len}: device peak {mib(peak)} MiB -> {'fits' if run['fits'] else 'over'} "
          f"{args.budget_mib} MiB (host tier {mib(run['host_peak_bytes'])}, optimizer on host "
          f"{mib(run['optimizer_host_bytes'])})", flush=True)
    return run


def _line(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float] | None:
    """(slope, intercept) in bytes per token through two runs; None when it does not rise."""
    if a["seq_len"] == b["seq_len"]:
        return None
    slope = (b["peak_bytes"] - a["peak_bytes"]) / (b["seq_len"] - a["seq_len"])
    return (slope, a["peak_bytes"] - slope * a["seq_len"]) if slope > 0 else None


def _next_length(runs: list[dict[str, Any]], lo: int, hi: int, budget: int, grain: int) -> tuple[int, str]:
    """The next length to run, strictly between lo (fits; 0 if none yet) and hi (does not fit or
    one past the limit), and why: the line's prediction when it lands there, else the midpoint."""
    ok = [r for r in runs if r["fits"]]
    over = [r for r in runs if not r["fits"]]
    if ok and over:  # the two runs around the boundary
        pair = (max(ok, key=lambda r: r["seq_len"]), min(over, key=lambda r: r["seq_len"]))
    else:  # the two longest runs (all on one side of the budget)
        pair = tuple(sorted(runs, key=lambda r: r["seq_len"])[-2:])
    line = _line(*pair) if len(pair) == 2 else None
    if line is not None:
        predicted = math.floor((budget - line[1]) / line[0] / grain) * grain
        if lo < predicted < hi:
            return predicted, f"line through {pair[0]['seq_len']} and {pair[1]['seq_len']}"
        if predicted == lo and lo + grain < hi:  # the line puts the boundary just past lo: check the next multiple
            return lo + grain, (f"next multiple (line through {pair[0]['seq_len']} and {pair[1]['seq_len']} "
                                f"predicts {lo})")
    mid = max(grain, (lo + hi) // 2 // grain * grain)
    if not lo < mid < hi:
        mid = lo + grain
    return mid, "midpoint" if line is None else f"midpoint (line through {pair[0]['seq_len']} and " \
                                                f"{pair[1]['seq_len']} predicted outside ({lo}, {hi}))"


def search(program: str, args: argparse.Namespace, limit: int, out_dir: Path) -> dict[str, Any]:
    """The longest multiple of the granularity, up to `limit`, whose measured device peak fits."""
    grain, budget = args.granularity, args.budget_mib * 2**20
    cap = limit // grain * grain
    runs: list[dict[str, Any]] = []
    lo, hi = 0, cap + grain  # lo: longest measured fit; hi: shortest measured failure (or past the limit)
    first = args.first_seq_len or FIRST_SEQ_LEN.get(program)
    seq_len, why = ((min(cap, max(grain, first // grain * grain)), "the first length") if first else
                    (max(grain, cap // 2 // grain * grain), "half the model's limit"))
    while len(runs) < args.max_runs:
        run = measure(program, seq_len, args, out_dir)
        runs.append({**run, "chosen_by": why})
        if "error" in run:
            break
        if run["fits"]:
            lo = max(lo, seq_len)
        else:
            hi = min(hi, seq_len)
        if hi - lo <= grain:
            break
        measured = [r for r in runs if "error" not in r]
        if len(measured) == 1:  # second point: twice the first (at most the limit) if it fits, else half
            seq_len, why = (min(cap, 2 * seq_len), "twice the first length") if run["fits"] else \
                (max(grain, seq_len // 2 // grain * grain), "half the first length")
            if seq_len not in (lo, hi):
                continue
        seq_len, why = _next_length(measured, lo, hi, budget, grain)

    if any("error" in r for r in runs):
        verdict = f"a run failed ({runs[-1]['error']})"
    elif lo == cap:
        verdict = f"fits at the model's max_seq_len {limit}; the budget does not limit it"
    elif hi - lo <= grain:
        verdict = f"{lo} fits, {hi} does not" if lo else f"nothing fits: {grain} is over the budget"
    else:
        verdict = f"undecided after {len(runs)} runs: {lo} fits, {hi} does not"
    result: dict[str, Any] = {"flags": PROGRAMS[program], "batch": global_batch(program, args.nproc),
                              "longest_fitting_seq_len": lo,
                              "bounded": hi - lo <= grain and not any("error" in r for r in runs),
                              "verdict": verdict, "num_runs": len(runs),
                              "wall_s": round(sum(r["wall_s"] for r in runs), 1), "runs": runs}
    return result


def format_table(doc: dict[str, Any]) -> str:
    programs = doc["programs"]
    names = list(programs)
    ref = programs.get(REFERENCE, {}).get("longest_fitting_seq_len", 0)

    def best(name: str) -> dict[str, Any] | None:
        p = programs[name]
        return next((r for r in p["runs"] if r.get("fits") and r["seq_len"] == p["longest_fitting_seq_len"]), None)

    def cell(name: str, fmt: Any) -> str:
        run = best(name)
        return fmt(run) if run else "-"

    def longest(name: str) -> str:
        p = programs[name]
        n = p["longest_fitting_seq_len"]
        return (f"{n} (model limit)" if p["verdict"].startswith("fits at the model") else str(n)) \
            + ("" if p["bounded"] else " ?")

    rows = [
        ("global batch (sequences)", [str(programs[n].get("batch", doc["settings"]["nproc"])) for n in names]),
        ("longest fitting seq_len", [longest(n) for n in names]),
        ("device-tier peak MiB", [cell(n, lambda r: mib(r["peak_bytes"])) for n in names]),
        ("host tier: activations MiB", [cell(n, lambda r: mib(r["host_peak_bytes"])) for n in names]),
        ("host tier: optimizer MiB", [cell(n, lambda r: mib(r["optimizer_host_bytes"])) for n in names]),
        ("peak MiB at next multiple", [next((mib(r["peak_bytes"]) for r in programs[n]["runs"]
                                             if r["seq_len"] == programs[n]["longest_fitting_seq_len"]
                                             + doc["settings"]["granularity"] and "peak_bytes" in r), "-")
                                       for n in names]),
        (f"x {REFERENCE}'s length", [("≥ " if programs[n]["verdict"].startswith("fits at the model") else "")
                                     + f"{programs[n]['longest_fitting_seq_len'] / ref:.2f}" if ref else "-"
                                     for n in names]),
        ("runs", [str(programs[n]["num_runs"]) for n in names]),
        ("wall s", [f"{programs[n]['wall_s']:.0f}" for n in names]),
    ]
    s = doc["settings"]
    lines = [(f"{s['model']} on {s['nproc']} CPU ranks (gloo), one sequence per rank (global batch {s['nproc']}), "
             f"or per context-parallel group of a --cp program (global batch {s['nproc']} / cp), "
             f"{s['steps']} steps; budget {s['budget_mib']} MiB per rank of device-tier peak (live-storage "
             f"accounting, max over ranks); lengths in multiples of {s['granularity']} up to max_seq_len "
             f"{doc['model_max_seq_len']}"), "", render(names, rows, min_col=10, fit_names=True), ""]
    for name in names:
        p = programs[name]
        lines.append(f"{name}: {p['verdict']}; runs (seq_len: device peak MiB, fits?) "
                     + ", ".join(f"{r['seq_len']}: " + (f"{mib(r['peak_bytes'])} {'yes' if r['fits'] else 'no'}"
                                                        if "peak_bytes" in r else r.get("error", "?"))
                                 for r in sorted(p["runs"], key=lambda r: r["seq_len"])))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-mib", type=float, default=400.0, help="device-tier peak allowed per rank, MiB")
    p.add_argument("--model", default="small")
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--granularity", type=int, default=64, help="sequence lengths are multiples of this")
    p.add_argument("--max-runs", type=int, default=6, help="runs per program at most")
    p.add_argument("--first-seq-len", type=int, default=None,
                   help="the first length every program runs (default: each program's FIRST_SEQ_LEN hint)")
    p.add_argument("--programs", default=",".join(PROGRAMS), help=f"comma list of {', '.join(PROGRAMS)}")
    p.add_argument("--out", default="benchmarks/results/max_seq.json")
    p.add_argument("--render", action="store_true", help="only print the table of the JSON at --out again")
    args = p.parse_args(argv)
    if args.render:
        print(format_table(json.loads(Path(args.out).read_text())))
        return 0
    programs = [n.strip() for n in args.programs.split(",") if n.strip()]
    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown:
        p.error(f"--programs: unknown {', '.join(unknown)}; choose from {', '.join(PROGRAMS)}")
    for name in programs:
        cp = context_parallel(name)
        if args.nproc % cp or args.granularity % (2 * cp):
            p.error(f"--programs {name}: cp={cp} needs --nproc a multiple of {cp} and --granularity a multiple "
                    f"of 2*cp={2 * cp} (got --nproc {args.nproc}, --granularity {args.granularity})")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from mopc.models.presets import PRESETS

    limit = PRESETS[args.model].max_seq_len
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mopc_bench_") as tmp:
        results = {name: search(name, args, limit, Path(tmp)) for name in programs}
    doc = {"settings": {k: v for k, v in vars(args).items() if k not in ("render", "out")},
           "model_max_seq_len": limit, "wall_s": round(time.perf_counter() - start, 1),
           "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                       "platform": platform.platform()},
           "git": git_state(), "programs": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print("\n" + format_table(doc))
    print(f"\nwall time {doc['wall_s']:.0f} s; results: {args.out}")
    return 1 if any("error" in r for res in results.values() for r in res["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
