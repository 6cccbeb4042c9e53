"""`offload="auto"`: save, recompute or offload each saved tensor under `memory_budget_gb`.

Recompute and offload are exact, so losses and parameters must equal the run without the
policy bitwise; the device-tier peak the memory tracker measures must fall; a budget the
graph already meets must leave the graphs as they are; and no collective may be rerun
in backward to rebuild a tensor.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import re

import pytest
import torch

import mopc
import mopc.backend
from mopc.models import PRESETS, build_model, make_init_fn
from mopc.passes.rewrite.memory_policy import (
    SavedTensor,
    choose_actions,
    estimate_memory,
)
from mopc.runtime.memory import MemoryTracker
from mopc.runtime.trainer import synthetic_batch

CONFIG = dataclasses.replace(PRESETS["tiny"], num_layers=2)  # one dense and one MoE layer
MiB = 2**20


@dataclasses.dataclass
class Run:
    losses: list[float]
    params: list[torch.Tensor]
    memory: dict[str, int]
    forward: str
    backward: str
    policy: object


@contextlib.contextmanager
def _recording_partitions():
    """Each compilation's (forward code, backward code, memory policy summary)."""
    seen = []
    partition = mopc.backend._Compilation.partition

    def record(self, *args, **kwargs):
        fw, bw = partition(self, *args, **kwargs)
        seen.append((fw.code, bw.code, getattr(self, "memory_policy", None)))
        return fw, bw

    mopc.backend._Compilation.partition = record
    try:
        yield seen
    finally:
        mopc.backend._Compilation.partition = partition


def _train(options: dict, steps: int = 5) -> Run:
    torch._dynamo.reset()
    model = build_model(CONFIG, device="cpu", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    step = torch.compile(model, backend="mop", options=options)
    tracker = MemoryTracker(model, opt)
    losses = []
    with _recording_partitions() as seen:
        for i in range(steps):
            with tracker.step():
                loss = step(**synthetic_batch(i, 4, 32, CONFIG.vocab_size, 0))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    assert len(seen) == 1
    forward, backward, policy = seen[0]
    return Run(losses, [p.detach().clone() for p in model.parameters()], tracker.report(), forward, backward, policy)


def _static_bytes() -> int:
    model = build_model(CONFIG, device="meta")
    numel = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return numel * (4 + 4 + 8) + buffers  # fp32 parameter, gradient, AdamW's two moments


@pytest.fixture(scope="module")
def plain() -> Run:
    return _train({})


def test_budget_already_met_leaves_the_graphs_unchanged(plain):
    run = _train({"offload": "auto", "memory_budget_gb": 64.0})
    assert (run.forward, run.backward) == (plain.forward, plain.backward)
    assert "mopc.offload" not in run.forward and run.policy.recomputed == run.policy.offloaded == ()
    assert run.policy.before == run.policy.after and run.policy.met
    assert run.policy.before.static == _static_bytes()
    assert run.losses == plain.losses


@pytest.mark.parametrize("device", ["cpu", "h100"])
def test_tight_budget_recomputes_or_offloads_exactly_and_lowers_the_peak(plain, device, caplog):
    # The roofline decides the action: on the cpu preset copies to host are cheaper than
    # recomputing, on the H100 preset (HBM 60x faster than PCIe) recompute is.
    budget = _static_bytes() + MiB // 2
    with caplog.at_level(logging.INFO, logger="mopc.passes"):
        run = _train({"offload": "auto", "memory_budget_gb": budget / 2**30, "memory_policy_hardware": device})
    policy = run.policy
    assert policy.before.total > budget >= policy.after.total and policy.met
    if device == "cpu":
        assert policy.offloaded and not policy.recomputed
        assert run.forward.count("torch.ops.mopc.offload") == len(policy.offloaded)
        assert run.memory["host_peak"] > 0
    else:
        assert policy.recomputed and not policy.offloaded
        # the min-cut partitioner honoured the tags: the tensors are rebuilt, not saved
        saved = re.search(r"def forward\(self, (.*?)\)", run.backward).group(1)
        assert not set(policy.recomputed) & {s.strip() for s in saved.split(",")}
        assert run.memory["host_peak"] == 0
    assert run.losses == plain.losses
    assert all(torch.equal(a, b) for a, b in zip(plain.params, run.params, strict=True))
    # the measured device-tier peak falls by about what the policy took off the estimate
    assert run.memory["peak"] < plain.memory["peak"]
    fall = plain.memory["activations_peak"] - run.memory["activations_peak"]
    assert fall == pytest.approx(policy.before.activations - policy.after.activations, rel=0.1)
    lines = [r.getMessage() for r in caplog.records if "memory policy" in r.getMessage()]
    assert any(re.search(r"layer 1: saved .* recomputed .* offloaded", m) for m in lines)
    assert any(re.search(r"estimate [\d.]+ MiB -> [\d.]+ MiB .* meets the budget", m) for m in lines)


def _saved(name, nbytes, *, storage=None, recompute=math.inf, offload=1.0, is_input=False, layer=0):
    return SavedTensor(name=name, nbytes=nbytes, storage=storage or name, storage_bytes=nbytes, layer=layer,
                       is_input=is_input, recompute_seconds=recompute, offload_seconds=offload)


def test_estimate_counts_static_state_and_each_saved_storage_once():
    w = torch.empty(10, 10, device="meta")  # 400 bytes
    frozen = torch.empty(5, dtype=torch.bfloat16, device="meta")
    saved = [_saved("a", 1000), _saved("a_view", 1000, storage="a"), _saved("b", 300),
             _saved("w_t", 400, storage="w", is_input=True)]
    est = estimate_memory([(w, True), (frozen, False)], saved)
    assert (est.params, est.grads, est.optimizer) == (410, 400, 800)  # AdamW: 2 fp32 moments
    assert est.activations == 1300 and est.total == est.static + 1300
    # monotone: more saved bytes never lower it; taking actions never raises it
    assert estimate_memory([(w, True)], [*saved, _saved("c", 1)]).total > estimate_memory([(w, True)], saved).total
    assert estimate_memory([(w, True)], saved, {"b": "offload"}).activations == 1000
    assert estimate_memory([(w, True)], saved, {"b": "offload"}).host == 300
    # a storage two saved tensors hold stays while either is kept
    assert estimate_memory([(w, True)], saved, {"a": "recompute"}).activations == 1300
    assert estimate_memory([(w, True)], saved, {"a": "recompute", "a_view": "offload"}).activations == 300
    # bf16 parameters still get fp32 moments
    assert estimate_memory([(frozen, True)], []).optimizer == 5 * 8


def test_choose_actions_takes_most_bytes_per_second_first_and_only_what_is_needed():
    saved = [_saved("big_cheap", 1000, recompute=1.0, offload=5.0), _saved("big_dear", 1000, offload=10.0),
             _saved("small", 100, offload=0.01), _saved("param", 10**6, is_input=True, offload=0.0),
             _saved("shared", 500, storage="s"), _saved("shared2", 500, storage="s")]
    assert choose_actions(saved, 50) == ({"small": "offload"}, True)
    actions, met = choose_actions(saved, 1050)
    assert met and actions == {"small": "offload", "big_cheap": "recompute"}
    # nothing meets it: every candidate, never inputs nor shared storages
    actions, met = choose_actions(saved, 10**7)
    assert not met and set(actions) == {"small", "big_cheap", "big_dear"}
    assert choose_actions(saved, 1050, allow_recompute=False)[0]["big_cheap"] == "offload"
    assert choose_actions(saved, 0) == ({}, True)


def _c10d_ops(code: str) -> collections.Counter:
    return collections.Counter(re.findall(r"torch\.ops\._c10d_functional\.(\w+)", code))


def test_no_collective_is_recomputed(fake_world_factory, monkeypatch, caplog):
    """World 2, ep=2, a budget nothing meets: the maximal policy, with recompute cheaper
    than offload (H100 roofline), must not put a forward collective into backward."""
    world = fake_world_factory(2, 0)
    splits = []
    split = mopc.backend.min_cut_rematerialization_partition

    def record(*args, **kwargs):
        fw, bw = split(*args, **kwargs)
        splits.append(bw.code)
        return fw, bw

    monkeypatch.setattr(mopc.backend, "min_cut_rematerialization_partition", record)
    batch = {k: v[:2] for k, v in synthetic_batch(0, 2 * world, 16, CONFIG.vocab_size).items()}
    model = build_model(CONFIG, device="meta")
    model = mopc.parallelize(model, batch, init_fn=make_init_fn(model, 0), ep=2)
    step = torch.compile(model, backend="mop", options={"offload": "auto", "memory_budget_gb": 1e-6,
                                                          "memory_policy_hardware": "h100"})
    with _recording_partitions() as seen, caplog.at_level(logging.INFO, logger="mopc.passes"):
        step(**batch)  # the fake group moves no data: the graphs are what is checked
    policy = seen[0][2]
    assert len(splits) == 2 and policy.recomputed and not policy.met  # split again with the recompute tags
    without, with_policy = _c10d_ops(splits[0]), _c10d_ops(splits[1])
    assert without["all_gather_into_tensor"] > 0 and with_policy == without
    assert "ep_dispatch" in splits[1] and splits[1].count("ep_dispatch") == splits[0].count("ep_dispatch")
    assert any(r.levelno == logging.WARNING and "exceeds memory_budget_gb=1e-06" in r.getMessage()
               for r in caplog.records)
