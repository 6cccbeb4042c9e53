"""One configuration tree for the whole compiler.

`torch.compile(model, backend="mop", options={...})` passes `options` here; every key is a
field of :class:`MoPConfig`. Values are validated once, with errors that name the field,
the value and the accepted values.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal


class MoPConfigError(ValueError):
    """A bad option: names the field, the value given and what is accepted."""


@dataclass(frozen=True, kw_only=True)
class MoPConfig:
    """Options of the `mop` backend. Pass them as `options={...}` to `torch.compile`."""

    lowering: Literal["auto", "eager", "inductor"] = "auto"
    """How forward and backward graphs run after the passes: `eager` runs the FX graphs
    op by op (like `aot_eager`), `inductor` compiles them with Inductor, `auto` picks
    Inductor when the inputs live on CUDA and eager otherwise."""

    partitioner: Literal["min_cut", "default"] = "min_cut"
    """How the joint graph is split into forward and backward: `min_cut` recomputes cheap
    ops instead of saving them (AOTAutograd's min-cut rematerialization), `default` saves
    every forward value the backward needs."""

    dump_dir: str | None = None
    """Folder for one readable file per pass (graph with shapes and roles, op-count diff,
    timing). Overrides the `MOPC_DUMP_DIR` environment variable when set."""

    disable_passes: tuple[str, ...] = ()
    """Names of passes to skip, in addition to `MOPC_DISABLE_PASSES=a,b`."""

    debug: bool = False
    """Run the graph verifier after every pass (also on with `MOPC_DEBUG=1`)."""

    fuse_dispatch: Literal["auto", "on", "off"] = "auto"
    """Replace each MoE layer's token dispatch and combine (sort, gathers, scatters,
    weighted sum; forward and backward) by mopc's fused ops: Triton kernels on CUDA,
    torch references elsewhere. `auto` fuses when the graphs are lowered by Inductor
    (CUDA inputs)."""

    # ------------------------------------------------------------ layout (mopc.parallelize)

    tp: int = 1
    """Tensor-parallel degree: attention heads (and dense MLP columns) are sharded over
    groups of `tp` consecutive ranks. Must divide the world size and the head counts."""

    dp: int | None = None
    """Data-parallel degree; default: the world size divided by `tp` and `cp`."""

    cp: int = 1
    """Context-parallel degree: every sequence is cut into 2·cp chunks and each rank of a
    context-parallel group (`cp` ranks, strided by `tp`) holds two of them, an early and a
    late one (`mopc.shard_sequence` cuts a batch that way). Attention gathers the group's
    keys and values; every other layer runs on the rank's own tokens. The sequence length
    must be divisible by 2·cp; `cp` must divide the world size divided by `tp`."""

    cp_attention: Literal["all_gather", "all_to_all"] = "all_gather"
    """How context-parallel attention reaches the other chunks. `all_gather`: gather the
    group's keys and values (every rank keeps all heads; gathered again in backward).
    `all_to_all` (head↔sequence, as in DeepSpeed-Ulysses): exchange queries, keys and values
    so each rank holds the whole sequence for heads / cp of the heads, run causal attention
    there, and send the output back; needs the head and key/value-head counts (per tensor-
    parallel rank) divisible by `cp`. Set by `mopc.parallelize`."""

    pp: int = 1
    """Pipeline-parallel degree: the layers are cut into `pp` stages (`pp · pp_virtual` under
    the interleaved schedule), each held by world / pp ranks; ranks are laid out (pp, dp,
    cp, tp), the pipeline rank varying slowest. The compiled call then runs the whole step
    (forward, loss and backward of every micro-batch) and returns the loss, the same on every
    rank; `loss.backward()` afterwards has nothing left to do. Must divide the world size."""

    microbatches: int | None = None
    """Micro-batches per step under pipeline parallelism (default: 2·pp); the batch each rank
    passes is cut along dim 0 into this many equal parts. 1F1B needs at least `pp`."""

    schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b"
    """Pipeline schedule: `gpipe` (every forward, then every backward: all micro-batches'
    activations in flight), `1f1b` (one forward one backward after a warm-up: at most `pp`
    in flight per stage), `interleaved_1f1b` (`pp_virtual` stages per rank, smaller bubble;
    micro-batches a multiple of `pp`)."""

    pp_virtual: int = 1
    """Stages per pipeline rank (interleaved 1F1B: 2 or more; rank r holds stages r, r+pp, ...)."""

    pp_split: tuple[int, ...] | None = None
    """First layer of every stage after the first (increasing layer indices, one fewer than the
    stages), e.g. (3,) for two stages at layer 3; None: balanced by the cost model (flops and
    parameter bytes per layer, expert layers included). Embeddings go to the first stage, the
    final norm, vocabulary projection and loss to the last."""

    plan: Literal["manual", "auto"] = "manual"
    """`manual` applies `tp` to every attention and dense MLP block; `auto` lets the
    planner keep a component on the sharded reference layout when tensor parallelism
    would move more bytes than it saves."""

    vocab_parallel: bool = True
    """Shard the vocabulary projection by rows over all ranks and compute the
    cross-entropy on vocabulary shards (the full [tokens, vocab] logits never exist)."""

    loss_chunk_tokens: int = 2048
    """Tokens per chunk of the vocabulary-parallel loss: a rank holds at most
    [loss_chunk_tokens, vocab / world] logits at a time."""

    bucket_mb: float = 25.0
    """Parameter all-gathers and gradient reduce-scatters of one layer are merged into
    collectives of at most this many MiB (0 = one collective per parameter)."""

    reshard_after_forward: bool = True
    """Free gathered parameters after their forward use and gather them again in
    backward (ZeRO-3), instead of keeping them until backward."""

    param_dtype: Literal["fp32", "bf16"] = "fp32"
    """Mixed precision: the dtype parameters are gathered and computed in. `bf16` casts
    each fp32 shard to bf16 before its all-gather (half the bytes moved), so the model's
    matmuls and activations run in bf16 (norms, router and loss upcast inside the model).
    `fp32` (default) casts nothing: parameters keep the dtype the model was built with.
    Set by `mopc.parallelize`."""

    reduce_dtype: Literal["fp32", "bf16"] | None = None
    """Mixed precision: the dtype gradients are reduce-scattered in (None: `param_dtype`).
    `reduce_dtype="fp32"` with `param_dtype="bf16"` casts each full gradient up before the
    reduce-scatter (exact mean over ranks, twice the bytes). Set by `mopc.parallelize`."""

    master_dtype: Literal["fp32"] = "fp32"
    """Mixed precision: the dtype of floating-point shards at rest, which the optimizer
    updates (its state follows) and which receive the reduced gradients. Acts when
    `param_dtype` or `reduce_dtype` is not fp32. Set by `mopc.parallelize`."""

    # ------------------------------------------------------------ experts

    ep: int = 1
    """Expert-parallel degree: the routed experts of every MoE layer are split over groups
    of `ep` consecutive ranks (which may span data- and tensor-parallel ranks); tokens
    travel to their experts by all-to-all and expert weights are never gathered. Must
    divide the world size and the number of experts."""

    capacity_factor: float | None = None
    """None = dropless (every routed token is computed). A number c caps each expert at
    ceil(c * rows / num_experts) rows per step and expert-parallel group, where rows is the
    group's routed (token, expert) pairs; the rows beyond the cap are dropped in order
    (source rank, then the rank's own row order), so they add nothing to the output."""

    expert_spill_factor: float | None = None
    """None = off. A number f >= 1 bounds the rows an expert-parallel rank computes to
    ceil(f * mean rows per rank): the overflow rows of its hottest experts are sent, with
    those experts' weights, to the least-loaded ranks of the group for that step, and
    their weight gradients sent back to the owner. Exact (same result as without)."""

    expert_spill_slots: int = 1
    """Experts a rank can borrow per layer and step when spilling (memory: this many
    extra experts' weights and gradients per rank)."""

    expert_bias_update_rate: float = 0.0
    """Aux-loss-free load balancing (DeepSeek-V3): after each optimizer step, every MoE
    layer's router correction bias (a buffer named `expert_bias`, `e_score_correction_bias`)
    moves by this rate times sign(mean load - expert load), from the global token counts
    of the last forward. 0 = off. Set by `mopc.parallelize` (needs `ep > 1`)."""

    # ------------------------------------------------------------ memory

    offload: Literal["none", "experts", "auto"] = "none"
    """Move tensors saved for backward to host memory between forward and backward, and
    back before backward needs them (exact copies). `experts`: those a MoE layer's routed
    experts, dispatch and combine produce (dispatched tokens, expert intermediates). On
    CPU the host copies are a separate pool the memory accounting counts as host-tier.
    `auto`: a per-tensor choice of save, recompute or offload under `memory_budget_gb`."""

    memory_budget_gb: float | None = None
    """Device-memory budget per rank, GiB, that `offload="auto"` plans saved activations
    under (None: no budget)."""

    memory_policy_hardware: Literal["device", "cpu", "h100", "h200"] = "device"
    """The roofline `offload="auto"` prices recompute and transfers on: `device` (the
    inputs' device: `cpu`, or `h100`/`h200` by the GPU's name), or a preset, to see on a
    CPU the policy a GPU run would get."""

    offload_prefetch: int = 1
    """How many offloaded tensors backward brings back ahead of the one it is using (0:
    each right before its first use)."""

    optimizer_offload: bool = False
    """Hand each parameter's reduced gradient shard to a host-resident optimizer
    (`mopc.optim.HostAdamW`) from inside backward, so its update runs while backward goes
    on, and make the next forward wait, per parameter, only for that parameter's update.
    Without this option `HostAdamW` still keeps its state on host, but updates in `step()`."""

    recompute: Literal["auto", "full"] = "auto"
    """Which forward values backward recomputes instead of keeping. `auto`: the min-cut
    partitioner's choice (cheap ops recomputed, the rest saved). `full` (Megatron's full
    activation checkpointing): every forward value computed inside a transformer layer is
    recomputed in backward, except the layer's input (the residual stream entering it);
    nodes outside layers (embedding, loss) keep the partitioner's choice. Exact. Needs
    `partitioner="min_cut"`; not with `offload="auto"` (both decide what is saved)."""

    # ------------------------------------------------------------ gradient compression

    grad_compression: Literal["none", "skip_idle", "int8", "fp8", "powersgd"] = "none"
    """How expert gradients are reduced over the ranks holding the same experts.
    `none`: reduce-scatter in full precision. `skip_idle` (exact): experts no rank of the
    group used this step send nothing. `int8` / `fp8`: per-block scaled quantization
    (`grad_compression_block` values per fp32 scale) with an error-feedback residual.
    `powersgd`: rank-`powersgd_rank` factorization with error feedback and warm start.
    All but `skip_idle` change the numbers: opt in (docs/user_guide.md states the tolerance)."""

    grad_compression_scope: Literal["experts", "all"] = "experts"
    """Which gradients `grad_compression` applies to: routed experts' only, or every
    sharded gradient (dense ones too; 1-D ones stay uncompressed for `skip_idle` and
    `powersgd`)."""

    grad_compression_block: int = 256
    """Values per quantization scale for `int8` / `fp8`."""

    powersgd_rank: int = 4
    """Rank of the PowerSGD factorization (bytes per step grow linearly with it)."""

    powersgd_warmup_steps: int = 10
    """Backward passes reduced uncompressed before PowerSGD starts."""

    # ------------------------------------------------------------ failing safely (mopc.parallelize)

    nan_guard: bool = True
    """Before every optimizer step over the model's parameters, check on every rank that the
    last loss and the local gradient shards are finite (one all-gather of 3 numbers per
    rank). If any is not, every rank raises `mopc.NonFiniteError` naming the step and the
    ranks, and the parameters and optimizer state stay as they were."""

    check_inputs: bool = True
    """Before each compiled step of a layout that gathers tokens from other ranks (`tp > 1`
    or `vocab_parallel`), all-gather an 8-byte digest of the input shapes; when ranks
    differ (a last, smaller batch on one rank), every rank raises
    `mopc.InputMismatchError` listing the shapes, before any other collective."""

    collective_timeout_s: float = 300.0
    """How long a collective waits for the other ranks after the first optimizer step. A rank
    that died makes the others fail at once; one that stopped calling collectives makes them
    fail after this long, with `mopc.CollectiveError` naming the rank, graph and step."""

    first_step_timeout_s: float = 1800.0
    """The same limit until the first optimizer step has finished (ranks compile at
    different speeds before their first collective)."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        for name in ("tp", "dp", "cp", "pp", "pp_virtual", "microbatches", "loss_chunk_tokens", "ep",
                     "expert_spill_slots"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise MoPConfigError(f"mop option {name}={value!r} must be a positive integer")
        for name in ("capacity_factor", "expert_spill_factor", "expert_bias_update_rate"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise MoPConfigError(f"mop option {name}={value!r} must be a finite number")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise MoPConfigError(
                f"mop option capacity_factor={self.capacity_factor!r} must be positive "
                "(e.g. 1.25), or None for dropless experts"
            )
        if self.expert_spill_factor is not None and not self.expert_spill_factor >= 1:
            raise MoPConfigError(
                f"mop option expert_spill_factor={self.expert_spill_factor!r} must be >= 1 (a bound "
                "relative to the mean rows per rank, e.g. 1.25), or None to turn spilling off"
            )
        if self.expert_bias_update_rate < 0:
            raise MoPConfigError(
                f"mop option expert_bias_update_rate={self.expert_bias_update_rate!r} must be >= 0 "
                "(e.g. 1e-3; 0 = off)"
            )
        for name in ("grad_compression_block", "powersgd_rank"):
            if getattr(self, name) < 1:
                raise MoPConfigError(f"mop option {name}={getattr(self, name)!r} must be a positive integer")
        if self.offload_prefetch < 0:
            raise MoPConfigError(f"mop option offload_prefetch={self.offload_prefetch!r} must be >= 0 "
                                 "(0 = reload each tensor right before its first use)")
        budget = self.memory_budget_gb
        if budget is not None and not (math.isfinite(budget) and budget > 0):
            raise MoPConfigError(f"mop option memory_budget_gb={budget!r} must be a positive finite number of "
                                 "GiB per rank (e.g. 40.0), or None for no budget")
        if self.offload == "auto" and budget is None:
            raise MoPConfigError("mop option offload='auto' chooses save, recompute or offload under a device "
                                 "budget, but memory_budget_gb=None; set memory_budget_gb (GiB per rank, e.g. 40.0) "
                                 "or choose offload='experts'")
        if self.memory_policy_hardware != "device" and self.offload != "auto":
            raise MoPConfigError(f"mop option memory_policy_hardware={self.memory_policy_hardware!r} acts only with "
                                 f"offload='auto', but offload={self.offload!r}; set offload='auto' or drop it")
        if budget is not None and self.offload != "auto":
            raise MoPConfigError(f"mop option memory_budget_gb={budget!r} acts only with offload='auto', but "
                                 f"offload={self.offload!r}; set offload='auto' or drop memory_budget_gb")
        if self.recompute == "full" and self.partitioner != "min_cut":
            raise MoPConfigError(f"mop option recompute='full' tags the nodes to recompute for the min-cut "
                                 f"partitioner, but partitioner={self.partitioner!r} saves every value backward "
                                 "needs; set partitioner='min_cut' or recompute='auto'")
        if self.recompute == "full" and self.offload == "auto":
            raise MoPConfigError("mop options recompute='full' and offload='auto' both decide what forward saves "
                                 "for backward; choose one: drop offload='auto' or set recompute='auto'")
        self._check_pipeline_options()
        if self.cp_attention != "all_gather" and self.cp == 1:
            raise MoPConfigError(f"mop option cp_attention={self.cp_attention!r} acts only with cp > 1, but cp=1; "
                                 "pass cp > 1 to mopc.parallelize or drop cp_attention")
        if self.powersgd_warmup_steps < 0:
            raise MoPConfigError(
                f"mop option powersgd_warmup_steps={self.powersgd_warmup_steps!r} must be >= 0 (0 = no warm-up)")
        self._check_compression_options()
        for name in ("collective_timeout_s", "first_step_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise MoPConfigError(f"mop option {name}={value!r} must be a positive number of seconds "
                                     f"(default {MoPConfig.__dataclass_fields__[name].default:g})")
        if self.bucket_mb < 0:
            raise MoPConfigError(f"mop option bucket_mb={self.bucket_mb!r} must be >= 0 (0 = no bucketing)")

    def _check_pipeline_options(self) -> None:
        """Schedule options need pp > 1 and must fit the schedule they name."""
        default = MoPConfig.__dataclass_fields__
        if self.pp == 1:
            given = [f"{n}={getattr(self, n)!r}" for n in ("microbatches", "schedule", "pp_virtual", "pp_split")
                     if getattr(self, n) != default[n].default]
            if given:
                raise MoPConfigError(f"mop option(s) {', '.join(given)} act only with pipeline parallelism, but "
                                     "pp=1; pass pp > 1 to mopc.parallelize or drop them")
            return
        if self.optimizer_offload:
            raise MoPConfigError(f"mop option optimizer_offload=True updates each parameter as soon as its gradient "
                                 f"is reduced, but under pp={self.pp} every micro-batch adds to the gradient; drop "
                                 "optimizer_offload (mopc.optim.HostAdamW still keeps its state on the host)")
        interleaved = self.schedule == "interleaved_1f1b"
        if interleaved and self.pp_virtual < 2:
            raise MoPConfigError(f"mop option schedule='interleaved_1f1b' needs pp_virtual >= 2 stages per rank, "
                                 f"but pp_virtual={self.pp_virtual}; pass pp_virtual=2 or schedule='1f1b'")
        if not interleaved and self.pp_virtual != 1:
            raise MoPConfigError(f"mop option pp_virtual={self.pp_virtual} (stages per rank) acts only with "
                                 f"schedule='interleaved_1f1b', but schedule={self.schedule!r}; pass "
                                 "schedule='interleaved_1f1b' or drop pp_virtual")
        m = self.num_microbatches
        if self.schedule != "gpipe" and m < self.pp:
            raise MoPConfigError(f"mop option microbatches={m} < pp={self.pp}: {self.schedule} needs at least pp "
                                 f"micro-batches to fill the pipeline; pass microbatches>={self.pp} or "
                                 "schedule='gpipe'")
        if interleaved and m % self.pp:
            raise MoPConfigError(f"mop option microbatches={m} is not a multiple of pp={self.pp}, which "
                                 f"schedule='interleaved_1f1b' needs; pass microbatches="
                                 f"{(m // self.pp + 1) * self.pp}")
        split = self.pp_split
        stages = self.pp * self.pp_virtual
        if split is not None and (len(split) != stages - 1 or list(split) != sorted(set(split)) or split[0] < 1):
            raise MoPConfigError(f"mop option pp_split={split!r} must list the first layer of every stage after the "
                                 f"first: {stages - 1} increasing layer indices >= 1 for {stages} stages "
                                 f"(e.g. pp_split={tuple(range(1, stages))})")

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per step (1 without pipeline parallelism)."""
        if self.pp == 1:
            return 1
        return self.microbatches if self.microbatches is not None else 2 * self.pp

    def _check_compression_options(self) -> None:
        """A compression sub-option that the chosen mode never reads would do nothing: refuse."""
        default = MoPConfig.__dataclass_fields__
        used_by = {"grad_compression_scope": ("skip_idle", "int8", "fp8", "powersgd"),
                   "grad_compression_block": ("int8", "fp8"),
                   "powersgd_rank": ("powersgd",), "powersgd_warmup_steps": ("powersgd",)}
        for name, modes in used_by.items():
            value = getattr(self, name)
            if value != default[name].default and self.grad_compression not in modes:
                raise MoPConfigError(
                    f"mop option {name}={value!r} acts only with grad_compression in {modes}, but "
                    f"grad_compression={self.grad_compression!r}; set grad_compression or drop {name}"
                )
        import torch

        if self.grad_compression == "fp8" and not hasattr(torch, "float8_e4m3fn"):
            raise MoPConfigError("mop option grad_compression='fp8' needs torch.float8_e4m3fn, which this "
                                 "torch build lacks; use grad_compression='int8'")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | MoPConfig | None) -> MoPConfig:
        """Build from `torch.compile(..., options=...)`; unknown keys are errors."""
        if options is None:
            return cls()
        if isinstance(options, MoPConfig):
            return options
        if not isinstance(options, Mapping):
            raise MoPConfigError(
                f"options must be a dict of MoPConfig fields, got {type(options).__name__}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        for key in options:
            if key not in known:
                close = difflib.get_close_matches(str(key), sorted(known), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise MoPConfigError(
                    f"unknown mop option {key!r}.{hint} Accepted options: {', '.join(sorted(known))}"
                )
        values = dict(options)
        passes = values.get("disable_passes")
        if isinstance(passes, str):  # "a,b" as in MOPC_DISABLE_PASSES
            values["disable_passes"] = tuple(p.strip() for p in passes.split(",") if p.strip())
        elif isinstance(passes, (list, set)):
            values["disable_passes"] = tuple(passes)
        if isinstance(values.get("dump_dir"), os.PathLike):
            values["dump_dir"] = os.fspath(values["dump_dir"])
        return cls(**values)

    @staticmethod
    def under_parallelize(base: MoPConfig, explicit: Mapping[str, Any]) -> MoPConfig:
        """The options `mopc.parallelize` was given, updated by torch.compile's `explicit` ones.

        A compile option that contradicts a layout field (how the parameters are sharded at
        rest) is an error: the shards cannot change under torch.compile.
        """
        for name in LAYOUT_FIELDS:
            if name in explicit and explicit[name] != getattr(base, name):
                raise MoPConfigError(
                    f"mop option {name}={explicit[name]!r} contradicts the layout mopc.parallelize chose "
                    f"({name}={getattr(base, name)!r}); drop it from torch.compile's options or pass it "
                    "to mopc.parallelize"
                )
        return MoPConfig.from_options({**dataclasses.asdict(base), **explicit})

    def mixed_precision(self):
        """The `mopc.runtime.ownership.MixedPrecision` these options ask for, or None when
        every dtype is fp32 (nothing is cast: the graphs of the default policy)."""
        import torch

        from mopc.runtime.ownership import MixedPrecision

        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
        param = dtypes[self.param_dtype]
        reduce = dtypes[self.reduce_dtype or self.param_dtype]
        master = dtypes[self.master_dtype]
        if param == reduce == master == torch.float32:
            return None
        return MixedPrecision(param=param, reduce=reduce, master=master)

    def check_expert_options(self) -> None:
        """Capacity and spilling shape the expert-parallel dispatch; without it they would do nothing."""
        given = [f"{n}={getattr(self, n)!r}" for n in EXPERT_FIELDS if getattr(self, n) is not None]
        if given and self.ep == 1:
            raise MoPConfigError(
                f"mop option(s) {', '.join(given)} act on the expert-parallel dispatch, but ep=1; pass ep > 1 "
                "to mopc.parallelize or drop them"
            )

    def check_no_layout(self, explicit: Mapping[str, Any]) -> None:
        """Layout options on a model `mopc.parallelize` did not shard would do nothing: refuse."""
        given = [n for n in (*LAYOUT_FIELDS, *EXPERT_FIELDS)
                 if n in explicit and explicit[n] != getattr(MoPConfig(), n)]
        if given:
            listed = ", ".join(f"{n}={explicit[n]!r}" for n in given)
            raise MoPConfigError(
                f"mop option(s) {listed} are set up by mopc.parallelize (layout, guard, timeouts), but this model was not "
                f"parallelized; call mopc.parallelize(model, example_inputs, {listed}) before torch.compile"
            )

    def non_default_fields(self) -> dict[str, Any]:
        """The fields set to something other than their default (what a user chose)."""
        default = MoPConfig()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}

    def replace(self, **changes: Any) -> MoPConfig:
        return MoPConfig.from_options({**dataclasses.asdict(self), **changes})


LAYOUT_FIELDS = ("tp", "dp", "cp", "cp_attention", "pp", "microbatches", "schedule", "pp_virtual", "pp_split",
                 "plan", "vocab_parallel", "ep", "expert_bias_update_rate",
                 "nan_guard", "check_inputs", "collective_timeout_s", "first_step_timeout_s",
                 "param_dtype", "reduce_dtype", "master_dtype")
"""Fields fixed by `mopc.parallelize` (how parameters are sharded at rest, and the
balancing hook, step guard and group timeouts it installs)."""

EXPERT_FIELDS = ("capacity_factor", "expert_spill_factor")
"""Fields that act on the expert-parallel dispatch: they need `ep > 1`."""


def _check_type(name: str, value: Any, hint: Any) -> None:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise MoPConfigError(
                f"mop option {name}={value!r} is not accepted; use one of {', '.join(map(repr, args))}"
            )
        return
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in args:
            try:
                _check_type(name, value, arg)
                return
            except MoPConfigError:
                continue
        raise MoPConfigError(f"mop option {name}={value!r} must be {hint}")
    if hint is type(None):
        if value is not None:
            raise MoPConfigError(f"mop option {name}={value!r} must be None")
        return
    if origin is tuple:
        if not isinstance(value, tuple) or not all(isinstance(v, args[0]) for v in value):
            raise MoPConfigError(f"mop option {name}={value!r} must be a tuple of {args[0].__name__}")
        return
    if hint is bool:
        if not isinstance(value, bool):
            raise MoPConfigError(f"mop option {name}={value!r} must be True or False")
        return
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MoPConfigError(f"mop option {name}={value!r} must be an integer")
        return
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MoPConfigError(f"mop option {name}={value!r} must be a number")
        return
    if isinstance(hint, type) and not isinstance(value, hint):
        raise MoPConfigError(f"mop option {name}={value!r} must be a {hint.__name__}")


__all__ = ["EXPERT_FIELDS", "LAYOUT_FIELDS", "MoPConfig", "MoPConfigError"]
