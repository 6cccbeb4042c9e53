"""Live-storage memory accounting: hand-computed bytes on small modules, eager and compiled."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mopc.runtime.memory import MemoryTracker, local_tensor, storage_bytes

F32 = 4


def _linear_relu() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _train(tracker: MemoryTracker, run: nn.Module, opt: torch.optim.Optimizer, steps: int = 2) -> None:
    for _ in range(steps):
        x = torch.randn(2, 4)
        with tracker.step():
            run(x).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("backend", [None, "aot_eager"], ids=["eager", "aot_eager"])
def test_linear_relu_bytes_by_category(backend):
    model, opt = _linear_relu()
    run = model if backend is None else torch.compile(model, backend=backend)
    tracker = MemoryTracker(model, opt, rank=0)
    _train(tracker, run, opt)
    report = tracker.report()

    params = (4 * 3 + 3) * F32  # weight [3, 4] + bias [3]
    adam = 2 * params + 2 * F32  # exp_avg, exp_avg_sq, and a scalar fp32 `step` per parameter
    # Saved for backward: the input x [2, 4] (for the weight's gradient) and relu's
    # output [2, 3] (for its own backward); the weight is a parameter, not an activation.
    activations = (2 * 4 + 2 * 3) * F32
    assert report["params"] == params == 60
    assert report["grads"] == params
    assert report["optimizer"] == adam == 128
    assert report["activations_peak"] == activations == 56
    # The peak: forward of step 2 holds params + Adam state + activations (244 B); the
    # end of an optimizer step holds params + grads + Adam state (248 B).
    assert report["peak"] == max(params + adam + activations, 2 * params + adam) == 248
    assert report["peak_rss"] > 10 * 2**20
    assert tracker.live_activation_bytes == 0  # backward freed everything it saved


def test_saved_storage_counted_once_and_freed_by_backward():
    module = nn.Module()
    module.w = nn.Parameter(torch.randn(8, 8))
    tracker = MemoryTracker(module, None, rank=0)
    x = torch.randn(16, 8)
    with tracker.step():
        h = x @ tracker.model.w  # saves x (512 B); w is a parameter
        s, c = h.sin(), h.cos()  # both save h: one storage, counted once
        assert tracker.live_activation_bytes == 2 * 16 * 8 * F32
        y = s * c  # saves s and c
        assert tracker.live_activation_bytes == 4 * 16 * 8 * F32
        y.sum().backward()
        assert tracker.live_activation_bytes == 0
    report = tracker.report()
    assert report["activations_peak"] == 4 * 16 * 8 * F32
    assert report["grads"] == 8 * 8 * F32


def test_dtensor_counts_local_shard(fake_world_factory):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    fake_world_factory(4)
    mesh = init_device_mesh("cpu", (4,))
    full = torch.zeros(16, 8)
    dt = distribute_tensor(full, mesh, [Shard(0)])
    assert local_tensor(dt).shape == (4, 8)
    assert storage_bytes([dt]) == 4 * 8 * F32
    module = nn.Module()
    module.w = nn.Parameter(dt)
    assert MemoryTracker(module, None, rank=0).report()["params"] == 0  # nothing measured yet
    tracker = MemoryTracker(module, None, rank=0)
    with tracker.step():
        pass
    assert tracker.report()["params"] == 4 * 8 * F32


def test_views_of_one_storage_count_once():
    base = torch.zeros(10)
    assert storage_bytes([base, base[2:], base.view(2, 5), None]) == 10 * F32


def test_comm_bytes_model():
    from mopc.runtime.comm import _kind, bytes_sent

    assert _kind("gloo:all_reduce") == "all_reduce"
    assert _kind("nccl:_allgather_base") == "all_gather"
    assert _kind("nccl:_reduce_scatter_base") == "reduce_scatter"
    assert _kind("gloo:all_to_all") == "all_to_all"
    n, w = 1000, 4
    assert bytes_sent("all_reduce", n, w) == 2 * n * 3 // 4  # ring: reduce-scatter + all-gather
    assert bytes_sent("all_gather", n, w) == n * 3  # its shard to each of the others
    assert bytes_sent("reduce_scatter", n, w) == n * 3 // 4
    assert bytes_sent("all_to_all", n, w) == n * 3 // 4
    assert bytes_sent("all_reduce", n, 1) == 0
    assert bytes_sent("barrier", n, w) == 0
