"""Command line: `mopc explain` and `mopc train` (also `python -m mopc ...`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("mopc")


def _build(name: str, device: str, seed: int):  # noqa: ANN202
    from mopc.models.presets import PRESETS, build_model

    if name not in PRESETS:
        raise SystemExit(f"--model {name!r} is not a preset; choose one of {', '.join(PRESETS)}")
    return build_model(name, device=device, seed=seed)


def _example_inputs(model, batch: int, seq_len: int, device: str) -> dict:  # noqa: ANN001
    vocab = model.config.vocab_size
    ids = torch.zeros(batch, seq_len, dtype=torch.long, device=device) if device == "meta" else \
        torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def cmd_explain(args: argparse.Namespace) -> int:
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


def cmd_train(args: argparse.Namespace) -> int:
    from mopc.analysis import analyze
    from mopc.runtime.trainer import train, write_json

    torch.manual_seed(args.seed)
    model = _build(args.model, "cpu", args.seed)
    options = {"dump_dir": args.dump_dir} if args.dump_dir and args.backend == "mop" else None
    n = sum(p.numel() for p in model.parameters())
    print(f"mopc train: model {args.model} ({n / 1e6:.1f}M parameters), backend {args.backend}, "
          f"{args.steps} steps of batch [{args.batch}, {args.seq_len}]", flush=True)
    report = train(model, model_name=args.model, steps=args.steps, batch=args.batch, seq_len=args.seq_len,
                   vocab=model.config.vocab_size, backend=args.backend, options=options, lr=args.lr,
                   seed=args.seed, progress=not args.quiet)
    print(f"\nloss {report.losses[0]:.4f} -> {report.losses[-1]:.4f}; first step (with compile) "
          f"{report.step_seconds[0]:.1f}s; {report.tokens_per_second:,.0f} tokens/s after it")
    print("\nwhat mopc sees in this model (roles, parameters, saved activations, flops per step):\n")
    print(analyze(model, _example_inputs(model, args.batch, args.seq_len, "cpu")).summary())
    if options:
        graphs = sorted(p.name for p in Path(args.dump_dir).iterdir() if p.is_dir())
        print(f"\ngraph dumps, one file per pass: {os.path.abspath(args.dump_dir)}/ ({', '.join(graphs)})")
    if args.json:
        write_json(report, args.json)
        print(f"report: {args.json}")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mopc", description="Mixture-of-Parallelisms compiler")
    parser.add_argument("-v", "--verbose", action="store_true", help="log mopc's passes (logger 'mopc')")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("explain", help="classify a model's parameters and nodes; dump the pass pipeline")
    p.add_argument("--model", default="tiny", help="preset: tiny, small, deepseek-v3, 1t")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--meta", action="store_true", help="build on the meta device (no allocation)")
    p.add_argument("--params", action="store_true", help="list every parameter with its role and why")
    p.add_argument("--dump-dir", default="mopc_dumps", help="where pass dumps go ('' to skip)")
    p.set_defaults(fn=cmd_explain)

    p = sub.add_parser("train", help="train a preset on synthetic data with backend='mop'")
    p.add_argument("--model", default="tiny")
    p.add_argument("--backend", default="mop", help="mop, eager, aot_eager, inductor")
    p.add_argument("--steps", type=_positive, default=10)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dump-dir", default=None, help="write one graph dump per pass here")
    p.add_argument("--json", default=None, help="write the run's report (losses, timings) here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_train)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s %(levelname)s: %(message)s")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
