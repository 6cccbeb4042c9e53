"""MoE dispatch/combine kernels (mopc/codegen/triton_dispatch.py) against their torch references.

On CUDA, for each shape (T tokens, hidden D, E experts, top-k, dtype) times every kernel
with `triton.testing.do_bench` (median), checks it against the reference once, and reports
time, bytes moved, achieved GB/s and the fraction of the HBM bandwidth bound (--peak-bw,
default 4.8e12 B/s, an H200). Prints a table and writes JSON (--out, default
benchmarks/results/dispatch_kernels.json). Well under 2 minutes on an H200.

    python benchmarks/bench_dispatch_kernels.py
    python benchmarks/bench_dispatch_kernels.py --tokens 4096 --dims 2048 --experts 64 --peak-bw 3.35e12

Bytes moved are what each kernel must read and write once, with no reuse through caches:
  dispatch_indices: ids [M] int64 read, perm [P] int64 written (M = T*k, P = M + E*(align-1));
  gather:           M token rows read, P rows written (+ perm, + gate);
  combine:          M rows read (+ inverse permutation, weights), T rows written;
  rows_dot_tokens:  M rows and T token rows read, M fp32 values written (the weight gradient).
Without CUDA it prints that no GPU is present, times the torch references at a small shape
on the CPU, and exits 0 (writing JSON only when --out is given).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from mopc.codegen import dispatch as ref

DEFAULT_OUT = "benchmarks/results/dispatch_kernels.json"


def make_inputs(num_tokens: int, dim: int, num_experts: int, top_k: int, align: int, dtype: torch.dtype,
                device: str) -> dict:
    """Top-k of random router scores (distinct experts per token), like a trained router's spread."""
    g = torch.Generator(device=device).manual_seed(0)
    scores = torch.rand(num_tokens, num_experts, generator=g, device=device)
    ids = scores.topk(top_k, dim=-1).indices.reshape(-1).contiguous()
    perm = ref.dispatch_indices_reference(ids, num_experts, align)[0]
    num_slots, num_rows = ids.numel(), perm.numel()
    return {
        "ids": ids, "perm": perm, "inv": ref.inverse_perm_reference(perm, num_slots),
        "x": torch.randn(num_tokens, dim, generator=g, device=device).to(dtype),
        "y": torch.randn(num_rows, dim, generator=g, device=device).to(dtype),
        "gate": torch.rand(num_slots, generator=g, device=device),
    }


def kernel_bytes(name: str, num_tokens: int, dim: int, num_experts: int, top_k: int, align: int, esize: int) -> int:
    num_slots = num_tokens * top_k
    num_rows = num_slots + num_experts * (align - 1)
    if name == "dispatch_indices":
        return 8 * num_slots + 8 * num_rows + 12 * num_experts
    if name.startswith("gather"):
        gate = 4 * num_slots if name == "gather_gate" else 0
        return (num_slots + num_rows) * dim * esize + 8 * num_rows + gate
    if name == "combine":
        return num_slots * dim * esize + 12 * num_slots + num_tokens * dim * esize
    if name == "rows_dot_tokens":
        return (num_slots + num_tokens) * dim * esize + 12 * num_slots
    raise ValueError(name)


def kernel_pairs(inp: dict, num_tokens: int, num_experts: int, top_k: int, align: int) -> dict:
    """name -> (triton callable, torch reference callable); the two must agree."""
    from mopc.codegen import triton_dispatch as td

    ids, perm, inv, x, y, gate = (inp[k] for k in ("ids", "perm", "inv", "x", "y", "gate"))
    return {
        "dispatch_indices": (lambda: td.dispatch_indices(ids, num_experts, align),
                             lambda: ref.dispatch_indices_reference(ids, num_experts, align)),
        "gather": (lambda: td.gather_rows(x, perm, top_k, None),
                   lambda: ref.gather_rows_reference(x, perm, top_k, None)),
        "gather_gate": (lambda: td.gather_rows(x, perm, top_k, gate),
                        lambda: ref.gather_rows_reference(x, perm, top_k, gate)),
        "combine": (lambda: td.combine_rows(y, inv, gate, num_tokens, top_k),
                    lambda: ref.combine_rows_reference(y, perm, gate, num_tokens, top_k)),
        "rows_dot_tokens": (lambda: td.rows_dot_tokens(y, x, inv, top_k),
                            lambda: ref.rows_dot_tokens_reference(y, x, perm, top_k)),
    }


def max_error(got, want) -> float:
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    worst = 0.0
    for a, b in zip(got, want):
        if not a.is_floating_point():
            worst = max(worst, float((a != b).sum()))  # count of differing indices
            continue
        scale = b.float().abs().max().clamp(min=1e-30)
        worst = max(worst, float((a.float() - b.float()).abs().max() / scale))
    return worst


def bench_cuda(args: argparse.Namespace) -> list[dict]:
    from triton.testing import do_bench

    dtype = getattr(torch, args.dtype)
    rows = []
    for dim in args.dims:
        for num_experts in args.experts:
            inp = make_inputs(args.tokens, dim, num_experts, args.top_k, args.align, dtype, "cuda")
            for name, (kernel, reference) in kernel_pairs(inp, args.tokens, num_experts, args.top_k,
                                                          args.align).items():
                err = max_error(kernel(), reference())
                ms = do_bench(kernel, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")
                ref_ms = do_bench(reference, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")
                nbytes = kernel_bytes(name, args.tokens, dim, num_experts, args.top_k, args.align,
                                      torch.finfo(dtype).bits // 8)
                rows.append({"kernel": name, "tokens": args.tokens, "dim": dim, "experts": num_experts,
                             "top_k": args.top_k, "align": args.align, "dtype": args.dtype, "ms": ms,
                             "torch_ms": ref_ms, "bytes": nbytes, "gb_per_s": nbytes / ms / 1e6,
                             "frac_of_peak_bw": nbytes / (ms * 1e-3) / args.peak_bw,
                             "speedup_vs_torch": ref_ms / ms, "max_err_vs_torch": err})
                del kernel, reference
            del inp
            torch.cuda.empty_cache()
    return rows


def bench_cpu_reference(args: argparse.Namespace) -> list[dict]:
    """Torch references on CPU at a small shape (no kernels: Triton needs a GPU or the interpreter)."""
    num_tokens, dim, num_experts, top_k = 512, 256, 16, 4
    inp = make_inputs(num_tokens, dim, num_experts, top_k, args.align, torch.float32, "cpu")
    ids, perm, x, y, gate = (inp[k] for k in ("ids", "perm", "x", "y", "gate"))
    refs = {
        "dispatch_indices": lambda: ref.dispatch_indices_reference(ids, num_experts, args.align),
        "gather": lambda: ref.gather_rows_reference(x, perm, top_k, None),
        "gather_gate": lambda: ref.gather_rows_reference(x, perm, top_k, gate),
        "combine": lambda: ref.combine_rows_reference(y, perm, gate, num_tokens, top_k),
        "rows_dot_tokens": lambda: ref.rows_dot_tokens_reference(y, x, perm, top_k),
    }
    rows = []
    for name, fn in refs.items():
        times = []
        for _ in range(10):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        rows.append({"kernel": name, "tokens": num_tokens, "dim": dim, "experts": num_experts, "top_k": top_k,
                     "align": args.align, "dtype": "float32", "torch_ms": statistics.median(times) * 1e3})
    return rows


def print_table(rows: list[dict]) -> None:
    if "ms" in rows[0]:
        print(f"{'kernel':17s} {'D':>5s} {'E':>4s} {'triton ms':>10s} {'torch ms':>9s} {'speedup':>8s} "
              f"{'MB':>8s} {'GB/s':>7s} {'of peak':>8s} {'max err':>9s}")
        for r in rows:
            print(f"{r['kernel']:17s} {r['dim']:5d} {r['experts']:4d} {r['ms']:10.4f} {r['torch_ms']:9.4f} "
                  f"{r['speedup_vs_torch']:7.2f}x {r['bytes'] / 1e6:8.1f} {r['gb_per_s']:7.0f} "
                  f"{r['frac_of_peak_bw']:8.1%} {r['max_err_vs_torch']:9.2e}")
    else:
        print(f"{'kernel':17s} {'T':>5s} {'D':>5s} {'E':>4s} {'k':>2s} {'torch ms (CPU)':>15s}")
        for r in rows:
            print(f"{r['kernel']:17s} {r['tokens']:5d} {r['dim']:5d} {r['experts']:4d} {r['top_k']:2d} "
                  f"{r['torch_ms']:15.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--dims", type=int, nargs="+", default=[4096, 7168])
    parser.add_argument("--experts", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--align", type=int, default=1, help="pad each expert's rows to a multiple of this")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--peak-bw", type=float, default=4.8e12, help="HBM bandwidth bound, bytes/s (H200: 4.8e12)")
    parser.add_argument("--warmup-ms", type=int, default=10)
    parser.add_argument("--rep-ms", type=int, default=40)
    parser.add_argument("--out", default=None, help=f"JSON path (default on CUDA: {DEFAULT_OUT})")
    args = parser.parse_args()

    result = {"torch": torch.__version__, "python": platform.python_version(), "peak_bw": args.peak_bw}
    if not torch.cuda.is_available():
        print("no CUDA GPU present: the Triton kernels are not timed; torch references on CPU, small shape:")
        result["device"] = "cpu"
        result["rows"] = bench_cpu_reference(args)
        print_table(result["rows"])
        out = args.out
    else:
        import triton

        result.update(device=torch.cuda.get_device_name(), triton=triton.__version__)
        result["rows"] = bench_cuda(args)
        print(f"{result['device']}, T={args.tokens}, k={args.top_k}, align={args.align}, {args.dtype}, "
              f"bandwidth bound {args.peak_bw / 1e12:.2f} TB/s")
        print_table(result["rows"])
        out = args.out or DEFAULT_OUT
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
