"""`MOPC_LOG` levels and the structured-trace artifacts `tlparse` reads (`TORCH_TRACE`)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from mopc import logs


def test_names_signs_and_all():
    assert logs.parse("+passes, ep") == {"mopc.passes": logging.DEBUG, "mopc.ep": logging.INFO}
    assert logs.parse("-compression") == {"mopc.compression": logging.ERROR}
    assert logs.parse("+all") == dict.fromkeys(logs.COMPONENTS.values(), logging.DEBUG)
    assert logs.parse("") == {}


def test_unknown_component_names_the_choices():
    with pytest.raises(ValueError, match=r"MOPC_LOG='pases': unknown component 'pases'; use a comma-separated "
                                         r"list of all, mopc, passes, ep, compression, guard"):
        logs.parse("pases")


SCRIPT = textwrap.dedent("""
    import dataclasses, torch, mopc
    from mopc.models import PRESETS, build_model
    from mopc.runtime.trainer import synthetic_batch
    config = dataclasses.replace(PRESETS["tiny"], num_layers=1, num_dense_layers=0)  # quick to compile
    model = build_model(config, seed=0)
    batch = synthetic_batch(0, 2, 16, 128)
    model = mopc.parallelize(model, batch)
    torch.compile(model, backend="mop")(**batch).backward()
""")


def test_mopc_log_and_torch_trace_in_one_compilation(tmp_path):
    """MOPC_LOG=+passes prints every pass's timing with the rank; TORCH_TRACE gets one
    artifact per rewrite pass plus the partitioned forward and backward graphs."""
    trace = tmp_path / "trace"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOPC_LOG": "+passes", "TORCH_TRACE": str(trace), "RANK": "0"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    timing = [line for line in proc.stderr.splitlines() if "mopc.passes] pass " in line]
    assert any(line.startswith("[rank0]D ") and "pass gather_params on " in line and line.endswith(" ms")
               for line in timing), proc.stderr[-3000:]
    entries = [json.loads(line.split("] ", 1)[1]) for f in trace.iterdir() for line in f.read_text().splitlines()
               if '"artifact"' in line and "mopc_" in line]  # glog prefix, then the JSON metadata
    names = {e["artifact"]["name"] for e in entries}
    for expected in ("annotate_roles", "gather_params", "vocab_parallel_loss"):
        assert any(n.endswith(expected) for n in names), names
    assert {n.rsplit("_", 1)[-1] for n in names} >= {"forward", "backward"}, names
    tlparse = shutil.which("tlparse", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))
    if tlparse:  # optional (pip install tlparse): the tool users open these traces with
        out = tmp_path / "tl_out"
        subprocess.run([tlparse, str(next(trace.iterdir())), "-o", str(out), "--no-browser", "--overwrite"],
                       check=True, capture_output=True, timeout=120)
        rendered = {p.name for p in out.rglob("mopc_*")}
        assert any("gather_params" in n for n in rendered), sorted(rendered)[:20]
