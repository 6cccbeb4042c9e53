"""mopc on real gloo ranks vs single-device eager: losses, parameters, bytes per rank.

Each case is one `torchrun` launch of tests/mp_parity.py (tiny model, 5 AdamW steps with
gradient clipping, each rank feeding its slice of the same global batch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _torchrun(world: int, configs: str, out: Path, per_rank: int, steps: int = 5) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--standalone",
           str(HERE / "mp_parity.py"), str(out), configs, str(steps), str(per_rank)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def _dump_text(out: Path, index: int, name: str) -> str:
    graphs = sorted((Path(f"{out}.dumps") / str(index)).iterdir())
    return "".join(p.read_text() for g in graphs for p in g.glob(f"*_{name}.txt"))


# One launch per world size runs several configurations. Expert-parallel ones: `skew`
# forces every token onto experts 0 and 1 (`skew=1`: expert 0 only), so the first EP
# rank gets every row and the other ranks and experts none; spilling then lends experts,
# and `grad_compression=skip_idle` (exact) reduces only the used experts' gradients.
# `offload=auto` with a budget nothing meets takes every candidate's cheaper action on the
# H100 roofline (mostly recompute, the rest offload); `host_adamw` is mopc.optim.HostAdamW.
# `cp` (context parallelism): the ranks of a cp group share `per_rank` sequences, each
# holding two chunks of every one (cp=4: 4 of the 16 tokens).
CASES = [
    (2, "tp=1,loss_chunk_tokens=16,offload=auto,memory_budget_gb=0.000001,memory_policy_hardware=h100;tp=2,biased_wo=True,recompute=full;ep=2,expert_bias_update_rate=0.001,fuse_dispatch=on,grad_compression=int8;"
        "cp=2,cp_attention=all_to_all,ep=2,skew=1,expert_spill_factor=1.0,topk=1,offload=experts,host_adamw=True,optimizer_offload=True", 2),
    (4, "cp=4,ep=4,skew=True,topk=3,offload=auto,memory_budget_gb=0.000001,memory_policy_hardware=h100;"
        "ep=2,tp=2,skew=True,expert_spill_factor=1.0,capacity_factor=8.0,grad_compression=skip_idle,"
        "offload=experts,offload_prefetch=2,host_adamw=True,optimizer_offload=True", 1),
]


def assert_matches_eager(r: dict, name: str) -> None:
    """One mp_parity result equals single-device eager: identical start, losses and clipped
    gradient norms per step, first-step gradients and final parameters, all within 1e-5."""
    assert r["init_diff"] == 0.0, name
    for ours, ref in zip(r["losses"], r["ref_losses"], strict=True):
        assert abs(ours - ref) <= 1e-5 * abs(ref), (name, r["losses"], r["ref_losses"])
    for ours, ref in zip(r["grad_norms"], r["ref_grad_norms"], strict=True):
        assert abs(ours - ref) <= 1e-5 * abs(ref), (name, "clip_grad_norm_ sees the global norm")
    # gradients of the first step, per tensor relative to its largest element
    assert r["first_step_grad_rel_diff"] <= 1e-5, (name, r["first_step_grad_rel_diff"])
    assert r["param_diff"] <= 1e-5, (name, r["param_diff"])


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize(("world", "configs", "per_rank"), CASES, ids=["world2", "world4-one-sequence-per-rank"])
def test_mop_trains_like_single_device_eager(tmp_path, world, configs, per_rank):
    out = tmp_path / "parity.json"
    results = _torchrun(world, configs, out, per_rank)
    for index, r in enumerate(results):
        name = f"world {world} {r['options']} skew={r['skew']} top_k={r['top_k']}"
        assert_matches_eager(r, name)
        full = r["full_param_bytes"]
        for rank in r["per_rank_bytes"]:
            assert rank["params"] <= full / world * 1.05, (name, rank)
            assert rank["grads"] <= full / world * 1.05, (name, rank)
            assert rank["optimizer"] <= 2 * full / world * 1.05, (name, rank)
        # state_dict() holds the shards (plus the 2 x 8 replicated expert_bias buffers)
        assert r["state_dict_local_numel"] * 4 == r["per_rank_bytes"][0]["params"] + 16 * 4
        forward = _dump_text(out, index, "forward")
        assert "by=gather_params" in forward and "by=vocab_parallel_loss" in forward
        if r["options"].get("cp", 1) > 1:
            _check_context_parallel(r, forward, _dump_text(out, index, "backward"), per_rank)
        if r["options"].get("tp") == 2 and r["options"].get("cp", 1) == 1:
            assert "by=tensor_parallel" in forward
            # attention on the tp group's 2 x per_rank sequences and 8 / 2 = 4 local heads; with a
            # biased output projection, layer 0 falls back to its own sequences and all 8 heads
            sdpa = [line for line in forward.splitlines() if "= aten._scaled_dot_product_flash_attention_for_cpu(" in line]
            local = f": (f32[{2 * per_rank}, 4, 16, 8], f32[{2 * per_rank}, 4, 16])"
            whole = f": (f32[{per_rank}, 8, 16, 8], f32[{per_rank}, 8, 16])"
            fallback = 1 if r["biased_wo"] else 0
            assert len(sdpa) == 3, sdpa
            assert sum(local in line for line in sdpa) == 3 - fallback, sdpa
            assert sum(whole in line for line in sdpa) == fallback, sdpa
        if r["options"].get("ep", 1) > 1:
            _check_expert_parallel(r, name, forward)
        if r["options"].get("offload") == "experts":  # exact copies: the parity above holds with them
            offloads = forward.count("= mopc.offload(")
            assert offloads > 0 and offloads == _dump_text(out, index, "backward").count("= mopc.reload("), name
        if r["host_adamw"] is not None:  # every update started in backward, none redone in step()
            stats = r["host_adamw"]
            assert stats["staged_in_backward"] == stats["used_staged"] > 0 and stats["recomputed"] == 0, name
            assert forward.count("mopc.await_update(") > 0 and \
                _dump_text(out, index, "backward").count("mopc.grad_ready(") > 0, name
        if r["options"].get("grad_compression") and r["options"]["ep"] == world:
            # every rank owns its experts: no expert gradient is reduced, nothing to compress
            assert "compressed_reduce_grad" not in _dump_text(out, index, "backward"), name
            assert r["compression"]["calls"] == 0, name
        elif r["options"].get("grad_compression"):
            assert "= mopc.compressed_reduce_grad(" in _dump_text(out, index, "backward"), name
            stats = r["compression"]  # idle experts sent nothing: fewer bytes than reduce-scatters
            assert 0 < stats["bytes_sent"] < stats["bytes_uncompressed"] and stats["residual_norm"] == 0, stats


def _check_context_parallel(r: dict, forward: str, backward: str, per_rank: int) -> None:
    """Attention runs on the cp group's gathered keys and values, forward and backward, and
    the positions the rotary tables are built from are this rank's global ones."""
    cp, tp = r["options"]["cp"], r["options"].get("tp", 1)
    local = 16 // cp  # tokens of each sequence on this rank (rank 0: chunks 0 and 2·cp - 1)
    chunk = local // 2
    assert f"aten.arange(0, {chunk}," in forward and f"aten.arange({16 - chunk}, 16," in forward, r["options"]
    if r["options"].get("cp_attention") == "all_to_all":  # heads / cp over the whole sequence
        exchange = "= _c10d_functional.all_to_all_single("
        # forward: q, k, v there and output, log-sum-exp back; backward: q, k, v again, the
        # output gradient there, dq, dk, dv back (3 layers)
        assert forward.count(exchange) == 3 * 5 and backward.count(exchange) == 3 * 7, r["options"]
        heads = f"f32[{tp * per_rank}, {8 // tp // cp}, 16, 8], f32[{tp * per_rank}, {8 // tp // cp}, 16])"
        assert forward.count(heads) == 3, (r["options"], "causal flash on heads / cp, whole sequence")
        return
    assert forward.count("= mopc.cp_attention(") == 3 and "flash_attention_for_cpu(" not in forward, r["options"]
    assert backward.count("= mopc.cp_attention_backward(") == 3, r["options"]
    gathered = f"f32[{cp * tp * per_rank}, {local}, {4 // tp}, 8] = _c10d_functional.all_gather_into_tensor("
    assert forward.count(gathered) == 6 and backward.count(gathered) == 6, (r["options"], "K and V, per layer")
    assert backward.count("_c10d_functional.reduce_scatter_tensor(") >= 6, r["options"]


def _check_expert_parallel(r: dict, name: str, forward: str) -> None:
    assert "mopc.ep_dispatch" in forward and "mopc.ep_combine" in forward, name
    assert r["bias_diff"] <= 1e-7, (name, "aux-loss-free bias updates equal the global-count reference")
    if r["options"].get("expert_bias_update_rate"):
        assert r["bias_moved"] >= 1e-3, (name, "the bias moved")
    if r["options"].get("fuse_dispatch") == "on":
        assert "mopc.moe_gather_rows" in forward and "mopc.moe_combine_rows" in forward, name
    ep = r["options"]["ep"]
    load = r["expert_load"]
    assert sorted(load) == ["1", "2"], name  # both MoE layers of tiny reported
    for stats in load.values():
        assert len(stats["rows_per_rank"]) == ep and stats["dropped_rows"] == 0, (name, stats)
        if r["skew"]:  # cold experts get nothing, so neither do their owners without spilling
            hot = 2 if r["skew"] is True else r["skew"]
            cold = hot if r["top_k"] <= hot else 4  # more picks than hot experts: the rest of group 0
            assert stats["tokens_per_expert"][cold:] == [0] * (8 - cold), (name, stats)
            assert stats["imbalance_without_spill"] >= 2, (name, stats)
            if r["options"].get("expert_spill_factor"):
                assert stats["imbalance"] == 1.0 and "mopc.ep_lend_weights" in forward, (name, stats)
            else:
                assert stats["rows_per_rank"][-1] == 0, (name, stats)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.world8
def test_expert_parallel_world8(tmp_path):
    """ep=4 x tp=2 over 8 ranks, skewed routing with spilling (run with -m world8)."""
    results = _torchrun(8, "ep=4,tp=2,skew=True,expert_spill_factor=1.0", tmp_path / "parity.json", 1, steps=5)
    for r in results:
        for ours, ref in zip(r["losses"], r["ref_losses"], strict=True):
            assert abs(ours - ref) <= 1e-5 * abs(ref), (r["losses"], r["ref_losses"])
        assert r["first_step_grad_rel_diff"] <= 1e-5 and r["param_diff"] <= 1e-5


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.large
def test_context_parallel_world4(tmp_path):
    """cp 4, cp 2 x ep 2 and cp 2 x tp 2 over 4 ranks, 3 steps (run with -m large); cp 4 and
    cp 2 x tp 2 with the head<->sequence all-to-all too."""
    results = _torchrun(4, "cp=4;cp=2,ep=2;cp=2,tp=2;cp=4,cp_attention=all_to_all;cp=2,tp=2,cp_attention=all_to_all",
                        tmp_path / "parity.json", 2, steps=3)
    for index, r in enumerate(results):
        for ours, ref in zip(r["losses"], r["ref_losses"], strict=True):
            assert abs(ours - ref) <= 1e-5 * abs(ref), (r["options"], r["losses"], r["ref_losses"])
        assert r["first_step_grad_rel_diff"] <= 1e-5 and r["param_diff"] <= 1e-5, r["options"]
        _check_context_parallel(r, _dump_text(tmp_path / "parity.json", index, "forward"),
                                _dump_text(tmp_path / "parity.json", index, "backward"), 2)
