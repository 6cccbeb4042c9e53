"""Live-storage memory accounting per rank, for eager and compiled training steps.

`torch.distributed._tools.mem_tracker.MemTracker` is a TorchDispatchMode, under which
Dynamo skips frames, and the profiler records too little on CPU. What works for both
eager and compiled steps is counting the bytes of live storages by category:

- params: this rank's parameter storages (a DTensor parameter counts its local shard);
- grads: the storages of the parameters' `.grad` (local shards likewise);
- optimizer: the tensors in `optimizer.state` (Adam's moments, step counters, ...);
  those in host memory (`mopc.optim.HostAdamW`'s state and master copies) are counted
  apart as `optimizer_host`, outside the device-tier peak;
- activations: storages saved for backward. A `saved_tensors_hooks` pack hook sees every
  tensor autograd saves, compiled regions included (AOTAutograd saves through
  `ctx.save_for_backward`). Each untyped storage counts once while any saved reference
  to it is alive; the reference dies when autograd frees the saved slot, after that
  node's backward. Storages that are parameters, grads or optimizer state are not
  counted twice.

The peak is the largest params + grads + optimizer + live activations seen at the
sample points: the start of the step, every save, every release of a saved storage,
every gradient accumulation into a parameter and the end of every optimizer step. Memory
that is never saved for backward (temporaries between two saves, a gathered weight used
and dropped within forward) is not seen; `peak_rss`, the process's resident high-water
mark, is the cross-check that includes everything (Python, libraries, allocator slack).

    tracker = MemoryTracker(model, optimizer)
    for batch in data:
        with tracker.step():
            loss = compiled(**batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    tracker.report()   # {"rank", "params", "grads", "optimizer", "activations_peak", "peak", "peak_rss"}
"""

from __future__ import annotations

import logging
import resource
import sys
import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from mopc.runtime.offload import is_host_tier, reload_listeners

log = logging.getLogger("mopc")

__all__ = ["MemoryReport", "MemoryTracker", "TimelineSample", "local_tensor", "peak_rss_bytes", "storage_bytes"]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage this rank holds: a DTensor's local shard, else `t`."""
    inner = getattr(t, "_local_tensor", None)
    return inner if isinstance(inner, torch.Tensor) else t


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    """(data_ptr, nbytes) of the untyped storage behind `t`, or None if it has none."""
    t = local_tensor(t)
    if t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor):
        return None
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # wrapper subclasses without a storage
        return None
    nbytes = storage.nbytes()
    return (storage.data_ptr(), nbytes) if nbytes else None


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct untyped storages behind `tensors` (each storage once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        key = _storage_key(t)
        if key is not None:
            seen[key[0]] = key[1]
    return sum(seen.values())


def peak_rss_bytes() -> int:
    """The process's peak resident set size in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _optimizer_tensors(optimizer: torch.optim.Optimizer | None) -> Iterator[torch.Tensor]:
    if optimizer is None:
        return
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                yield value


@dataclass
class MemoryReport:
    """One rank's memory by category, in bytes (activations and peak: the largest seen)."""

    rank: int
    params: int
    grads: int
    optimizer: int
    activations_peak: int
    peak: int
    peak_rss: int
    host_peak: int = 0
    """Most bytes of offloaded activations held in host memory at once (`offload`)."""
    optimizer_host: int = 0
    """Optimizer state (and master copies) kept in host memory (`mopc.optim.HostAdamW`)."""

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class TimelineSample:
    """This rank's bytes at one sample point of a step (module doc): device-tier by
    category, and `host`, the saved activations `offload` moved to host memory."""

    seconds: float
    """Since the start of the step."""
    event: str
    """`step start`, `save` (autograd saved a new storage), `release` (a saved storage was
    freed), `reload` (backward brought an offloaded tensor back), `grad` (a gradient was
    accumulated), `optimizer step`, `step end`."""
    params: int
    grads: int
    optimizer: int
    activations: int
    """Device-tier: saved storages autograd holds, plus tensors reloaded from host."""
    host: int = 0
    """Saved activations `offload` moved to host memory."""
    optimizer_host: int = 0
    """Optimizer state and master copies held in host memory (`mopc.optim.HostAdamW`)."""

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations


class _Saved:
    """What the pack hook hands autograd in place of a saved tensor; its death (autograd
    freeing the saved slot) is what releases the storage in the count."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


@dataclass
class _Entry:
    """One saved storage: how many saved references hold it, and its size."""

    storage: torch.UntypedStorage
    refs: int
    nbytes: int
    resizable: bool
    """A leaf's storage (an input or a gathered parameter): its owner may free it with
    `untyped_storage().resize_(0)` while autograd still holds it (FSDP2 does, after
    forward) and re-allocate it in backward, so its size is read again at each sample."""


def _is_leaf_storage(t: torch.Tensor) -> bool:
    base = t._base if t._base is not None else t
    return base.is_leaf


class MemoryTracker:
    """Counts this rank's live bytes by category over training steps; see the module doc."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 rank: int | None = None, timeline: bool = False) -> None:
        self.model = model
        self.record_timeline = timeline
        self.timeline: list[TimelineSample] = []
        """With `timeline=True`: every sample of the last step (see `TimelineSample`)."""
        self._step_start = 0.0
        self.optimizer = optimizer
        self.rank = _default_rank() if rank is None else rank
        # Keyed by id() of the storage object: the entry holds the storage, so the id is
        # not reused while the entry lives, and it survives a resize (a data_ptr does not).
        self._live: dict[int, _Entry] = {}
        self._fixed_bytes = 0  # live saved bytes of entries that are not resizable
        self._host: dict[int, int] = {}  # saved host-tier (offloaded) storages -> bytes
        self._reloaded: dict[int, int] = {}  # tensors mopc::reload brought back, alive -> bytes
        self._host_peak = 0
        self._resizable: dict[int, _Entry] = {}
        self._owned: set[int] = set()  # data_ptrs of params, grads and optimizer state
        self._params = self._grads = self._grads_max = self._optimizer = self._optimizer_host = 0
        self._param_list: list[torch.Tensor] = []  # this step's parameters (taken at its start)
        self._grad_keys: dict[int, tuple[int, int] | None] = {}  # id(param) -> its grad's storage key
        self._grad_hooks_fired = False
        self._activations_peak = 0
        self._peak = 0
        self._in_step = False
        # The hooks run inside compiled regions' eager fallbacks (FSDP2's hooks, graph
        # breaks); Dynamo must not try to trace them as frames of their own.
        self._pack_hook = _no_dynamo(self._pack)
        self._unpack_hook = _no_dynamo(self._unpack)
        self._release_hook = _no_dynamo(self._release)
        self._on_grad_hook = _no_dynamo(self._on_grad)
        self._on_optimizer_step_hook = _no_dynamo(self._on_optimizer_step)
        self._release_host_hook = _no_dynamo(self._release_host)
        self._release_reload_hook = _no_dynamo(self._release_reload)
        self._on_reload_hook = _no_dynamo(self._on_reload)

    # ------------------------------------------------------------------ categories

    def _measure_static(self) -> None:
        self._param_list = list(self.model.parameters())
        self._params = storage_bytes(self._param_list)
        self._measure_dynamic()

    def _set_grads(self) -> None:
        distinct = {key[0]: key[1] for key in self._grad_keys.values() if key is not None}
        self._grads = sum(distinct.values())
        self._grads_max = max(self._grads_max, self._grads)

    def _measure_grads(self) -> list[torch.Tensor | None]:
        grads = [p.grad for p in self._param_list]
        self._grad_keys = {id(p): _storage_key(g) if g is not None else None
                           for p, g in zip(self._param_list, grads, strict=True)}
        self._set_grads()
        return grads

    def _measure_dynamic(self) -> None:
        params = self._param_list
        grads = self._measure_grads()
        opt_state = list(_optimizer_tensors(self.optimizer))
        host_state = [t for t in opt_state if is_host_tier(local_tensor(t))]
        host_state += list(getattr(self.optimizer, "host_tensors", list)())
        self._optimizer = storage_bytes(t for t in opt_state if not is_host_tier(local_tensor(t)))
        self._optimizer_host = storage_bytes(host_state)
        owned = set()
        for t in [*params, *grads, *opt_state]:
            key = _storage_key(t) if t is not None else None
            if key is not None:
                owned.add(key[0])
        self._owned = owned

    def _live_bytes(self) -> int:
        device = self._fixed_bytes + sum(e.storage.nbytes() for e in self._resizable.values())
        return device + sum(self._reloaded.values())

    def _host_bytes(self) -> int:
        return sum(self._host.values())

    def _sample(self, event: str = "save") -> None:
        live = self._live_bytes()
        total = self._params + self._grads + self._optimizer + live
        self._peak = max(self._peak, total)
        self._activations_peak = max(self._activations_peak, live)
        host = self._host_bytes()
        self._host_peak = max(self._host_peak, host)
        if self.record_timeline:
            self.timeline.append(TimelineSample(time.perf_counter() - self._step_start, event, self._params,
                                                self._grads, self._optimizer, live, host, self._optimizer_host))

    # ------------------------------------------------------------------ saved tensors

    def _pack(self, tensor: torch.Tensor) -> Any:
        key = _storage_key(tensor)
        if key is None or key[0] in self._owned:
            return tensor
        if is_host_tier(tensor):  # an offloaded activation: host memory, counted apart
            sid = id(local_tensor(tensor).untyped_storage())
            self._host[sid] = key[1]
            self._sample()
            saved = _Saved(tensor)
            weakref.finalize(saved, self._release_host_hook, sid)
            return saved
        storage = local_tensor(tensor).untyped_storage()
        sid = id(storage)
        entry = self._live.get(sid)
        if entry is None:
            entry = _Entry(storage=storage, refs=1, nbytes=key[1], resizable=_is_leaf_storage(tensor))
            self._live[sid] = entry
            if entry.resizable:
                self._resizable[sid] = entry
            else:
                self._fixed_bytes += entry.nbytes
            self._sample()
        else:
            entry.refs += 1
        saved = _Saved(tensor)
        weakref.finalize(saved, self._release_hook, sid)
        return saved

    @staticmethod
    def _unpack(saved: Any) -> torch.Tensor:
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _release(self, sid: int) -> None:
        entry = self._live.get(sid)
        if entry is None:
            return
        entry.refs -= 1
        if entry.refs:
            return
        if self._in_step:
            if not self._grad_hooks_fired:
                # Gradients may arrive without an accumulation hook (FSDP2 assigns its
                # reduce-scattered shards to .grad directly): look at them again.
                self._measure_grads()
            self._sample("release")
        del self._live[sid]
        if entry.resizable:
            del self._resizable[sid]
        else:
            self._fixed_bytes -= entry.nbytes

    # ------------------------------------------------------------------ hooks

    def _release_host(self, sid: int) -> None:
        if self._host.pop(sid, None) is not None and self._in_step:
            self._sample("release")

    def _on_reload(self, tensor: torch.Tensor) -> None:
        if not self._in_step:
            return
        key = id(tensor)
        self._reloaded[key] = tensor.untyped_storage().nbytes()
        weakref.finalize(tensor, self._release_reload_hook, key)
        self._sample("reload")

    def _release_reload(self, key: int) -> None:
        if self._reloaded.pop(key, None) is not None and self._in_step:
            self._sample("release")

    def _on_grad(self, param: torch.Tensor) -> None:
        self._grad_hooks_fired = True
        key = _storage_key(param.grad) if param.grad is not None else None
        self._grad_keys[id(param)] = key
        if key is not None:
            self._owned.add(key[0])
        self._set_grads()
        self._sample("grad")

    def _on_optimizer_step(self, *_args: Any) -> None:
        self._measure_dynamic()
        self._sample("optimizer step")

    def _install_hooks(self) -> list[Any]:
        handles = []
        for p in self._param_list:
            if p.requires_grad and hasattr(p, "register_post_accumulate_grad_hook"):
                try:
                    handles.append(p.register_post_accumulate_grad_hook(self._on_grad_hook))
                except RuntimeError:  # non-leaf or subclass that refuses hooks
                    pass
        if self.optimizer is not None:
            handles.append(self.optimizer.register_step_post_hook(self._on_optimizer_step_hook))
        return handles

    @contextmanager
    def step(self) -> Iterator[MemoryTracker]:
        """Track one training step (forward, backward, optimizer step) inside the block."""
        self._measure_static()
        self.timeline = []
        self._step_start = time.perf_counter()
        self._sample("step start")
        self._grad_hooks_fired = False
        handles = self._install_hooks()
        self._in_step = True
        reload_listeners.append(self._on_reload_hook)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack_hook, self._unpack_hook):
                yield self
        finally:
            self._in_step = False
            reload_listeners.remove(self._on_reload_hook)
            for handle in handles:
                handle.remove()
            self._measure_dynamic()
            self._sample("step end")

    # ------------------------------------------------------------------ results

    @property
    def live_activation_bytes(self) -> int:
        """Bytes of saved storages still held by autograd right now."""
        return self._live_bytes()

    def report(self) -> dict[str, int]:
        """This rank's bytes by category: params and optimizer state as of the end of the
        last step, the most gradient bytes seen (`zero_grad()` frees them at the end of a
        step), the peak of live saved activations, the peak total and the process's peak RSS."""
        return self.memory_report().to_dict()

    def memory_report(self) -> MemoryReport:
        return MemoryReport(rank=self.rank, params=self._params, grads=self._grads_max,
                            optimizer=self._optimizer, activations_peak=self._activations_peak,
                            peak=self._peak, peak_rss=peak_rss_bytes(), host_peak=self._host_peak,
                            optimizer_host=self._optimizer_host)


def _no_dynamo(fn: Any) -> Any:
    return torch._dynamo.disable(fn, recursive=True)


def _default_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# ---------------------------------------------------------------------------- timeline files

_CATEGORIES = ("params", "grads", "optimizer", "activations")


def timeline_paths(path: str) -> tuple[str, str]:
    """`run.png`, `run.json` or `run` -> (`run.json`, `run.png`)."""
    stem = path[:-5] if path.endswith((".json", ".JSON")) else path[:-4] if path.endswith((".png", ".PNG")) else path
    return f"{stem}.json", f"{stem}.png"


_HOST_CATEGORIES = ("host", "optimizer_host")


def _host_total(sample: dict[str, Any]) -> int:
    return sum(sample.get(c, 0) for c in _HOST_CATEGORIES)


def write_timeline(path: str, per_rank: list[list[dict[str, Any]]], title: str) -> list[str]:
    """Write every rank's last-step timeline as JSON and, when matplotlib is installed, as a
    PNG (one panel per rank, bytes by category stacked over the step). Returns the files."""
    import json
    import os

    json_path, png_path = timeline_paths(path)
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    doc = {
        "title": title,
        "tiers": {"device": list(_CATEGORIES),
                  "host": [c for c in _HOST_CATEGORIES if any(s.get(c) for samples in per_rank for s in samples)]
                  or "none: nothing was offloaded (offload='none', no HostAdamW)"},
        "ranks": [{"rank": r, "peak_bytes": max((sum(s[c] for c in _CATEGORIES) for s in samples), default=0),
                   "host_peak_bytes": max((_host_total(s) for s in samples), default=0),
                   "samples": samples} for r, samples in enumerate(per_rank)],
    }
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1)
    written = [json_path]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("--memory-timeline: matplotlib is not installed (pip install -e '.[bench]'); wrote %s only",
                    json_path)
        return written
    fig, axes = plt.subplots(len(per_rank), 1, figsize=(9, 2.2 * len(per_rank) + 0.8), sharex=True, squeeze=False)
    for r, (ax, samples) in enumerate(zip(axes[:, 0], per_rank, strict=True)):
        ms = [1e3 * s["seconds"] for s in samples]
        stacks = [[s[c] / 2**20 for s in samples] for c in _CATEGORIES]
        ax.stackplot(ms, *stacks, labels=_CATEGORIES, step="post", alpha=0.85)
        peak = doc["ranks"][r]["peak_bytes"] / 2**20
        host_peak = doc["ranks"][r]["host_peak_bytes"] / 2**20
        if host_peak:
            ax.step(ms, [_host_total(s) / 2**20 for s in samples], where="post", color="k", lw=1.2,
                    label="host tier (offloaded activations + optimizer)")
        ax.set_ylabel(f"rank {r}\nMiB")
        ax.set_title(f"rank {r}: device-tier peak {peak:.2f} MiB, host-tier peak {host_peak:.2f} MiB",
                     fontsize=9, loc="left")
        grads = [i for i, s in enumerate(samples) if s["event"] == "grad"]
        if grads:
            ax.axvline(ms[grads[0]], color="k", lw=0.6, ls="--")
    axes[0, 0].legend(loc="upper left", fontsize=8, ncol=5)
    axes[-1, 0].set_xlabel("ms since the start of the step (dashed: first gradient accumulated)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    written.append(png_path)
    return written
