"""The plan report behind `mopc explain --nproc N`: what the parallelized program does.

One process plays rank `rank` of a `fake` process group of `nproc` ranks (collectives get
the right shapes and move no data), so any layout can be explained without launching
ranks. The model is `mopc.parallelize`d as under torchrun, compiled with the `mop`
backend and run for one training step (forward, backward, AdamW); the compilation is
recorded pass by pass.

The report gives, per layer and component, the role, the layout and the bytes this rank
holds; every collective of the partitioned forward and backward graphs with its group,
bytes and the pass that inserted it; the memory this rank's step used (measured by
`mopc.runtime.memory.MemoryTracker`) and a memory timeline estimated from the
partitioned graphs (`mopc.passes.analysis.memory_timeline`); and every pass's graph.
`PlanReport.text()` is the terminal version, `mopc.report_html.render_html` the
self-contained page (`mopc explain --html PATH`).

Algorithm:
1. create the fake process group (unless one of the right size exists), parallelize the
   preset on `meta` with this rank's batch;
2. compile with the backend's own compilation, its pipeline's dump writer swapped for a
   recorder that keeps each pass's graph text and the partitioned graphs' collectives, and
   walks the forward and backward graphs for the timeline;
3. run one step under `MemoryTracker`; tear the process group down if this made it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.fx import GraphModule

from mopc.passes.analysis.collectives import Collective, graph_collectives
from mopc.passes.analysis.memory_timeline import MemoryTimeline, memory_timeline
from mopc.passes.dump import format_graph

__all__ = ["PlanReport", "build_report"]

OFFLOAD_NOTE = "offload: none (offload='none'; --offload experts moves expert activations to host)"
REPORT_MODELS = ("tiny", "small")
"""Presets a report runs: it allocates this rank's shards and runs one step on the CPU."""


# ---------------------------------------------------------------------------- records


@dataclass(frozen=True)
class PassRecord:
    """One step of a graph's compilation: its graph after the step, as the dumps print it."""

    name: str
    kind: str
    """`input` (the captured joint graph), `analysis`, `rewrite` or `partition`."""
    seconds: float
    text: str
    op_count_diff: Mapping[str, int] | None
    note: str = ""


@dataclass(frozen=True)
class CollectiveRow:
    graph: str
    phase: str
    """`forward` or `backward`: the partitioned graph that runs it."""
    collective: Collective
    axis: str
    bytes_sent: int
    """Bytes this rank sends under ring/pairwise algorithms (`mopc.runtime.comm.bytes_sent` of the
    input: this rank's shard for an all-gather, the full input otherwise)."""


@dataclass(frozen=True)
class GraphRecord:
    graph_id: str
    passes: tuple[PassRecord, ...]
    collectives: tuple[CollectiveRow, ...]
    timeline: MemoryTimeline | None


@dataclass(frozen=True)
class ComponentRow:
    """The parameters of one (layer, role)."""

    layer: str
    role: str
    layout: str
    num_tensors: int
    numel: int
    full_bytes: int
    bytes_per_rank: int
    """This rank's shards at rest."""
    gathered_bytes_per_rank: int
    """What this rank gathers of them in a step (0 for the vocabulary shard, used in place)."""


@dataclass(frozen=True)
class LayerCommRow:
    """The collectives of one layer (by their node's layer; embedding, vocabulary projection and
    loss collectives outside the layers), per phase and pass."""

    layer: str
    num_forward: int
    num_backward: int
    sent_forward: int
    sent_backward: int
    by_pass: Mapping[str, int]
    """Inserting pass -> collectives."""


@dataclass(frozen=True)
class ParamRow:
    fqn: str
    role: str
    layer: str
    shape: tuple[int, ...]
    layout: str
    bytes_per_rank: int


@dataclass(frozen=True)
class PlanReport:
    model: str
    world_size: int
    rank: int
    batch: int
    seq_len: int
    options: Mapping[str, Any]
    mesh: str
    """`Plan.summary()`: the mesh, tensors per layout kind, the plan's notes."""
    components: tuple[ComponentRow, ...]
    layer_comm: tuple[LayerCommRow, ...]
    params: tuple[ParamRow, ...]
    graphs: tuple[GraphRecord, ...]
    memory: Mapping[str, int]
    """`MemoryTracker.report()` of the step: params, grads, optimizer, activations_peak, peak, peak_rss."""
    seconds: float
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def collectives(self) -> list[CollectiveRow]:
        return [c for g in self.graphs for c in g.collectives]

    def text(self, *, params: bool = False) -> str:
        return _format_text(self, params=params)


# ---------------------------------------------------------------------------- offload

_DTYPE_BYTES = {"f64": 8, "f32": 4, "f16": 2, "bf16": 2, "i64": 8, "i32": 4, "i16": 2, "i8": 1, "u8": 1, "b8": 1}
_OFFLOAD_LINE = re.compile(r"^%(\S+): (\w+)\[([^\]]*)\] = mopc\.offload\(%([^)]+)\)(.*)$")
OFFLOAD_HEADER = ("graph", "saved tensor", "tensor", "bytes", "node")


def offloaded_tensors(report: PlanReport) -> list[tuple[str, str, str, int | None, str]]:
    """(graph, saved tensor, dtype[shape], bytes, role/layer) of every `mopc.offload` in the
    partitioned forward graphs (the `offload` rewrite's work). Bytes are None for a shape
    known only at run time (the rows an expert-parallel rank receives)."""
    rows = []
    for graph in report.graphs:
        for p in graph.passes:
            if p.kind != "partition" or p.name != "forward":
                continue
            for line in p.text.splitlines():
                m = _OFFLOAD_LINE.match(line.strip())
                if m:
                    _, dtype, shape, source, rest = m.groups()
                    dims = [x.strip() for x in shape.split(",") if x.strip()]
                    nbytes = math.prod(int(x) for x in dims) * _DTYPE_BYTES.get(dtype, 4) \
                        if all(x.isdigit() for x in dims) else None
                    rows.append((graph.graph_id, source, f"{dtype}[{shape}]", nbytes, rest.strip().lstrip("#").strip()))
    return rows


def offload_note(report: PlanReport) -> str:
    rows = offloaded_tensors(report)
    if not rows:
        return OFFLOAD_NOTE
    known = [r[3] for r in rows if r[3] is not None]
    unknown = len(rows) - len(known)
    return (f"offload: {len(rows)} saved tensors ({human_bytes(sum(known))}"
            + (f" plus {unknown} sized at run time" if unknown else "")
            + f") go to host memory between forward and backward (offload={report.options.get('offload')!r})")


def offload_cells(row: tuple[str, str, str, int | None, str]) -> list[str]:
    return [*row[:3], "run time" if row[3] is None else f"{row[3]:,}", row[4]]


# ---------------------------------------------------------------------------- formatting helpers


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> list[str]:
    """Plain-text table; columns listed in `right` are right-aligned."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.rjust(w) if i in right else c.ljust(w)
                                for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
    return [fmt(cells[0]), "  ".join("-" * w for w in widths), *map(fmt, cells[1:])]


def collective_cells(row: CollectiveRow) -> list[str]:
    c = row.collective
    layer = "" if c.layer is None else str(c.layer)
    return [row.phase, c.kind, row.axis, str(c.group_size), f"{c.bytes_in:,}", f"{c.bytes_out:,}",
            f"{row.bytes_sent:,}", c.created_by, c.role, layer, c.node]


COLLECTIVE_HEADER = ("phase", "op", "axis", "ranks", "in B/rank", "out B/rank", "sent B/rank", "inserted by",
                     "role", "layer", "node")
COMPONENT_HEADER = ("layer", "component", "layout", "tensors", "params", "full bytes", "bytes/rank",
                    "gathered B/rank")
LAYER_COMM_HEADER = ("layer", "forward", "backward", "sent forward B/rank", "sent backward B/rank", "inserted by")


def component_cells(row: ComponentRow) -> list[str]:
    return [row.layer, row.role, row.layout, str(row.num_tensors), f"{row.numel:,}", f"{row.full_bytes:,}",
            f"{row.bytes_per_rank:,}", f"{row.gathered_bytes_per_rank:,}"]


def layer_comm_cells(row: LayerCommRow) -> list[str]:
    return [row.layer, str(row.num_forward), str(row.num_backward), f"{row.sent_forward:,}",
            f"{row.sent_backward:,}", ", ".join(f"{k} {v}" for k, v in row.by_pass.items())]


MEMORY_KEYS = (("params", "parameter shards"), ("grads", "gradient shards (most seen)"),
               ("optimizer", "optimizer state (AdamW)"), ("activations_peak", "saved activations (peak)"),
               ("peak", "peak of their sum (device tier)"), ("host_peak", "offloaded to host (peak)"),
               ("peak_rss", "process peak RSS (cross-check)"))


def _format_text(report: PlanReport, *, params: bool) -> str:
    opts = ", ".join(f"{k}={v!r}" for k, v in sorted(report.options.items())) or "defaults"
    lines = [
        (f"mopc explain: plan report for {report.model} at world {report.world_size} "
        f"(rank {report.rank} of a fake process group), batch [{report.batch}, {report.seq_len}] per rank"),
        f"options: {opts}; built, compiled and stepped once in {report.seconds:.1f}s",
        report.mesh, "",
        "per layer and component (bytes of this rank: its shards at rest, what it gathers of them per step)",
        *table(COMPONENT_HEADER, [component_cells(r) for r in report.components], right=(3, 4, 5, 6, 7)),
        "", "collectives per layer (by the layer of their node)",
        *table(LAYER_COMM_HEADER, [layer_comm_cells(r) for r in report.layer_comm], right=(1, 2, 3, 4)),
    ]
    if params:
        lines += ["", "parameters",
                  *table(("parameter", "role", "shape", "layout", "bytes/rank"),
                         [(p.fqn, p.role, "x".join(map(str, p.shape)), p.layout, f"{p.bytes_per_rank:,}")
                          for p in report.params], right=(4,))]
    for graph in report.graphs:
        rows = graph.collectives
        sent = sum(r.bytes_sent for r in rows)
        lines += ["", (f"collectives of graph {graph.graph_id} ({len(rows)}, {human_bytes(sent)} sent by this rank "
                      "per step; bytes of the tensors on this rank)"),
                  *table(COLLECTIVE_HEADER, [collective_cells(r) for r in rows], right=(3, 4, 5, 6))]
    offloaded = offloaded_tensors(report)
    lines += ["", offload_note(report)]
    if offloaded:
        lines += table(OFFLOAD_HEADER, [offload_cells(r) for r in offloaded], right=(3,))
    lines += ["", "memory of this rank's step (measured: live storages by category, mopc/runtime/memory.py)"]
    lines += [f"  {label:32s} {human_bytes(report.memory.get(key, 0)):>12s}" for key, label in MEMORY_KEYS]
    for graph in report.graphs:
        lines += ["", *_timeline_text(graph.timeline)]
    lines += ["", "passes (graph, pass, kind, ms, op-count diff)"]
    for graph in report.graphs:
        for p in graph.passes:
            lines.append(f"  {graph.graph_id:4s} {p.name:22s} {p.kind:9s} {p.seconds * 1e3:8.1f}  "
                         f"{diff_summary(p.op_count_diff)}")
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


def diff_summary(diff: Mapping[str, int] | None) -> str:
    if diff is None:
        return "n/a"
    return ", ".join(f"{'+' if v > 0 else ''}{v} {k}" for k, v in diff.items()) or "no change"


def _timeline_text(timeline: MemoryTimeline | None) -> list[str]:
    if timeline is None:
        return ["memory timeline: not computed (no partitioned forward/backward graphs were recorded)"]
    peak = timeline.peak
    out = [(f"memory timeline of graph {timeline.graph} (estimate from the partitioned graphs' tensor sizes; "
           f"{len(timeline.points)} nodes): peak {human_bytes(peak.total)} after {peak.phase} node {peak.node}"),
           (f"  at the peak: parameter shards and inputs {human_bytes(peak.params)}, saved activations "
           f"{human_bytes(peak.saved)}, temporaries {human_bytes(peak.temporaries)}, gradient shards "
           f"{human_bytes(peak.grads)}")]
    end_fw = timeline.points[timeline.num_forward - 1] if timeline.num_forward else None
    if end_fw is not None:
        out.append(f"  end of forward: saved activations {human_bytes(end_fw.saved)}")
    if timeline.unknown_sizes:
        out.append(f"  {timeline.unknown_sizes} tensors have sizes known only at run time (expert dispatch rows) "
                   "and count as 0")
    return out


# ---------------------------------------------------------------------------- recording the compilation


class _Recorder:
    """A dump writer (the `write` the pipeline and the backend call) that keeps what it is given."""

    def __init__(self, graph_id: str, param_fqns: dict[str, str], inner: Any) -> None:
        self.graph_id = graph_id
        self.param_fqns = param_fqns
        self.inner = inner  # the real DumpWriter when dumps are on
        self.dir = getattr(inner, "dir", None)
        self.passes: list[PassRecord] = []
        self.collectives: list[CollectiveRow] = []
        self.forward: GraphModule | None = None
        self.timeline: MemoryTimeline | None = None

    def write(self, step_name: str, gm: GraphModule, *, kind: str, seconds: float,
              diff: dict[str, int] | None, note: str = "", roles: Any = None) -> None:
        if self.inner is not None:
            self.inner.write(step_name, gm, kind=kind, seconds=seconds, diff=diff, note=note, roles=roles)
        self.passes.append(PassRecord(name=step_name, kind=kind, seconds=seconds,
                                      text=format_graph(gm, self.param_fqns, roles),
                                      op_count_diff=None if diff is None else dict(diff), note=note))
        if kind != "partition":
            return
        from mopc.runtime.comm import bytes_sent

        axes = _group_axes()
        for c in graph_collectives(gm):
            self.collectives.append(CollectiveRow(graph=self.graph_id, phase=step_name, collective=c,
                                                  axis=axes.get(c.group, "?"),
                                                  bytes_sent=bytes_sent(c.kind, c.bytes_in, c.group_size)))
        if step_name == "forward":
            self.forward = gm
        elif step_name == "backward" and self.forward is not None:
            self.timeline = memory_timeline(self.graph_id, self.forward, gm)
            self.forward = None

    def record(self) -> GraphRecord:
        return GraphRecord(graph_id=self.graph_id, passes=tuple(self.passes),
                           collectives=tuple(self.collectives), timeline=self.timeline)


def _group_axes() -> dict[str, str]:
    """Process-group name -> every mesh axis it is (`world/tp` when tp spans the world)."""
    from mopc.plan.mesh import _MESHES

    axes: dict[str, list[str]] = defaultdict(list)
    for meshes in _MESHES.values():
        if meshes.default_group is not dist.group.WORLD:
            continue
        for axis in ("world", "dp", "tp", "cp", "ep", "edp"):
            name = getattr(meshes, f"{axis}_group")
            if name is not None and axis not in axes[name]:
                axes[name].append(axis)
    return {name: "/".join(a) for name, a in axes.items()}


def _recording_backend(records: list[_Recorder], dump_dir: str | None) -> Any:
    from mopc.backend import _Compilation
    from mopc.config import MoPConfig
    from mopc.passes.pipeline import Pipeline

    @dataclass(frozen=True)
    class RecordingPipeline(Pipeline):
        def make_writer(self, ctx: Any) -> Any:
            recorder = _Recorder(str(ctx.graph_id), dict(ctx.param_fqns), super().make_writer(ctx))
            records.append(recorder)
            return recorder

    def backend(gm: GraphModule, example_inputs: Sequence[Any]) -> Any:
        options = {"dump_dir": dump_dir} if dump_dir else {}
        compilation = _Compilation(gm, example_inputs, MoPConfig.from_options(options), options)
        fields = {f.name: getattr(compilation.pipeline, f.name) for f in dataclasses.fields(Pipeline)}
        compilation.pipeline = RecordingPipeline(**fields)
        return compilation.compile(gm, example_inputs)

    return backend


# ---------------------------------------------------------------------------- tables from the plan


def layer_label(fqn: str, role: str) -> str:
    from mopc.passes.analysis.role_defs import layer_of

    layer = layer_of(fqn)
    if layer is not None:
        return f"layer {layer}"
    return "embedding" if role == "embedding" else "head"


def _layer_order(label: str) -> tuple[int, int]:
    if label == "embedding":
        return (0, 0)
    if label.startswith("layer "):
        return (1, int(label.split()[1]))
    return (2, 0)


def describe_layout(layout: Any, spec: Any) -> str:
    if layout.kind == "tp":
        return f"tp: dim {layout.chunk_dim} / {spec.tp}, ZeRO-3 over dp {spec.dp}"
    if layout.kind == "ep":
        return (f"ep: {layout.shape[0] // layout.num_chunks} of {layout.shape[0]} experts, "
                f"ZeRO-3 over edp {spec.world_size // spec.ep}")
    if layout.kind == "vocab":
        return f"vocab: rows / {layout.num_chunks}, never gathered"
    return f"flat: ZeRO-3 over world {spec.world_size}"


def gathered_numel(layout: Any) -> int:
    """What a rank gathers of a parameter per step: its (padded) chunk; nothing for the vocabulary shard."""
    return 0 if layout.kind == "vocab" else layout.num_pieces * layout.piece_numel


def collective_layer(c: Collective) -> str:
    """The layer label of a collective: its node's layer; the embedding's, the vocabulary
    projection's and the loss's outside the layers (a backward node may carry a layer there)."""
    if c.role == "embedding":
        return "embedding"
    if c.role in ("vocab_projection", "loss") or c.layer is None:
        return "head"
    return f"layer {c.layer}"


def _tables(model: torch.nn.Module, plan: Any, collectives: Sequence[CollectiveRow]
            ) -> tuple[tuple[ComponentRow, ...], tuple[LayerCommRow, ...], tuple[ParamRow, ...]]:
    itemsize = {fqn: p.element_size() for fqn, p in model.named_parameters()}
    groups: dict[tuple[str, str], dict[str, Any]] = defaultdict(
        lambda: {"layouts": [], "tensors": 0, "numel": 0, "full": 0, "rank": 0, "gathered": 0})
    params = []
    for fqn, layout in plan.layouts.items():
        role = plan.param_roles.get(fqn, "other")
        label = layer_label(fqn, role)
        size = itemsize.get(fqn, 4)
        text = describe_layout(layout, plan.spec)
        g = groups[(label, role)]
        if text not in g["layouts"]:
            g["layouts"].append(text)
        g["tensors"] += 1
        g["numel"] += math.prod(layout.shape)
        g["full"] += math.prod(layout.shape) * size
        g["rank"] += layout.piece_numel * size
        g["gathered"] += gathered_numel(layout) * size
        params.append(ParamRow(fqn=fqn, role=role, layer=label, shape=tuple(layout.shape), layout=text,
                               bytes_per_rank=layout.piece_numel * size))
    rows = [ComponentRow(layer=label, role=role, layout="; ".join(g["layouts"]), num_tensors=g["tensors"],
                         numel=g["numel"], full_bytes=g["full"], bytes_per_rank=g["rank"],
                         gathered_bytes_per_rank=g["gathered"])
            for (label, role), g in groups.items()]
    rows.sort(key=lambda r: (_layer_order(r.layer), r.role))
    comm: dict[str, dict[str, Any]] = defaultdict(lambda: {"forward": 0, "backward": 0, "sent_forward": 0,
                                                           "sent_backward": 0, "by_pass": defaultdict(int)})
    for row in collectives:
        g = comm[collective_layer(row.collective)]
        g[row.phase] += 1
        g[f"sent_{row.phase}"] += row.bytes_sent
        g["by_pass"][row.collective.created_by] += 1
    layer_comm = [LayerCommRow(layer=label, num_forward=g["forward"], num_backward=g["backward"],
                               sent_forward=g["sent_forward"], sent_backward=g["sent_backward"],
                               by_pass=dict(sorted(g["by_pass"].items())))
                  for label, g in sorted(comm.items(), key=lambda kv: _layer_order(kv[0]))]
    return tuple(rows), tuple(layer_comm), tuple(params)


# ---------------------------------------------------------------------------- building the report


def add_option_flags(parser: Any, skip: Sequence[str] = ()) -> None:
    """`mopc train`'s MoPConfig flags for `mopc explain`, less the names in `skip` (its own flags)."""
    import argparse
    import typing

    from mopc.cli import _MOP_DEST, _field_docs, _flag_kwargs
    from mopc.config import MoPConfig

    group = parser.add_argument_group("mop options for the plan report (fields of mopc.MoPConfig, given to "
                                      "mopc.parallelize; only the ones given are passed)")
    hints = typing.get_type_hints(MoPConfig)
    docs = _field_docs(MoPConfig)
    for f in dataclasses.fields(MoPConfig):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        group.add_argument("--" + f.name.replace("_", "-"), dest=_MOP_DEST + f.name, default=argparse.SUPPRESS,
                           help=f"{docs.get(f.name, '')} (default: {default!r})".strip(),
                           **_flag_kwargs(f.name, hints[f.name]))


def _process_group(world_size: int, rank: int) -> bool:
    """Make a fake default group of `world_size` ranks; True when this call made it."""
    if dist.is_initialized():
        if dist.get_backend() != "fake" or dist.get_world_size() != world_size:
            raise RuntimeError(
                f"mopc explain: a {dist.get_backend()} process group of {dist.get_world_size()} ranks exists; "
                f"the plan report needs a fake one of {world_size} (or none, and it makes one)")
        return False
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    return True


def build_report(model_name: str, world_size: int, options: Mapping[str, Any] | None = None, *,
                 rank: int = 0, batch: int = 2, seq_len: int = 16, seed: int = 0,
                 dump_dir: str | None = None) -> PlanReport:
    """The plan report of preset `model_name` at `world_size` ranks with mop `options`.

    `batch` rows of `seq_len` tokens per rank. `dump_dir` also writes the usual pass dumps.
    """
    import time

    import mopc
    from mopc.models import build_model, make_init_fn
    from mopc.runtime.memory import MemoryTracker
    from mopc.runtime.trainer import synthetic_batch

    if model_name not in REPORT_MODELS:
        raise ValueError(f"mopc explain --nproc: the plan report runs one step of this rank's program on the CPU, "
                         f"so it takes {' or '.join(REPORT_MODELS)}, not {model_name!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"mopc explain: rank {rank} is not in a world of {world_size}; pass 0..{world_size - 1}")
    options = dict(options or {})
    options.pop("dump_dir", None)
    start = time.perf_counter()
    made = _process_group(world_size, rank)
    rank = dist.get_rank()  # an existing fake group's
    try:
        torch.manual_seed(seed)
        model = build_model(model_name, device="meta", seed=seed)
        full = synthetic_batch(0, batch * world_size, seq_len, model.config.vocab_size, seed)
        example = {k: v[rank * batch:(rank + 1) * batch].contiguous() for k, v in full.items()}
        model = mopc.parallelize(model, example, init_fn=make_init_fn(model, seed), **options)
        records: list[_Recorder] = []
        step = torch.compile(model, backend=_recording_backend(records, dump_dir))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tracker = MemoryTracker(model, optimizer, rank=rank)
        with tracker.step():
            loss = step(**example)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        plan = model.mopc_plan
        graphs = tuple(r.record() for r in records)
        collectives = [c for g in graphs for c in g.collectives]
        components, layer_comm, params = _tables(model, plan, collectives)
        notes = ["the fake process group moves no data: shapes and bytes are exact, values are not",
                 ("a collective carries its node's layer and role; a bucketed all-gather or reduce-scatter "
                  "(gather_params) carries its first member's role, and its bytes cover the whole bucket")]
        if any(g.timeline is not None and g.timeline.unknown_sizes for g in graphs):
            notes.append("rows an expert-parallel rank receives are known only at run time: collectives count "
                         "them as the rows sent, the timeline as 0")
        return PlanReport(
            model=model_name, world_size=world_size, rank=rank, batch=batch, seq_len=seq_len,
            options=dict(options), mesh=plan.summary(), components=components, layer_comm=layer_comm,
            params=params, graphs=graphs, memory=tracker.report(),
            seconds=time.perf_counter() - start, notes=tuple(notes))
    finally:
        if made:
            dist.destroy_process_group()
