"""`mopc.optim.HostAdamW` and `optimizer_offload`: host-resident AdamW, exact.

World 1 here (the multi-rank parity runs cover world 2 and 4). The reference is
`torch.optim.AdamW` on the same compiled model: on CPU both run the single-tensor AdamW,
so losses and parameters must agree bitwise.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import mopc.optim
from mopc.models import PRESETS, build_model
from mopc.runtime.memory import MemoryTracker
from mopc.runtime.trainer import synthetic_batch

CONFIG = dataclasses.replace(PRESETS["tiny"], num_layers=2)  # one dense and one MoE layer


def _train(make_opt, options: dict, steps: int = 5, clip: float | None = None, tmp_path=None):
    torch._dynamo.reset()
    model = build_model(CONFIG, device="cpu", seed=0)
    opt = make_opt(model.parameters())
    if tmp_path is not None:
        options = {**options, "dump_dir": str(tmp_path)}
    step = torch.compile(model, backend="mop", options=options)
    tracker = MemoryTracker(model, opt, timeline=True)
    losses = []
    for i in range(steps):
        with tracker.step():
            loss = step(**synthetic_batch(i, 4, 32, CONFIG.vocab_size, 0))
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if hasattr(opt, "synchronize"):
        opt.synchronize()
    return losses, [p.detach().clone() for p in model.parameters()], tracker, opt


def _adamw(params):
    return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1)


def _host(params):
    return mopc.optim.HostAdamW(params, lr=3e-3, weight_decay=0.1)


@pytest.mark.parametrize("overlap", [False, True], ids=["step", "overlapped"])
def test_host_adamw_equals_torch_adamw_bitwise(overlap, tmp_path):
    losses, params, ref_tracker, _ = _train(_adamw, {})
    options = {"optimizer_offload": True} if overlap else {}
    losses2, params2, tracker, opt = _train(_host, options, tmp_path=tmp_path)
    assert losses2 == losses
    assert all(torch.equal(a, b) for a, b in zip(params, params2, strict=True))
    stats = opt.overlap_stats()
    n = sum(1 for p in opt.param_groups[0]["params"] if p.requires_grad)
    if overlap:  # every update was started in backward and used as staged
        assert stats["staged_in_backward"] == stats["used_staged"] > 0
        assert stats["recomputed"] == 0
        fw = "".join(p.read_text() for p in tmp_path.rglob("*_forward.txt"))
        bw = "".join(p.read_text() for p in tmp_path.rglob("*_backward.txt"))
        assert bw.count("mopc.grad_ready(") >= n - 2 and fw.count("mopc.await_update(") >= n - 2
    else:
        assert stats == {"staged_in_backward": 0, "used_staged": 0, "recomputed": 0}
    ref, rep = ref_tracker.report(), tracker.report()
    # the moments leave the device tier for the host tier, with the fp32 master copies
    assert rep["optimizer"] == 0 and ref["optimizer"] > 0
    param_bytes = sum(p.numel() * 4 for p in opt.param_groups[0]["params"])
    assert rep["optimizer_host"] >= ref["optimizer"] + param_bytes - 64
    assert rep["peak"] <= ref["peak"] - ref["optimizer"] + 64


def test_modified_gradient_is_recomputed_not_stale():
    """clip_grad_norm_ between backward and step changes p.grad in place: the update
    started in backward must be dropped and redone from the clipped gradient."""
    losses, params, _, _ = _train(_adamw, {}, steps=3, clip=0.05)
    losses2, params2, _, opt = _train(_host, {"optimizer_offload": True}, steps=3, clip=0.05)
    assert losses2 == losses
    assert all(torch.equal(a, b) for a, b in zip(params, params2, strict=True))
    stats = opt.overlap_stats()
    assert stats["recomputed"] > 0 and stats["used_staged"] == 0


def test_state_dict_round_trip_continues_exactly():
    model = build_model(CONFIG, device="cpu", seed=0)
    opt = _host(model.parameters())
    step = torch.compile(model, backend="mop", options={"optimizer_offload": True})
    for i in range(2):
        step(**synthetic_batch(i, 4, 32, CONFIG.vocab_size, 0)).backward()
        opt.step()
        opt.zero_grad()
    sd = opt.state_dict()
    first = next(iter(sd["state"].values()))
    assert set(first) == {"step", "exp_avg", "exp_avg_sq"} and float(first["step"]) == 2.0
    # into torch.optim.AdamW: the same layout, continues the same
    torch_opt = _adamw(model.parameters())
    torch_opt.load_state_dict(copy.deepcopy(sd))  # on CPU, load_state_dict keeps the tensors it is given
    host2 = _host(model.parameters())
    host2.load_state_dict(copy.deepcopy(sd))
    saved = [p.detach().clone() for p in model.parameters()]
    batch = synthetic_batch(5, 4, 32, CONFIG.vocab_size, 0)
    results = []
    for o in (torch_opt, host2):
        with torch.no_grad():
            for p, v in zip(model.parameters(), saved, strict=True):
                p.copy_(v)
        step(**batch).backward()
        o.step()
        o.zero_grad()
        if hasattr(o, "synchronize"):
            o.synchronize()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_bad_hyperparameters_name_the_argument():
    with pytest.raises(ValueError, match=r"lr=-1 must be >= 0"):
        mopc.optim.HostAdamW([torch.nn.Parameter(torch.zeros(2))], lr=-1)
    with pytest.raises(ValueError, match=r"betas\[1\]=1.0 must be in \[0, 1\)"):
        mopc.optim.HostAdamW([torch.nn.Parameter(torch.zeros(2))], betas=(0.9, 1.0))


def test_checkpoint_with_pending_updates_resumes_exactly(tmp_path):
    """mopc.checkpoint.save right after an overlapped step() (its updates may still be
    running) waits for them; the checkpoint resumes into HostAdamW or torch.optim.AdamW."""
    import mopc.checkpoint as ckpt

    def train(model, opt, steps):
        fn = torch.compile(model, backend="mop", options={"optimizer_offload": True})
        for i in steps:
            fn(**synthetic_batch(i, 4, 32, CONFIG.vocab_size, 0)).backward()
            opt.step()
            opt.zero_grad()
        if hasattr(opt, "synchronize"):
            opt.synchronize()

    torch._dynamo.reset()
    model = build_model(CONFIG, device="cpu", seed=0)
    opt = _host(model.parameters())
    train(model, opt, range(2))
    ckpt.save(tmp_path, model, opt, step=2)
    train(model, opt, range(2, 4))
    for make in (_host, _adamw):
        other = build_model(CONFIG, device="cpu", seed=7)
        other_opt = make(other.parameters())
        assert ckpt.load(tmp_path, other, other_opt) == 2
        train(other, other_opt, range(2, 4))
        for a, b in zip(model.parameters(), other.parameters(), strict=True):
            assert torch.equal(a, b), make.__name__


def test_refused_step_commits_nothing():
    """A step pre-hook that raises (as the non-finite guard does) after an overlapped
    backward leaves parameters and state as they were; training then goes on exactly."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    def run(make_opt):
        torch._dynamo.reset()
        model = build_model(CONFIG, device="cpu", seed=0)
        opt = make_opt(model.parameters())
        fn = torch.compile(model, backend="mop", options={"optimizer_offload": True})
        refuse = {"left": 1}

        def guard(optimizer, args, kwargs):
            if refuse["left"]:
                refuse["left"] -= 1
                raise FloatingPointError("refused")

        for i in range(3):
            fn(**synthetic_batch(i, 4, 32, CONFIG.vocab_size, 0)).backward()
            if i == 1:  # the refused attempt: its backward's staged updates must be dropped
                before = [p.detach().clone() for p in model.parameters()]
                handle = register_optimizer_step_pre_hook(guard)
                with pytest.raises(FloatingPointError):
                    opt.step()
                handle.remove()
                if hasattr(opt, "synchronize"):
                    opt.synchronize()
                assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
            else:
                opt.step()
            opt.zero_grad()
        if hasattr(opt, "synchronize"):
            opt.synchronize()
        return [p.detach().clone() for p in model.parameters()], opt

    ref, _ = run(_adamw)
    got, opt = run(_host)
    assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))
    assert opt.overlap_stats()["used_staged"] > 0
