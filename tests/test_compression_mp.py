"""Compressed expert-gradient reduction on real gloo ranks: exactness, bytes, residuals.

One `torchrun` launch (tests/mp_compression.py) trains `tiny` with skewed routing (experts
2..7 get no token) once per mode on the same data; parity with single-device eager under
expert and tensor parallelism is in test_parallelize_mp.py (skip_idle case).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
STEPS = 3


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("compression") / "reports.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
           str(HERE / "mp_compression.py"), str(out), "none;skip_idle;int8;powersgd", str(STEPS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def _expert_grad_bytes(report: dict) -> int:
    """Flight-recorder bytes of the gradient reductions: with ep=1 and tp=1 every gradient
    reduces over the world; the compressed ones add all-to-alls."""
    return sum(b for k, b in report["comm_by_axis_per_step"].items()
               if k.split(":")[1] in ("all_reduce", "reduce_scatter", "all_to_all"))


pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def test_skip_idle_is_exact_and_sends_only_the_used_experts(reports):
    none, skip = reports["none"], reports["skip_idle"]
    assert none["grad_compression"] is None
    for ours, ref in zip(skip["losses"], none["losses"], strict=True):
        assert abs(ours - ref) <= 1e-6 * abs(ref), (skip["losses"], none["losses"])
    stats = skip["grad_compression"]
    # 2 of 8 experts used, all on rank 0's half of each expert weight: rank 1 sends those
    # two experts' rows (half of what a reduce-scatter sends) plus 8 flags; rank 0 nothing
    for sent, full in zip(stats["bytes_sent_per_step"], stats["bytes_uncompressed_per_step"], strict=True):
        assert 0 < sent <= full / 2 + 6 * 8 * 4, stats
    assert stats["residual_norm"] == [0.0] * STEPS
    assert _expert_grad_bytes(skip) < _expert_grad_bytes(none), (skip["comm_by_axis_per_step"],
                                                                 none["comm_by_axis_per_step"])
    assert "world:all_gather" in none["comm_by_axis_per_step"]


@pytest.mark.parametrize(("mode", "min_ratio"), [("int8", 3.5), ("powersgd", 6.0)])
def test_lossy_modes_send_fewer_bytes_and_keep_a_bounded_residual(reports, mode, min_ratio):
    none, ours = reports["none"], reports[mode]
    stats = ours["grad_compression"]
    assert stats["ratio_last_step"] >= min_ratio, stats
    assert _expert_grad_bytes(ours) < _expert_grad_bytes(none)
    # error feedback: what the quantizer or the factorization left out stays below what it was given
    compressed_steps = range(1, STEPS) if mode == "powersgd" else range(STEPS)
    for step in compressed_steps:
        residual, given = stats["residual_norm"][step], stats["input_norm"][step]
        assert math.isfinite(residual) and 0 < residual < given, (step, stats)
        # the group mean of the residuals (what the update misses) is no larger than the largest one
        assert 0 < stats["mean_residual_norm"][step] <= residual * (1 + 1e-6), (step, stats)
    if mode != "powersgd":  # quantization loses at most half a code step per value: ~1% here
        assert max(stats["residual_norm"]) < 0.05 * min(stats["input_norm"])
    # the same training within the compression's own error over a few steps
    for a, b in zip(ours["losses"], none["losses"], strict=True):
        assert abs(a - b) <= 2e-3 * abs(b), (ours["losses"], none["losses"])
    assert ours["losses"][0] == none["losses"][0], "the first forward precedes any compressed step"
