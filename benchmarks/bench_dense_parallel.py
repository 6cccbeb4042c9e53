"""mop vs FSDP2 vs DDP on W CPU ranks (gloo): memory per rank by category, loss, comm, step time.

Runs `mopc train --nproc W ... --json` once per configuration, on the same model, seed and
global batches, then prints one comparison table and writes every report to
benchmarks/results/dense_parallel.json (or --out).

    python benchmarks/bench_dense_parallel.py --model small --nproc 4 --steps 4 --batch 4 --seq-len 64
    python benchmarks/bench_dense_parallel.py --mop-flags "--tp 2"      # options for the mop run

Memory is live-storage accounting per rank (mopc/runtime/memory.py); comm bytes are the
bytes each rank sends, from the flight recorder's record of every collective
(mopc/runtime/comm.py). Step time is the median over steps after the first, the slowest
rank per step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _report import MEMORY_ROWS, max_rel_diff, mib, render

MOP_CONFIGS = {  # mop variants: their extra `mopc train` flags
    "mop": [],
    "mop_tp2": ["--tp", "2"],  # tensor-parallel attention/MLP
    "mop_ep4": ["--ep", "4"],  # expert parallel
    "mop_ep4_offload": ["--ep", "4", "--offload", "experts"],  # ... with expert activations offloaded to host
    "mop_ep4_optoff": ["--ep", "4", "--optimizer-offload"],  # ... AdamW state on host (mopc.optim.HostAdamW)
    "mop_ep4_offload_optoff": ["--ep", "4", "--offload", "experts", "--optimizer-offload"],  # both
    # save/recompute/offload per tensor under a 0.2 GiB budget (CPU roofline), optimizer on host
    "mop_ep4_auto_optoff": ["--ep", "4", "--offload", "auto", "--memory-budget-gb", "0.2", "--optimizer-offload"],
}
CONFIGS = (*MOP_CONFIGS, "fsdp2", "ddp")
DEFAULT_CONFIGS = ("mop", "fsdp2", "ddp")


def run_config(name: str, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """One `mopc train --nproc W` run; returns its JSON report (plus the wall time)."""
    json_path = out_dir / f"{name}.json"
    cmd = [sys.executable, "-m", "mopc", "train", "--nproc", str(args.nproc), "--model", args.model,
           "--steps", str(args.steps), "--batch", str(args.batch), "--seq-len", str(args.seq_len),
           "--seed", str(args.seed), "--lr", str(args.lr), "--json", str(json_path)]
    if name.startswith("mop"):
        cmd += shlex.split(args.mop_flags) + MOP_CONFIGS[name]
        if args.memory_timeline:
            cmd += ["--memory-timeline", str(Path(args.memory_timeline) / name)]
        if args.dump_dir:
            cmd += ["--dump-dir", args.dump_dir]
    else:
        cmd += ["--baseline", name]
        if not args.compile_baselines:
            cmd += ["--no-compile-baseline"]
    print(f"\n== {name}: {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not json_path.exists():
        print(proc.stdout)
        return {"error": f"exit code {proc.returncode}", "wall_s": wall}
    report = json.loads(json_path.read_text())
    report["wall_s"] = wall
    print(f"   done in {wall:.0f}s", flush=True)
    return report


def _per_rank(report: dict[str, Any], key: str) -> str:
    """max over ranks, with the min in parentheses when ranks differ (MiB)."""
    values = [m[key] for m in report["memory"]["per_rank"]]
    hi, lo = max(values), min(values)
    return mib(hi) if hi == lo else f"{mib(hi)} ({mib(lo)})"


def lower_bound(report: dict[str, Any]) -> int:
    """Sharded parameters and gradients (max over ranks) plus the least activations a step
    can keep: one fp32 residual-stream tensor [tokens per rank, dim] per layer boundary,
    what full recompute saves (everything else recomputed or sent to host)."""
    from mopc.models.presets import PRESETS

    cfg, settings = PRESETS[report["config"]["model"]], report["config"]
    tokens = settings["batch"] // report["world_size"] * settings["seq_len"]
    static = max(m["params"] + m["grads"] for m in report["memory"]["per_rank"])
    return static + cfg.num_layers * tokens * cfg.dim * 4


def format_comparison(runs: dict[str, dict[str, Any]]) -> str:
    """The comparison table: one column per configuration."""
    ok = {k: v for k, v in runs.items() if "error" not in v}
    names = list(runs)
    rows: list[tuple[str, list[str]]] = [("runs as", [runs[n].get("config", {}).get("runs_as", runs[n].get("error", "?"))
                                                      for n in names])]
    for label, key in MEMORY_ROWS:
        rows.append((f"{label} MiB/rank", [_per_rank(runs[n], key) if n in ok else "-" for n in names]))
    rows.append(("lower bound MiB/rank", [mib(lower_bound(runs[n])) if n in ok else "-" for n in names]))
    if "fsdp2" in ok:
        fsdp2 = ok["fsdp2"]["memory"]["peak_bytes"]
        rows.append(("peak / FSDP2's", [f"{runs[n]['memory']['peak_bytes'] / fsdp2:.2f}" if n in ok else "-"
                                         for n in names]))
    ref = next(iter(ok.values()), None)
    rows += [
        ("final loss", [f"{runs[n]['losses'][-1]:.4f}" if n in ok else "-" for n in names]),
        ("max rel. loss diff vs " + (next(iter(ok)) if ok else "-"),
         [f"{max_rel_diff(runs[n]['losses'], ref['losses']):.1e}" if n in ok and ref else "-" for n in names]),
        ("comm MiB sent/rank/step", [mib(runs[n]["comm_bytes_per_step"]) if n in ok else "-" for n in names]),
        ("step time s (median)", [f"{runs[n]['step_time_s']:.2f}" if n in ok else "-" for n in names]),
        ("first step s (compile)", [f"{runs[n]['first_step_s']:.1f}" if n in ok else "-" for n in names]),
    ]
    return render(names, rows, min_col=14)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="small")
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="global batch")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--mop-flags", default="", help="extra `mopc train` flags for the mop run, e.g. '--tp 2'")
    p.add_argument("--compile-baselines", default=True, action=argparse.BooleanOptionalAction,
                   help="compile FSDP2 and DDP with aot_eager (default) or run them eagerly")
    p.add_argument("--dump-dir", default=None, help="graph dumps of the mop run go here")
    p.add_argument("--memory-timeline", default=None, metavar="DIR",
                   help="each mop run writes its memory timeline (JSON, PNG) to DIR/<config>")
    p.add_argument("--out", default="benchmarks/results/dense_parallel.json")
    args = p.parse_args(argv)

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        p.error(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    with tempfile.TemporaryDirectory(prefix="mopc_bench_") as tmp:
        runs = {name: run_config(name, args, Path(tmp)) for name in configs}

    result = {"settings": vars(args), "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                                  "cpus": os.cpu_count(), "platform": platform.platform()},
              "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{args.model} on {args.nproc} CPU ranks (gloo), global batch [{args.batch}, {args.seq_len}], "
          f"{args.steps} steps; memory: live storages per rank, max over ranks (min when ranks differ)\n")
    print(format_comparison(runs))
    if "mop" in runs and args.dump_dir:
        print(f"\nmop graph dumps (rank 0), one file per pass: {os.path.abspath(args.dump_dir)}/")
    print(f"results: {args.out}")
    return 1 if any("error" in r for r in runs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
