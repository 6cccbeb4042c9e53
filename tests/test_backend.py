"""The `mop` backend end to end on one process: same training as eager, dumps, entry point."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from mopc.models.presets import build_model
from mopc.runtime.trainer import synthetic_batch


def _train(model, backend, steps=3, options=None, batch=2, seq_len=16):
    run = model if backend == "eager" else torch.compile(model, backend=backend, options=options)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, grads = [], []
    for step in range(steps):
        loss = run(**synthetic_batch(step, batch, seq_len, model.config.vocab_size))
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return losses, grads


@pytest.mark.parametrize("partitioner", ["min_cut", "default"])
def test_tiny_trains_exactly_like_eager(partitioner):
    eager_losses, eager_grads = _train(build_model("tiny", seed=0), "eager")
    mop_losses, mop_grads = _train(build_model("tiny", seed=0), "mop", options={"partitioner": partitioner})
    for step, (a, b) in enumerate(zip(eager_losses, mop_losses)):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=f"loss differs at step {step}")
    for step, (ga, gb) in enumerate(zip(eager_grads, mop_grads)):
        assert ga.keys() == gb.keys()
        for name in ga:
            torch.testing.assert_close(gb[name], ga[name], rtol=1e-5, atol=1e-6,
                                       msg=f"grad of {name} differs at step {step}")


def test_dump_dir_writes_one_file_per_pass_with_roles(tmp_path, monkeypatch):
    monkeypatch.setenv("MOPC_DUMP_DIR", str(tmp_path))
    model = build_model("tiny", seed=0)
    loss = torch.compile(model, backend="mop")(**synthetic_batch(0, 2, 16, 128))
    loss.backward()
    graphs = [d for d in tmp_path.iterdir() if d.is_dir()]
    assert len(graphs) == 1, "tiny compiles to one graph"
    index = json.loads((graphs[0] / "index.json").read_text())
    steps = [e["pass"] for e in index]
    assert steps == ["captured", "classify_roles", "count_costs", "annotate_roles", "vocab_parallel_loss",
                     "gather_params", "forward", "backward"]
    for entry in index:
        text = (graphs[0] / entry["file"]).read_text()
        body = [line for line in text.splitlines() if line.startswith("%")]
        assert body, entry["file"]
        if entry["pass"] != "captured":
            missing = [line for line in body if "role=?" in line]
            assert not missing, f"{entry['file']}: nodes without a role: {missing[:3]}"
    annotated = (graphs[0] / "03_annotate_roles.txt").read_text()
    for role in ("embedding", "attention", "router", "expert", "dispatch", "combine", "loss", "vocab_projection"):
        assert f"role={role}" in annotated, role
    assert "f32[8, 64, 32]" in annotated  # shapes are printed (an expert weight)


def test_disable_passes_env_and_requirements(monkeypatch, tmp_path):
    monkeypatch.setenv("MOPC_DISABLE_PASSES", "count_costs")
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    compiled = torch.compile(model, backend="mop", options={"dump_dir": str(tmp_path)})
    compiled(torch.randn(3, 4)).sum().backward()
    index = json.loads(next(tmp_path.iterdir()).joinpath("index.json").read_text())
    assert "count_costs" not in [e["pass"] for e in index]

    torch._dynamo.reset()
    monkeypatch.setenv("MOPC_DISABLE_PASSES", "classify_roles")
    compiled = torch.compile(model, backend="mop")
    with pytest.raises(Exception, match="requires pass 'classify_roles', but it is disabled"):
        compiled(torch.randn(3, 4))


class _CountsToPython(nn.Module):
    """Routing that reads token counts back to Python: Dynamo breaks the graph there."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(8, 4, bias=False)
        self.experts = nn.ModuleList(nn.Linear(8, 8, bias=False) for _ in range(4))

    def forward(self, x):
        idx = self.gate(x).argmax(-1)
        out = torch.zeros_like(x)
        for e, n in enumerate(torch.bincount(idx, minlength=4).tolist()):
            if n:
                rows = (idx == e).nonzero().squeeze(-1)
                out = out.index_add(0, rows, self.experts[e](x[rows]))
        return out.square().mean()


def test_graph_breaks_train_like_eager():
    torch.manual_seed(0)
    model = _CountsToPython()
    x = torch.randn(16, 8)
    eager = model(x)
    eager.backward()
    want = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    got = torch.compile(model, backend="mop")(x)
    got.backward()
    torch.testing.assert_close(got, eager)
    for k, g in want.items():
        torch.testing.assert_close(dict(model.named_parameters())[k].grad, g)


def test_inference_without_grad():
    model = build_model("tiny", seed=0)
    batch = synthetic_batch(0, 2, 16, 128)
    with torch.no_grad():
        want = model(batch["input_ids"])
        got = torch.compile(model, backend="mop")(batch["input_ids"])
    torch.testing.assert_close(got, want)


def test_functional_collectives_pass_the_verifier(fake_world, tmp_path):
    import torch.distributed as dist
    from torch.distributed._functional_collectives import all_gather_tensor

    def step(x, w):
        full = all_gather_tensor(w, 0, dist.group.WORLD)
        return (x @ full.t()).sum()

    w = torch.randn(2, 4, requires_grad=True)
    x = torch.randn(3, 4)
    out = torch.compile(step, backend="mop", options={"debug": True, "dump_dir": str(tmp_path)})(x, w)
    out.backward()
    assert w.grad.shape == w.shape
    text = "\n".join(p.read_text() for p in next(tmp_path.iterdir()).glob("*annotate_roles.txt"))
    assert f"f32[{2 * fake_world}, 4] = _c10d_functional.all_gather_into_tensor" in text
    assert "_c10d_functional.wait_tensor" in text


def test_backend_resolves_without_importing_mopc():
    code = textwrap.dedent(
        """
        import sys, torch
        m = torch.nn.Linear(4, 2)
        assert "mopc" not in sys.modules
        out = torch.compile(m, backend="mop")(torch.randn(3, 4)).sum()
        out.backward()
        assert m.weight.grad is not None
        print("ok", "mopc" in sys.modules)
        """
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/",
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok True")


@pytest.mark.slow
def test_inductor_lowering_matches_eager():
    model = build_model("tiny", seed=0)
    data = synthetic_batch(0, 2, 16, 128)
    want = model(**data)
    want.backward()
    want_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    got = torch.compile(model, backend="mop", options={"lowering": "inductor"})(**data)
    got.backward()
    torch.testing.assert_close(got, want)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[k], rtol=1e-4, atol=1e-6)


def test_collectives_over_mesh_subgroups_at_scale(mesh_3d, tmp_path):
    """Graph tests at 8 and 64 fake ranks: a gather over the mesh's expert axis."""
    from torch.distributed._functional_collectives import all_gather_tensor

    ep_group = mesh_3d.get_group("ep")

    def step(x, w):
        return (x @ all_gather_tensor(w, 0, ep_group).t()).sum()

    w = torch.randn(3, 4, requires_grad=True)
    out = torch.compile(step, backend="mop", options={"debug": True, "dump_dir": str(tmp_path)})(torch.randn(5, 4), w)
    out.backward()
    assert w.grad.shape == (3, 4)
    text = next(tmp_path.iterdir()).joinpath("03_annotate_roles.txt").read_text()
    assert "f32[6, 4] = _c10d_functional.all_gather_into_tensor" in text  # ep axis has 2 ranks


def test_dynamic_shapes_compile_once():
    """Analysis must not specialise symbolic sizes (it would force a recompile per size)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    counter = CompileCounterWithBackend("mop")
    compiled = torch.compile(model, backend=counter, dynamic=True)
    for batch in (3, 5, 7):
        compiled(torch.randn(batch, 4)).sum().backward()
    assert counter.frame_count == 1


def test_torch_compile_mode_is_refused_clearly():
    compiled = torch.compile(nn.Linear(4, 4), backend="mop", mode="reduce-overhead")
    with pytest.raises(Exception, match="does not take mode=; pass mop's settings as options"):
        compiled(torch.randn(2, 4))
