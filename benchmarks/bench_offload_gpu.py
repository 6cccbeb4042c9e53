"""Offload on a GPU: pinned host<->device bandwidth, and peak memory and step time of `small`
with and without each memory pass (one process, `torch.compile(backend="mop")`).

    python benchmarks/bench_offload_gpu.py                      # needs CUDA
    python benchmarks/bench_offload_gpu.py --device cpu --model tiny --steps 2   # the script's own check

Configurations (AdamW unless said):
- `none`: mop, nothing offloaded;
- `experts`: `offload="experts"` (expert activations to pinned host memory on a side stream);
- `optimizer`: `mopc.optim.HostAdamW` with `optimizer_offload` (AdamW state on host,
  updates started in backward);
- `experts+optimizer`: both.

Memory on CUDA is `torch.cuda.max_memory_allocated()` over the timed steps (everything the
caching allocator handed out, not only live storages); on CPU it is mopc's live-storage
accounting (device tier). Step time is the median over the steps after the first two.
Writes benchmarks/results/offload_gpu.json (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

CONFIGS = {
    "none": ({}, False),
    "experts": ({"offload": "experts"}, False),
    "optimizer": ({"optimizer_offload": True}, True),
    "experts+optimizer": ({"offload": "experts", "optimizer_offload": True}, True),
}


def pinned_bandwidth(num_bytes: int, repeats: int = 10) -> dict[str, float]:
    """GB/s of host->device and device->host copies between pinned host and device memory."""
    host = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    out = {}
    for name, (dst, src) in {"h2d_GBps": (dev, host), "d2h_GBps": (host, dev)}.items():
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            dst.copy_(src, non_blocking=True)
        end.record()
        torch.cuda.synchronize()
        out[name] = num_bytes * repeats / (start.elapsed_time(end) / 1e3) / 1e9
    return out


def run_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import mopc.optim
    from mopc.models import PRESETS, build_model
    from mopc.runtime.memory import MemoryTracker
    from mopc.runtime.trainer import synthetic_batch

    options, host_adamw = CONFIGS[name]
    torch._dynamo.reset()
    config = dataclasses.replace(PRESETS[args.model], max_seq_len=max(args.seq_len, PRESETS[args.model].max_seq_len))
    model = build_model(config, device=args.device, seed=0)
    opt = (mopc.optim.HostAdamW if host_adamw else torch.optim.AdamW)(model.parameters(), lr=3e-4)
    step_fn = torch.compile(model, backend="mop", options=options)
    tracker = MemoryTracker(model, opt) if args.device == "cpu" else None
    times, losses = [], []
    for i in range(args.steps):
        batch = {k: v.to(args.device) for k, v in synthetic_batch(i, args.batch, args.seq_len, config.vocab_size, 0).items()}
        if args.device == "cuda" and i == 2:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        if tracker is not None:
            with tracker.step():
                loss = step_fn(**batch)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        else:
            loss = step_fn(**batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    if hasattr(opt, "synchronize"):
        opt.synchronize()
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else tracker.report()["peak"]
    timed = times[2:] if len(times) > 2 else times
    return {"options": options, "host_adamw": host_adamw, "peak_bytes": peak, "step_time_s": statistics.median(timed),
            "losses": losses, "step_seconds": times}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--model", default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--bandwidth-mib", type=int, default=256, help="bytes per pinned copy (MiB)")
    p.add_argument("--out", default="benchmarks/results/offload_gpu.json")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_offload_gpu: no CUDA device here; run it on a GPU (or --device cpu to check the script)")
        return 2
    result: dict[str, Any] = {"settings": vars(args), "torch": torch.__version__, "python": platform.python_version()}
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
        result["bandwidth"] = pinned_bandwidth(args.bandwidth_mib * 2**20)
        print(f"pinned host<->device: {result['bandwidth']['h2d_GBps']:.1f} GB/s H2D, "
              f"{result['bandwidth']['d2h_GBps']:.1f} GB/s D2H")
    runs = {}
    for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
        runs[name] = run_config(name, args)
        r = runs[name]
        print(f"{name:>18}: peak {r['peak_bytes'] / 2**20:9.1f} MiB, step {r['step_time_s'] * 1e3:8.1f} ms, "
              f"final loss {r['losses'][-1]:.4f}", flush=True)
    result["runs"] = runs
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
