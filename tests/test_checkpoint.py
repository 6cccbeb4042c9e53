"""Distributed Checkpoint round trips: across layouts (gloo ranks), interrupted saves, export.

The multi-rank test saves `tiny` at world 4 with tp=2 x ep=4 after 3 AdamW steps, resumes at
world 2 with ep=2 (so world 4 -> 2, ep 4 -> 2 and tp 2 -> 1 at once), and checks the resumed
losses against the uninterrupted run and single-device eager; then a save that fails on one
rank midway must leave the step-3 checkpoint loadable; then `mopc export` consolidates it
into one file that loads into the unparallelized model.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mopc.checkpoint as ckpt
from mopc.models import build_model
from mopc.runtime.trainer import synthetic_batch

HERE = Path(__file__).parent
BATCH, SEQ, LR, SAVE_AT, STEPS = 4, 16, 3e-3, 3, 6  # as in tests/mp_checkpoint.py
TOL = 1e-5
# Parameters against eager: Adam divides by sqrt(v), so an element whose gradient is at fp32
# rounding level moves by up to lr either way (tests/mp_parity.py trains at lr 1e-4 for this);
# at the trainer's lr 3e-3 over 3 steps the compiled program differs from eager by up to
# ~1.2e-5 in a few such elements. The exported values themselves are compared bitwise.
PARAM_TOL = 1e-4


def _torchrun(world: int, layout: str, out: Path, root: Path, phase: str, *extra: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--standalone",
           str(HERE / "mp_checkpoint.py"), str(out), str(root), phase, layout, *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((out / f"{phase}_rank{r}.json").read_text()) for r in range(world)]


def _eager(steps: int) -> tuple[list[float], torch.nn.Module]:
    torch.manual_seed(0)
    model = build_model("tiny", device="cpu", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for step in range(steps):
        loss = model(**synthetic_batch(step, BATCH, SEQ, model.config.vocab_size, 0))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses, model


def _rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def _roundtrip(tmp_path: Path, compile_: bool, save: tuple[int, str] = (4, "tp=2,ep=4"),
               resume: tuple[int, str] = (2, "ep=2")) -> None:
    out, root = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir(parents=True)
    flags = ("--compile",) if compile_ else ()
    saved = _torchrun(*save, out, root, "save", *flags)
    resumed = _torchrun(*resume, out, root, "resume", *flags)
    eager_losses, _ = _eager(STEPS)

    uninterrupted = saved[0]["losses"]
    assert all(r["losses"] == uninterrupted for r in saved)  # every rank reports the global mean
    assert _rel(uninterrupted, eager_losses) < TOL, (uninterrupted, eager_losses)
    for r in resumed:
        assert r["loaded_step"] == SAVE_AT
        assert _rel(r["losses"], uninterrupted[SAVE_AT:]) < TOL, (r["losses"], uninterrupted)
        assert _rel(r["losses"], eager_losses[SAVE_AT:]) < TOL
        # the interrupted save: every rank raised, the previous checkpoint is still the latest
        assert r["failed_save"].startswith("CheckpointError") and "rank(s) [1]" in r["failed_save"]
        assert "injected: disk full" in r["failed_save"]
        assert r["latest"] == f"step_{SAVE_AT:08d}" and r["reloaded_step"] == SAVE_AT
        assert r["reload_equal"]
    assert (root / f".step_{STEPS:08d}.partial").exists() and not (root / f"step_{STEPS:08d}").exists()

    # one file for inference, through the command line, loads into the unparallelized model
    exported = tmp_path / "tiny.pt"
    proc = subprocess.run([sys.executable, "-m", "mopc", "export", str(root), str(exported)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"step {SAVE_AT}" in proc.stdout and str(exported) in proc.stdout
    weights = torch.load(exported, weights_only=True)
    saved_full = torch.load(out / "saved_full.pt", weights_only=True)  # the saving run's own values
    for name, value in saved_full.items():
        assert torch.equal(weights[name], value), name  # export is exact
    model = build_model("tiny", device="cpu", seed=1)  # other values, all overwritten
    model.load_state_dict(weights, strict=True)
    _, ref = _eager(SAVE_AT)
    for (name, got), want in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        assert (got - want).abs().max() <= PARAM_TOL, name


@pytest.mark.multiprocess
def test_checkpoint_reshards_world4_tp2_ep4_to_world2_ep2(tmp_path):
    _roundtrip(tmp_path, compile_=False)


@pytest.mark.multiprocess
@pytest.mark.large
def test_checkpoint_reshards_compiled(tmp_path):
    _roundtrip(tmp_path, compile_=True)


@pytest.mark.multiprocess
@pytest.mark.large
def test_checkpoint_from_pipeline_stages_loads_into_another_layout_and_back(tmp_path):
    """Saved at pp 2 x ep 2 (each stage's ranks write its parameters' rows), resumed at world
    2 without pipelines, exactly; then pp 2 resumes from that layout's checkpoint."""
    _roundtrip(tmp_path / "a", compile_=True, save=(4, "pp=2,ep=2,microbatches=2"), resume=(2, "ep=2"))
    _roundtrip(tmp_path / "b", compile_=True, save=(2, "tp=2"), resume=(2, "pp=2,microbatches=2"))


# ---------------------------------------------------------------------------- one process


def _train(model, opt, steps: range) -> None:
    for step in steps:
        model(**synthetic_batch(step, BATCH, SEQ, model.config.vocab_size, 0)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_save_load_unparallelized_is_exact(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny", device="cpu", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05)
    _train(model, opt, range(2))
    ckpt.save(tmp_path, model, opt, step=2)
    _train(model, opt, range(2, 4))

    other = build_model("tiny", device="cpu", seed=7)
    other_opt = torch.optim.AdamW(other.parameters(), lr=1.0)
    assert ckpt.load(tmp_path, other, other_opt) == 2
    assert other_opt.param_groups[0]["lr"] == LR and other_opt.param_groups[0]["weight_decay"] == 0.05
    _train(other, other_opt, range(2, 4))
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)  # same program, same state: bitwise
    assert (tmp_path / "latest").read_text().strip() == "step_00000002"


def test_load_refuses_another_model(tmp_path):
    import dataclasses

    from mopc.models import PRESETS

    model = build_model("tiny", device="cpu", seed=0)
    ckpt.save(tmp_path, model, step=0)
    wider = build_model(dataclasses.replace(PRESETS["tiny"], moe_inter_dim=48), device="cpu", seed=0)
    with pytest.raises(ckpt.CheckpointError, match=r"layers\.\d+\.moe\.experts\.\w+: checkpoint shape \[8, "):
        ckpt.load(tmp_path, wider)
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint under .*nowhere"):
        ckpt.load(tmp_path / "nowhere", model)


@pytest.mark.parametrize(("shape", "chunk_dim", "chunks", "world"),
                         [((8, 6), 0, 1, 4), ((8, 6), 1, 2, 4), ((4, 6, 10), 2, 2, 2), ((4, 6, 10), 0, 4, 8),
                          ((5, 3), 0, 1, 4), ((7,), 0, 1, 3), ((6, 4, 2), 1, 2, 6)])
def test_piece_indices_name_the_values_each_rank_holds(shape, chunk_dim, chunks, world):
    from mopc.runtime.ownership import ParamLayout, local_shard

    layout = ParamLayout("w", shape, chunk_dim=chunk_dim, num_chunks=chunks, world_size=world)
    full = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape) + 1.0  # value = flat index + 1
    covered = torch.zeros(math.prod(shape), dtype=torch.long)
    for rank in range(world):
        piece = local_shard(full, layout, rank)
        positions, flat = ckpt._piece_indices(layout, rank, torch.device("cpu"))
        assert torch.equal(piece[positions], flat.to(torch.float64) + 1.0)
        padding = torch.ones(piece.numel(), dtype=torch.bool)
        padding[positions] = False
        assert torch.all(piece[padding] == 0)
        covered[flat] += 1
    assert torch.all(covered == 1)  # every value held by exactly one rank
