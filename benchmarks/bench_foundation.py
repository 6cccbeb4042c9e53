"""Foundation benchmark: what the `mop` backend costs on one process, and how fast analysis is.

Measures, side by side in one run:
- steady-state training-step time of eager vs `backend="mop"` (and `aot_eager` as the
  reference AOT path) on a preset, plus first-call (compile) time;
- `mopc.analyze` time and joint-graph size per preset (large presets on `meta`).

Prints a table and writes JSON (default benchmarks/results/foundation.json).

    python benchmarks/bench_foundation.py --train-model small --steps 4 --batch 2 --seq-len 64
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from mopc.analysis import analyze
from mopc.models.presets import build_model
from mopc.runtime.trainer import synthetic_batch


def time_training(model_name: str, backend: str, steps: int, batch: int, seq_len: int) -> dict:
    torch._dynamo.reset()
    model = build_model(model_name, seed=0)
    run = model if backend == "eager" else torch.compile(model, backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times, losses = [], []
    for step in range(steps + 1):
        data = synthetic_batch(step, batch, seq_len, model.config.vocab_size)
        start = time.perf_counter()
        loss = run(**data)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    steady = times[1:]
    return {"backend": backend, "first_step_s": times[0], "median_step_s": statistics.median(steady),
            "steps_s": steady, "losses": losses}


def time_analysis(model_name: str, batch: int, seq_len: int) -> dict:
    device = "cpu" if model_name in ("tiny", "small") else "meta"
    model = build_model(model_name, device=device, seed=0)
    ids = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    start = time.perf_counter()
    analysis = analyze(model, {"input_ids": ids, "labels": ids})
    seconds = time.perf_counter() - start
    return {"model": model_name, "device": device, "batch": batch, "seq_len": seq_len, "seconds": seconds,
            "joint_graph_nodes": len(analysis.graph.graph.nodes), "num_params": sum(analysis.param_numel.values()),
            "moe_blocks": len(analysis.roles.moe_blocks), "traced_with": analysis.traced.mode,
            "step_flops": analysis.costs.total_flops}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-model", default="small")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--analysis-models", default="tiny,small,deepseek-v3")
    parser.add_argument("--out", default="benchmarks/results/foundation.json")
    args = parser.parse_args()

    result = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
              "train_model": args.train_model, "batch": args.batch, "seq_len": args.seq_len, "training": [],
              "analysis": []}
    # interleave backends so that machine noise hits them alike
    for backend in ("eager", "aot_eager", "mop"):
        result["training"].append(time_training(args.train_model, backend, args.steps, args.batch, args.seq_len))
    eager = result["training"][0]["median_step_s"]
    print(f"training step, {args.train_model}, batch [{args.batch}, {args.seq_len}], {args.steps} steps after the first")
    print(f"{'backend':10s} {'first step s':>13s} {'median step s':>14s} {'vs eager':>9s}  final loss")
    for r in result["training"]:
        r["ratio_vs_eager"] = r["median_step_s"] / eager
        print(f"{r['backend']:10s} {r['first_step_s']:13.2f} {r['median_step_s']:14.3f} {r['ratio_vs_eager']:9.2f}  "
              f"{r['losses'][-1]:.6f}")
    same = all(r["losses"] == result["training"][0]["losses"] for r in result["training"])
    result["losses_identical_across_backends"] = same
    print(f"losses identical across backends: {same}")
    print(f"\n{'analyze':12s} {'device':6s} {'seconds':>8s} {'nodes':>7s} {'params':>10s} {'blocks':>6s}  traced")
    for name in args.analysis_models.split(","):
        seq = 4096 if name not in ("tiny", "small") else args.seq_len
        r = time_analysis(name, 1, seq)
        result["analysis"].append(r)
        print(f"{name:12s} {r['device']:6s} {r['seconds']:8.1f} {r['joint_graph_nodes']:7d} "
              f"{r['num_params'] / 1e9:9.2f}B {r['moe_blocks']:6d}  {r['traced_with']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
