"""`mopc train` with expert parallelism: forced skewed routing and the expert-load report."""

from __future__ import annotations

import json

import pytest
import torch

from mopc.cli import main
from mopc.models import PRESETS, Router, build_model
from mopc.runtime.trainer import TrainSettings, TrainSettingsError, skew_routing


@pytest.mark.parametrize("value", [1, 9])
def test_bad_skew_experts_names_the_flag_and_launches_nothing(value, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def no_launch(*args, **kwargs):
        raise AssertionError("torchrun was launched")

    monkeypatch.setattr("mopc.cli.launch_torchrun", no_launch)
    with pytest.raises(SystemExit) as err:
        main(["train", "--model", "tiny", "--nproc", "2", "--ep", "2", "--skew-experts", str(value)])
    message = str(err.value)
    assert f"--skew-experts {value}" in message and "top_k=2" in message and "use --skew-experts 2..8" in message


def test_skew_experts_flag_and_settings():
    with pytest.raises(SystemExit):  # argparse: negative values are rejected before anything runs
        main(["train", "--skew-experts", "-1"])
    TrainSettings(model="tiny", seq_len=16, skew_experts=2).validate(2)
    TrainSettings(model="tiny", seq_len=16, skew_experts=8, baseline="fsdp2").validate(2)
    with pytest.raises(TrainSettingsError, match="--skew-experts 1"):
        TrainSettings(model="small", seq_len=16, skew_experts=1).validate(1)


def test_skew_routing_sends_every_token_to_the_favoured_experts():
    config = PRESETS["tiny"]
    model = build_model(config, seed=0)
    assert skew_routing(model, 3) == config.num_layers - config.num_dense_layers
    router = next(m for m in model.modules() if isinstance(m, Router))
    _, ids = router(torch.randn(32, config.dim))
    assert ids.max() < 3 and router.expert_bias.tolist() == [1.0, 1.0, 1.0] + [0.0] * 5


@pytest.mark.multiprocess
def test_skewed_ep_run_reports_load_with_and_without_spilling(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "ep.json"
    assert main(["train", "--model", "tiny", "--nproc", "2", "--ep", "2", "--skew-experts", "2",
                 "--expert-spill-factor", "1.0", "--steps", "2", "--batch", "4", "--seq-len", "16",
                 "--quiet", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    load = report["expert_load"]
    config = PRESETS["tiny"]
    assert len(load) == config.num_layers - config.num_dense_layers
    tokens = 4 * 16
    for stats in load.values():
        # every token picks experts 0 and 1, both owned by EP rank 0; one is lent to rank 1
        assert stats["tokens_per_expert"] == [tokens, tokens] + [0] * 6
        assert stats["rows_per_rank"] == [tokens, tokens]
        assert stats["imbalance"] == 1.0
        assert stats["imbalance_without_spill"] == 2.0
        assert stats["dropped_rows"] == 0
