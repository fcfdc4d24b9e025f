"""`paratune plan` on the bundled demo model: batches, exclusions, bad input, explain, calibrate."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import paratune
from paratune.cli import main
from paratune.data.lengths import read_lengths, write_synthetic_manifest
from paratune.memory import levers
from paratune.memory.plan import PlanError, parse_bytes, step_options
from paratune.memory.trace import StepOptions, StepTracer
from paratune.modeldir import read_model_dir
from paratune.train.config import load_config

DEMO = Path(paratune.__file__).parent / "assets" / "demo_model"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_synthetic_manifest(tmp_path_factory.mktemp("m") / "train.jsonl", 400, seed=3, max_s=20.0)


def _plan(capsys, *args):
    code = main(["plan", "--model", str(DEMO), "--device", "cpu", "--png", "", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_two_ranks_of_three_clips_that_only_fit_alone(capsys, tmp_path):
    """An odd count of one-utterance batches: an empty batch (a placeholder step) makes each rank's count
    equal (it raised numpy's "zero-size array" error in the sampler, then in the plan's report)."""
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps({"key": k, "source": f"{k}.wav", "source_len": 3000, "target_len": 20}) + "\n"
                            for k in "abc"))
    code, out, err = _plan(capsys, "--data", data, "--budget", "100MiB", "--world-size", 2, "--json",
                           "--checkpointing", "off")
    assert code == 0, err
    plan = json.loads(out)
    assert sorted((b["rank"], b["size"]) for b in plan["batches"]) == [(0, 0), (0, 1), (1, 1), (1, 1)]
    assert sorted(k for b in plan["batches"] for k in b["keys"]) == ["a", "b", "c"] and not plan["excluded"]


def test_every_utterance_is_in_exactly_one_batch_within_budget(capsys, manifest):
    code, out, err = _plan(capsys, "--data", manifest, "--budget", "160MiB", "--json", "--checkpointing", "off")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["budget_bytes"] == 160 * 2**20 and not plan["excluded"]
    keys = [k for b in plan["batches"] for k in b["keys"]]
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert sorted(keys) == sorted(x["key"] for x in lines)
    frames = {x["key"]: -(-max(x["source_len"] - 2, 1) // 6) for x in lines}  # LFR n=6 after fbank
    tokens = {x["key"]: x["target_len"] for x in lines}
    for b in plan["batches"]:
        assert b["size"] == len(b["keys"])
        assert b["max_frames"] == max(frames[k] for k in b["keys"])
        assert b["max_tokens"] == max(tokens[k] for k in b["keys"])
        assert b["predicted_peak_bytes"] <= plan["budget_bytes"]
    assert len(plan["batches"]) < len(keys) / 4  # packs, not one per batch
    assert plan["padding_waste"] < 0.10  # 400 utterances, few per batch: sorted packing still pads little


@pytest.mark.slow
def test_predicted_peak_of_a_planned_batch_matches_a_real_step(capsys, manifest):
    code, out, err = _plan(capsys, "--data", manifest, "--budget", "160MiB", "--json", "--checkpointing", "off")
    plan = json.loads(out)
    worst = max(plan["batches"], key=lambda b: b["predicted_peak_bytes"])
    spec = read_model_dir(DEMO)
    real = StepTracer(spec.config, spec.vocab_size, spec.input_size, StepOptions(), fake=False)
    measured = real.trace_step([(worst["size"], worst["max_frames"], worst["max_tokens"])]).peak
    assert abs(worst["predicted_peak_bytes"] - measured) <= 0.03 * measured


def test_plan_reads_lengths_without_opening_audio(capsys, manifest):
    # the synthetic manifest's audio files do not exist: only source_len is read
    assert not (manifest.parent / "wav").exists()
    code, out, err = _plan(capsys, "--data", manifest, "--budget", "1GiB", "--checkpointing", "off")
    assert code == 0, err
    assert "400 utterances ->" in out


def test_lengths_from_audio_headers_match_the_features(tmp_path, zh_real):
    spec = read_model_dir(DEMO)
    wavs = sorted(zh_real.glob("*.wav"))[:3]
    path = tmp_path / "real.jsonl"
    path.write_text("".join(json.dumps({"key": w.stem, "source": str(w), "target": "你好"}) + "\n" for w in wavs),
                    encoding="utf-8")
    lengths, errors = read_lengths([path], spec.tokenizer, spec.frontend.lfr_n)
    assert not errors
    from paratune.data.audio import load_audio
    spec.frontend.eval()
    for key, t in zip(lengths.keys, lengths.frames):
        feats = spec.frontend.features(load_audio(zh_real / f"{key}.wav", 16000))
        assert abs(int(t) - feats.shape[0]) <= 1, key  # the header's duration rounds to 10 ms
    assert list(lengths.tokens) == [2, 2, 2]


@pytest.mark.slow
def test_utterances_too_long_for_the_budget_are_excluded_with_a_remedy(capsys, tmp_path, manifest):
    data = tmp_path / "mixed.jsonl"
    data.write_text(manifest.read_text() + json.dumps({"key": "huge", "source": "x.wav", "source_len": 60000,
                                                       "target_len": 200}) + "\n")
    code, out, err = _plan(capsys, "--data", data, "--budget", "100MiB", "--json", "--checkpointing", "off")
    assert code == 1
    plan = json.loads(out)
    assert [e["key"] for e in plan["excluded"]] == ["huge"]
    reason = plan["excluded"][0]["reason"]
    assert "split it below" in reason and "--long-audio split" in reason and "100.00 GiB" not in reason
    assert "huge" not in [k for b in plan["batches"] for k in b["keys"]]
    # auto: no lever lets it fit, so none is turned on, and no note claims one made room
    code, out, err = _plan(capsys, "--data", data, "--budget", "100MiB", "--json")
    plan = json.loads(out)
    assert code == 1 and [e["key"] for e in plan["excluded"]] == ["huge"]
    assert plan["levers"]["checkpointing"] == {"encoder_blocks": 0, "decoder_blocks": 0}
    assert plan["levers"]["optimizer"] == "adamw" and not any("fits" in n for n in plan["notes"])


@pytest.mark.slow
def test_checkpointing_auto_checkpoints_the_fewest_blocks_that_fit(capsys, tmp_path, fit_cache):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"key": "long", "source": "x.wav", "source_len": 3000, "target_len": 120}) + "\n")
    spec = read_model_dir(DEMO)
    t, u = -(-(3000 - 2) // 6), 120
    # the long utterance's traced need with no block and every block checkpointed, as the plan's search
    # traces it (its figures are kept in the cache the plan reads)
    base, blocks = step_options(load_config(spec.config, None, []), "cpu"), levers.block_counts(spec)
    search = levers.LeverSearch(spec, None, 1.0, 0, False, cache=fit_cache)
    need = {ckpt: int(search.need(dataclasses.replace(base, checkpointing=blocks if ckpt else (0, 0)), t, u))
            for ckpt in (False, True)}
    assert need[True] < need[False]
    budget = (need[True] + need[False]) // 2  # fits only with checkpointing
    code, out, err = _plan(capsys, "--data", data, "--budget", budget, "--json")
    plan = json.loads(out)
    assert code == 0 and not plan["excluded"] and plan["levers"]["optimizer"] == "adamw"
    ckpt = plan["levers"]["checkpointing"]
    counts = (ckpt["encoder_blocks"], ckpt["decoder_blocks"])
    assert tuple(plan["options"]["checkpointing"]) == counts and counts != (0, 0)
    assert any("activation checkpointing of" in n and "the fewest" in n for n in plan["notes"])
    # the fewest: one block fewer along the ladder does not fit, by the traced step
    ladder = levers.ladder(levers.block_counts(spec))
    fewer = ladder[ladder.index(counts) - 1]
    tracer = StepTracer(spec.config, spec.vocab_size, spec.input_size, StepOptions(checkpointing=fewer))
    assert tracer.trace_step([(1, t, u)]).single > budget
    code, out, err = _plan(capsys, "--data", data, "--budget", budget, "--json", "--checkpointing", "off")
    assert code == 1 and [e["key"] for e in json.loads(out)["excluded"]] == ["long"]
    # forced: exactly what is asked
    code, out, err = _plan(capsys, "--data", data, "--budget", budget, "--json", "--checkpointing", "all/1")
    forced = json.loads(out)
    assert code == 0 and forced["levers"]["checkpointing"] == {"encoder_blocks": ladder[-1][0], "decoder_blocks": 1}
    assert any("as memory.checkpointing asks" in n for n in forced["notes"])
    assert not any("the fewest" in n for n in forced["notes"])
    # with room to spare, auto leaves it off
    code, out, err = _plan(capsys, "--data", data, "--budget", need[False] * 2, "--json")
    assert code == 0 and json.loads(out)["levers"]["checkpointing"] == {"encoder_blocks": 0, "decoder_blocks": 0}


def test_budget_below_static_memory(capsys, manifest):
    code, out, err = _plan(capsys, "--data", manifest, "--budget", "4MiB", "--checkpointing", "off")
    assert code == 2
    assert "below the static memory" in err and "--fsdp" in err


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_manifest(capsys, tmp_path, content):
    data = tmp_path / "empty.jsonl"
    data.write_text(content)
    code, out, err = _plan(capsys, "--data", data, "--budget", "1GiB")
    assert code == 2
    assert f"{data}: empty manifest" in err and "nothing to plan" in err


def test_bad_lines_are_named_and_the_rest_planned(capsys, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"key": "a", "source_len": 300, "target_len": 5}\n'
                    '{"key": "b", "source_len": -4, "target_len": 5}\n'
                    'not json\n'
                    '{"key": "c", "source_len": 300}\n'
                    '{"key": "a", "source_len": 300, "target_len": 5}\n')
    code, out, err = _plan(capsys, "--data", data, "--budget", "1GiB", "--json", "--checkpointing", "off")
    assert code == 1
    assert f"{data}:2: source_len must be" in err
    assert f"{data}:3: malformed JSON" in err
    assert f"{data}:4: no transcript" in err
    assert f"{data}:5: duplicate key 'a'" in err
    assert [b["keys"] for b in json.loads(out)["batches"]] == [["a"]]


@pytest.mark.parametrize("args, message", [
    (["--precision", "fp8"], "invalid choice: 'fp8'"),
    (["--budget-x", "3"], "unrecognized arguments"),
])
def test_unknown_options(capsys, manifest, args, message):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--model", str(DEMO), "--data", str(manifest), "--budget", "1GiB", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_budget_and_world_size(capsys, manifest):
    code, _, err = _plan(capsys, "--data", manifest, "--budget", "lots")
    assert code == 2 and "cannot read the budget 'lots'" in err
    code, _, err = _plan(capsys, "--data", manifest, "--budget", "1GiB", "--fsdp")
    assert code == 2 and "--world-size 2 or more" in err


def test_explain_and_png(capsys, manifest, tmp_path):
    png = tmp_path / "plan.png"
    code = main(["plan", "--model", str(DEMO), "--device", "cpu", "--data", str(manifest), "--budget", "160MiB",
                 "--checkpointing", "off", "--explain", "--png", str(png)])
    out = capsys.readouterr().out
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for part in ("parameters", "optimizer state", "forward: encoder", "forward: decoder"):
        assert part in out
    assert "uncalibrated" not in out  # cpu plans count tensor bytes without a margin


@pytest.mark.slow
def test_fsdp_and_ddp_plans(capsys, manifest):
    _, out1, _ = _plan(capsys, "--data", manifest, "--budget", "160MiB", "--json", "--checkpointing", "off")
    _, out2, _ = _plan(capsys, "--data", manifest, "--budget", "160MiB", "--json", "--checkpointing", "off",
                       "--world-size", "2")
    _, out4, _ = _plan(capsys, "--data", manifest, "--budget", "160MiB", "--json", "--checkpointing", "off",
                       "--world-size", "4", "--fsdp")
    one, ddp, fsdp = (json.loads(o) for o in (out1, out2, out4))
    assert ddp["options"]["ddp"] and fsdp["options"]["fsdp_world_size"] == 4
    # DDP has the same static bytes; its gradient all-reduce adds a bucket after the backward
    assert fsdp["static_bytes"] < one["static_bytes"] == ddp["static_bytes"]
    # step-major over the ranks: every step gives each rank one batch
    assert [(b["step"], b["rank"]) for b in ddp["batches"]] == [
        (step, rank) for step in range(1, len(ddp["batches"]) // 2 + 1) for rank in (0, 1)]
    assert len(ddp["batches"]) >= len(one["batches"])


@pytest.mark.slow
def test_calibrate_on_cpu_compares_real_steps(capsys, manifest, tmp_path, monkeypatch):
    cache = tmp_path / "cache"  # its own: a calibrated fit replaces the shared one, which other tests plan with
    monkeypatch.setenv("PARATUNE_CACHE", str(cache))
    code, out, err = _plan(capsys, "--data", manifest, "--budget", "160MiB", "--checkpointing", "off",
                           "--calibrate")
    assert code == 0, err
    stored = [json.loads(p.read_text()) for p in cache.glob("*.json")]
    cal = stored[0]["calibration"]
    assert 3 <= len(cal["rows"]) <= 5
    assert all(abs(r["allocated_error"]) <= 0.03 for r in cal["rows"]), cal["rows"]
    # each shape's second step timed and its FLOPs counted: the line later plans weigh the batch count with
    assert all(r["seconds"] > 0 and r["flops"] > 0 for r in cal["rows"])
    assert len({r["flops"] for r in cal["rows"]}) >= 2
    timing = cal["timing"]
    assert timing is None or (timing["rate"] > 0 and timing["per_step"] >= 0)  # None: the steps' times fell


@pytest.mark.parametrize("text, value", [("24GiB", 24 * 2**30), ("24G", 24 * 2**30), ("800MiB", 800 * 2**20),
                                         ("1.5TiB", int(1.5 * 2**40)), ("123456", 123456)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "-3GiB", "GiB", "12 parsecs", "nan"])
def test_parse_bytes_refuses(text):
    with pytest.raises(PlanError, match="cannot read the budget"):
        parse_bytes(text)


def test_a_cuda_calibration_corrects_the_expected_peak_and_the_budget_share():
    """The H200's figures (2026-11-26): allocated = 0.83 x predicted, reserved = 0.84 x predicted. A
    calibrated limit packs by the reserved ratio and reports the allocated one as the expected peak."""
    from paratune.memory.estimate import MemoryModel
    from paratune.memory.plan import Limit
    model = MemoryModel(resident={"parameters": 10, "buffers": 0, "optimizer_state": 20, "gradients": 10},
                        static_forward=30, gradients=[0.0], coef=[[100.0, 0, 1.0, 0, 0, 0, 0]],
                        options={"device": "cuda"}, key="k", parts=[0])
    raw = float(model.peak(2, 50, 5))
    plain = Limit(model, 10**6, "cuda")
    assert plain.expected([(2, 50, 5)]) == raw and plain.scale == 1.10
    model.calibration = {"allocated_ratio": 0.83, "reserved_ratio": 0.84, "rows": []}
    calibrated = Limit(model, 10**6, "cuda")
    assert calibrated.calibrated and calibrated.scale == 0.84
    assert calibrated.expected([(2, 50, 5)]) == pytest.approx(0.83 * raw)
    assert Limit(model, 10**6, "cpu").expected([(2, 50, 5)]) == raw  # a CUDA calibration says nothing of a CPU
