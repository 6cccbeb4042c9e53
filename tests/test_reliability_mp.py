"""Failures injected into real gloo runs: NaN on one rank, input shapes that differ, a
rank killed, a rank that stops calling collectives (tests/mp_reliability.py)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent
DIVERGE_TIMEOUT_S = 5.0  # mp_reliability.DIVERGE_TIMEOUT_S


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, mode: str, out: Path) -> tuple[list[dict], list[int], str]:
    """Start `world` ranks by hand (torchrun's agent would kill the survivors itself)."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(HERE / "mp_reliability.py"), str(out), mode], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs, codes = [], []
    deadline = time.time() + 400
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=max(1, deadline - time.time()))[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError("a rank hung: " + "\n".join(o[-2000:] for o in outputs)) from None
        codes.append(proc.returncode)
    logs = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    return logs, codes, "\n".join(o[-3000:] for o in outputs)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_nan_mismatch_and_a_killed_rank_stop_every_rank_clearly(tmp_path):
    logs, codes, output = _launch(4, "train", tmp_path)
    assert codes[3] == -9, output  # SIGKILL
    assert codes[:3] == [0, 0, 0], output
    for log in logs:
        nan, mismatch = log["nan"], log["mismatch"]
        assert nan["raised"] == "NonFiniteError", (log["rank"], nan)
        assert "step 2: the loss is not finite on rank 1 (rank 1: nan)" in nan["message"], nan
        assert "the parameters and optimizer state are unchanged" in nan["message"]
        assert log["nan_state_unchanged"] and log["mismatch_state_unchanged"], log
        assert len(log["losses"]) == 2 and all(math.isfinite(v) for v in log["losses"]), log  # training went on
        assert mismatch["raised"] == "InputMismatchError", (log["rank"], mismatch)
        assert "rank 0: input_ids [2, 16]" in mismatch["message"] and "rank 2: input_ids [1, 16]" in mismatch["message"]
        assert "DataLoader(drop_last=True)" in mismatch["message"]
    killed_at = logs[3]["killed_at"]
    for log in logs[:3]:
        dead = log["dead_peer"]
        assert dead["raised"] == "CollectiveError", (log["rank"], dead)
        assert f"mopc: a collective failed on rank {log['rank']}" in dead["message"] and "step 4" in dead["message"]
        assert "Another rank died or stopped calling the same collectives" in dead["message"]
        assert dead["at"] - killed_at < 10, (dead, killed_at)  # a dead peer is noticed at once, not at the timeout


@pytest.mark.multiprocess
def test_a_rank_that_stops_calling_collectives_times_out_with_a_clear_error(tmp_path):
    logs, codes, output = _launch(2, "diverge", tmp_path)
    assert codes == [0, 0], output
    err = logs[0]["diverged_peer"]
    assert err["raised"] == "CollectiveError", err
    assert "in the non-finite check before optimizer.step()" in err["message"]
    assert "The wait limit is 5 s (first_step_timeout_s of mopc.parallelize)" in err["message"]
    waited = err["at"] - logs[1]["diverged_at"]
    assert DIVERGE_TIMEOUT_S - 1 < waited < DIVERGE_TIMEOUT_S + 10, waited
