"""`offload="experts"`: expert activations go to host memory between forward and backward.

Exact copies, so losses and parameters must equal the run without offload bitwise; the
device-tier activation peak must fall by exactly the bytes held in the host tier.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mopc import MoPConfig, MoPConfigError
from mopc.models import PRESETS, build_model
from mopc.runtime.memory import MemoryTracker
from mopc.runtime.trainer import synthetic_batch

CONFIG = dataclasses.replace(PRESETS["tiny"], num_layers=2)  # one dense and one MoE layer


def _train(options: dict, tmp_path, steps: int = 5):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(CONFIG, device="cpu", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    step = torch.compile(model, backend="mop", options={**options, "dump_dir": str(tmp_path)})
    tracker = MemoryTracker(model, opt, timeline=True)
    losses = []
    for i in range(steps):
        with tracker.step():
            loss = step(**synthetic_batch(i, 4, 32, CONFIG.vocab_size, 0))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    graphs = {name: "".join(p.read_text() for p in tmp_path.rglob(f"*_{name}.txt")) for name in ("forward", "backward")}
    return losses, [p.detach().clone() for p in model.parameters()], tracker, graphs


def test_offload_experts_is_exact_and_moves_activations_to_host(tmp_path):
    losses, params, plain, _ = _train({}, tmp_path / "none")
    losses_off, params_off, off, graphs = _train({"offload": "experts", "offload_prefetch": 1}, tmp_path / "experts")

    assert losses_off == losses
    assert all(torch.equal(a, b) for a, b in zip(params, params_off, strict=True))

    offloads = graphs["forward"].count("= mopc.offload(")
    reloads = graphs["backward"].count("= mopc.reload(")
    assert offloads > 0 and offloads == reloads
    assert "role=expert" in graphs["forward"] or "role=dispatch" in graphs["forward"]

    before, after = plain.report(), off.report()
    assert before["host_peak"] == 0 and after["host_peak"] > 0
    # the device-tier activation peak (the end of forward) falls by what the host tier holds
    assert after["activations_peak"] == before["activations_peak"] - after["host_peak"]
    assert after["peak"] < before["peak"]
    events = {s.event for s in off.timeline}
    assert {"reload", "save", "release"} <= events
    assert max(s.host for s in off.timeline) == after["host_peak"]
    assert off.timeline[-1].host == 0  # nothing left in the host pool after the step


def test_offload_options_are_checked():
    with pytest.raises(MoPConfigError, match=r"offload_prefetch=-1 must be >= 0"):
        MoPConfig.from_options({"offload_prefetch": -1})
    with pytest.raises(MoPConfigError, match=r"offload='all' is not accepted; use one of 'none', 'experts'"):
        MoPConfig.from_options({"offload": "all"})
