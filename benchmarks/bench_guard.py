"""What failing safely costs: step time with the non-finite guard and the input check on vs off.

    python benchmarks/bench_guard.py --model small --nproc 4 --steps 8 --repeats 2

Runs `mopc train` with the defaults (`nan_guard`, `check_inputs` on) and with both off
(`--no-nan-guard --no-check-inputs`), alternating on/off `--repeats` times so drifts of
this shared machine hit both alike. Reports the median step time (after the first) of each
run, the time each check took inside the guarded runs (`guard_s_per_step`, including its
all-gather, host sync and any wait for a slower rank) and the on/off ratio of the medians.
Prints a table and writes JSON (default benchmarks/results/guard.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from _report import git_state, run_train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", choices=["tiny", "small"])
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/guard.json")
    args = p.parse_args()
    out = Path(args.out)
    layout = ["--ep", str(args.ep)]
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory(prefix="mopc_bench_guard_") as tmp:
        for i in range(args.repeats):
            runs["on"].append(run_train(f"on{i}", args, Path(tmp), layout))
            runs["off"].append(run_train(f"off{i}", args, Path(tmp), [*layout, "--no-nan-guard", "--no-check-inputs"]))
    failed = [r["command"] for rs in runs.values() for r in rs if "error" in r]
    if failed:
        raise SystemExit(f"runs failed: {failed}")
    step = {k: [r["step_time_s"] for r in rs] for k, rs in runs.items()}
    guard = [r["guard_s_per_step"] for r in runs["on"]]
    nan_s = statistics.median(g["nan_guard"] for g in guard)
    input_s = statistics.median(g["input_check"] for g in guard)
    on, off = statistics.median(step["on"]), statistics.median(step["off"])
    same_losses = all(a["losses"] == b["losses"] for a, b in zip(runs["on"], runs["off"], strict=True))
    result = {
        "config": vars(args), "git": git_state(),
        "step_time_s": step, "median_step_time_s": {"on": on, "off": off}, "ratio_on_off": on / off,
        "nan_guard_s_per_step": nan_s, "input_check_s_per_step": input_s,
        "checks_fraction_of_step": (nan_s + input_s) / on,
        "losses_identical_on_off": same_losses,
        "commands": {k: [r["command"] for r in rs] for k, rs in runs.items()},
    }
    print(f"\n{args.model}, {args.nproc} ranks, ep {args.ep}, batch [{args.batch}, {args.seq_len}], "
          f"{args.steps} steps x {args.repeats} runs each")
    print(f"median step time   guard on {on * 1e3:8.1f} ms   off {off * 1e3:8.1f} ms   ratio {on / off:.3f}")
    print(f"inside the checks  non-finite {nan_s * 1e3:.2f} ms, input shapes {input_s * 1e3:.2f} ms per step "
          f"({100 * (nan_s + input_s) / on:.2f}% of a step)")
    print(f"losses identical with and without: {same_losses}")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
