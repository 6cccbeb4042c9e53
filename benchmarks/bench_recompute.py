"""recompute="full" vs the partitioner's choice: activations kept for backward and step time.

One process, the `small` preset, live-storage accounting (`MemoryTracker`), forward +
backward + AdamW per step. Prints a table and writes benchmarks/results/recompute.json.

    python benchmarks/bench_recompute.py [--batch 2] [--seq 256] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mopc.models import PRESETS, build_model
from mopc.runtime.memory import MemoryTracker
from mopc.runtime.trainer import synthetic_batch


def measure(recompute: str, batch: int, seq: int, steps: int) -> dict:
    torch._dynamo.reset()
    config = PRESETS["small"]
    model = build_model(config, device="cpu", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = torch.compile(model, backend="mop", options={"recompute": recompute})
    tracker = MemoryTracker(model, opt)
    times, losses = [], []
    for i in range(steps + 1):  # the first step compiles
        start = time.perf_counter()
        with tracker.step():
            loss = step(**synthetic_batch(i, batch, seq, config.vocab_size, 0))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    report = tracker.report()
    return {"recompute": recompute, "activations_peak_bytes": report["activations_peak"],
            "peak_bytes": report["peak"], "step_s_median": statistics.median(times[1:]),
            "first_step_s": times[0], "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "recompute.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [measure(mode, args.batch, args.seq, args.steps) for mode in ("auto", "full")]
    assert rows[0]["losses"] == rows[1]["losses"], "recompute is exact"
    MiB = 2**20
    print(f"small, batch {args.batch}, seq {args.seq}, {torch.get_num_threads()} threads, {args.steps} timed steps")
    for r in rows:
        print(f"  recompute={r['recompute']:<5} activations_peak {r['activations_peak_bytes'] / MiB:8.2f} MiB  "
              f"peak {r['peak_bytes'] / MiB:8.2f} MiB  step {r['step_s_median']:.3f} s")
    result = {"model": "small", "batch": args.batch, "seq": args.seq, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
