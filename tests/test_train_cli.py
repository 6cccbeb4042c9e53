"""`mopc train`: flags generated from MoPConfig, clear errors, and loss parity across ranks."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing

import pytest
import torch

from mopc.cli import build_parser, main, mop_options
from mopc.config import MoPConfig
from mopc.runtime.trainer import TrainSettings, TrainSettingsError

REPORT_KEYS = {"config", "world_size", "losses", "memory", "comm_bytes_per_step", "comm_bytes_source",
               "step_time_s"}
MEMORY_KEYS = {"rank", "params", "grads", "optimizer", "activations_peak", "peak", "peak_rss", "host_peak",
               "optimizer_host"}


def _sample(name: str, hint: typing.Any, default: typing.Any) -> tuple[list[str], typing.Any]:
    """Command-line words that set field `name` to a non-default value, and that value."""
    flag = "--" + name.replace("_", "-")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return ([f"--no-{flag[2:]}"], False) if default else ([flag], True)
    if origin is typing.Literal:
        value = next((a for a in args if a != default), default)  # a one-value Literal: its only value
        return [flag, str(value)], value
    if origin is tuple:
        if args[0] is int:
            return [flag, "2,5"], (2, 5)
        return [flag, "a,b"], ("a", "b")
    value = {int: 2, float: 0.5, str: "somewhere"}[hint]
    return [flag, str(value)], value


def _train_args(*words: str) -> argparse.Namespace:
    return build_parser().parse_args(["train", *words])


def test_every_moconfig_field_is_a_flag():
    hints = typing.get_type_hints(MoPConfig)
    fields = dataclasses.fields(MoPConfig)
    assert fields, "MoPConfig has fields"
    for f in fields:
        words, value = _sample(f.name, hints[f.name], f.default)
        assert mop_options(_train_args(*words)) == {f.name: value}, words  # given, even if the default


def test_only_flags_given_are_passed():
    assert mop_options(_train_args()) == {}
    options = mop_options(_train_args("--dump-dir", "d", "--debug"))
    assert options == {"dump_dir": "d", "debug": True}


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit) as err:
        _train_args("--no-such-option", "3")
    assert err.value.code == 2
    assert "--no-such-option" in capsys.readouterr().err


def test_literal_flag_rejects_other_values(capsys):
    literal = next(f.name for f in dataclasses.fields(MoPConfig)
                   if typing.get_origin(typing.get_type_hints(MoPConfig)[f.name]) is typing.Literal)
    with pytest.raises(SystemExit):
        _train_args("--" + literal.replace("_", "-"), "not-a-choice")
    assert "invalid choice" in capsys.readouterr().err


def test_batch_not_divisible_by_world_names_the_flag(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as err:
        main(["train", "--nproc", "2", "--batch", "5", "--baseline", "ddp"])
    assert "--batch 5" in str(err.value) and "world size 2" in str(err.value)


def test_settings_errors_name_the_fix():
    with pytest.raises(TrainSettingsError, match="--backend eager"):
        TrainSettings(backend="eager", batch=4).validate(2)
    with pytest.raises(TrainSettingsError, match="--tp apply to --backend mop only"):
        TrainSettings(baseline="ddp", mop_options={"tp": 2}).validate(2)
    with pytest.raises(TrainSettingsError, match="--seq-len 128 exceeds the tiny model's max_seq_len 64"):
        TrainSettings(model="tiny", seq_len=128, batch=4).validate(4)
    with pytest.raises(TrainSettingsError, match=r"tp=3 does not divide the world size 4"):
        TrainSettings(model="tiny", seq_len=16, batch=4, mop_options={"tp": 3}).validate(4)
    TrainSettings(baseline="fsdp2", batch=4, seq_len=16).validate(4)


def test_context_parallel_settings_errors_name_flag_value_and_fix():
    """`--cp` is checked before torchrun starts a rank: mop only, a divisor of W / tp, a
    sequence length cut into 2*cp chunks and a global batch split over W / cp readers."""
    tiny = {"model": "tiny", "seq_len": 16}
    with pytest.raises(TrainSettingsError, match=r"--cp 2 is mop's context parallelism; --baseline fsdp2 reads "
                                                 r"whole sequences\. Drop --cp for fsdp2"):
        TrainSettings(baseline="fsdp2", batch=4, mop_options={"cp": 2}, **tiny).validate(4)
    with pytest.raises(TrainSettingsError, match=r"--cp 2 is mop's context parallelism; --backend eager"):
        TrainSettings(backend="eager", batch=4, mop_options={"cp": 2}, **tiny).validate(1)
    with pytest.raises(TrainSettingsError, match=r"--cp 3 does not divide the world size 4 / --tp 1 = 4 .* "
                                                 r"use --cp from \[1, 2, 4\]"):
        TrainSettings(batch=4, mop_options={"cp": 3}, **tiny).validate(4)
    with pytest.raises(TrainSettingsError, match=r"--cp 4 does not divide the world size 4 / --tp 2 = 2"):
        TrainSettings(batch=4, mop_options={"cp": 4, "tp": 2}, **tiny).validate(4)
    with pytest.raises(TrainSettingsError, match=r"--seq-len 20 is not divisible by 2 x --cp 4 = 8: .* "
                                                 r"use --seq-len 16 or 24"):
        TrainSettings(model="tiny", seq_len=20, batch=4, mop_options={"cp": 4}).validate(4)
    with pytest.raises(TrainSettingsError, match=r"--batch 3 .* multiple of world size 4 / --cp 2 = 2 .* "
                                                 r"use e\.g\. --batch 2"):
        TrainSettings(batch=3, mop_options={"cp": 2}, **tiny).validate(4)
    TrainSettings(batch=1, mop_options={"cp": 4}, **tiny).validate(4)  # one sequence for the one cp group
    TrainSettings(batch=4, mop_options={"cp": 2, "tp": 2}, **tiny).validate(8)  # tp ranks read their own rows
    with pytest.raises(SystemExit, match=r"mopc train: --seq-len 18 is not divisible by 2 x --cp 2 = 4"):
        main(["train", "--nproc", "2", "--cp", "2", "--seq-len", "18", "--batch", "2"])  # no rank started


def test_rank_batch_under_context_parallelism_reassembles_the_global_batch():
    """Ranks (tp fastest, then cp) of one cp group read the same rows; their chunks, put back
    in global order, are those rows; the data-parallel slices tile the global batch."""
    from mopc.runtime.context_parallel import sequence_chunk_ids
    from mopc.runtime.trainer import data_part, rank_batch, synthetic_batch

    world, cp, tp, batch, seq = 8, 2, 2, 4, 16
    full = synthetic_batch(3, batch, seq, 128, 7)["input_ids"]
    rows = {}
    for rank in range(world):
        part = data_part(rank, world, cp, tp)
        mine = rank_batch(3, batch, seq, 128, 7, rank, world, cp=cp, tp=tp)["input_ids"]
        assert mine.shape == (batch // (world // cp), seq // cp)
        early, late = mine.chunk(2, dim=1)
        for g, piece in zip(sequence_chunk_ids(cp, part.cp_rank), (early, late), strict=True):
            rows.setdefault(part.index, {})[g] = piece
    assert sorted(rows) == list(range(world // cp))
    rebuilt = torch.cat([torch.cat([chunks[g] for g in range(2 * cp)], dim=1) for _, chunks in sorted(rows.items())])
    assert torch.equal(rebuilt, full)


@pytest.mark.large  # CI budget: 84 s of CPU (two ranks compiling mop); cp parity runs in tests/mp_parity.py
@pytest.mark.multiprocess
def test_context_parallel_two_ranks_matches_eager(tmp_path, monkeypatch):
    """`mopc train --nproc 2 --cp 2`: one sequence group, each rank two of the four chunks of
    both sequences; the losses are the global batch's, as on one device."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    common = ["--model", "tiny", "--steps", "2", "--batch", "2", "--seq-len", "16", "--quiet"]
    assert main(["train", "--backend", "eager", "--json", str(tmp_path / "eager.json"), *common]) == 0
    assert main(["train", "--nproc", "2", "--cp", "2", "--json", str(tmp_path / "cp.json"), *common]) == 0
    eager, cp = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("eager", "cp"))
    assert cp["layout"] == {"dp": 1, "cp": 2, "tp": 1, "ep": 1, "pp": 1} and cp["rank_batch_shape"] == [2, 8]
    assert eager["layout"]["cp"] == 1 and eager["rank_batch_shape"] == [2, 16]
    assert cp["losses"] == pytest.approx(eager["losses"], rel=1e-5)


def test_pipeline_settings_errors_name_flag_value_and_fix():
    """`--pp` is checked before torchrun starts a rank: the pipeline's rows cut into
    micro-batches, and the mesh against the world."""
    tiny = {"model": "tiny", "seq_len": 16}
    with pytest.raises(TrainSettingsError, match=r"--batch 6: each pipeline reads 3 rows per step .* do not cut "
                                                 r"into 2 micro-batches; use --batch 8"):
        TrainSettings(batch=6, mop_options={"pp": 2, "microbatches": 2}, **tiny).validate(4)
    with pytest.raises(TrainSettingsError, match=r"pp=3 does not divide the world size 4"):
        TrainSettings(batch=4, mop_options={"pp": 3, "microbatches": 4}, **tiny).validate(4)
    with pytest.raises(SystemExit, match=r"microbatches=1 < pp=2"):
        main(["train", "--nproc", "2", "--pp", "2", "--microbatches", "1", "--batch", "2"])  # no rank started
    settings = TrainSettings(batch=4, mop_options={"pp": 2, "microbatches": 2}, **tiny)
    settings.validate(4)  # 2 pipelines of 2 stages, 2 rows each
    assert settings.data_ranks(4) == 2


@pytest.mark.large  # two ranks compiling two stages; the pp parity runs in tests/test_pipeline_mp.py
@pytest.mark.multiprocess
def test_pipeline_two_ranks_matches_eager(tmp_path, monkeypatch):
    """`mopc train --nproc 2 --pp 2`: both ranks read the whole batch; the step's loss and the
    bytes the schedule sent are reported."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    common = ["--model", "tiny", "--steps", "2", "--batch", "4", "--seq-len", "16", "--quiet"]
    assert main(["train", "--backend", "eager", "--json", str(tmp_path / "eager.json"), *common]) == 0
    assert main(["train", "--nproc", "2", "--pp", "2", "--microbatches", "2", "--json", str(tmp_path / "pp.json"),
                 *common]) == 0
    eager, pp = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("eager", "pp"))
    assert pp["layout"] == {"dp": 1, "cp": 1, "tp": 1, "ep": 1, "pp": 2} and pp["rank_batch_shape"] == [4, 16]
    assert pp["losses"] == pytest.approx(eager["losses"], rel=1e-5)
    # 2 micro-batches of [2, 16, 64] fp32 activations one way, their gradients the other
    assert pp["comm_by_kind_last_step"]["send"]["bytes_sent"] == 2 * 2 * 16 * 64 * 4


@pytest.mark.multiprocess
def test_ddp_two_ranks_matches_eager(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    common = ["--model", "tiny", "--steps", "3", "--batch", "4", "--seq-len", "16", "--quiet"]
    assert main(["train", "--backend", "eager", "--json", str(tmp_path / "eager.json"), *common]) == 0
    assert main(["train", "--nproc", "2", "--baseline", "ddp", "--no-compile-baseline",
                 "--json", str(tmp_path / "ddp.json"), *common]) == 0
    eager = json.loads((tmp_path / "eager.json").read_text())
    ddp = json.loads((tmp_path / "ddp.json").read_text())

    for report, world in ((eager, 1), (ddp, 2)):
        assert REPORT_KEYS <= set(report)
        assert report["world_size"] == world
        assert len(report["losses"]) == 3
        assert [m["rank"] for m in report["memory"]["per_rank"]] == list(range(world))
        for m in report["memory"]["per_rank"]:
            assert set(m) == MEMORY_KEYS
            assert m["params"] > 0 and m["grads"] > 0 and m["optimizer"] > 0 and m["activations_peak"] > 0
        assert report["memory"]["peak_bytes"] == max(m["peak"] for m in report["memory"]["per_rank"])
    assert ddp["config"]["runs_as"] == "eager" and ddp["config"]["program"] == "ddp"
    assert ddp["losses"] == pytest.approx(eager["losses"], rel=1e-5)
    # DDP replicates: same parameter bytes as one device, fewer activations (half the batch),
    # and one all-reduce of every gradient per step: 2 N (W-1)/W = N bytes sent at W = 2.
    e_mem, d_mem = eager["memory"]["per_rank"][0], ddp["memory"]["per_rank"][0]
    assert d_mem["params"] == e_mem["params"]
    assert d_mem["activations_peak"] < e_mem["activations_peak"]
    assert eager["comm_bytes_per_step"] == 0
    assert ddp["comm_bytes_per_step"] >= e_mem["params"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_mop_and_fsdp2_two_ranks_match_eager_and_mop_is_deterministic(tmp_path, monkeypatch):
    """Routing skewed onto experts 0 and 1 in every program; mop with tp 2 x ep 2 twice, in
    processes with different hash seeds (set and dict orders differ): bitwise the same losses."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    common = ["--model", "tiny", "--steps", "3", "--batch", "4", "--seq-len", "16", "--skew-experts", "2", "--quiet"]
    assert main(["train", "--backend", "eager", "--json", str(tmp_path / "eager.json"), *common]) == 0
    for run, seed in (("mop", "1"), ("mop_again", "2")):
        monkeypatch.setenv("PYTHONHASHSEED", seed)
        assert main(["train", "--nproc", "2", "--tp", "2", "--ep", "2", "--json", str(tmp_path / f"{run}.json"),
                     *common]) == 0
    assert main(["train", "--nproc", "2", "--baseline", "fsdp2", "--json", str(tmp_path / "fsdp2.json"),
                 *common]) == 0
    eager, mop, again, fsdp2 = (json.loads((tmp_path / f"{n}.json").read_text())
                                for n in ("eager", "mop", "mop_again", "fsdp2"))
    assert again["losses"] == mop["losses"], (mop["losses"], again["losses"])  # bitwise: floats from JSON
    assert mop["guard_s_per_step"]["nan_guard"] > 0 and mop["guard_s_per_step"]["input_check"] > 0
    assert mop["config"]["runs_as"] == "mop" and fsdp2["config"]["runs_as"] == "aot_eager"
    for report in (mop, fsdp2):
        assert report["losses"] == pytest.approx(eager["losses"], rel=1e-5)
        # both shard parameters, gradients and optimizer state over the 2 ranks
        for m in report["memory"]["per_rank"]:
            for key in ("params", "grads", "optimizer"):
                assert m[key] < 0.6 * eager["memory"]["per_rank"][0][key], (report["config"]["program"], key)
        assert report["comm_bytes_per_step"] > 0


def test_save_and_resume_continue_like_one_run(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    common = ["train", "--backend", "eager", "--model", "tiny", "--batch", "2", "--seq-len", "8", "--quiet"]
    assert main([*common, "--steps", "4", "--json", str(tmp_path / "whole.json")]) == 0
    assert main([*common, "--steps", "2", "--save", str(tmp_path / "ckpt")]) == 0
    assert main([*common, "--steps", "4", "--resume", str(tmp_path / "ckpt"), "--save", str(tmp_path / "ckpt"),
                 "--json", str(tmp_path / "resumed.json")]) == 0
    whole = json.loads((tmp_path / "whole.json").read_text())
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["start_step"] == 2 and len(resumed["losses"]) == 2
    assert resumed["losses"] == whole["losses"][2:]  # same program, same state: bitwise
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_00000004"
    with pytest.raises(SystemExit, match=r"the checkpoint is at step 4 and --steps 3 ends there"):
        main([*common, "--steps", "3", "--resume", str(tmp_path / "ckpt")])
    with pytest.raises(SystemExit, match=r"--resume .*nowhere: no complete checkpoint there"):
        main([*common, "--steps", "3", "--resume", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match=r"--save-every 2 needs --save DIR"):
        main([*common, "--steps", "3", "--save-every", "2"])


def test_memory_timeline_json_and_png(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", "--backend", "eager", "--model", "tiny", "--batch", "2", "--seq-len", "8", "--steps", "2",
                 "--quiet", "--json", str(tmp_path / "r.json"), "--memory-timeline", str(tmp_path / "tl.png")]) == 0
    doc = json.loads((tmp_path / "tl.json").read_text())
    report = json.loads((tmp_path / "r.json").read_text())
    (rank,) = doc["ranks"]
    events = [s["event"] for s in rank["samples"]]
    assert events[0] == "step start" and events[-1] == "step end"
    assert {"save", "release", "grad", "optimizer step"} <= set(events)
    first_grad = events.index("grad")
    assert "save" not in events[first_grad:]  # forward saves, then backward accumulates gradients
    assert all(a["seconds"] <= b["seconds"] for a, b in zip(rank["samples"], rank["samples"][1:]))
    # the timeline is the last step's samples: its peak is at most the run's peak, and the
    # activations it shows rise to the live-storage peak of that step
    assert 0 < rank["peak_bytes"] <= report["memory"]["peak_bytes"]
    assert max(s["activations"] for s in rank["samples"]) > 0
    assert doc["tiers"]["host"].startswith("none")  # offload="none"
    pytest.importorskip("matplotlib")
    assert (tmp_path / "tl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
