"""Command line: `mopc explain`, `mopc train` and `mopc export` (also `python -m mopc ...`)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
import types
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from mopc.runtime.trainer import TrainSettings

log = logging.getLogger("mopc")


def _build(name: str, device: str, seed: int):
    from mopc.models.presets import PRESETS, build_model

    if name not in PRESETS:
        raise SystemExit(f"--model {name!r} is not a preset; choose one of {', '.join(PRESETS)}")
    return build_model(name, device=device, seed=seed)


def _default_seq_len(model: str) -> int:
    from mopc.models.presets import PRESETS

    return min(128, PRESETS[model].max_seq_len) if model in PRESETS else 128


def _example_inputs(model, batch: int, seq_len: int, device: str) -> dict:
    vocab = model.config.vocab_size
    ids = torch.zeros(batch, seq_len, dtype=torch.long, device=device) if device == "meta" else \
        torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def cmd_explain(args: argparse.Namespace) -> int:
    if mop_options(args) and args.nproc is None and not args.html:
        raise SystemExit(f"mopc explain: {', '.join('--' + k.replace('_', '-') for k in mop_options(args))} "
                         "describe(s) a parallelized program; add --nproc N for its plan report")
    if args.nproc is not None or args.html:  # the plan report of the parallelized program
        from mopc.config import MoPConfigError
        from mopc.report import build_report
        from mopc.report_html import render_html

        try:
            report = build_report(args.model, args.nproc or 1, mop_options(args), rank=args.rank,
                                  batch=args.batch, seq_len=args.seq_len, seed=args.seed,
                                  dump_dir=args.dump_dir or None)
        except (MoPConfigError, ValueError, RuntimeError) as err:
            raise SystemExit(f"mopc explain: {err}") from None
        print(report.text(params=args.params), end="")
        if args.dump_dir:
            print(f"pass dumps: {os.path.abspath(args.dump_dir)}/")
        if args.html:
            with open(args.html, "w", encoding="utf-8") as f:
                f.write(render_html(report))
            print(f"html report: {os.path.abspath(args.html)}")
        return 0
    from mopc.analysis import analyze
    from mopc.config import MoPConfig
    from mopc.passes.pipeline import PassContext, build_pipeline

    big = args.model not in ("tiny", "small")
    device = "meta" if big or args.meta else "cpu"
    model = _build(args.model, device, args.seed)
    inputs = _example_inputs(model, args.batch, args.seq_len, device)
    start = time.perf_counter()
    analysis = analyze(model, inputs)
    print(f"mopc explain: model {args.model} on {device}, batch [{args.batch}, {args.seq_len}], "
          f"analysed in {time.perf_counter() - start:.1f}s\n")
    print(analysis.summary())
    if args.params:
        print()
        for fqn, role in analysis.param_roles.items():
            print(f"  {fqn:60s} {role:16s} {analysis.roles.evidence.get(fqn, '')}")
    if args.dump_dir:
        config = MoPConfig(dump_dir=args.dump_dir)
        pipeline = build_pipeline(config)
        traced = analysis.traced
        ctx = PassContext(config=config, example_inputs=(), param_fqns=traced.param_fqns,
                          trainable=traced.trainable, num_fwd_outputs=traced.num_fwd_outputs,
                          graph_id=f"explain_{args.model}")
        writer = pipeline.make_writer(ctx)
        pipeline.run(traced.gm, ctx, writer)
        print(f"\npass dumps ({', '.join(pipeline.names)}): {writer.dir}/")
    return 0


# ---------------------------------------------------------------------------- train

_TRAIN_FLAGS = frozenset({"model", "steps", "seed", "batch", "seq_len", "lr", "backend", "baseline", "json",
                          "quiet", "nproc", "compile_baseline", "verbose", "skew_experts", "save", "save_every",
                          "resume", "memory_timeline"})
"""Trainer flags; a MoPConfig field of the same name would be shadowed (and is not generated)."""

_MOP_DEST = "mop__"


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field (the first sentence), for `--help`."""
    import ast
    import inspect
    import itertools
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, after in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            text = " ".join(after.value.value.split())
            docs[node.target.id] = text.split(". ")[0].rstrip(".").replace("%", "%%")
    return docs


def _comma_tuple(item_type: type) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        return tuple(item_type(part.strip()) for part in text.split(",") if part.strip())

    parse.__name__ = f"comma-separated {item_type.__name__}s"
    return parse


def _flag_kwargs(name: str, hint: Any) -> dict[str, Any]:
    """argparse keywords for a MoPConfig field of type `hint`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        # `X | None`: the flag sets X; leaving it out keeps the default (None).
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _flag_kwargs(name, inner[0])
        raise TypeError(f"MoPConfig.{name}: cannot make a flag for {hint}")
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is typing.Literal:
        return {"type": type(args[0]), "choices": list(args), "metavar": "{" + ",".join(map(str, args)) + "}"}
    if origin is tuple:
        return {"type": _comma_tuple(args[0]), "metavar": "A,B,..."}
    if hint in (int, float, str):
        return {"type": hint, "metavar": name.upper()}
    raise TypeError(f"MoPConfig.{name}: cannot make a flag for {hint}")


_TRAIN_HELP = {
    "cp": "In mopc train: the cp ranks of a group read the same sequences of the global batch "
          "(--batch must be a multiple of W / cp), each holds [batch / (W / cp), seq_len / cp] tokens, and "
          "--seq-len must be divisible by 2*cp.",
}
"""What a MoPConfig flag means for `mopc train`, appended to its generated help."""


def add_mop_options(parser: argparse.ArgumentParser, extra_help: dict[str, str] | None = None) -> None:
    """One flag per `MoPConfig` field (`--foo-bar` for `foo_bar`); unset flags stay unset.
    `extra_help`: more help text for some fields, by field name."""
    from mopc.config import MoPConfig

    group = parser.add_argument_group("mop options (fields of mopc.MoPConfig; only the ones given are passed)")
    hints = typing.get_type_hints(MoPConfig)
    docs = _field_docs(MoPConfig)
    for f in dataclasses.fields(MoPConfig):
        if f.name in _TRAIN_FLAGS:
            log.warning("MoPConfig.%s is shadowed by the trainer flag of the same name", f.name)
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{docs.get(f.name, '')} (default: {default!r})".strip()
        if extra_help and f.name in extra_help:
            help_text += ". " + extra_help[f.name].replace("%", "%%")
        group.add_argument("--" + f.name.replace("_", "-"), dest=_MOP_DEST + f.name, default=argparse.SUPPRESS,
                           help=help_text, **_flag_kwargs(f.name, hints[f.name]))


def mop_options(args: argparse.Namespace) -> dict[str, Any]:
    """The MoPConfig fields set on the command line, by field name."""
    return {k[len(_MOP_DEST):]: v for k, v in vars(args).items() if k.startswith(_MOP_DEST)}


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    """TrainSettings from parsed `mopc train` arguments; MoPConfig options validated here."""
    from mopc.config import MoPConfig
    from mopc.runtime.trainer import TrainSettings

    options = mop_options(args)
    MoPConfig.from_options(options)  # a bad value fails before any process starts
    return TrainSettings(model=args.model, steps=args.steps, seed=args.seed, batch=args.batch,
                         seq_len=args.seq_len or _default_seq_len(args.model), lr=args.lr, backend=args.backend, baseline=args.baseline,
                         compile_baseline=args.compile_baseline, json_path=args.json, quiet=args.quiet,
                         skew_experts=args.skew_experts, save_dir=args.save, save_every=args.save_every,
                         resume=args.resume, memory_timeline=args.memory_timeline, mop_options=options)


def _strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def launch_torchrun(nproc: int, train_argv: list[str]) -> int:
    """Run `mopc train` on `nproc` local ranks: torchrun as a subprocess, one thread each."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "mopc", *train_argv]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log.info("launching: %s", " ".join(cmd))
    return subprocess.run(cmd, env=env, check=False).returncode


def cmd_train(args: argparse.Namespace) -> int:
    from mopc.runtime.trainer import (
        TrainSettingsError,
        format_table,
        run_training,
        write_json,
    )

    try:
        settings = settings_from_args(args)
    except ValueError as err:
        raise SystemExit(f"mopc train: {err}") from None
    under_torchrun = "WORLD_SIZE" in os.environ
    if args.nproc is not None and not under_torchrun:
        try:
            settings.validate(args.nproc)
        except TrainSettingsError as err:
            raise SystemExit(f"mopc train: {err}") from None
        return launch_torchrun(args.nproc, _strip_nproc(args.argv))
    if args.nproc is not None and int(os.environ["WORLD_SIZE"]) != args.nproc:
        raise SystemExit(f"mopc train: --nproc {args.nproc} under torchrun with WORLD_SIZE="
                         f"{os.environ['WORLD_SIZE']}; drop --nproc when launching with torchrun yourself")
    from mopc.config import MoPConfigError
    from mopc.runtime.guard import CollectiveError, InputMismatchError, NonFiniteError

    try:
        report = run_training(settings)
    except (TrainSettingsError, MoPConfigError) as err:  # raised on every rank, before any allocation
        raise SystemExit(f"mopc train: {err}") from None
    except (NonFiniteError, InputMismatchError, CollectiveError) as err:  # the message says what and where
        raise SystemExit(f"mopc train: rank {os.environ.get('RANK', '0')}: {err}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"\nmopc train: {settings.model}, {settings.program} (runs as {report['config']['runs_as']}), "
              f"{report['world_size']} rank(s), global batch [{settings.batch}, {settings.seq_len}]"
              + (f", routing skewed to experts 0..{settings.skew_experts - 1}" if settings.skew_experts else ""))
        layout = report["layout"]
        pipeline = f"pp {layout['pp']} x " if layout.get("pp", 1) > 1 else ""
        print(f"layout {pipeline}dp {layout['dp']} x cp {layout['cp']} x tp {layout['tp']}, ep {layout['ep']}; "
              f"each rank holds [{', '.join(map(str, report['rank_batch_shape']))}] tokens"
              + (f" (two of the {2 * layout['cp']} chunks of each sequence)" if layout["cp"] > 1 else ""))
        print(format_table(report))
        dump_dir = settings.mop_options.get("dump_dir")
        if dump_dir and settings.program == "mop":
            print(f"graph dumps, one file per pass (rank 0): {os.path.abspath(dump_dir)}/")
        for path in report.get("memory_timeline_files") or []:
            print(f"memory timeline: {path}")
        if settings.json_path:
            write_json(report, settings.json_path)
            print(f"report: {settings.json_path}")
    return 0


def _add_train_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="train a preset on synthetic data: mop, the eager reference, or a baseline",
                       description="Train a preset on synthetic data on one or several ranks. "
                                   "Run under torchrun, or pass --nproc W to have mopc launch torchrun.")
    p.add_argument("--model", default="tiny", choices=["tiny", "small"], help="model preset")
    p.add_argument("--nproc", type=_positive, default=None,
                   help="launch this many local ranks with torchrun (gloo, OMP_NUM_THREADS=1)")
    p.add_argument("--backend", default="mop", choices=["mop", "eager"],
                   help="mop, or eager: the single-device reference (one process)")
    p.add_argument("--baseline", default=None, choices=["fsdp2", "ddp"], help="train a baseline instead of mop")
    p.add_argument("--compile-baseline", default=True, action=argparse.BooleanOptionalAction,
                   help="compile the baseline with backend='aot_eager' (default) or run it eagerly")
    p.add_argument("--steps", type=_positive, default=10)
    p.add_argument("--batch", type=_positive, default=4,
                   help="global batch; each of W ranks takes batch // W rows (must divide); with --cp C, each "
                        "group of C ranks takes batch // (W // C) rows and each of its ranks two of the 2*C "
                        "chunks of every sequence")
    p.add_argument("--seq-len", type=_positive, default=None,
                   help="tokens per sequence (default: 128, or the model's max_seq_len when smaller)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write the report here (rank 0): config, losses, memory, comm bytes, step time")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--skew-experts", type=_non_negative, default=0, metavar="N",
                   help="force skewed routing: every token picks among experts 0..N-1 (router correction bias "
                        "+1.0 on them; top_k <= N <= num_experts), the same for mop and the baselines "
                        "(default: 0, the model's own routing)")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="save model and optimizer with Distributed Checkpoint under DIR after the last step "
                        "(and every --save-every steps); loadable at any other layout")
    p.add_argument("--save-every", type=_non_negative, default=0, metavar="N",
                   help="also save every N steps (default: 0, only after the last step)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="load the newest checkpoint under DIR (saved at any layout) and continue from its step "
                        "up to --steps")
    p.add_argument("--memory-timeline", default=None, metavar="PATH",
                   help="write each rank's memory by category over the last step to PATH.json and PATH.png "
                        "(the plot needs matplotlib)")
    add_mop_options(p, _TRAIN_HELP)
    p.set_defaults(fn=cmd_train)


def cmd_export(args: argparse.Namespace) -> int:
    from mopc.checkpoint import CheckpointError, export

    try:
        summary = export(args.checkpoint, args.out)
    except CheckpointError as err:
        raise SystemExit(f"mopc export: {err}") from None
    print(f"mopc export: step {summary['step']} of {summary['source']} -> {summary['out']}: "
          f"{summary['tensors']} tensors, {summary['bytes'] / 2**20:.1f} MiB "
          "(load with model.load_state_dict(torch.load(PATH)))")
    return 0


def _add_export_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="consolidate a checkpoint into one file of full tensors for inference",
                       description="Read the newest complete checkpoint under CHECKPOINT (saved by mopc train "
                                   "--save or mopc.checkpoint.save, at any layout) and write the model's full "
                                   "parameters and buffers, under their own names, to OUT with torch.save. "
                                   "Runs in one process.")
    p.add_argument("checkpoint", help="a checkpoint directory (or one of its step_* directories)")
    p.add_argument("out", help="the file to write (e.g. model.pt)")
    p.set_defaults(fn=cmd_export)


def cmd_plan(args: argparse.Namespace) -> int:
    from mopc.planner.search import format_plan, plan

    try:
        result = plan(args.model, gpus=args.gpus, gpu=args.gpu, seq_len=args.seq_len, global_batch=args.global_batch,
                      host_mem_gb=args.host_mem_gb, skew_z=args.skew_z, projections=not args.no_projections)
    except (ValueError, RuntimeError) as err:
        raise SystemExit(f"mopc plan: {err}") from None
    print(format_plan(result), end="")
    if args.json:
        import json

        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result.to_json(), f, indent=2)
        print(f"plan: {os.path.abspath(args.json)}")
    return 0


def _add_plan_parser(sub: Any) -> None:
    p = sub.add_parser("plan", help="choose a layout: per-rank memory and step time of every mixture, on fakes",
                       description="Estimate per-rank memory and step time of every layout mopc can run (and of "
                                   "projections with features it lacks), choose the fastest that fits, and estimate "
                                   "FSDP2 on the same model. Runs on fake tensors and a fake process group.")
    p.add_argument("--model", default="small", help="preset (tiny, small, deepseek-v3, 1t) or PATH.json of "
                                                   "MoEModelConfig fields")
    p.add_argument("--gpus", type=_positive, required=True, help="number of ranks (devices)")
    p.add_argument("--gpu", default="h200", help="hardware: h100, h200 or cpu (this machine)")
    p.add_argument("--seq-len", type=_positive, default=4096)
    p.add_argument("--global-batch", type=_positive, default=None,
                   help="sequences per step (default: one per rank)")
    p.add_argument("--host-mem-gb", type=float, default=None, help="host memory per node, GiB")
    p.add_argument("--skew-z", type=float, default=2.326,
                   help="routing skew percentile as a normal z-score (2.326: p99 of tokens per EP rank)")
    p.add_argument("--no-projections", action="store_true", help="only layouts mopc can run today")
    p.add_argument("--json", default=None, metavar="PATH", help="write candidates, chosen plan and FSDP2 here")
    p.set_defaults(fn=cmd_plan)


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mopc", description="Mixture-of-Parallelisms compiler")
    parser.add_argument("-v", "--verbose", action="store_true", help="log mopc's passes (logger 'mopc')")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("explain", help="classify a model's parameters and nodes; dump the pass pipeline; "
                                       "with --nproc, the plan report of the parallelized program")
    p.add_argument("--model", default="tiny", help="preset: tiny, small, deepseek-v3, 1t")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--meta", action="store_true", help="build on the meta device (no allocation)")
    p.add_argument("--params", action="store_true", help="list every parameter with its role and why")
    p.add_argument("--dump-dir", default="mopc_dumps", help="where pass dumps go ('' to skip)")
    p.add_argument("--nproc", type=_positive, default=None,
                   help="explain the program parallelized over this many ranks (tiny, small): one process plays "
                        "a rank of a fake process group; prints the plan report (--batch is per rank)")
    p.add_argument("--rank", type=_non_negative, default=0, help="the rank whose program the report shows")
    p.add_argument("--html", default=None, metavar="PATH",
                   help="also write the plan report as one self-contained HTML page (implies --nproc 1 if unset)")
    from mopc.report import add_option_flags

    add_option_flags(p, skip=("dump_dir",))
    p.set_defaults(fn=cmd_explain)

    _add_train_parser(sub)
    _add_export_parser(sub)
    _add_plan_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s %(levelname)s: %(message)s")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
