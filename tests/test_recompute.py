"""`recompute="full"`: each transformer layer keeps only its input between forward and backward.

Recompute is exact, so losses and gradients must equal the default run; the forward graph
must save, from inside layers, only the layers' inputs ([B, S, D] each); the measured
activation peak must fall; collectives that tensor and expert parallelism put inside a
layer must run again in backward.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

import mopc
from mopc import MoPConfig, MoPConfigError
from mopc.models import PRESETS, build_model, make_init_fn
from mopc.passes.pipeline import build_pipeline
from mopc.runtime.memory import MemoryTracker
from mopc.runtime.trainer import synthetic_batch

CONFIG = PRESETS["tiny"]  # 3 layers: one dense, two MoE
BATCH, SEQ = 2, 16


@dataclasses.dataclass
class Run:
    losses: list[float]
    grads: list[list[torch.Tensor]]
    memory: dict[str, int]
    dump: Path


def _train(options: dict, dump: Path, steps: int = 2) -> Run:
    torch._dynamo.reset()
    model = build_model(CONFIG, device="cpu", seed=0)
    step = torch.compile(model, backend="mop", options={**options, "dump_dir": str(dump)})
    tracker = MemoryTracker(model, None)
    losses, grads = [], []
    for i in range(steps):
        with tracker.step():
            loss = step(**synthetic_batch(i, BATCH, SEQ, CONFIG.vocab_size, 0))
            loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    return Run(losses, grads, tracker.report(), dump)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("recompute")
    return {"auto": _train({}, root / "auto"), "full": _train({"recompute": "full"}, root / "full")}


def _graph_text(dump: Path, phase: str) -> str:
    graph = next(d for d in dump.iterdir() if d.is_dir() and list(d.glob(f"*_{phase}.txt")))
    return next(graph.glob(f"*_{phase}.txt")).read_text()


def _saved_in_layers(dump: Path) -> list[str]:
    """Types of the values the forward graph saves for backward that a layer computed."""
    forward = _graph_text(dump, "forward")
    defs = {m.group(1): m.group(0) for m in re.finditer(r"^%(\w+): .*$", forward, re.MULTILINE)}
    returned = re.search(r"^return \[(.*)\]$", forward, re.MULTILINE).group(1).split(", ")
    saved = [name.lstrip("%") for name in returned[1:]]  # the loss first
    return [re.match(r"%\w+: (\S+\[[^\]]*\])", defs[s]).group(1) for s in saved
            if s in defs and re.search(r"layer=\d+", defs[s]) and "= input" not in defs[s]]


def test_full_recompute_is_exact(runs):
    auto, full = runs["auto"], runs["full"]
    assert full.losses == pytest.approx(auto.losses, rel=1e-6, abs=0)
    for step_auto, step_full in zip(auto.grads, full.grads, strict=True):
        for a, b in zip(step_auto, step_full, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_layers_save_only_their_inputs_and_the_peak_falls(runs):
    auto, full = runs["auto"], runs["full"]
    # layers 1 and 2 keep their input, the residual stream [B, S, D]; layer 0's input is the
    # embedding (outside layers, the partitioner's choice); nothing else a layer computed
    assert _saved_in_layers(full.dump) == [f"f32[{BATCH}, {SEQ}, {CONFIG.dim}]"] * (CONFIG.num_layers - 1)
    assert len(_saved_in_layers(auto.dump)) > 3 * (CONFIG.num_layers - 1)  # the min-cut alone saves much more
    assert full.memory["activations_peak"] * 4 < auto.memory["activations_peak"]
    # attention runs again in backward (under the partitioner's RNG-state wrapper: the
    # kernel carries the seeded tag for its dropout)
    sdpa = "OpOverload(op='aten._scaled_dot_product_flash_attention_for_cpu'"
    assert _graph_text(full.dump, "backward").count(sdpa) == CONFIG.num_layers
    assert sdpa not in _graph_text(auto.dump, "backward")


def test_option_errors():
    with pytest.raises(MoPConfigError, match=r"recompute='full' .* partitioner='default' .* set "
                                             r"partitioner='min_cut' or recompute='auto'"):
        MoPConfig(recompute="full", partitioner="default")
    with pytest.raises(MoPConfigError, match=r"recompute='full' and offload='auto' both decide what forward saves"):
        MoPConfig(recompute="full", offload="auto", memory_budget_gb=1.0)
    with pytest.raises(MoPConfigError, match=r"recompute"):
        MoPConfig.from_options({"recompute": "selective"})
    assert "full_recompute" not in build_pipeline(MoPConfig()).names
    names = build_pipeline(MoPConfig(recompute="full")).names
    assert names[-1] == "full_recompute" and names.index("gather_params") < names.index("full_recompute")


def test_collectives_inside_layers_run_again_in_backward(tmp_path, fake_world_factory):
    """Fake world 4, tp=2 x ep=2: the tensor-parallel reduce-scatters and the expert
    exchange the forward ran are re-run by backward's recompute."""
    world = fake_world_factory(4, 0)
    config = dataclasses.replace(CONFIG, num_layers=2)  # one dense, one MoE layer
    batch = {k: v[:BATCH] for k, v in synthetic_batch(0, world * BATCH, SEQ, config.vocab_size).items()}
    model = build_model(config, device="meta", seed=0)
    model = mopc.parallelize(model, batch, init_fn=make_init_fn(model, 0), tp=2, ep=2)
    step = torch.compile(model, backend="mop", options={"recompute": "full", "dump_dir": str(tmp_path)})
    step(**batch).backward()  # the fake group moves no data: the graphs are what is checked
    graph = next(d for d in tmp_path.iterdir() if d.is_dir())
    index = {e["pass"]: e for e in json.loads((graph / "index.json").read_text())}
    count = {phase: collections.Counter((c["kind"], c["created_by"]) for c in index[phase]["collectives"])
             for phase in ("forward", "backward")}
    fw, bw = count["forward"], count["backward"]
    # without recompute backward has one all-to-all per forward one (the gradients'), and
    # one tp reduce-scatter per forward all-gather; with it, the forward's again
    assert fw["all_to_all", "expert_parallel"] > 0
    assert bw["all_to_all", "expert_parallel"] == 2 * fw["all_to_all", "expert_parallel"]
    assert bw["reduce_scatter", "tensor_parallel"] > fw["all_gather", "tensor_parallel"] > 0
    assert bw["all_gather", "expert_parallel"] == fw["all_gather", "expert_parallel"] > 0  # routing counts
    backward = _graph_text(tmp_path, "backward")
    assert backward.count("= mopc.ep_dispatch(") == 2 and backward.count("= mopc.ep_combine(") == 2
