"""Helpers shared by the benchmark scripts (they run as scripts: `benchmarks/` is on sys.path):
running `mopc train` once per configuration, the git state of a run, and table layout."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MEMORY_ROWS = (("params", "params"), ("grads", "grads"), ("optimizer", "optimizer"),
               ("activations (peak)", "activations_peak"), ("peak", "peak"), ("host tier (peak)", "host_peak"),
               ("optimizer on host", "optimizer_host"),
               ("peak RSS", "peak_rss"))
"""(row label, key of a `mopc train --json` per-rank memory record)."""


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def max_rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def render(names: list[str], rows: list[tuple[str, list[str]]], *, min_col: int, corner: str = "",
           fit_names: bool = False, fit_values: bool = True) -> str:
    """Rows of right-aligned columns, one per configuration in `names`, under a header line."""
    width = max(len(label) for label, _ in rows)
    col = max(min_col, *((len(n) for n in names) if fit_names else ()),
              *((len(v) for _, vals in rows for v in vals) if fit_values else ()))
    lines = [f"{corner:{width}}  " + "  ".join(f"{n:>{col}}" for n in names)]
    lines += [f"{label:{width}}  " + "  ".join(f"{v:>{col}}" for v in vals) for label, vals in rows]
    return "\n".join(lines)


def run_train(name: str, args: Any, out_dir: Path, flags: list[str]) -> dict[str, Any]:
    """One `mopc train --nproc W` run with the shared settings of `args` (nproc, model, steps,
    batch, seq_len, seed, lr) plus `flags`; its JSON report, with the wall time and command."""
    json_path = out_dir / f"{name.replace('@', '_r').replace(' ', '_')}.json"
    cmd = [sys.executable, "-m", "mopc", "train", "--nproc", str(args.nproc), "--model", args.model,
           "--steps", str(args.steps), "--batch", str(args.batch), "--seq-len", str(args.seq_len),
           "--seed", str(args.seed), "--lr", str(args.lr), "--quiet", "--json", str(json_path), *flags]
    shown = "mopc " + " ".join(shlex.quote(c) for c in cmd[3:] if c != str(json_path) and c != "--json")
    print(f"\n== {name}: {shown}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not json_path.exists():
        print(proc.stdout[-6000:])
        return {"error": f"exit code {proc.returncode}", "wall_s": wall, "command": shown}
    report = json.loads(json_path.read_text())
    report["wall_s"] = wall
    report["command"] = shown
    print(f"   done in {wall:.0f}s", flush=True)
    return report


def git_state() -> dict[str, Any]:
    """The commit the runs used, and the files of mopc/ with uncommitted changes."""
    def git(*words: str) -> str:
        out = subprocess.run(["git", *words], capture_output=True, text=True, check=False)
        return out.stdout.strip()

    changed = [line.split(maxsplit=1)[1] for line in git("status", "--porcelain", "--", "mopc").splitlines()]
    return {"commit": git("rev-parse", "HEAD"), "mopc_uncommitted": changed}
