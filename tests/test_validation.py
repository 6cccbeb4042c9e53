"""Bad input is refused up front, on every rank, with the field, the value and the fix.

Each case runs `mopc.parallelize` (or `torch.compile`) on a fake process group of the
world size given, with the `tiny` model on `meta` (or a variant), and asserts the whole
point of the message: the field and value named, and the fix offered. Every rank runs the
same checks on the same configuration and shapes, so every rank raises the same error; the
checks run before any parameter is materialised or any process group is created, so the
model the user had is untouched (asserted after every case). docs/RELIABILITY.md lists
the cases with the messages users see (`python -m tests.test_validation` prints them).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

import mopc
from mopc.config import MoPConfigError
from mopc.models import PRESETS, build_model, make_init_fn
from mopc.plan import mesh
from mopc.runtime.trainer import synthetic_batch


@dataclass(frozen=True)
class Case:
    name: str
    world: int
    options: dict
    expect: tuple[str, ...]
    """Regexes that must all occur in the message."""
    model: dict = field(default_factory=dict)
    """Overrides of the `tiny` MoEModelConfig."""
    run: str = "parallelize"
    """`parallelize`, `parallelize-twice`, `no-init-fn`, `compile-only` or `compile-contradicts`."""
    error: type = MoPConfigError


CASES = [
    Case("unknown option", 8, {"tpp": 2}, (r"unknown mop option 'tpp'", r"Did you mean 'tp'\?")),
    Case("option of the wrong type", 8, {"tp": "2"}, (r"tp='2' must be an integer",)),
    Case("value not accepted", 8, {"plan": "fast"}, (r"plan='fast' is not accepted", r"'manual', 'auto'")),
    Case("tp does not divide the world", 8, {"tp": 3},
         (r"tp=3 does not divide the world size 8", r"choose tp from \[1, 2, 4, 8\]")),
    Case("mesh product is not the world", 8, {"tp": 2, "dp": 3},
         (r"dp=3 x tp=2 = 6 ranks, but the world size is 8", r"set dp=4 \(or leave dp unset\)")),
    Case("ep does not divide the world", 8, {"ep": 3},
         (r"ep=3 does not divide the world size 8", r"choose ep from \[1, 2, 4, 8\]")),
    Case("tp does not divide the attention heads", 8, {"tp": 4}, (
        r"tp=4 does not divide the model's attention heads \(6\)", r"choose tp from \[1, 2\]"),
         model={"num_heads": 6, "num_kv_heads": 6, "dim": 48}),
    Case("tp does not divide the key/value heads", 8, {"tp": 4},
         (r"tp=4 does not divide the model's key/value heads \(2\)", r"choose tp from \[1, 2\]"),
         model={"num_kv_heads": 2}),
    Case("tp does not divide a hidden size", 8, {"tp": 4},
         (r"tp=4 does not divide the dense_mlp hidden size 90 \(dim 0 of layers\.0\.feed_forward\.w1\.weight\)",
          r"choose tp from \[1, 2\]"),
         model={"dense_inter_dim": 90}),
    Case("vocabulary not divisible by the world", 8, {},
         (r"vocab_parallel=True needs the vocabulary \(132\) divisible by the world size 8",
          r"pad the vocabulary to a multiple of 8 or pass vocab_parallel=False"),
         model={"vocab_size": 132}),
    Case("ep does not divide the experts", 8, {"ep": 4},
         (r"ep=4 does not divide the model's number of experts \(6\)", r"choose ep from \[1, 2\]"),
         model={"num_experts": 6, "num_expert_groups": 1}),
    Case("ep > 1 on a model without MoE blocks", 8, {"ep": 2},
         (r"ep=2 needs routed experts", r"found none in this model \(no MoE block", r"pass ep=1"),
         model={"num_dense_layers": 3}),
    Case("dispatch option without expert parallelism", 8, {"capacity_factor": 1.25},
         (r"capacity_factor=1\.25 act on the expert-parallel dispatch, but ep=1", r"pass ep > 1")),
    Case("bias balancing without a router bias", 8, {"ep": 2, "expert_bias_update_rate": 1e-3},
         (r"expert_bias_update_rate=0\.001 needs router correction-bias buffers",
          r"router_bias=True\) or pass expert_bias_update_rate=0"),
         model={"router_bias": False}),
    Case("compression sub-option its mode never reads", 8, {"grad_compression": "int8", "powersgd_rank": 8},
         (r"powersgd_rank=8 acts only with grad_compression in \('powersgd',\)",
          r"grad_compression='int8'; set grad_compression or drop powersgd_rank")),
    Case("timeout that is not positive", 8, {"collective_timeout_s": 0},
         (r"collective_timeout_s=0 must be a positive number of seconds \(default 300\)",)),
    Case("non-finite number", 8, {"capacity_factor": float("nan"), "ep": 2},
         (r"capacity_factor=nan must be a finite number",)),
    Case("meta model without init_fn", 8, {}, (r"the model is on the meta device; pass init_fn=",
                                               r"mopc\.models\.make_init_fn\(model, seed\)"),
         run="no-init-fn", error=ValueError),
    Case("model parallelized twice", 8, {}, (r"this model is already parallelized", r"call it once per model"),
         run="parallelize-twice"),
    Case("layout option on a model parallelize did not shard", 1, {"tp": 2},
         (r"tp=2 are set up by mopc\.parallelize", r"call mopc\.parallelize\(model, example_inputs, tp=2\)"),
         run="compile-only", error=Exception),  # torch.compile wraps it: BackendCompilerFailed
    Case("compile option contradicting the layout", 8, {"tp": 2},
         (r"tp=1 contradicts the layout mopc\.parallelize chose \(tp=2\)",
          r"drop it from torch\.compile's options or pass it to mopc\.parallelize"),
         run="compile-contradicts", error=Exception),
]


def _model(case: Case) -> torch.nn.Module:
    config = dataclasses.replace(PRESETS["tiny"], **case.model) if case.model else "tiny"
    return build_model(config, device="meta", seed=0)


def _batch(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return synthetic_batch(0, 2, 16, model.config.vocab_size)


def _trigger(case: Case) -> tuple[torch.nn.Module, Callable[[], object]]:
    """The model the user has, and the call that must fail."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    torch.distributed.init_process_group("fake", store=FakeStore(), rank=case.world - 1, world_size=case.world)
    model = _model(case)
    batch = _batch(model)
    init_fn = make_init_fn(model, 0)
    if case.run == "parallelize":
        return model, lambda: mopc.parallelize(model, batch, init_fn=init_fn, **case.options)
    if case.run == "no-init-fn":
        return model, lambda: mopc.parallelize(model, batch, **case.options)
    if case.run == "parallelize-twice":
        mopc.parallelize(model, batch, init_fn=init_fn)
        return model, lambda: mopc.parallelize(model, batch, init_fn=init_fn)
    if case.run == "compile-only":
        real = build_model(case.model.get("preset", "tiny"), seed=0)
        step = torch.compile(real, backend="mop", options=case.options)
        return real, lambda: step(**synthetic_batch(0, 2, 16, real.config.vocab_size))
    if case.run == "compile-contradicts":
        mopc.parallelize(model, batch, init_fn=init_fn, **case.options)
        step = torch.compile(model, backend="mop", options={"tp": 1})
        return model, lambda: step(**batch)
    raise AssertionError(case.run)


def _message(case: Case) -> str:
    try:
        model, call = _trigger(case)
        before = {k: (v, v.is_meta) for k, v in model.named_parameters()}
        meshes = dict(mesh._MESHES)
        with pytest.raises(case.error) as err:
            call()
        if case.run in ("parallelize", "no-init-fn"):  # nothing allocated, no group created
            after = dict(model.named_parameters())
            assert all(after[k] is v and v.is_meta == was_meta for k, (v, was_meta) in before.items()), case.name
            assert getattr(model, "mopc_plan", None) is None and mesh._MESHES == meshes, case.name
        return str(err.value)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_with_field_value_and_fix(case):
    message = _message(case)
    for pattern in case.expect:
        assert re.search(pattern, message), (case.name, pattern, message)


def test_at_least_fifteen_distinct_cases():
    assert len({c.name for c in CASES}) >= 15


def test_train_cli_refuses_bad_mesh_before_launching(monkeypatch, capsys):
    """`mopc train` checks the mesh against --nproc before it starts any rank."""
    from mopc.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as err:
        main(["train", "--nproc", "4", "--tp", "3", "--steps", "1"])
    assert "tp=3 does not divide the world size 4" in str(err.value)


if __name__ == "__main__":  # the table in docs/RELIABILITY.md
    for case in CASES:
        options = ", ".join(f"{k}={v!r}" for k, v in case.options.items())
        text = _message(case).split("\n\nSet TORCHDYNAMO_VERBOSE")[0].replace("\n", " ").replace("|", "\\|")
        sys.stdout.write(f"| {case.name} | world {case.world}, {options or 'defaults'} | {text} |\n")
