"""The device mesh of a run: world = pp × dp × cp × tp, validated before anything is allocated.

Under pipeline parallelism (`pp > 1`) each stage is held by world / pp consecutive ranks
(the pipeline rank varies slowest), and everything below describes one stage's ranks:
`MeshSpec.world_size` counts them, and the world group is that stage's group.

Ranks are laid out row-major over `(dp, cp, tp)`: the tensor-parallel rank varies fastest,
so a tensor-parallel group is `tp` consecutive ranks (on GPUs, the ranks of one node), and
a context-parallel group is `cp` ranks strided by `tp` (they hold chunks of the same
sequences). Parameters not split by tensor parallelism are sharded over all
`dp · cp` ranks of a tp rank (`MeshSpec.dp` counts those; `MeshSpec.data_parallel` the
ranks holding different sequences).
Experts have their own grid over the same ranks, `(edp, ep)`: an expert-parallel group is
`ep` consecutive ranks (it may span data- and tensor-parallel ranks), and the
expert-data-parallel group of a rank holds the ranks with the same experts.
Process groups are created once per mesh and reused by every compiled graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mopc.config import MoPConfig, MoPConfigError

log = logging.getLogger("mopc")


@dataclass(frozen=True)
class MeshSpec:
    """Sizes of the mesh axes; `world_size == dp * tp`, and `ep` divides the world.

    `dp` is every rank with the same tensor-parallel rank (the ZeRO axis: data × context
    parallel); `cp` divides it."""

    world_size: int
    """Ranks of one pipeline stage (all ranks when pp == 1): the ranks parameters are sharded over."""
    dp: int
    tp: int
    ep: int = 1
    cp: int = 1
    pp: int = 1

    @property
    def total_ranks(self) -> int:
        """Every rank of the run: pp stages of `world_size` ranks."""
        return self.world_size * self.pp

    def stage_rank(self, rank: int) -> int:
        """A global rank's rank inside its pipeline stage."""
        return rank % self.world_size

    def pipeline_rank(self, rank: int) -> int:
        """A global rank's pipeline rank (which stage, or first stage, it holds)."""
        return rank // self.world_size

    @property
    def data_parallel(self) -> int:
        """Ranks (per tensor-parallel rank) that hold different sequences."""
        return self.dp // self.cp

    @staticmethod
    def from_config(config: MoPConfig, world_size: int) -> MeshSpec:
        """Check `pp`, `tp`, `cp` and `dp` against the world size; errors name the option and the fix."""
        pp = config.pp
        if world_size % pp:
            raise MoPConfigError(
                f"mop option pp={pp} does not divide the world size {world_size}; choose pp from "
                f"{_divisors(world_size)} or launch a multiple of {pp} ranks"
            )
        return MeshSpec._within_stage(config, world_size // pp, world_size)

    @staticmethod
    def _within_stage(config: MoPConfig, world_size: int, total: int) -> MeshSpec:
        pp = config.pp
        where = f"the world size {total} / pp={pp} = {world_size}" if pp > 1 else f"the world size {world_size}"
        stage_ranks = (f"a pipeline stage has {total} / pp={pp} = {world_size} ranks" if pp > 1
                       else f"the world size is {world_size}")
        tp = config.tp
        if world_size % tp:
            raise MoPConfigError(
                f"mop option tp={tp} does not divide {where}; choose tp from "
                f"{_divisors(world_size)} or launch a multiple of {tp * pp} ranks"
            )
        cp = config.cp
        if (world_size // tp) % cp:
            raise MoPConfigError(
                f"mop option cp={cp} does not divide {where} / tp={tp} = {world_size // tp}; "
                f"choose cp from {_divisors(world_size // tp)} or launch a multiple of {tp * cp * pp} ranks"
            )
        dp = config.dp if config.dp is not None else world_size // (tp * cp)
        if dp * cp * tp != world_size:
            shown = f"dp={dp} x cp={cp} x tp={tp}" if cp > 1 else f"dp={dp} x tp={tp}"
            raise MoPConfigError(
                f"mop options {shown} = {dp * cp * tp} ranks, but {stage_ranks}; "
                f"set dp={world_size // (tp * cp)} (or leave dp unset) or launch {dp * cp * tp * pp} ranks"
            )
        ep = config.ep
        if world_size % ep:
            raise MoPConfigError(
                f"mop option ep={ep} does not divide {where}; choose ep from "
                f"{_divisors(world_size)} or launch a multiple of {ep * pp} ranks"
            )
        return MeshSpec(world_size=world_size, dp=dp * cp, tp=tp, ep=ep, cp=cp, pp=pp)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class Meshes:
    """The process groups of a run, by name (the strings functional collectives take)."""

    spec: MeshSpec
    world: object  # DeviceMesh over all ranks (1-D): the mesh of the shard DTensors
    grid: object  # DeviceMesh (dp, tp)
    world_group: str
    dp_group: str
    tp_group: str
    ep_group: str
    """`ep` consecutive ranks: the experts of a layer are split over them."""
    edp_group: str
    """The ranks holding the same experts as this one (world / ep of them, strided)."""
    cp_group: str | None
    """The `cp` ranks holding chunks of this rank's sequences (None when cp == 1)."""
    pp_group: str | None
    """The `pp` ranks holding the pipeline stages of this rank's data (None when pp == 1)."""
    default_group: object  # the default process group these were made under


_MESHES: dict[tuple[MeshSpec, str], Meshes] = {}


def ensure_process_group() -> None:
    """A one-rank gloo group when the script was not launched by torchrun."""
    if dist.is_initialized():
        return
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    log.info("mopc: no process group; created a one-rank gloo group")


def device_type() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def build_meshes(spec: MeshSpec) -> Meshes:
    """Create (once) the 1-D world mesh and the (dp, tp) mesh with their groups (per pipeline
    stage: each mesh has a leading `pp` dimension, and this rank's groups are its stage's)."""
    from torch.distributed.device_mesh import init_device_mesh

    key = (spec, device_type())
    cached = _MESHES.get(key)
    if cached is None or cached.default_group is not dist.group.WORLD:  # re-initialised since
        def mesh(shape: tuple[int, ...], names: tuple[str, ...]):
            if spec.pp == 1:
                return init_device_mesh(device_type(), shape, mesh_dim_names=names)
            return init_device_mesh(device_type(), (spec.pp, *shape), mesh_dim_names=("pp", *names))

        world2 = mesh((spec.world_size,), ("world",))
        world = world2["world"] if spec.pp > 1 else world2
        grid = mesh((spec.dp, spec.tp), ("dp", "tp"))
        grid = grid["dp", "tp"] if spec.pp > 1 else grid
        experts = mesh((spec.world_size // spec.ep, spec.ep), ("edp", "ep"))
        cp_group = None
        if spec.cp > 1:
            context = mesh((spec.data_parallel, spec.cp, spec.tp), ("sdp", "cp", "tp"))
            cp_group = context.get_group("cp").group_name
        _MESHES[key] = Meshes(
            spec=spec, world=world, grid=grid,
            pp_group=world2.get_group("pp").group_name if spec.pp > 1 else None,
            world_group=world.get_group("world").group_name,
            dp_group=grid.get_group("dp").group_name,
            tp_group=grid.get_group("tp").group_name,
            ep_group=experts.get_group("ep").group_name,
            edp_group=experts.get_group("edp").group_name,
            cp_group=cp_group,
            default_group=dist.group.WORLD,
        )
    return _MESHES[key]


def resolve_group(name: str) -> dist.ProcessGroup:
    """The process group a functional collective names (`group_name`)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def is_fake_group(group: dist.ProcessGroup) -> bool:
    """A `fake` backend group (graph tests at large worlds): collectives move no data."""
    try:
        return dist.get_backend(group) == "fake"
    except Exception:  # noqa: BLE001
        return False


def group_size(name: str) -> int:
    return resolve_group(name).size()


def group_rank(name: str) -> int:
    return dist.get_rank(resolve_group(name))


def find_meshes(world_group: str, tp: int, ep: int | None = None, cp: int | None = None) -> Meshes | None:
    """The meshes built for a world group and tensor-parallel (and expert-, context-parallel) degree."""
    for meshes in _MESHES.values():
        if (meshes.world_group == world_group and meshes.spec.tp == tp and meshes.default_group is dist.group.WORLD
                and (ep is None or meshes.spec.ep == ep) and (cp is None or meshes.spec.cp == cp)):
            return meshes
    return None


def rank_device() -> torch.device:
    if device_type() == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# torch 2.13 renamed the flat collectives (the old names warn with a FutureWarning on every
# rank); torch 2.11 has only the old ones.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_flat(output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
    """`output` = every rank's `input` concatenated in rank order (dim 0)."""
    _all_gather_flat(output, input, group=group)


def reduce_scatter_flat(output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
    """`output` = this rank's block of the sum over ranks of `input`."""
    _reduce_scatter_flat(output, input, group=group)
