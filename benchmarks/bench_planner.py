"""The planner against measurement: estimated vs measured per-rank peak memory.

    python benchmarks/bench_planner.py                 # every configuration below
    python benchmarks/bench_planner.py --only tiny     # the ones whose name contains "tiny"
    python benchmarks/bench_planner.py --from-results benchmarks/results/memory_passes_seq256.json

`--re-estimate` runs nothing either: it recomputes the estimates of the rows in --out
with the current planner and keeps their measured numbers (the runs' commit stays in
the JSON as `git_of_runs`).

`--from-results PATH` runs nothing: it estimates every mop run of an existing
`bench_dense_parallel.py` result JSON (layouts with `--tp`, `--ep`, `--offload experts`,
`--optimizer-offload`; `offload="auto"` and the baselines are skipped) and compares with
the memory those runs measured, device tier and host tier (offloaded activations,
`HostAdamW`'s state and master copies). The host table also shows the estimate at the
run's own routing (its `expert_load`: the most rows any EP rank received over all MoE
layers / the mean), next to the planner's p99 uniform-router skew.

The rows with `cp` and `param_dtype` run `mopc train --cp C` and `--param-dtype bf16`; their
estimates are the planner's context-parallel and mixed-precision models (estimate.py).
`--only "w2 cp2,w2 bf16"` runs the configurations whose name contains either part.

For each configuration: `mopc train --nproc W ... --json` runs on real gloo ranks and
reports each rank's live-storage memory (`mopc/runtime/memory.py`: parameters, gradients,
AdamW state, saved activations; `peak` is their largest sum over the step). The planner
estimates the same quantity (`Estimate.live_peak`: params + optimizer + max(activations,
grads)) from exact shard sizes and from probes of the compiled program on fake tensors at
a reduced depth (1 dense + 1 MoE layer, 64 tokens), scaled to the run's depth and tokens.
Nothing is fitted to the measured numbers: the estimate is computed without reading them.
Expert-parallel runs route real tokens; the estimate scales received rows by the p99
routing skew of a uniform multinomial, and the table shows the measured max over ranks.

Prints a table and writes JSON (default benchmarks/results/planner_validation.json, or
benchmarks/results/planner_validation_<stem of PATH>.json with --from-results).
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

# name, model, world, global batch, seq_len, tp, ep[, {cp, param_dtype}]
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
    # context parallelism and mixed precision (mopc train --cp, --param-dtype)
    ("tiny w2 cp2", "tiny", 2, 8, 64, 1, 1, {"cp": 2}),
    ("tiny w2 bf16", "tiny", 2, 8, 64, 1, 1, {"param_dtype": "bf16"}),
    ("small w2 s256", "small", 2, 4, 256, 1, 1),
    ("small w2 cp2 s256", "small", 2, 4, 256, 1, 1, {"cp": 2}),
    ("small w2 bf16 s256", "small", 2, 4, 256, 1, 1, {"param_dtype": "bf16"}),
    ("small w2 cp2 bf16 s256", "small", 2, 4, 256, 1, 1, {"cp": 2, "param_dtype": "bf16"}),
    ("small w4 cp2 ep2 s256", "small", 4, 4, 256, 1, 2, {"cp": 2}),
    # pipeline parallelism (mopc train --pp P --microbatches M [--schedule gpipe]): written to
    # planner_validation_pp.json with --only pp --out benchmarks/results/planner_validation_pp.json
    ("tiny w2 pp2", "tiny", 2, 8, 64, 1, 1, {"pp": 2, "microbatches": 4}),
    ("tiny w2 pp2 gpipe", "tiny", 2, 8, 64, 1, 1, {"pp": 2, "microbatches": 4, "schedule": "gpipe"}),
    ("tiny w2 pp2 act-off", "tiny", 2, 8, 64, 1, 1, {"pp": 2, "microbatches": 4, "offload_activations": True}),
    ("tiny w4 pp2 tp2", "tiny", 4, 8, 64, 2, 1, {"pp": 2, "microbatches": 4}),
    ("tiny w4 pp2 ep2", "tiny", 4, 8, 64, 1, 2, {"pp": 2, "microbatches": 4}),
    ("small w2 pp2", "small", 2, 4, 128, 1, 1, {"pp": 2, "microbatches": 2}),
    ("small w4 pp4", "small", 4, 4, 128, 1, 1, {"pp": 4, "microbatches": 4}),
    ("small w4 pp2 ep2 act-off", "small", 4, 4, 128, 1, 2, {"pp": 2, "microbatches": 2, "offload_activations": True}),
    # full activation recompute (mopc train --recompute full)
    ("small w2 rc-full s256", "small", 2, 4, 256, 1, 1, {"recompute": "full"}),
    ("tiny w2 pp2 rc-full", "tiny", 2, 8, 64, 1, 1, {"pp": 2, "microbatches": 4, "recompute": "full"}),
)

_ESTIMATE_KEYS = ("cp", "param_dtype", "pp", "microbatches", "schedule", "offload_activations", "recompute")


def _flags(more: dict) -> list[str]:
    """`mopc train` flags of a configuration's extra layout fields."""
    out = []
    for k, v in more.items():
        if k == "offload_activations":
            out += ["--offload", "experts"] if v else []
        else:
            out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="steps per run (the peak is reached from step 2 on)")
    p.add_argument("--only", default="", help="run the configurations whose name contains this (A,B: either)")
    p.add_argument("--out", default=None, help="JSON to write (see above for the default)")
    p.add_argument("--from-results", default=None, metavar="PATH",
                   help="validate against the mop runs of an existing bench_dense_parallel.py JSON; run nothing")
    p.add_argument("--render", action="store_true", help="only print the table of the JSON at --out again")
    p.add_argument("--re-estimate", action="store_true",
                   help="recompute the estimates of the rows in --out (measured numbers kept); run nothing")
    p.add_argument("--runs-dir", default=None, metavar="DIR",
                   help="keep each run's report in DIR and reuse a report already there (default: a temporary dir)")
    args = p.parse_args()
    if args.out is None:
        args.out = (f"benchmarks/results/planner_validation_{Path(args.from_results).stem}.json"
                    if args.from_results else "benchmarks/results/planner_validation.json")
    if args.render:
        rows = json.loads(Path(args.out).read_text())["rows"]
        print("\n".join(_table(rows) + _host_table(rows) + _routed_table(rows) + _stage_table(rows)))
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.from_results:
        _write(_rows_from_results(Path(args.from_results), args.only), Path(args.out))
        return
    if args.re_estimate:
        doc = json.loads(Path(args.out).read_text())
        _write([_re_estimate(r) for r in doc["rows"]], Path(args.out),
               git_of_runs=doc.get("git_of_runs", doc.get("git")))
        return
    from mopc.planner import estimate_layout

    rows = []
    with tempfile.TemporaryDirectory(prefix="mopc_bench_planner_") as tmp:
        if args.runs_dir:
            tmp = args.runs_dir
            Path(tmp).mkdir(parents=True, exist_ok=True)
        for name, model, world, batch, seq, tp, ep, *extra in CONFIGS:
            if not any(part in name for part in args.only.split(",")):
                continue
            more = extra[0] if extra else {}
            start = time.perf_counter()
            est = estimate_layout(model, world=world, tp=tp, ep=ep, global_batch=batch, seq_len=seq, **more)
            est_s = time.perf_counter() - start
            flags = [f for f, v in (("--tp", tp), ("--ep", ep)) if v > 1 for f in (f, str(v))]
            flags += _flags(more)
            run_args = SimpleNamespace(nproc=world, model=model, steps=args.steps, batch=batch, seq_len=seq,
                                       seed=0, lr=3e-3)
            report = _reuse(name, run_args, Path(tmp), flags) if args.runs_dir else None
            report = report or run_train(name, run_args, Path(tmp), flags)
            if "error" in report:
                rows.append({"name": name, "error": report["error"], "command": report["command"]})
                continue
            per_rank = report["memory"]["per_rank"]
            measured = max(m["peak"] for m in per_rank)
            cats = {k: max(m.get(k, 0) for m in per_rank)
                    for k in ("params", "grads", "optimizer", "activations_peak", "host_peak", "optimizer_host")}
            rows.append({
                "name": name, "command": report["command"], "world": world, "tp": tp, "ep": ep, **more,
                "global_batch": batch, "seq_len": seq,
                "estimated": {"params": est.params, "grads": est.grads, "optimizer": est.optimizer,
                              "activations": est.activations, "peak": est.live_peak,
                              "host_activations": est.host_activations, "host_optimizer": est.host_optimizer,
                              "transient_not_measured": est.transient},
                "estimated_at_run_routing": {"skew": None, "host_activations": est.host_activations},
                "measured": {**cats, "peak_max_over_ranks": measured,
                             "peak_min_over_ranks": min(m["peak"] for m in per_rank)},
                "error_pct": 100.0 * (est.live_peak - measured) / measured,
                "estimate_s": est_s,
                **_stage_rows(est, per_rank, world, more.get("pp", 1)),
            })
    _write(rows, Path(args.out))


def _reuse(name: str, run_args: SimpleNamespace, out_dir: Path, flags: list[str]) -> dict | None:
    """The report `run_train` wrote for this configuration in an earlier run, if any."""
    path = out_dir / f"{name.replace('@', '_r').replace(' ', '_')}.json"
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    a = run_args
    report["command"] = (f"mopc train --nproc {a.nproc} --model {a.model} --steps {a.steps} --batch {a.batch} "
                         f"--seq-len {a.seq_len} --seed {a.seed} --lr {a.lr} --quiet " + " ".join(flags)).rstrip()
    print(f"\n== {name}: reusing {path}", flush=True)
    return report


def _stage_rows(est: object, per_rank: list[dict], world: int, pp: int) -> dict:
    """Under pipeline parallelism, each stage's estimate next to its pipeline rank's measurement
    (max over the ranks of that stage; pipeline rank = rank // (world / pp))."""
    if pp <= 1:
        return {}
    ranks = world // pp
    out = []
    for st in est.stages:
        mine = [m for m in per_rank if m["rank"] // ranks == st["stage"]]
        out.append({"stage": st["stage"], "dense_layers": st["dense_layers"], "moe_layers": st["moe_layers"],
                    "estimated": {k: st[k] for k in ("params", "grads", "optimizer", "activations",
                                                     "host_activations", "live_peak")},
                    "measured": {k: max(m[k] for m in mine) for k in ("params", "grads", "optimizer",
                                                                       "activations_peak", "host_peak", "peak")}})
    return {"stages": out}


def _write(rows: list[dict], out: Path, **extra: object) -> None:
    lines = _table(rows) + _host_table(rows) + _routed_table(rows) + _stage_table(rows)
    print("\n" + "\n".join(lines))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "table": lines, "git": git_state(), **extra}, indent=2) + "\n")
    print(f"wrote {out}")


def _re_estimate(row: dict) -> dict:
    """`row` (measured earlier) with the current planner's estimate."""
    from mopc.planner import estimate_layout

    if "error" in row:
        return row
    words = row["command"].split()
    model = words[words.index("--model") + 1]
    start = time.perf_counter()
    more = {k: row[k] for k in _ESTIMATE_KEYS if k in row}
    est = estimate_layout(model, world=row["world"], tp=row["tp"], ep=row["ep"], global_batch=row["global_batch"],
                          seq_len=row["seq_len"], **more)
    measured = row["measured"]["peak_max_over_ranks"]
    stages = row.get("stages")
    if stages:
        for old, new in zip(stages, est.stages, strict=True):
            old["estimated"] = {k: new[k] for k in old["estimated"]}
    routed = {"estimated_at_run_routing": {"skew": None, "host_activations": est.host_activations}} \
        if "estimated_at_run_routing" in row else {}
    return {**row, **routed,
            "estimated": {"params": est.params, "grads": est.grads, "optimizer": est.optimizer,
                          "activations": est.activations, "peak": est.live_peak,
                          "host_activations": est.host_activations, "host_optimizer": est.host_optimizer},
            "error_pct": 100.0 * (est.live_peak - measured) / measured, "estimate_s": time.perf_counter() - start}


_LAYOUT_OPTIONS = {"tp", "ep", "offload", "optimizer_offload"}


def _routing_skew(report: dict, ep: int) -> float | None:
    """The run's own routing: max over EP ranks of the rows it received in all MoE layers / the mean."""
    load = report.get("expert_load") or {}
    per_layer = [v["rows_per_rank"] for v in load.values() if len(v.get("rows_per_rank", ())) == ep]
    if ep <= 1 or not per_layer:
        return None
    totals = [sum(rows[r] for rows in per_layer) for r in range(ep)]
    mean = sum(totals) / ep
    return max(totals) / mean if mean else None


def _rows_from_results(path: Path, only: str) -> list[dict]:
    """Rows for the mop runs of a `bench_dense_parallel.py` result JSON (nothing is run)."""
    from mopc.planner import estimate_layout

    doc = json.loads(path.read_text())
    settings = doc["settings"]
    model, batch, seq = settings["model"], settings["batch"], settings["seq_len"]
    rows = []
    for run, report in doc["runs"].items():
        cfg = report.get("config", {})
        opts = cfg.get("mop_options") or {}
        if cfg.get("backend") != "mop" or cfg.get("baseline") or only not in run:
            continue
        if set(opts) - _LAYOUT_OPTIONS or opts.get("offload", "experts") != "experts":
            continue  # offload="auto" picks per tensor under a budget: not a planner layout
        world, tp, ep = report["world_size"], opts.get("tp", 1), opts.get("ep", 1)
        layout = {"world": world, "tp": tp, "ep": ep, "global_batch": batch, "seq_len": seq,
                      "offload_activations": opts.get("offload") == "experts",
                      "offload_optimizer": bool(opts.get("optimizer_offload"))}
        start = time.perf_counter()
        est = estimate_layout(model, **layout)
        est_s = time.perf_counter() - start
        skew = _routing_skew(report, ep)
        routed = estimate_layout(model, **layout, skew=skew) if skew else est
        per_rank = report["memory"]["per_rank"]
        peak = max(m["peak"] for m in per_rank)
        cats = {k: max(m.get(k, 0) for m in per_rank)
                for k in ("params", "grads", "optimizer", "activations_peak", "host_peak", "optimizer_host")}
        flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in opts.items()]
        name = " ".join([model, f"w{world}", *(f"{k}{v}" for k, v in (("tp", tp), ("ep", ep)) if v > 1),
                         *(["act-off"] if layout["offload_activations"] else []),
                         *(["opt-off"] if layout["offload_optimizer"] else []), f"s{seq}"])
        rows.append({
            "name": name, "source": f"{path}: runs[{run!r}]",
            "command": f"mopc train --nproc {world} --model {model} --batch {batch} --seq-len {seq} "
                       f"--steps {settings.get('steps')} {' '.join(flags)}".rstrip(),
            "world": world, "tp": tp, "ep": ep, "global_batch": batch, "seq_len": seq,
            "offload_activations": layout["offload_activations"], "offload_optimizer": layout["offload_optimizer"],
            "estimated": {"params": est.params, "grads": est.grads, "optimizer": est.optimizer,
                          "activations": est.activations, "peak": est.live_peak,
                          "host_activations": est.host_activations, "host_optimizer": est.host_optimizer},
            "estimated_at_run_routing": {"skew": skew, "activations": routed.activations, "peak": routed.live_peak,
                                         "host_activations": routed.host_activations},
            "measured": {**cats, "peak_max_over_ranks": peak, "peak_min_over_ranks": min(m["peak"] for m in per_rank),
                         "host_peak_min_over_ranks": min(m.get("host_peak", 0) for m in per_rank)},
            "error_pct": 100.0 * (est.live_peak - peak) / peak,
            "estimate_s": est_s,
        })
    return rows


def _table(rows: list[dict]) -> list[str]:
    w = max([24, *(len(r["name"]) for r in rows)])
    header = (f"{'configuration':{w}} {'params+opt':>10} {'est. act.':>10} {'meas. act.':>10} {'act. err':>8} "
              f"{'est. peak':>10} {'meas. peak':>10} {'peak err':>8}")
    lines = ["per-rank memory, MiB (live storages; measured = max over ranks; params+opt exact in every row)",
             header, "-" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:{w}} run failed: {r['error']}")
            continue
        e, m = r["estimated"], r["measured"]
        act_err = 100.0 * (e["activations"] - m["activations_peak"]) / m["activations_peak"]
        lines.append(f"{r['name']:{w}} {mib(e['params'] + e['optimizer']):>10} {mib(e['activations']):>10} "
                     f"{mib(m['activations_peak']):>10} {act_err:>+7.1f}% {mib(e['peak']):>10} "
                     f"{mib(m['peak_max_over_ranks']):>10} {r['error_pct']:>+7.1f}%")
    ok = [r for r in rows if "error" not in r]
    if ok:
        worst = max(abs(r["error_pct"]) for r in ok)
        lines.append(f"worst |peak error| {worst:.1f}% over {len(ok)} configurations")
    return lines


def _err(est: float, meas: float) -> str:
    return f"{100.0 * (est - meas) / meas:>+7.1f}%" if meas else f"{'-':>8}"


def _host_table(rows: list[dict]) -> list[str]:
    """Host tier: offloaded activations (measured: `host_peak`) and optimizer state (`optimizer_host`)."""
    rows = [r for r in rows if "error" not in r and (r.get("offload_activations") or r.get("offload_optimizer"))]
    if not rows:
        return []
    w = max([24, *(len(r["name"]) for r in rows)])
    header = (f"{'configuration':{w}} {'est. act.':>10} {'at run rt.':>10} {'meas. act.':>10} {'act. err':>8} "
              f"{'est. opt.':>10} {'meas. opt.':>10} {'opt. err':>8}")
    lines = ["", "host tier, MiB (measured = max over ranks; 'at run rt.' = the estimate at the run's own routing skew)",
             header, "-" * len(header)]
    for r in rows:
        e, m, routed = r["estimated"], r["measured"], r["estimated_at_run_routing"]
        act = (f"{mib(e['host_activations']):>10} {mib(routed['host_activations']):>10} {mib(m['host_peak']):>10} "
               f"{_err(e['host_activations'], m['host_peak'])}")
        opt = f"{mib(e['host_optimizer']):>10} {mib(m['optimizer_host']):>10} {_err(e['host_optimizer'], m['optimizer_host'])}"
        lines.append(f"{r['name']:{w}} {act} {opt}")
    return lines


def _routed_table(rows: list[dict]) -> list[str]:
    """The device tier estimated at each run's own routing skew (rows from --from-results)."""
    routed = [r for r in rows if "error" not in r and (r.get("estimated_at_run_routing") or {}).get("skew")]
    w = max([24, *(len(r["name"]) for r in routed)])
    lines = []
    if routed:
        lines += ["", ("device tier at the run's own routing skew (max over EP ranks of rows received in all MoE "
                       "layers / mean), MiB")]
        for r in routed:
            e, m = r["estimated_at_run_routing"], r["measured"]
            lines.append(f"{r['name']:{w}} skew {e['skew']:.2f}: act. {mib(e['activations'])} vs "
                         f"{mib(m['activations_peak'])} ({_err(e['activations'], m['activations_peak']).strip()}), "
                         f"peak {mib(e['peak'])} vs {mib(m['peak_max_over_ranks'])} "
                         f"({_err(e['peak'], m['peak_max_over_ranks']).strip()})")
    return lines


def _stage_table(rows: list[dict]) -> list[str]:
    """Pipeline rows: every stage's estimate against its pipeline rank's measurement."""
    rows = [r for r in rows if "error" not in r and r.get("stages")]
    if not rows:
        return []
    w = max([24, *(len(r["name"]) for r in rows)])
    header = (f"{'configuration':{w}} {'stage':>5} {'layers':>7} {'params':>8} {'p. err':>7} {'est. act.':>10} "
              f"{'meas. act.':>10} {'act. err':>8} {'est. peak':>10} {'meas. peak':>10} {'peak err':>8}")
    lines = ["", "per pipeline stage, MiB (measured = max over the ranks of that stage)", header, "-" * len(header)]
    for r in rows:
        for st in r["stages"]:
            e, m = st["estimated"], st["measured"]
            layers = f"{st['dense_layers']}d+{st['moe_layers']}m"
            lines.append(f"{r['name']:{w}} {st['stage']:>5} {layers:>7} {mib(e['params']):>8} "
                         f"{_err(e['params'], m['params'])} {mib(e['activations']):>10} "
                         f"{mib(m['activations_peak']):>10} {_err(e['activations'], m['activations_peak'])} "
                         f"{mib(e['live_peak']):>10} {mib(m['peak']):>10} {_err(e['live_peak'], m['peak'])}")
    return lines


if __name__ == "__main__":
    main()
