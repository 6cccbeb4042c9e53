"""The planner against measurement: estimated vs measured per-rank peak memory.

    python benchmarks/bench_planner.py                 # every configuration below
    python benchmarks/bench_planner.py --only tiny     # the ones whose name contains "tiny"

For each configuration: `mopc train --nproc W ... --json` runs on real gloo ranks and
reports each rank's live-storage memory (`mopc/runtime/memory.py`: parameters, gradients,
AdamW state, saved activations; `peak` is their largest sum over the step). The planner
estimates the same quantity (`Estimate.live_peak`: params + optimizer + max(activations,
grads)) from exact shard sizes and from probes of the compiled program on fake tensors at
a reduced depth (1 dense + 1 MoE layer, 64 tokens), scaled to the run's depth and tokens.
Nothing is fitted to the measured numbers: the estimate is computed without reading them.
Expert-parallel runs route real tokens; the estimate scales received rows by the p99
routing skew of a uniform multinomial, and the table shows the measured max over ranks.

Prints a table and writes JSON (default benchmarks/results/planner_validation.json).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from _report import git_state, mib, run_train

# name, model, world, global batch, seq_len, tp, ep
CONFIGS = (
    ("tiny w2", "tiny", 2, 8, 64, 1, 1),
    ("tiny w2 tp2", "tiny", 2, 8, 64, 2, 1),
    ("tiny w2 ep2", "tiny", 2, 8, 64, 1, 2),
    ("tiny w4 ep4", "tiny", 4, 8, 64, 1, 4),
    ("tiny w4 tp2 ep4", "tiny", 4, 8, 64, 2, 4),
    ("tiny w4 tp4", "tiny", 4, 16, 64, 4, 1),
    ("small w2", "small", 2, 4, 128, 1, 1),
    ("small w4 tp2", "small", 4, 8, 128, 2, 1),
    ("small w4 ep4", "small", 4, 8, 128, 1, 4),
    ("small w2 tp2 ep2 s256", "small", 2, 4, 256, 2, 2),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="steps per run (the peak is reached from step 2 on)")
    p.add_argument("--only", default="", help="run the configurations whose name contains this")
    p.add_argument("--out", default="benchmarks/results/planner_validation.json")
    p.add_argument("--render", action="store_true", help="only print the table of the JSON at --out again")
    args = p.parse_args()
    if args.render:
        rows = json.loads(Path(args.out).read_text())["rows"]
        print("\n".join(_table(rows)))
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from mopc.planner import estimate_layout

    rows = []
    with tempfile.TemporaryDirectory(prefix="mopc_bench_planner_") as tmp:
        for name, model, world, batch, seq, tp, ep in CONFIGS:
            if args.only not in name:
                continue
            start = time.perf_counter()
            est = estimate_layout(model, world=world, tp=tp, ep=ep, global_batch=batch, seq_len=seq)
            est_s = time.perf_counter() - start
            flags = [f for f, v in (("--tp", tp), ("--ep", ep)) if v > 1 for f in (f, str(v))]
            run_args = SimpleNamespace(nproc=world, model=model, steps=args.steps, batch=batch, seq_len=seq,
                                       seed=0, lr=3e-3)
            report = run_train(name, run_args, Path(tmp), flags)
            if "error" in report:
                rows.append({"name": name, "error": report["error"], "command": report["command"]})
                continue
            per_rank = report["memory"]["per_rank"]
            measured = max(m["peak"] for m in per_rank)
            cats = {k: max(m[k] for m in per_rank) for k in ("params", "grads", "optimizer", "activations_peak")}
            rows.append({
                "name": name, "command": report["command"], "world": world, "tp": tp, "ep": ep,
                "global_batch": batch, "seq_len": seq,
                "estimated": {"params": est.params, "grads": est.grads, "optimizer": est.optimizer,
                              "activations": est.activations, "peak": est.live_peak},
                "measured": {**cats, "peak_max_over_ranks": measured,
                             "peak_min_over_ranks": min(m["peak"] for m in per_rank)},
                "error_pct": 100.0 * (est.live_peak - measured) / measured,
                "estimate_s": est_s,
            })
    lines = _table(rows)
    print("\n" + "\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "table": lines, "git": git_state()}, indent=2) + "\n")
    print(f"wrote {out}")


def _table(rows: list[dict]) -> list[str]:
    header = (f"{'configuration':24} {'params+opt':>10} {'est. act.':>10} {'meas. act.':>10} {'act. err':>8} "
              f"{'est. peak':>10} {'meas. peak':>10} {'peak err':>8}")
    lines = ["per-rank memory, MiB (live storages; measured = max over ranks; params+opt exact in every row)",
             header, "-" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:24} run failed: {r['error']}")
            continue
        e, m = r["estimated"], r["measured"]
        act_err = 100.0 * (e["activations"] - m["activations_peak"]) / m["activations_peak"]
        lines.append(f"{r['name']:24} {mib(e['params'] + e['optimizer']):>10} {mib(e['activations']):>10} "
                     f"{mib(m['activations_peak']):>10} {act_err:>+7.1f}% {mib(e['peak']):>10} "
                     f"{mib(m['peak_max_over_ranks']):>10} {r['error_pct']:>+7.1f}%")
    ok = [r for r in rows if "error" not in r]
    if ok:
        worst = max(abs(r["error_pct"]) for r in ok)
        lines.append(f"worst |peak error| {worst:.1f}% over {len(ok)} configurations")
    return lines


if __name__ == "__main__":
    main()
