"""Expert parallelism on W CPU ranks (gloo): mop ep=1 vs mop ep=W vs FSDP2 vs DDP, balanced and skewed routing.

Runs `mopc train --nproc W ... --json` once per configuration, on the same model, seed and
global batches, then prints two comparison tables and writes every report to
benchmarks/results/expert_parallel.json (or --out).

    python benchmarks/bench_expert_parallel.py --model small --nproc 4 --steps 3 --batch 16 --seq-len 64
    python benchmarks/bench_expert_parallel.py --show benchmarks/results/expert_parallel.json   # tables only

Configurations (one after another, in this order):
- the preset's own routing (its untrained router; far from balanced, see the imbalance
  row): `mop` (reference program, ep=1), `mop_ep` (`--ep W`), `fsdp2`, `ddp`;
- skewed routing (`--skew-experts N`: every token picks among experts 0..N-1, which with
  N <= E / ep all live on EP rank 0): `mop_ep_skew` (no spilling), `mop_ep_skew_spill`
  (`--expert-spill-factor F --expert-spill-slots S`) and `fsdp2_skew`.

Memory is live-storage accounting per rank (mopc/runtime/memory.py); comm bytes are the
bytes each rank sends, from the flight recorder's record of every collective
(mopc/runtime/comm.py). Step time is the median over steps after the first, the slowest
rank per step. Expert load is rank 0's `mopc.expert_load_stats()` for the last step:
routed rows each EP rank computed, and the imbalance max/mean rows per rank with and
without spilling. With spilling, the script checks the bound: no rank computes more than
ceil(F * mean) rows in any layer.
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
from typing import Any

import torch
from _report import MEMORY_ROWS, git_state, max_rel_diff, mib, render, run_train

BALANCED = ("mop", "mop_ep", "fsdp2", "ddp")
SKEWED = ("mop_ep_skew", "mop_ep_skew_spill", "fsdp2_skew")
CONFIGS = BALANCED + SKEWED


def train_flags(name: str, args: argparse.Namespace) -> list[str]:
    """The `mopc train` flags that make configuration `name` (beyond the shared ones)."""
    flags: list[str] = []
    if name.endswith(("_skew", "_skew_spill")):
        flags += ["--skew-experts", str(args.skew_experts)]
    if name.startswith("mop_ep"):
        flags += ["--ep", str(args.ep)]
    if name.endswith("_spill"):
        flags += ["--expert-spill-factor", str(args.spill_factor), "--expert-spill-slots", str(args.spill_slots)]
    if name.startswith(("fsdp2", "ddp")):
        flags += ["--baseline", name.split("_")[0]]
        if not args.compile_baselines:
            flags += ["--no-compile-baseline"]
    return flags


def spill_check(report: dict[str, Any], factor: float) -> dict[str, Any]:
    """Whether every layer's busiest EP rank is within ceil(factor * mean rows per rank)."""
    layers = {}
    for layer, s in (report.get("expert_load") or {}).items():
        rows = s["rows_per_rank"]
        bound = math.ceil(factor * sum(rows) / len(rows))
        layers[layer] = {"max_rows": max(rows), "bound": bound, "met": max(rows) <= bound}
    return {"factor": factor, "bound_met": bool(layers) and all(v["met"] for v in layers.values()),
            "layers": layers}


# ------------------------------------------------------------------------ tables


def _max_min(values: list[float], fmt=mib) -> str:
    """max over ranks, with the min in parentheses when ranks differ."""
    hi, lo = max(values), min(values)
    return fmt(hi) if fmt(hi) == fmt(lo) else f"{fmt(hi)} ({fmt(lo)})"


def _load(report: dict[str, Any]) -> dict[str, dict] | None:
    return report.get("expert_load") or None


def _rows_first_layer(report: dict[str, Any]) -> str:
    load = _load(report)
    if not load:
        return "-"
    layer = next(iter(load))
    return f"L{layer}: " + "/".join(str(r) for r in load[layer]["rows_per_rank"])


def _imbalance(report: dict[str, Any], key: str) -> str:
    load = _load(report)
    if not load:
        return "-"
    values = [s[key] for s in load.values()]
    return _max_min(values, fmt=lambda v: f"{v:.2f}")


def format_comparison(runs: dict[str, dict[str, Any]], ref_name: str | None) -> str:
    """One column per configuration; memory as max over ranks (min when ranks differ)."""
    names = list(runs)
    ok = {n for n in names if "error" not in runs[n]}
    ref = runs[ref_name] if ref_name in ok else None

    def row(label: str, fn) -> tuple[str, list[str]]:
        return label, [fn(runs[n]) if n in ok else "-" for n in names]

    rows: list[tuple[str, list[str]]] = [
        ("runs as", [runs[n].get("config", {}).get("runs_as", runs[n].get("error", "?")) for n in names]),
    ]
    for label, key in MEMORY_ROWS:
        rows.append(row(f"{label} MiB/rank", lambda r, k=key: _max_min([m[k] for m in r["memory"]["per_rank"]])))
    rows += [
        row("comm MiB sent/rank/step", lambda r: _max_min(r["comm_bytes_per_rank"])),
        row("  rank 0 all-to-all MiB", lambda r: mib(r["comm_by_kind_last_step"].get("all_to_all", {})
                                                      .get("bytes_sent", 0))),
        row("step time s (median)", lambda r: f"{r['step_time_s']:.2f}"),
        row("first step s (compile)", lambda r: f"{r['first_step_s']:.1f}"),
        row("final loss", lambda r: f"{r['losses'][-1]:.4f}"),
        row(f"max rel. loss diff vs {ref_name}",
            lambda r: f"{max_rel_diff(r['losses'], ref['losses']):.1e}" if ref else "-"),
        row("rows per EP rank", _rows_first_layer),
        row("imbalance max/mean", lambda r: _imbalance(r, "imbalance")),
        row("  without spilling", lambda r: _imbalance(r, "imbalance_without_spill")),
    ]
    return render(names, rows, min_col=12, fit_names=True)


def format_per_rank(runs: dict[str, dict[str, Any]],
                    keys=(("activations (peak)", "activations_peak"), ("peak", "peak"), ("peak RSS", "peak_rss"))) -> str:
    """Each rank's memory (MiB), one column per configuration: the hot EP rank shows up here."""
    names = [n for n in runs if "error" not in runs[n]]
    if not names:
        return ""
    world = len(runs[names[0]]["memory"]["per_rank"])
    rows = [(f"{label}, rank {rank}", [mib(runs[n]["memory"]["per_rank"][rank][key]) for n in names])
            for label, key in keys for rank in range(world)]
    return render(names, rows, min_col=12, corner="MiB", fit_names=True, fit_values=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="small")
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--ep", type=int, default=None, help="expert-parallel degree of the mop_ep runs (default: nproc)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=16, help="global batch")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--skew-experts", type=int, default=2, help="favoured experts of the skewed runs")
    p.add_argument("--spill-factor", type=float, default=1.25, help="--expert-spill-factor of mop_ep_skew_spill")
    p.add_argument("--spill-slots", type=int, default=1, help="--expert-spill-slots of mop_ep_skew_spill")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--compile-baselines", default=True, action=argparse.BooleanOptionalAction,
                   help="compile FSDP2 and DDP with aot_eager (default) or run them eagerly")
    p.add_argument("--out", default="benchmarks/results/expert_parallel.json")
    p.add_argument("--show", default=None, metavar="JSON", help="print the tables of a saved result; run nothing")
    args = p.parse_args(argv)
    if args.show:
        return print_result(json.loads(Path(args.show).read_text()), args.show)
    args.ep = args.ep or args.nproc

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        p.error(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    start, git_before = time.perf_counter(), git_state()
    with tempfile.TemporaryDirectory(prefix="mopc_bench_ep_") as tmp:
        runs = {name: run_train(name, args, Path(tmp), train_flags(name, args)) for name in configs}
    checks = {}
    if "mop_ep_skew_spill" in runs and "error" not in runs["mop_ep_skew_spill"]:
        checks["spill_bound"] = spill_check(runs["mop_ep_skew_spill"], args.spill_factor)

    result = {"settings": vars(args), "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                                  "cpus": os.cpu_count(), "platform": platform.platform()},
              "git": {"before": git_before, "after": git_state()},
              "wall_s": time.perf_counter() - start, "checks": checks, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return print_result(result, args.out)


def print_result(result: dict[str, Any], path: str) -> int:
    """Print the tables of a result (as saved); 1 if a run failed or the spill bound was missed."""
    args = argparse.Namespace(**result["settings"])
    runs, checks = result["runs"], result["checks"]
    print(f"\n{args.model} on {args.nproc} CPU ranks (gloo), global batch [{args.batch}, {args.seq_len}], "
          f"{args.steps} steps, ep={args.ep}; memory: live storages per rank, max over ranks (min when ranks "
          f"differ); expert load: rank 0's EP group, last step, max over MoE layers (min)")
    own = {n: runs[n] for n in BALANCED if n in runs}
    skewed = {n: runs[n] for n in SKEWED if n in runs}
    if own:
        print("\nthe preset's own routing (untrained router)\n")
        print(format_comparison(own, "mop" if "mop" in own else None))
    if skewed:
        print(f"\nskewed routing (--skew-experts {args.skew_experts}: every token picks among experts "
              f"0..{args.skew_experts - 1}); spilling: --expert-spill-factor {args.spill_factor} "
              f"--expert-spill-slots {args.spill_slots}\n")
        print(format_comparison(skewed, "fsdp2_skew" if "fsdp2_skew" in skewed else None))
        print("\nper rank\n")
        print(format_per_rank(skewed))
    if "spill_bound" in checks:
        c = checks["spill_bound"]
        worst = max(c["layers"].values(), key=lambda v: v["max_rows"] - v["bound"])
        print(f"\nspill bound ceil({c['factor']} * mean rows per rank) met in every MoE layer: {c['bound_met']} "
              f"(busiest rank {worst['max_rows']} rows, bound {worst['bound']})")
    print(f"\nwall {result['wall_s']:.0f}s; results: {path}")
    failed = any("error" in r for r in runs.values()) or ("spill_bound" in checks and not checks["spill_bound"]["bound_met"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
