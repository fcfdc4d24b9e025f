"""`paratune doctor` on real FunASR logs pasted by users, on FunASR-format logs written here for the
cases the pastes lack, and on paratune's own memory.csv (recorded on an H200, and made here on CPU)."""
from __future__ import annotations

import json

import pytest

from paratune.cli import main
from paratune.doctor import KINDS, doctor
from tests.train.test_monitor import DATA, _run

# what happened in each pasted log (../shared/data/funasr_logs/INDEX.md), as the doctor must say it
VERDICTS = {
    # the seed: 2 val lines; the allocator holds 2.4 GiB (16 %) more than any step allocated, the
    # signature of uneven batch shapes that the maintainers' fix (sort_size, smaller token batches) removes
    "01_funasr1828_paraformer_multilingual_seed.log": {"fragmentation"},
    "03_funasr2018_paraformer_pretrain_8gpu_hostRAM.log": {"healthy"},  # GPU flat; the RAM is 03c's story
    "03b_funasr2018_dataloader_restart_chunk.log": {"no_memory_data"},
    "03c_funasr2018_hostRAM_oom_traceback_tail.log": {"host_memory"},
    "04_funasr2016_sensevoice_3090_healthy.log": {"healthy"},
    "05_sensevoice146_val_after_emptycache.log": {"healthy"},  # cache fell after empty_cache(): normal
    "06_funasr_docs_tutorial_example_healthy.log": {"healthy"},
    "09_funasr902_paraformer_0.7.4_oldformat_OOM_after_17k_steps.log": {"no_memory_data"},
    "10_funasr863_paraformer_0.7.4_oldformat_OOM.log": {"no_memory_data"},
    "11_funasr862_paraformer_0.4.8_oldformat_epoch_summary_gpu_max_cached.log": {"healthy"},
}


@pytest.fixture(scope="module")
def logs(shared_data):
    return shared_data / "funasr_logs"


def _json(capsys, *args):
    code = main(["doctor", *map(str, args), "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_every_pasted_log_gets_the_verdict_of_what_happened(logs, capsys):
    assert sorted(p.name for p in logs.glob("*.log")) == sorted(VERDICTS)
    for name, kinds in VERDICTS.items():
        code, report = _json(capsys, logs / name)
        assert code == 0
        assert {f["kind"] for f in report["findings"]} == kinds, (name, report["findings"])
        assert set(report) >= {"lines_parsed", "ranks", "findings"} and report["lines_parsed"] >= 1
        assert all(f["kind"] in KINDS and f["evidence"] and f["fix"] for f in report["findings"])


def test_one_run_in_three_files_is_a_host_memory_case(logs, capsys):
    code, report = _json(capsys, *sorted(logs.glob("03*.log")))
    assert [f["kind"] for f in report["findings"]] == ["host_memory"]
    assert "40.66 GiB" in report["findings"][0]["evidence"]  # the GPU figure, beside the host RAM story
    assert report["ranks"] == [1]


def test_truncated_lines_are_noted_not_failed(logs, capsys):
    code, report = _json(capsys, logs / "01_funasr1828_paraformer_multilingual_seed.log")
    assert any("line 2" in n and "without complete memory figures" in n for n in report["notes"])
    assert "17.81 GiB" in report["findings"][0]["evidence"] and "15.38 GiB" in report["findings"][0]["evidence"]


def _line(step, usage, peak, cache, cache_peak, rank=0, batch=32, stamp=True):
    head = f"[2024-06-18 18:15:19,010][root][INFO] - train, rank: {rank}, " if stamp else ""
    return (f"{head}epoch: 0/50, data_slice: 0/1, step_in_slice: {step}/9000, step_in_epoch: {step}, "
            f"total step: {step}, (loss_avg_rank: 0.5), (lr: 1.0e-04), [('loss', 0.5), ('batch_size', {batch})], "
            f"{{'data_load': '0.000', 'forward_time': '0.1', 'backward_time': '0.1'}}, GPU, memory: usage: "
            f"{usage:.3f} GB, peak: {peak:.3f} GB, cache: {cache:.3f} GB, cache_peak: {cache_peak:.3f} GB")


def test_leak_in_a_funasr_log_with_deepspeed_lines_interleaved(tmp_path, capsys):
    lines = []
    for i in range(12):
        usage = 3.0 + 0.4 * i  # allocated between steps, rising: references kept
        lines.append(_line(100 * (i + 1), usage, 18.0 + 0.4 * i, 19.0 + 0.4 * i, 19.5 + 0.4 * i))
        lines.append(f"[2024-06-18 18:15:19,010] [INFO] [engine.py:1] MemAllocated={usage:.2f}GB "
                     f"MaxMemAllocated={18 + 0.4 * i:.2f}GB")
    log = tmp_path / "leak.log"
    log.write_text("\n".join(lines) + "\n")
    code, report = _json(capsys, log)
    kinds = [f["kind"] for f in report["findings"]]
    assert "leak" in kinds and "outlier_batch" not in kinds, report
    leak = next(f for f in report["findings"] if f["kind"] == "leak")
    assert "3.00 -> 7.40 GiB" in leak["evidence"]


def test_peak_rising_alone_is_no_leak_but_an_outlier_batch(tmp_path, capsys):
    """FunASR's peak and cache_peak never reset: a jump with flat usage is one large batch."""
    steps = [(s, 3.0, 12.0, 12.5, 12.6, 30) for s in range(100, 600, 100)]
    steps += [(600, 3.0, 31.0, 4.0, 32.0, 96)] + [(s, 3.0, 31.0, 20.0, 32.0, 30) for s in range(700, 1000, 100)]
    log = tmp_path / "spike.log"
    log.write_text("\n".join(_line(s, u, p, c, cp, batch=b, stamp=False) for s, u, p, c, cp, b in steps))
    code, report = _json(capsys, log)
    assert [f["kind"] for f in report["findings"]] == ["outlier_batch"]
    assert "step 600 (batch_size 96)" in report["findings"][0]["evidence"]


def test_near_capacity_from_the_card_size_or_an_oom_message(tmp_path, capsys):
    log = tmp_path / "full.log"
    log.write_text("\n".join(_line(s, 3.0, 22.5, 23.1, 23.2) for s in range(100, 600, 100)))
    code, report = _json(capsys, log, "--gpu-memory", "24GiB")
    assert [f["kind"] for f in report["findings"]] == ["near_capacity"]
    oom = tmp_path / "oom.log"
    oom.write_text("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                   "capacity of 23.65 GiB of which 1.10 GiB is free.\n")
    code, report = _json(capsys, oom)
    assert report["findings"][0]["kind"] == "near_capacity" and "23.65 GiB" in report["findings"][0]["evidence"]


def test_unreadable_input_says_so_without_a_traceback(tmp_path, capsys):
    junk = tmp_path / "junk.log"
    junk.write_bytes(b"\xff\xfe\x00garbage\n" * 5)
    code, report = _json(capsys, junk)
    assert code == 0 and [f["kind"] for f in report["findings"]] == ["no_memory_data"]
    assert main(["doctor", str(tmp_path / "missing.log")]) == 2
    assert "No such file" in capsys.readouterr().out


def test_paratune_memory_csv_recorded_on_an_h200(capsys):
    code, report = _json(capsys, DATA / "h200_fragmented_memory.csv")
    assert [f["kind"] for f in report["findings"]] == ["fragmentation"]
    for name in ("h200_epoch_memory.csv", "h200_epoch_memory_v3.csv"):
        code, report = _json(capsys, DATA / name)
        assert [f["kind"] for f in report["findings"]] == ["healthy"], name
        assert "of the 125.82 GiB budget" in report["findings"][0]["evidence"]


def test_paratune_memory_csv_with_a_deliberate_leak(tmp_path, capsys):
    _run(tmp_path / "leak", leak=True)
    _run(tmp_path / "clean", leak=False)
    code, report = _json(capsys, tmp_path / "leak" / "memory.csv")
    assert [f["kind"] for f in report["findings"]] == ["leak"]
    code, report = _json(capsys, tmp_path / "clean" / "memory.csv")
    assert [f["kind"] for f in report["findings"]] == ["healthy"]


def test_text_report_and_timeline_png(logs, tmp_path, capsys):
    png = tmp_path / "timeline.png"
    assert main(["doctor", str(logs / "06_funasr_docs_tutorial_example_healthy.log"), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("read 2 line(s)") and "healthy:" in out and f"timeline: {png}" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    report = doctor([logs / "01_funasr1828_paraformer_multilingual_seed.log"])
    assert report["ranks"] == [0]


def test_a_memory_csv_with_inf_or_a_short_row_is_read_without_a_traceback(tmp_path, capsys):
    header = "step,epoch,batch,frames,tokens,predicted,peak,allocated,reserved,inactive_split,retries,rss,budget\n"
    row = "{step},0,0,100,10,1000,{peak},500,0,0,0,100,100000\n"
    path = tmp_path / "memory.csv"
    path.write_text(header + "".join(row.format(step=s, peak="inf" if s == 3 else 1000) for s in range(1, 6))
                    + "6,0,0,100\n")
    assert main(["doctor", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}:4: peak not a finite number; row skipped" in out
    assert f"{path}:7: a missing figure; row skipped" in out and "healthy: 4 steps" in out
    path.write_text(header + row.format(step=1, peak="nan"))
    main(["doctor", str(path)])  # no usable row
    assert "no_memory_data" in capsys.readouterr().out
