"""The training loop behind `mopc train`: one program per rank, synthetic data, AdamW.

Programs (`TrainSettings.program`):
- `mop`: `mopc.parallelize` (shards at rest, built on `meta` and initialised shard by
  shard) then `torch.compile(backend="mop")`;
- `eager`: the single-device reference, one process, the whole global batch;
- `fsdp2` / `ddp`: the baselines of `mopc.runtime.baselines`.

Data: `--batch` is the *global* batch. Every rank draws the same global batch for a step
and takes its slice of `batch // world` rows, so the mean of the rank losses is the
loss of the whole batch and runs at different world sizes (and the eager reference)
can be compared step by step. Under context parallelism (`--cp C`) the C ranks of a
context-parallel group read the same rows (`batch // (world // C)` of them, the slice of
`mopc.data_parallel_rank`) and each keeps its two chunks of every sequence
(`mopc.shard_sequence`): a rank holds `[batch // (world // C), seq_len // C]` tokens, all
ranks hold equally many, so the mean of the rank losses is still the whole batch's. The data is learnable on purpose (arithmetic token
sequences over the first 256 tokens: each starts at a random token and steps by a random
stride), so the loss visibly falls within a few steps.

Forced skew (`--skew-experts N`): the preset is built with a router correction bias and,
before the first step and identically for every program, the bias of experts 0..N-1 is
set to +1.0 (0 elsewhere). Router scores lie in [0, 1], so every token picks its top_k
experts among those N: the worst case for expert parallelism (with `ep` ranks and
N <= E / ep, the first rank of every EP group owns every routed row).

Each step is measured per rank: memory by category (`mopc.runtime.memory`), collective
bytes (`mopc.runtime.comm`) and wall time. Rank 0 gathers the results, prints a table and
writes the JSON report. When a MoE layer ran expert-parallel, the report's `expert_load`
holds, per layer, rank 0's `mopc.expert_load_stats()` for the last step (rows per EP
rank, imbalance max/mean with and without spilling, dropped rows, lent experts).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mopc.runtime.comm import (
    COMM_BYTES_SOURCE,
    CommCounter,
    CommStats,
    enable_flight_recorder,
    mesh_axes,
)
from mopc.runtime.context_parallel import DataPart, data_part, shard_sequence
from mopc.runtime.memory import MemoryTracker

log = logging.getLogger("mopc")

__all__ = [
    "DataPart",
    "Progress",
    "TrainSettings",
    "TrainSettingsError",
    "data_part",
    "format_table",
    "rank_batch",
    "run_training",
    "skew_routing",
    "synthetic_batch",
    "write_json",
]


class TrainSettingsError(ValueError):
    """A bad `mopc train` setting: the message names the flag and the fix."""


def synthetic_batch(step: int, batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Global batch `step` of the arithmetic-sequence task: input_ids and next-token labels."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    span = min(vocab, 256)  # a small alphabet: the loss falls within a few steps
    start = torch.randint(0, span, (batch, 1), generator=gen)
    stride = torch.randint(1, 8, (batch, 1), generator=gen)
    pos = torch.arange(seq_len + 1).unsqueeze(0)
    tokens = (start + stride * pos) % span
    return {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}


def rank_batch(step: int, batch: int, seq_len: int, vocab: int, seed: int, rank: int,
               world: int, *, cp: int = 1, tp: int = 1) -> dict[str, torch.Tensor]:
    """This rank's part of global batch `step`: `batch // (world // cp)` rows and, under
    context parallelism, of each of their sequences the two chunks (of 2·cp) it holds."""
    part = data_part(rank, world, cp, tp)
    rows = batch // part.count
    full = synthetic_batch(step, batch, seq_len, vocab, seed)
    mine = {k: v[part.index * rows:(part.index + 1) * rows] for k, v in full.items()}
    if cp > 1:
        mine = {k: shard_sequence(v, cp, part.cp_rank) for k, v in mine.items()}
    return {k: v.contiguous() for k, v in mine.items()}


class Progress:
    """A one-line progress bar on stderr (a plain line per step when not a terminal)."""

    def __init__(self, total: int, label: str, stream: Any = None) -> None:
        self.total, self.label = total, label
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.start = time.perf_counter()

    def update(self, done: int, **fields: Any) -> None:
        width = 24
        filled = int(width * done / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        elapsed = time.perf_counter() - self.start
        info = "  ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{self.label} [{bar}] {done}/{self.total}  {elapsed:6.1f}s  {info}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done == self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# ---------------------------------------------------------------------------- settings


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """Everything `mopc train` was asked to do (the JSON report's `config`)."""

    model: str = "tiny"
    steps: int = 10
    seed: int = 0
    batch: int = 4
    """Global batch: each of the W ranks takes `batch // W` rows of it (with `cp` in
    `mop_options`, each cp group `batch // (W // cp)` rows, cut along the sequence)."""
    seq_len: int = 128
    lr: float = 3e-3
    backend: str = "mop"
    """`mop` or `eager` (the single-device reference; world size 1 only)."""
    baseline: str | None = None
    """`fsdp2` or `ddp` instead of `backend`."""
    compile_baseline: bool = True
    """Compile the baseline with `aot_eager` (else run it eagerly)."""
    json_path: str | None = None
    quiet: bool = False
    skew_experts: int = 0
    """0 = the model's own routing. N > 0: build the preset with a router correction bias
    and raise it by 1.0 for experts 0..N-1, so every token picks among those N experts
    (top_k <= N <= num_experts). Applied identically to mop and the baselines."""
    save_dir: str | None = None
    """Save model and optimizer (mopc.checkpoint, DCP) here after the last step."""
    save_every: int = 0
    """Also save every N steps (0: only after the last step)."""
    resume: str | None = None
    """Load the newest checkpoint under this directory and continue from its step."""
    memory_timeline: str | None = None
    """Write every rank's memory over the last step here (JSON, and PNG with matplotlib)."""
    mop_options: dict[str, Any] = field(default_factory=dict)
    """The `mopc.MoPConfig` fields the user set (only those)."""

    @property
    def program(self) -> str:
        return self.baseline or self.backend

    @property
    def cp(self) -> int:
        """The context-parallel degree (1 unless `--cp` was given)."""
        return self.mop_options.get("cp", 1)

    @property
    def tp(self) -> int:
        return self.mop_options.get("tp", 1)

    @property
    def pp(self) -> int:
        """The pipeline-parallel degree (1 unless `--pp` was given)."""
        pp = self.mop_options.get("pp", 1)
        return pp if isinstance(pp, int) and pp >= 1 else 1

    def validate(self, world: int) -> None:
        """Errors name the flag and what to change. Runs before any allocation or collective."""
        if self.steps < 1:
            raise TrainSettingsError(f"--steps {self.steps}: train at least one step")
        self._validate_context_parallel(world)
        self._validate_batch(world)
        self._validate_pipeline(world)
        if self.backend not in ("mop", "eager"):
            raise TrainSettingsError(f"--backend {self.backend!r}: choose mop or eager")
        if self.baseline is not None and self.baseline not in ("fsdp2", "ddp"):
            raise TrainSettingsError(f"--baseline {self.baseline!r}: choose fsdp2 or ddp")
        if self.program == "eager" and world != 1:
            raise TrainSettingsError(
                f"--backend eager is the single-device reference and runs on one process, not {world}; "
                "drop --nproc (or use --backend mop / --baseline ddp|fsdp2 for several ranks)"
            )
        if self.baseline is not None and self.backend != "mop":
            raise TrainSettingsError(f"--baseline {self.baseline} and --backend {self.backend}: choose one")
        if self.program != "mop" and "dump_dir" in self.mop_options:
            log.warning("--dump-dir: %s has no mop graphs to dump; ignored", self.program)
        mop_only = sorted(set(self.mop_options) - {"dump_dir"})
        if self.program != "mop" and mop_only:
            flags = ", ".join("--" + name.replace("_", "-") for name in mop_only)
            raise TrainSettingsError(f"{flags} apply to --backend mop only, not to {self.program}")
        self._validate_checkpointing()
        from mopc.models.presets import PRESETS

        limit = PRESETS[self.model].max_seq_len if self.model in PRESETS else None
        if limit is not None and self.seq_len > limit:
            raise TrainSettingsError(f"--seq-len {self.seq_len} exceeds the {self.model} model's max_seq_len "
                                     f"{limit}; use --seq-len {limit} or less")
        preset = PRESETS.get(self.model)
        if self.skew_experts and preset is not None and not preset.top_k <= self.skew_experts <= preset.num_experts:
            raise TrainSettingsError(
                f"--skew-experts {self.skew_experts}: every token of the {self.model} model picks "
                f"top_k={preset.top_k} of its {preset.num_experts} experts, so the number of favoured experts "
                f"must be from {preset.top_k} to {preset.num_experts}; use --skew-experts "
                f"{preset.top_k}..{preset.num_experts}, or 0 for the model's own routing"
            )
        if self.program == "mop":  # the mesh against the world, before torchrun starts any rank
            from mopc.config import MoPConfig, MoPConfigError
            from mopc.plan.mesh import MeshSpec

            try:
                MeshSpec.from_config(MoPConfig.from_options(self.mop_options), world)
            except MoPConfigError as err:
                raise TrainSettingsError(str(err)) from None


    def _validate_context_parallel(self, world: int) -> None:
        """`--cp`: mop only, dividing the ranks per tensor-parallel rank, and a sequence
        length that cuts into 2·cp equal chunks."""
        cp, tp = self.cp, self.tp
        if not isinstance(cp, int) or isinstance(cp, bool) or cp < 1:
            raise TrainSettingsError(f"--cp {cp!r}: the context-parallel degree is a positive integer; use --cp 1 "
                                     "(off) or a divisor of the world size")
        if cp == 1:
            return
        if self.program != "mop":
            raise TrainSettingsError(
                f"--cp {cp} is mop's context parallelism; --{'baseline' if self.baseline else 'backend'} "
                f"{self.program} reads whole sequences. Drop --cp for {self.program} (the same --batch "
                f"{self.batch} and --seq-len {self.seq_len} are the same global batch to compare against)")
        if isinstance(tp, int) and tp >= 1 and world % tp == 0 and (world // tp) % cp:
            per_tp = world // tp
            choices = [d for d in range(1, per_tp + 1) if per_tp % d == 0]
            raise TrainSettingsError(
                f"--cp {cp} does not divide the world size {world} / --tp {tp} = {per_tp} (a context-parallel "
                f"group is cp ranks of the same tensor-parallel rank); use --cp from {choices}, or --nproc "
                f"{tp * cp * max(1, per_tp // cp)}")
        if self.seq_len % (2 * cp):
            down = self.seq_len // (2 * cp) * (2 * cp)
            fix = f"--seq-len {down} or {down + 2 * cp}" if down else f"--seq-len {2 * cp}"
            raise TrainSettingsError(
                f"--seq-len {self.seq_len} is not divisible by 2 x --cp {cp} = {2 * cp}: every sequence is cut "
                f"into 2*cp equal chunks and each rank of a context-parallel group holds two; use {fix}")

    def data_ranks(self, world: int) -> int:
        """Ranks that read different sequences: the world size, divided by `pp` and `cp` when
        they divide (the ranks of a pipeline, and of a context-parallel group, read the same rows)."""
        if self.program != "mop" or world % (self.pp * self.cp):
            return world
        return world // (self.pp * self.cp)

    def _validate_pipeline(self, world: int) -> None:
        """`--pp`: each pipeline's rows cut into `--microbatches`."""
        if self.pp == 1 or self.program != "mop" or world % (self.pp * self.cp):
            return
        from mopc.config import MoPConfig, MoPConfigError

        try:
            micro = MoPConfig.from_options(self.mop_options).num_microbatches
        except MoPConfigError as err:
            raise TrainSettingsError(str(err)) from None
        rows = self.batch // self.data_ranks(world)
        if rows % micro:
            fix = self.data_ranks(world) * micro * max(1, -(-rows // micro))
            raise TrainSettingsError(
                f"--batch {self.batch}: each pipeline reads {rows} rows per step (batch / (world {world} / pp "
                f"{self.pp}{f' / cp {self.cp}' if self.cp > 1 else ''})), which do not cut into {micro} "
                f"micro-batches; use --batch {fix} or --microbatches dividing {rows}")

    def _validate_batch(self, world: int) -> None:
        readers = self.data_ranks(world)
        if self.batch >= 1 and self.batch % readers == 0:
            return
        fix = max(readers, self.batch - self.batch % readers or readers)
        if readers == world:
            raise TrainSettingsError(
                f"--batch {self.batch} is the global batch and must be a positive multiple of the "
                f"world size {world} (each rank takes batch // world rows); use e.g. --batch {fix}")
        raise TrainSettingsError(
            f"--batch {self.batch} is the global batch and must be a positive multiple of world size {world} "
            f"/ --cp {self.cp} = {readers} (the cp ranks of a group read the same sequences, each its chunks; "
            f"every group takes batch // {readers} of them); use e.g. --batch {fix}")

    def _validate_checkpointing(self) -> None:
        if self.save_every and not self.save_dir:
            raise TrainSettingsError(f"--save-every {self.save_every} needs --save DIR (where to write)")
        if (self.save_dir or self.resume) and self.program not in ("mop", "eager"):
            raise TrainSettingsError(
                f"--save/--resume checkpoint mop and the eager reference, not --baseline {self.baseline}; "
                "drop them for the baseline")
        if self.resume:
            from mopc.checkpoint import latest_step, saved_step

            if latest_step(self.resume) is None:
                raise TrainSettingsError(f"--resume {self.resume}: no complete checkpoint there (a step_* "
                                         "directory with DCP's .metadata); check the path, or drop --resume")
            step = saved_step(self.resume)
            if step is not None and step >= self.steps:
                raise TrainSettingsError(f"--resume {self.resume}: the checkpoint is at step {step} and --steps "
                                         f"{self.steps} ends there; pass --steps greater than {step}")


# ---------------------------------------------------------------------------- programs


@dataclass
class Program:
    """What a training step runs: the module the optimizer sees and the callable."""

    module: nn.Module
    step_fn: Callable[..., torch.Tensor]
    runs_as: str
    """How the step runs: `mop`, `aot_eager` (compiled baseline) or `eager`."""
    batch_fn: Callable[[int], dict[str, torch.Tensor]]
    """Step number -> this rank's part of that global batch."""
    layout: dict[str, int]
    """The mesh the step runs on: data-parallel readers (`dp`), `cp`, `tp`, `ep`."""
    build_seconds: float = 0.0


def init_distributed() -> tuple[int, int, bool]:
    """(rank, world, created). Under torchrun (WORLD_SIZE set) create the gloo default
    group, with the flight recorder on so collectives can be counted."""
    created = False
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        enable_flight_recorder()
        dist.init_process_group("gloo")
        created = True
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), created
    return 0, 1, created


def _mop_compile_options(settings: TrainSettings, rank: int) -> dict[str, Any]:
    options = dict(settings.mop_options)
    if rank != 0:
        options.pop("dump_dir", None)  # SPMD: rank 0's graphs stand for every rank's
    return options


def _model_config(settings: TrainSettings) -> Any:
    """The preset's MoEModelConfig; with `skew_experts`, with the router correction bias on."""
    import dataclasses

    from mopc.models import PRESETS

    config = PRESETS[settings.model]
    return dataclasses.replace(config, router_bias=True) if settings.skew_experts else config


@torch.no_grad()
def skew_routing(model: nn.Module, num_favoured: int) -> int:
    """Set every router's correction bias to +1.0 for experts 0..num_favoured-1 and 0 for
    the others, so every token picks among the favoured experts. Returns the routers set."""
    from mopc.models import Router

    routers = [m for m in model.modules() if isinstance(m, Router)]
    for router in routers:
        if router.expert_bias is None:
            raise ValueError("skew_routing: a router has no expert_bias; build the model with router_bias=True")
        router.expert_bias.zero_()
        router.expert_bias[:num_favoured] = 1.0
    return len(routers)


def _whole_rows(settings: TrainSettings, rank: int, world: int, vocab: int) -> Callable[[int], dict[str, torch.Tensor]]:
    return lambda step: rank_batch(step, settings.batch, settings.seq_len, vocab, settings.seed, rank, world)


def _build_mop(settings: TrainSettings, rank: int, world: int) -> Program:
    import mopc
    from mopc.models import build_model, make_init_fn

    model = build_model(_model_config(settings), device="meta", seed=settings.seed)
    vocab = model.config.vocab_size
    # this rank's part of every global batch (its rows; under cp, its chunks of each sequence),
    # by the arithmetic of mopc.data_parallel_rank / mopc.shard_sequence (runtime.context_parallel)
    def batches(step: int) -> dict[str, torch.Tensor]:
        # the ranks of a pipeline read the same rows: the arithmetic is over one stage's ranks
        stage_world = world // settings.pp
        return rank_batch(step, settings.batch, settings.seq_len, vocab, settings.seed, rank % stage_world,
                          stage_world, cp=settings.cp, tp=settings.tp)

    layout = {k: v for k, v in settings.mop_options.items() if k != "dump_dir"}
    model = mopc.parallelize(model, batches(0), init_fn=make_init_fn(model, settings.seed), **layout)
    if settings.skew_experts:  # buffers are plain, materialised tensors after parallelize
        skew_routing(model, settings.skew_experts)
    compiled = torch.compile(model, backend="mop", options=_mop_compile_options(settings, rank))
    spec = mopc.plan_of(model).spec
    return Program(module=model, step_fn=compiled, runs_as="mop", batch_fn=batches,
                   layout={"dp": spec.data_parallel, "cp": spec.cp, "tp": spec.tp, "ep": spec.ep, "pp": spec.pp})


def build_program(settings: TrainSettings, rank: int, world: int) -> Program:
    """Build the model and wrap it the way `settings` asks, on this rank."""
    from mopc.models import build_model
    from mopc.runtime.baselines import wrap_baseline

    start = time.perf_counter()
    if settings.program == "mop":
        program = _build_mop(settings, rank, world)
    else:
        model = build_model(_model_config(settings), device="cpu", seed=settings.seed)
        if settings.skew_experts:
            skew_routing(model, settings.skew_experts)
        batches = _whole_rows(settings, rank, world, model.config.vocab_size)
        layout = {"dp": world, "cp": 1, "tp": 1, "ep": 1, "pp": 1}
        if settings.program == "eager":
            program = Program(module=model, step_fn=model, runs_as="eager", batch_fn=batches, layout=layout)
        else:
            module, step_fn, runs_as = wrap_baseline(model, settings.program, compile=settings.compile_baseline)
            program = Program(module=module, step_fn=step_fn, runs_as=runs_as, batch_fn=batches, layout=layout)
    program.build_seconds = time.perf_counter() - start
    return program


# ---------------------------------------------------------------------------- the loop


@dataclass
class _StepRecord:
    loss: float
    seconds: float
    comm: CommStats
    compression: dict[str, float] | None = None
    """This step's compressed gradient reductions: bytes sent, bytes uncompressed, residual."""


def _compression_delta(before: dict, after: dict) -> dict[str, float] | None:
    if after["calls"] == before["calls"]:
        return None
    from mopc.runtime.compression import mean_residual_norm

    return {"bytes_sent": after["bytes_sent"] - before["bytes_sent"],
            "bytes_uncompressed": after["bytes_uncompressed"] - before["bytes_uncompressed"],
            "residual_norm": after["residual_norm"], "input_norm": after["input_norm"],
            "mean_residual_norm": mean_residual_norm()}


def _global_mean(value: torch.Tensor, world: int) -> float:
    """The mean over ranks of a scalar (gloo has no AVG: sum, then divide)."""
    value = value.detach().to(torch.float64).reshape(1).clone()
    if world > 1:
        dist.all_reduce(value)
    return float(value) / world


def _save(settings: TrainSettings, program: Program, optimizer: torch.optim.Optimizer, step: int) -> None:
    from mopc.checkpoint import save

    save(settings.save_dir, program.module, optimizer, step=step,  # type: ignore[arg-type]
         extra={"model": settings.model, "seed": settings.seed, "batch": settings.batch,
                "seq_len": settings.seq_len, "lr": settings.lr, "program": settings.program,
                "mop_options": settings.mop_options})


def _train_steps(settings: TrainSettings, program: Program, optimizer: torch.optim.Optimizer,
                 tracker: MemoryTracker, rank: int, world: int, start: int = 0) -> list[_StepRecord]:
    bar = Progress(settings.steps, f"train {settings.model} ({program.runs_as}, {world} rank"
                   f"{'s' if world > 1 else ''})") if rank == 0 and not settings.quiet else None
    from mopc.runtime.compression import compression_stats, reset_compression_state

    reset_compression_state()  # a fresh run: no residual from an earlier one in this process
    counter = CommCounter(mesh_axes())
    records = []
    for step in range(start, settings.steps):
        data = program.batch_fn(step)
        compressed = compression_stats()
        counter.mark()
        start = time.perf_counter()
        with tracker.step():
            loss = program.step_fn(**data)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        comm = counter.since_mark()
        if settings.program == "mop" and settings.pp > 1:
            _add_pipeline_sends(comm)
        records.append(_StepRecord(loss=_global_mean(loss, world), seconds=seconds, comm=comm,
                                   compression=_compression_delta(compressed, compression_stats())))
        if bar:
            bar.update(step + 1, loss=f"{records[-1].loss:.4f}", step_s=f"{seconds:.2f}")
        if settings.save_dir and (step + 1 == settings.steps
                                  or (settings.save_every and (step + 1) % settings.save_every == 0)):
            _save(settings, program, optimizer, step + 1)
    return records


def _add_pipeline_sends(comm: CommStats) -> None:
    """The schedule's point-to-point sends (the flight recorder does not see gloo's), counted
    from the tensors it sent: activations forward and gradients back, on the `pp` axis."""
    from mopc.runtime.pipeline_step import pipeline_stats

    stats = pipeline_stats()
    total = sum(stats.get("p2p_bytes_sent", {}).values())
    count = stats.get("p2p_messages_sent", 0)
    slot = comm.by_kind.setdefault("send", {"count": 0, "input_bytes": 0, "bytes_sent": 0})
    slot["count"] += count
    slot["input_bytes"] += total
    slot["bytes_sent"] += total
    comm.bytes_sent += total
    comm.by_axis["pp:send"] = comm.by_axis.get("pp:send", 0) + total


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _steady(values: list[float]) -> list[float]:
    return values[1:] if len(values) > 1 else values


def run_training(settings: TrainSettings) -> dict[str, Any]:
    """Run `settings` on this rank; every rank returns the same report (rank 0 writes it)."""
    rank, world, created = init_distributed()
    try:
        settings.validate(world)
        return _run(settings, rank, world)
    finally:
        if created:
            dist.destroy_process_group()


def make_optimizer(settings: TrainSettings, module: nn.Module) -> torch.optim.Optimizer:
    """AdamW; with `--optimizer-offload`, `mopc.optim.HostAdamW` (state on host, updates
    started in backward)."""
    if settings.mop_options.get("optimizer_offload"):
        from mopc.optim import HostAdamW

        return HostAdamW(module.parameters(), lr=settings.lr)
    return torch.optim.AdamW(module.parameters(), lr=settings.lr)


def _run(settings: TrainSettings, rank: int, world: int) -> dict[str, Any]:
    """Build, train and measure on this rank; gather every rank's numbers into one report."""
    torch.manual_seed(settings.seed)
    program = build_program(settings, rank, world)
    optimizer = make_optimizer(settings, program.module)
    tracker = MemoryTracker(program.module, optimizer, rank=rank, timeline=bool(settings.memory_timeline))
    start = 0
    if settings.resume:
        from mopc.checkpoint import load

        start = load(settings.resume, program.module, optimizer)
    records = _train_steps(settings, program, optimizer, tracker, rank, world, start)

    timeline_files = _write_timeline(settings, tracker, rank, world) if settings.memory_timeline else []
    per_rank = _gather({"memory": tracker.report(),
                        "step_seconds": [r.seconds for r in records],
                        "comm_bytes": [r.comm.bytes_sent for r in records],
                        "comm_by_axis": [r.comm.by_axis for r in records],
                        "compression": [r.compression for r in records],
                        "comm_complete": all(r.comm.complete for r in records)}, world)
    # A step ends when its slowest rank ends: take the max over ranks, then the median over steps.
    step_seconds = [max(p["step_seconds"][i] for p in per_rank) for i in range(len(records))]
    comm_per_rank = [int(statistics.median(_steady(p["comm_bytes"]))) for p in per_rank]
    last_comm = records[-1].comm
    expert_load = _expert_load(settings) if rank == 0 else None
    expert_load = _gather(expert_load, world)[0]  # rank 0's, so every rank returns the same report
    return {
        "config": {**asdict(settings), "program": settings.program, "runs_as": program.runs_as},
        "world_size": world,
        "layout": program.layout,
        "rank_batch_shape": [settings.batch // settings.data_ranks(world), settings.seq_len // program.layout["cp"]],
        "start_step": start,
        "memory_timeline_files": _gather(timeline_files, world)[0],
        "losses": [r.loss for r in records],
        "memory": {
            "peak_bytes": max(p["memory"]["peak"] for p in per_rank),
            "per_rank": [p["memory"] for p in per_rank],
        },
        "comm_bytes_per_step": max(comm_per_rank),
        "comm_bytes_per_rank": comm_per_rank,
        "comm_bytes_source": COMM_BYTES_SOURCE if all(p["comm_complete"] for p in per_rank) or world == 1
        else "incomplete: " + COMM_BYTES_SOURCE,
        "comm_by_kind_last_step": last_comm.by_kind,
        "comm_by_axis_per_step": _by_axis_per_step(per_rank),
        "grad_compression": _compression_report(settings, per_rank),
        "expert_load": expert_load,
        "guard_s_per_step": _guard_seconds(program.module),
        "step_time_s": statistics.median(_steady(step_seconds)),
        "step_seconds": step_seconds,
        "first_step_s": step_seconds[0],
        "build_s": program.build_seconds,
        "num_params": sum(p.numel() for p in program.module.parameters()),
        "torch": torch.__version__,
    }


def _write_timeline(settings: TrainSettings, tracker: MemoryTracker, rank: int, world: int) -> list[str]:
    from mopc.runtime.memory import write_timeline

    timelines = _gather([asdict(s) for s in tracker.timeline], world)
    if rank == 0:
        layout = ", ".join(f"{k}={v}" for k, v in sorted(settings.mop_options.items()) if k != "dump_dir")
        title = (f"{settings.model}, {settings.program}{f' ({layout})' if layout else ''}, {world} rank(s), "
                 f"global batch [{settings.batch}, {settings.seq_len}], step {settings.steps - 1}")
        return write_timeline(settings.memory_timeline, timelines, title)  # type: ignore[arg-type]
    return []


def _guard_seconds(module: nn.Module) -> dict[str, float | None] | None:
    """Mean seconds per step, after the first, this rank spent in the non-finite check and
    in the input-shape check (each includes its all-gather, the host sync and any wait for
    a slower rank); None for programs without the guard."""
    from mopc.runtime.guard import input_check_seconds

    guard = getattr(module, "_mopc_guard", None)
    if guard is None:
        return None
    return {"nan_guard": guard.seconds / guard.checks if guard.checks else None,
            "input_check": input_check_seconds()}


def _by_axis_per_step(per_rank: list[dict]) -> dict[str, int]:
    """Bytes sent per `axis:kind` in a step: the max over ranks, median over the steps after the first."""
    keys = sorted({k for p in per_rank for step in p["comm_by_axis"] for k in step})
    steps = len(per_rank[0]["comm_by_axis"])
    return {k: int(statistics.median(_steady([max(p["comm_by_axis"][i].get(k, 0) for p in per_rank)
                                              for i in range(steps)]))) for k in keys}


def _compression_report(settings: TrainSettings, per_rank: list[dict]) -> dict[str, Any] | None:
    """`grad_compression`'s bytes per step (max over ranks) and error-feedback residual per step."""
    mode = settings.mop_options.get("grad_compression", "none") if settings.program == "mop" else "none"
    if mode == "none":
        return None
    steps = len(per_rank[0]["compression"])

    def per_step(field: str) -> list[float]:
        return [max((p["compression"][i] or {}).get(field, 0) for p in per_rank) for i in range(steps)]

    sent, uncompressed = per_step("bytes_sent"), per_step("bytes_uncompressed")
    last_sent, last_uncompressed = sent[-1], uncompressed[-1]
    return {
        "mode": mode,
        "bytes_sent_per_step": [int(b) for b in sent],
        "bytes_uncompressed_per_step": [int(b) for b in uncompressed],
        "ratio_last_step": last_uncompressed / last_sent if last_sent else None,
        "residual_norm": per_step("residual_norm"),
        "mean_residual_norm": per_step("mean_residual_norm"),
        "input_norm": per_step("input_norm"),
        "source": "bytes of the tensors each compressed reduction sent (mopc/runtime/compression.py); "
                  "uncompressed = the reduce-scatter it replaces; residual_norm / input_norm: this rank's "
                  "error-feedback residual and what it compressed, max over ranks; mean_residual_norm: the "
                  "group-mean residual (what the updates miss; one diagnostic all-reduce after the step's "
                  "measurements)",
    }


def _expert_load(settings: TrainSettings) -> dict[str, dict] | None:
    """This rank's EP group's routing in the last step, per MoE layer (keys: layer index as
    a string, for JSON); None when no layer ran expert-parallel."""
    if settings.program != "mop":
        return None
    from mopc.runtime.experts import expert_load_stats

    stats = expert_load_stats()
    return {str(layer): value for layer, value in stats.items()} or None


# ---------------------------------------------------------------------------- output


def _mib(n: int) -> str:
    return f"{n / 2**20:9.2f}"


def format_table(report: dict[str, Any]) -> str:
    """Per-rank memory by category (MiB) and the run's losses, comm and step time."""
    cols = ("params", "grads", "optimizer", "activations_peak", "peak", "peak_rss")
    host = [c for c in ("host_peak", "optimizer_host") if any(m.get(c) for m in report["memory"]["per_rank"])]
    cols += tuple(host)
    head = f"{'rank':>4} " + " ".join(f"{c:>16}" for c in cols)
    lines = ["memory per rank (MiB; live storages, peak_rss = process high-water mark"
             + ("; peak = device tier, host_peak / optimizer_host = host tier" if host else "") + ")", head]
    for m in report["memory"]["per_rank"]:
        lines.append(f"{m['rank']:>4} " + " ".join(f"{_mib(m[c]):>16}" for c in cols))
    losses = report["losses"]
    lines.append(
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps; "
        f"step {report['step_time_s']:.3f}s (median after the first; first {report['first_step_s']:.1f}s); "
        f"comm {report['comm_bytes_per_step'] / 2**20:.2f} MiB sent per rank per step"
    )
    compression = report.get("grad_compression")
    if compression:
        ratio = compression["ratio_last_step"]
        lines.append(
            f"grad_compression={compression['mode']}: {compression['bytes_sent_per_step'][-1] / 2**20:.3f} MiB "
            f"sent per rank in the last step for {compression['bytes_uncompressed_per_step'][-1] / 2**20:.3f} MiB "
            f"uncompressed ({ratio:.1f}x fewer); error-feedback residual {compression['residual_norm'][-1]:.3g} "
            f"(input {compression['input_norm'][-1]:.3g})" if ratio else
            f"grad_compression={compression['mode']}: nothing sent in the last step")
    if report.get("expert_load"):
        lines += ["", *format_expert_load(report["expert_load"])]
    return "\n".join(lines)


def format_expert_load(expert_load: dict[str, dict]) -> list[str]:
    """Per MoE layer: routed rows each EP rank computed, and max/mean with and without spilling."""
    ep = len(next(iter(expert_load.values()))["rows_per_rank"])
    lines = [f"expert load, last step (rank 0's expert-parallel group of {ep}; imbalance = max/mean rows per rank)",
             f"{'layer':>5}  {'rows per EP rank':<28} {'imbalance':>9} {'without spill':>13} {'dropped':>7}  lent"]
    for layer, s in expert_load.items():
        rows = " ".join(str(r) for r in s["rows_per_rank"])
        lent = ", ".join(f"rank {q}: {[e for e in slots if e >= 0]}" for q, slots in enumerate(s["lent_experts"])
                         if any(e >= 0 for e in slots)) or "-"
        lines.append(f"{layer:>5}  {rows:<28} {s['imbalance']:>9.2f} {s['imbalance_without_spill']:>13.2f} "
                     f"{s['dropped_rows']:>7}  {lent}")
    return lines


def write_json(report: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
