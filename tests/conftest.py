"""Shared fixtures: a fake process group of any size in one process, and device meshes.

The `fake` backend (torch.testing._internal.distributed.fake_pg) gives collectives the
right shapes without moving data, so graph tests can run at world sizes up to 256.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _init_fake(world_size: int, rank: int = 0) -> None:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


@pytest.fixture(params=[8, 64], ids=lambda n: f"world{n}")
def fake_world(request):
    """A fake default process group of 8 or 64 ranks (this process is rank 0)."""
    _init_fake(request.param)
    yield request.param
    dist.destroy_process_group()


@pytest.fixture
def fake_world_factory():
    """Call with (world_size, rank) to get a fake process group; torn down afterwards."""

    def make(world_size: int, rank: int = 0) -> int:
        _init_fake(world_size, rank)
        return world_size

    yield make
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def mesh_2d(fake_world):
    """A (data, tensor) mesh over the fake world: (world/2, 2)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (fake_world // 2, 2), mesh_dim_names=("dp", "tp"))


@pytest.fixture
def mesh_3d(fake_world):
    """A (data, expert, tensor) mesh over the fake world: (world/4, 2, 2)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (fake_world // 4, 2, 2), mesh_dim_names=("dp", "ep", "tp"))


def pytest_collection_modifyitems(config, items):
    """Multi-process tests first: with `-n 2` (pytest-xdist) the
    short single-process tests then fill the gaps instead of leaving one worker idle at
    the end while the other runs a long launch."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("multiprocess") else 1)
