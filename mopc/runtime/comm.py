"""Bytes moved by collectives, measured from the process groups' flight recorder.

Every collective that reaches a c10d ProcessGroup (gloo or NCCL) is recorded by
PyTorch's flight recorder with its op name, process group and input/output sizes and
dtypes: the functional collectives inside mop's compiled graphs
(`torch.ops._c10d_functional.*`), FSDP2's all-gathers and reduce-scatters, DDP's bucketed
all-reduces alike. The recorder is on when `TORCH_FR_BUFFER_SIZE` is set before the first
process group is created (`enable_flight_recorder()` sets it); `CommCounter` reads the
records made between two marks.

What is counted, per rank, is the bytes this rank *sends* under the usual bandwidth-
optimal algorithms, from the sizes of the tensors the collective actually ran on
(N = the rank's input bytes, W = the process group's size):

| collective | bytes sent |
|---|---|
| all_reduce (ring: reduce-scatter then all-gather) | 2 N (W-1)/W |
| all_gather (N = this rank's shard) | N (W-1) |
| reduce_scatter (N = the full input) | N (W-1)/W |
| all_to_all (N = the full input, even splits assumed) | N (W-1)/W |
| broadcast, scatter, gather, reduce | N (W-1)/W |
| send / recv | N / 0 |
| barrier | 0 |

Gloo's real algorithms differ in constants, not in these totals' scaling; the table is
the model the `comm_bytes_source` note in reports refers to. Gloo has no native
reduce-scatter: `ProcessGroupGloo` runs `reduce_scatter_tensor` (functional or not) as an
all-reduce of the full input, and the recorder names it `all_reduce`, so on gloo
gradient reduce-scatters (mop's and FSDP2's) count at all-reduce cost. That is what gloo
sends; NCCL runs a real reduce-scatter at half that.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("mopc")

__all__ = ["COMM_BYTES_SOURCE", "CommCounter", "CommStats", "count_comm_bytes", "enable_flight_recorder",
           "mesh_axes"]

COMM_BYTES_SOURCE = ("measured: the flight recorder's record of every collective each ProcessGroup ran, "
                     "bytes sent per rank under ring/pairwise algorithms (mopc/runtime/comm.py)")

# Records kept; a window is one training step (tiny: ~20 collectives, small with ep: ~175).
# Every mark and count pickles the whole ring, so a larger buffer costs time per step once it
# is full (outside the timed step, but in the wall time of long runs); a step that runs more
# collectives than this is reported incomplete, with a warning to raise it.
_DEFAULT_BUFFER = 2_000

_DTYPE_BYTES = {
    "Float": 4, "Double": 8, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2,
    "Char": 1, "Byte": 1, "Bool": 1, "Float8_e4m3fn": 1, "Float8_e5m2": 1, "ComplexFloat": 8,
}


def enable_flight_recorder(buffer_size: int = _DEFAULT_BUFFER) -> None:
    """Turn the flight recorder on for process groups created after this call."""
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", str(buffer_size))


def _numel(size: list[int]) -> int:
    n = 1
    for s in size:
        n *= int(s)
    return n


def _tensor_bytes(sizes: list[list[int]], dtypes: list[str]) -> int:
    total = 0
    for i, size in enumerate(sizes):
        dtype = dtypes[i] if i < len(dtypes) else "Float"
        total += _numel(size) * _DTYPE_BYTES.get(dtype, 4)
    return total


def _kind(profiling_name: str) -> str:
    """'gloo:all_gather' / 'nccl:_allgather_base' / ... -> a canonical collective name."""
    name = profiling_name.split(":", 1)[-1].lower().lstrip("_")
    for kind in ("reduce_scatter", "all_reduce", "allreduce", "all_gather", "allgather",
                 "all_to_all", "alltoall", "broadcast", "barrier", "scatter", "gather", "reduce",
                 "send", "recv"):
        if name.startswith(kind):
            return {"allreduce": "all_reduce", "allgather": "all_gather", "alltoall": "all_to_all"}.get(kind, kind)
    return name


def bytes_sent(kind: str, input_bytes: int, group_size: int) -> int:
    """Bytes one rank sends for a collective of `kind` on `input_bytes` (see the module table)."""
    w = max(group_size, 1)
    if w == 1 or kind in ("barrier", "recv"):
        return 0
    if kind == "all_reduce":
        return 2 * input_bytes * (w - 1) // w
    if kind == "all_gather":
        return input_bytes * (w - 1)
    if kind == "send":
        return input_bytes
    return input_bytes * (w - 1) // w


@dataclass
class CommStats:
    """Collectives run between two marks: bytes sent by this rank, and per kind."""

    bytes_sent: int = 0
    num_collectives: int = 0
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    by_axis: dict[str, int] = field(default_factory=dict)
    """Bytes sent per mesh axis and kind, keyed `axis:kind` (e.g. `edp:all_to_all`); the axis
    is the name the counter was given for the process group (`other` when unknown)."""
    complete: bool = True
    """False when the recorder's ring buffer dropped records (raise TORCH_FR_BUFFER_SIZE)."""


def _dump() -> dict[str, Any] | None:
    try:
        from torch._C._distributed_c10d import _dump_fr_trace
    except ImportError:
        return None
    try:
        return pickle.loads(_dump_fr_trace(includeCollectives=True, includeStackTraces=False))
    except Exception as err:  # noqa: BLE001 - the recorder is a diagnostic, never fatal
        log.debug("flight recorder dump failed: %s", err)
        return None


def _group_size(pg_name: str, cache: dict[str, int]) -> int:
    if pg_name not in cache:
        import torch.distributed as dist

        try:
            cache[pg_name] = dist.distributed_c10d._resolve_process_group(pg_name).size()
        except Exception:  # noqa: BLE001 - a group destroyed since: assume the world
            cache[pg_name] = dist.get_world_size() if dist.is_initialized() else 1
    return cache[pg_name]


class CommCounter:
    """Counts the collectives this process ran between `mark()` and `since_mark()`.

    `axes` names process groups (`{group_name: "edp"}`; `mesh_axes()` gives mopc's) so that
    `by_axis` can tell, say, expert-gradient reductions from dense ones."""

    def __init__(self, axes: dict[str, str] | None = None) -> None:
        self._last_record = self._latest_record_id()
        self._group_sizes: dict[str, int] = {}
        self.axes = dict(axes or {})

    @staticmethod
    def _latest_record_id() -> int:
        trace = _dump()
        entries = (trace or {}).get("entries") or []
        return max((e["record_id"] for e in entries), default=-1)

    def mark(self) -> None:
        """Start a new window: later `since_mark()` counts only collectives after now."""
        self._last_record = self._latest_record_id()

    def since_mark(self) -> CommStats:
        """The collectives recorded since the last mark (and move the mark to now)."""
        trace = _dump()
        stats = CommStats()
        if trace is None:
            stats.complete = False
            return stats
        entries = [e for e in trace.get("entries") or [] if e["record_id"] > self._last_record]
        if entries and entries[0]["record_id"] != self._last_record + 1 and self._last_record >= 0:
            stats.complete = False
            log.warning("flight recorder dropped records; raise TORCH_FR_BUFFER_SIZE for exact comm bytes")
        for e in entries:
            kind = _kind(e.get("profiling_name", ""))
            pg_name = str(e["process_group"][0])
            size = _group_size(pg_name, self._group_sizes)
            payload = _tensor_bytes(e.get("input_sizes") or [], e.get("input_dtypes") or [])
            sent = bytes_sent(kind, payload, size)
            stats.bytes_sent += sent
            stats.num_collectives += 1
            slot = stats.by_kind.setdefault(kind, {"count": 0, "input_bytes": 0, "bytes_sent": 0})
            slot["count"] += 1
            slot["input_bytes"] += payload
            slot["bytes_sent"] += sent
            axis = f"{self.axes.get(pg_name, 'other')}:{kind}"
            stats.by_axis[axis] = stats.by_axis.get(axis, 0) + sent
        if entries:
            self._last_record = entries[-1]["record_id"]
        return stats


def mesh_axes() -> dict[str, str]:
    """Process-group name -> mesh axis (`world`, `dp`, `tp`, `cp`, `ep`, `edp`, `pp`) of every mesh mopc built.

    A group that is several axes at once (with ep=1 the expert-data-parallel group is the
    world) takes the most general name: world, then dp, tp, cp, ep, edp."""
    from mopc.plan.mesh import _MESHES

    axes: dict[str, str] = {}
    for meshes in _MESHES.values():
        for axis in ("edp", "ep", "cp", "tp", "dp", "world", "pp"):
            group = getattr(meshes, f"{axis}_group")
            if group is not None:
                axes[group] = axis
    return axes


def count_comm_bytes(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, CommStats]:
    """Run `fn(*args, **kwargs)` and return its result with the collectives it ran."""
    counter = CommCounter()
    result = fn(*args, **kwargs)
    return result, counter.since_mark()

