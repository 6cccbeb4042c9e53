"""Checkpoints with Distributed Checkpoint (DCP), loadable at any other layout.

A parallelized parameter lives on its rank as a piece of a padded, chunk-permuted flat
buffer whose shape depends on the world size, `tp` and `ep` (mopc/runtime/ownership.py).
Saving that buffer as it is would tie the checkpoint to the layout. Instead every
parameter, and every optimizer state tensor shaped like one, is saved in a *canonical*
form: a `DTensor` with the parameter's own global shape, sharded by rows (`Shard(0)`)
over the world. DCP stores each rank's rows with their offsets, so a checkpoint written
at world 4 with `ep=4` loads at world 2 with `ep=2`, or at `tp=1`, or into one process
(`mopc export`): DCP reads whichever rows the loading rank asks for.

Converting between the two forms is one all-to-all per tensor: each value goes straight
from the rank holding it in mopc's layout to the rank holding its row in the canonical
form (with its index), so no rank ever holds a full parameter, only its piece and its rows.

A checkpoint directory holds one sub-directory per saved step and a `latest` file
naming the newest complete one. A step is written to a hidden staging directory and
renamed into place only after every rank has finished writing, and `latest` is replaced
atomically after that, so a save that dies midway leaves the previous checkpoint in
place and `latest` pointing at it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from mopc.plan.mesh import all_gather_flat
from mopc.runtime.host_optim import wait_all_updates
from mopc.runtime.ownership import ParamLayout, gathered_to_full, local_shard

__all__ = ["CheckpointError", "export", "latest_step", "load", "save", "saved_step"]

log = logging.getLogger("mopc")

_LATEST = "latest"
_STEP_PREFIX = "step_"
_META = "mopc_meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, or does not fit the model it is loaded into."""


# ------------------------------------------------------------------------ the canonical form


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _world() -> tuple[int, int]:
    if _distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _row_range(rows: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, end) of a `Shard(0)` DTensor on `rank` (torch.chunk's split: ceil-sized
    blocks, the trailing ranks possibly empty)."""
    block = -(-rows // world)
    return min(rank * block, rows), min((rank + 1) * block, rows)


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


def _mesh_of(model: nn.Module):
    """The 1-D world mesh the parallelized parameters are DTensors on (None if not parallelized)."""
    for param in _unwrap(model).parameters():
        if _layout_of(param) is not None and hasattr(param, "device_mesh"):
            return param.device_mesh
    return None


def _local_of(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _mesh_rank(mesh) -> tuple[int, int, Any]:
    """(rank, size, process group) of the 1-D mesh a parameter is sharded over: the world, or
    under pipeline parallelism its stage's ranks (the default group when not parallelized)."""
    if mesh is None:
        rank, world = _world()
        return rank, world, None
    return mesh.get_local_rank(), mesh.size(), mesh.get_group()


def _full_from_piece(piece: torch.Tensor, layout: ParamLayout, mesh) -> torch.Tensor:
    """All-gather the ranks' pieces of one (small, 0-d) parameter into its full value."""
    _, world, group = _mesh_rank(mesh)
    gathered = piece.new_empty(piece.numel() * world)
    if world > 1:
        all_gather_flat(gathered, piece.contiguous(), group=group)
    else:
        gathered.copy_(piece.reshape(-1))
    return gathered_to_full(gathered, list(layout.shape), layout.chunk_dim, layout.num_chunks, world)


def _piece_indices(layout: ParamLayout, rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Where this rank's piece lives in the full tensor: (positions in the piece that hold
    values, not padding; their flat indices in the full row-major tensor)."""
    shape = list(layout.shape)
    d, chunks = layout.chunk_dim, layout.num_chunks
    chunk, piece = rank % chunks, rank // chunks
    j = torch.arange(piece * layout.piece_numel, (piece + 1) * layout.piece_numel, device=device)
    valid = j < layout.chunk_numel
    j = j[valid]
    chunk_shape = list(shape)
    chunk_shape[d] //= chunks
    full_stride = _contiguous_stride(tuple(shape))
    flat = torch.zeros_like(j)
    rest = j
    for i in reversed(range(len(shape))):  # unravel in the chunk's shape, ravel in the full one
        coord = rest % chunk_shape[i]
        rest = rest // chunk_shape[i]
        if i == d:
            coord = coord + chunk * chunk_shape[d]
        flat += coord * full_stride[i]
    return valid.nonzero().squeeze(1), flat


def _row_owner(flat: torch.Tensor, shape: tuple[int, ...], world: int) -> torch.Tensor:
    row_numel = math.prod(shape[1:])
    return (flat // row_numel) // -(-shape[0] // world)


def _exchange(send: torch.Tensor, dest: torch.Tensor, world: int, group: Any = None
              ) -> tuple[torch.Tensor, list[int], list[int]]:
    """Send each element of `send` to rank `dest[i]` of `group` (all-to-all, uneven splits);
    returns what this rank received, in sender order, and the (sent, received) split sizes."""
    send_counts = torch.bincount(dest, minlength=world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    sent, received = send_counts.tolist(), recv_counts.tolist()
    out = send.new_empty(sum(received))
    dist.all_to_all_single(out, send.contiguous(), received, sent, group=group)
    return out, sent, received


def _canonical_from_piece(piece: torch.Tensor, layout: ParamLayout, mesh) -> torch.Tensor:
    """This rank's rows of the canonical `Shard(0)` DTensor, from every rank's piece: each
    value goes straight to the rank owning its row (one all-to-all of values and indices;
    no rank holds more than its piece and its rows, never the full tensor)."""
    from torch.distributed.tensor import DTensor, Shard

    shape = tuple(layout.shape)
    if len(shape) == 0:
        return _full_from_piece(piece, layout, mesh).clone()
    rank, world, group = _mesh_rank(mesh)
    start, end = _row_range(shape[0], rank, world)
    row_numel = math.prod(shape[1:])
    rows = piece.new_empty((end - start) * row_numel)
    positions, flat = _piece_indices(layout, rank, piece.device)
    values = piece.reshape(-1)[positions]
    if world == 1:
        rows[flat] = values
    else:
        dest = _row_owner(flat, shape, world)
        order = torch.argsort(dest, stable=True)
        got_values, _, _ = _exchange(values[order], dest[order], world, group)
        got_flat, _, _ = _exchange(flat[order], dest[order], world, group)
        rows[got_flat - start * row_numel] = got_values
    return DTensor.from_local(rows.view(end - start, *shape[1:]), mesh, [Shard(0)], run_check=False,
                              shape=torch.Size(shape), stride=_contiguous_stride(shape))


def _piece_from_canonical(value: torch.Tensor, layout: ParamLayout, like: torch.Tensor, mesh) -> torch.Tensor:
    """This rank's piece (shaped like `like`, padding zeroed) from the canonical rows: every
    rank asks the owners of the rows its values live in (all-to-all of indices), and they
    answer with the values (all-to-all back)."""
    from torch.distributed.tensor import DTensor

    rank, world, group = _mesh_rank(mesh)
    shape = tuple(layout.shape)
    if not isinstance(value, DTensor) or len(shape) == 0:
        return local_shard(value.reshape(shape).to(like.dtype), layout, rank)
    rows = value.to_local().reshape(-1)
    start, _ = _row_range(shape[0], rank, world)
    base = start * math.prod(shape[1:])
    positions, flat = _piece_indices(layout, rank, like.device)
    piece = torch.zeros(like.numel(), dtype=like.dtype, device=like.device)
    if world == 1:
        piece[positions] = rows[flat].to(like.dtype)
        return piece.view_as(like)
    dest = _row_owner(flat, shape, world)
    order = torch.argsort(dest, stable=True)
    asked, sent, received = _exchange(flat[order], dest[order], world, group)
    answers = rows[asked - base]
    back = answers.new_empty(sum(sent))
    dist.all_to_all_single(back, answers.contiguous(), sent, received, group=group)
    piece[positions[order]] = back.to(like.dtype)
    return piece.view_as(like)


def _empty_canonical(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, mesh) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, Shard

    if len(shape) == 0:
        return torch.empty((), dtype=dtype, device=device)
    rank, world, _ = _mesh_rank(mesh)
    start, end = _row_range(shape[0], rank, world)
    rows = torch.empty((end - start, *shape[1:]), dtype=dtype, device=device)
    return DTensor.from_local(rows, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                              stride=_contiguous_stride(shape))


# ------------------------------------------------------------------------ state dicts


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # a torch.compile'd module holds the original


def _layout_of(param: torch.Tensor) -> ParamLayout | None:
    return getattr(param, "_mopc_layout", None)


def _model_entries(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, ParamLayout | None]]:
    """(fqn, value, layout) for every parameter and persistent buffer this rank holds, in
    state_dict order (under pipeline parallelism, the parameters of this rank's stages)."""
    for fqn, value in _unwrap(model).state_dict(keep_vars=True).items():
        if not _remote(value):
            yield fqn, value, _layout_of(value)


def _remote(param: torch.Tensor) -> bool:
    """A parameter of another pipeline stage (its shard here is empty)."""
    return bool(getattr(param, "_mopc_remote", False))


def _param_mesh(param: torch.Tensor, fallback):
    """The mesh a parameter's shard is a DTensor on (its pipeline stage's ranks, or the world)."""
    return getattr(param, "device_mesh", None) or fallback


def _param_fqns(model: nn.Module) -> dict[int, str]:
    return {id(p): fqn for fqn, p in _unwrap(model).named_parameters()}


def _is_sharded_state(value: Any, param: torch.Tensor) -> bool:
    """An optimizer state tensor laid out like its parameter (AdamW's moments): same local size."""
    return isinstance(value, torch.Tensor) and value.dim() > 0 and \
        _local_of(value).shape == _local_of(param).shape


def _optimizer_groups(optimizer: torch.optim.Optimizer, fqns: dict[int, str]) -> list[dict[str, Any]]:
    groups = []
    for group in optimizer.param_groups:
        missing = [p for p in group["params"] if id(p) not in fqns]
        if missing:
            raise CheckpointError("mopc.checkpoint: the optimizer holds parameters that are not the model's; "
                                  "pass the optimizer built over this model's parameters")
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [fqns[id(p)] for p in group["params"]]})
    return groups


@torch.no_grad()
def _to_canonical(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    world_mesh = _mesh_of(model)
    state: dict[str, Any] = {}
    for fqn, value, layout in _model_entries(model):
        state[f"model.{fqn}"] = _canonical_from_piece(_local_of(value), layout, _param_mesh(value, world_mesh)) \
            if layout is not None else value.detach()
    if optimizer is not None:
        fqns = _param_fqns(model)
        for group in optimizer.param_groups:
            for param in group["params"]:
                layout = _layout_of(param)
                if _remote(param):
                    continue  # another pipeline stage saves its state
                for name, value in optimizer.state.get(param, {}).items():
                    key = f"optim.{fqns[id(param)]}.{name}"
                    if layout is not None and _is_sharded_state(value, param):
                        state[key] = _canonical_from_piece(_local_of(value), layout, _param_mesh(param, world_mesh))
                    elif isinstance(value, torch.Tensor):
                        state[key] = value.detach()
                    else:
                        state[key] = value
    return state


# ------------------------------------------------------------------------ save


def _step_dir(root: Path, step: int) -> Path:
    return root / f"{_STEP_PREFIX}{step:08d}"


def _barrier() -> None:
    if _world()[1] > 1:
        dist.barrier()


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
         step: int, extra: dict[str, Any] | None = None, storage_writer: Any = None) -> Path:
    """Save `model` (parallelized or not) and `optimizer` as step `step` under `path`.

    Every rank calls it (it is a collective). Returns the step's directory. `extra` is
    JSON-able metadata kept beside the checkpoint (the trainer stores its settings there).
    `storage_writer` replaces DCP's `FileSystemWriter` (it must write to the staging path
    it is given via `checkpoint_id`).
    """
    rank, world = _world()
    root = Path(path)
    final = _step_dir(root, step)
    staging = root / f".{final.name}.partial"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)  # left by an earlier save that died
    _barrier()
    wait_all_updates()  # HostAdamW's updates still running from the last step()
    state = _to_canonical(model, optimizer)
    groups = _optimizer_groups(optimizer, _param_fqns(model)) if optimizer is not None else None
    state["mopc"] = {"step": step, "world_size": world}
    try:
        dcp.save(state, checkpoint_id=staging, storage_writer=storage_writer, no_dist=not _distributed())
    except dcp.CheckpointException as err:  # a BaseException: turn it into an error callers can catch
        failures = getattr(err, "failures", {})
        first = next(iter(failures.values()), None) if isinstance(failures, dict) and failures else None
        first = first[0] if isinstance(first, tuple) else first
        previous = latest_step(root)
        raise CheckpointError(
            f"mopc.checkpoint: saving step {step} to {final} failed on rank(s) {sorted(failures)}: "
            f"{type(first).__name__ if first is not None else ''}: {first}. Nothing was renamed into place: "
            + (f"the previous checkpoint {previous} is intact and `latest` still names it"
               if previous is not None else "there is no earlier checkpoint")
            + f"; the partial files in {staging} are removed by the next save") from None
    _barrier()  # every rank's files are written (DCP's finish step has run on rank 0)
    if rank == 0:
        meta = {"step": step, "world_size": world, "optimizer_param_groups": groups, "extra": extra or {},
                "layout": _layout_summary(model)}
        (staging / _META).write_text(json.dumps(meta, indent=1, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _replace_text(root / _LATEST, final.name + "\n")
    _barrier()
    log.info("mopc.checkpoint: saved step %d to %s", step, final)
    return final


def _layout_summary(model: nn.Module) -> dict[str, Any]:
    plan = getattr(_unwrap(model), "mopc_plan", None)
    if plan is None:
        return {"parallelized": False}
    spec = plan.spec
    return {"parallelized": True, "world_size": spec.total_ranks, "dp": spec.dp, "tp": spec.tp, "ep": spec.ep,
            "cp": spec.cp, "pp": spec.pp}


# ------------------------------------------------------------------------ load


def latest_step(path: str | os.PathLike) -> Path | None:
    """The newest complete step directory under `path` (or `path` itself when it is one)."""
    root = Path(path)
    if (root / ".metadata").exists():
        return root
    pointer = root / _LATEST
    if pointer.exists():
        step = root / pointer.read_text().strip()
        if (step / ".metadata").exists():
            return step
    steps = sorted(p for p in root.glob(f"{_STEP_PREFIX}*") if (p / ".metadata").exists())
    return steps[-1] if steps else None


def saved_step(path: str | os.PathLike) -> int | None:
    """The step of the newest complete checkpoint under `path` (None when there is none, or
    when it was not saved by `save`)."""
    found = latest_step(path)
    step = _read_meta(found).get("step") if found is not None else None
    return step if isinstance(step, int) else None


def _resolve(path: str | os.PathLike) -> Path:
    found = latest_step(path)
    if found is None:
        raise CheckpointError(f"mopc.checkpoint: no complete checkpoint under {os.fspath(path)!r} (a step "
                              "directory holding DCP's .metadata); check the path given to --resume / load()")
    return found


def _read_meta(step_dir: Path) -> dict[str, Any]:
    meta = step_dir / _META
    return json.loads(meta.read_text()) if meta.exists() else {}


def _saved_shapes(step_dir: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(os.fspath(step_dir)).read_metadata()
    return {key: (tuple(md.size), md.properties.dtype)
            for key, md in metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)}


@torch.no_grad()
def load(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Load the newest complete checkpoint under `path` into `model` (and `optimizer`), at
    whatever layout `model` was parallelized with. Every rank calls it. Returns the step.

    The model must have the same parameters (names and shapes) as the one saved; the
    optimizer the same kind, over the same parameters.
    """
    step_dir = _resolve(path)
    saved = _saved_shapes(step_dir)
    meta = _read_meta(step_dir)
    wait_all_updates()
    world_mesh = _mesh_of(model)
    entries = list(_model_entries(model))
    wanted: dict[str, Any] = {}
    problems = []
    for fqn, value, layout in entries:
        key = f"model.{fqn}"
        shape = tuple(layout.shape) if layout is not None else tuple(value.shape)
        if key not in saved:
            problems.append(f"{fqn}: not in the checkpoint")
        elif saved[key][0] != shape:
            problems.append(f"{fqn}: checkpoint shape {list(saved[key][0])}, model shape {list(shape)}")
        else:
            wanted[key] = _empty_canonical(shape, value.dtype, _local_of(value).device,
                                           _param_mesh(value, world_mesh)) \
                if layout is not None else torch.empty_like(value)
    known = {f"model.{fqn}" for fqn in _unwrap(model).state_dict(keep_vars=True)}  # another stage's too
    problems += [f"{k[len('model.'):]}: in the checkpoint, not in the model"
                 for k in sorted(saved) if k.startswith("model.") and k not in known]
    if problems:
        raise CheckpointError(f"mopc.checkpoint: {step_dir} does not fit this model ({len(problems)} "
                              f"mismatches): " + "; ".join(problems[:8])
                              + ("; ..." if len(problems) > 8 else "")
                              + ". Build the same model (preset/config) the checkpoint was saved from")
    optim_keys: dict[str, tuple[torch.Tensor, str, str]] = {}
    if optimizer is not None:
        by_fqn = {fqn: p for fqn, p in _unwrap(model).named_parameters()}
        for key, (shape, dtype) in saved.items():
            if not key.startswith("optim."):
                continue
            fqn, name = key[len("optim."):].rsplit(".", 1)
            if fqn not in by_fqn:
                raise CheckpointError(f"mopc.checkpoint: optimizer state for {fqn!r} has no parameter in this model")
            param = by_fqn[fqn]
            if _remote(param):
                continue  # another pipeline stage's: its ranks load it
            layout = _layout_of(param)
            full_shape = tuple(layout.shape) if layout is not None else tuple(param.shape)
            device = _local_of(param).device
            if layout is not None and shape == full_shape and len(shape) > 0:
                wanted[key] = _empty_canonical(shape, dtype, device, _param_mesh(param, world_mesh))
            else:
                wanted[key] = torch.empty(shape, dtype=dtype, device=device)
            optim_keys[key] = (param, fqn, name)
    dcp.load(wanted, checkpoint_id=step_dir, no_dist=not _distributed())

    for fqn, value, layout in entries:
        loaded = wanted[f"model.{fqn}"]
        if layout is None:
            value.data.copy_(loaded) if isinstance(value, nn.Parameter) else value.copy_(loaded)
            continue
        local = _local_of(value)
        local.copy_(_piece_from_canonical(loaded, layout, local, _param_mesh(value, world_mesh)))
    if optimizer is not None:
        _load_optimizer(optimizer, wanted, optim_keys, meta.get("optimizer_param_groups"))
    step = int(meta.get("step", -1))
    log.info("mopc.checkpoint: loaded step %d from %s", step, step_dir)
    return step


def _load_optimizer(optimizer: torch.optim.Optimizer, wanted: dict[str, Any],
                    optim_keys: dict[str, tuple[torch.Tensor, str, str]], groups: list | None) -> None:
    from torch.distributed.tensor import DTensor

    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    optimizer.state.clear()
    for key, (param, fqn, name) in optim_keys.items():
        if id(param) not in owned:
            raise CheckpointError(f"mopc.checkpoint: the checkpoint has optimizer state for {fqn}, which this "
                                  "optimizer does not hold; build the optimizer over all of the model's parameters")
        loaded = wanted[key]
        layout = _layout_of(param)
        if layout is not None and isinstance(loaded, DTensor):
            local = _piece_from_canonical(loaded, layout, _local_of(param), loaded.device_mesh)
            value = DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                       shape=param.shape, stride=param.stride()) \
                if isinstance(param, DTensor) else local
        else:
            value = loaded
        optimizer.state[param][name] = value
    if groups is not None:
        if len(groups) != len(optimizer.param_groups):
            raise CheckpointError(f"mopc.checkpoint: the checkpoint's optimizer has {len(groups)} parameter "
                                  f"groups, this one {len(optimizer.param_groups)}; build it the same way")
        for saved, group in zip(groups, optimizer.param_groups):
            for k, v in saved.items():
                if k != "params" and k in group and not isinstance(group[k], torch.Tensor):
                    group[k] = tuple(v) if isinstance(group[k], tuple) and isinstance(v, list) else v


# ------------------------------------------------------------------------ export


def export(path: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Consolidate the newest checkpoint under `path` into one `torch.save` file of full
    tensors keyed by the model's own parameter names (`model.load_state_dict(torch.load(out))`
    works on the unparallelized model). Runs in one process; no process group needed.
    Returns a summary (step, tensors, bytes)."""
    step_dir = _resolve(path)
    saved = _saved_shapes(step_dir)
    state = {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in saved.items()
             if key.startswith("model.")}
    dcp.load(state, checkpoint_id=step_dir, no_dist=True)
    weights = {key[len("model."):]: value for key, value in state.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(weights, tmp)
    os.replace(tmp, out)
    meta = _read_meta(step_dir)
    return {"step": meta.get("step"), "source": os.fspath(step_dir), "out": os.fspath(out),
            "tensors": len(weights), "bytes": sum(math.prod(v.shape) * v.element_size() for v in weights.values())}
