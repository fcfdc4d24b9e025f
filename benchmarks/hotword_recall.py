"""Hotword recall (issue 14): does giving a SeACo-Paraformer a word as a hotword make it say that word?

    python benchmarks/hotword_recall.py [--split fsdd|speaker] [--train N] [--extra N] [--test N] [--epochs E1,E2]
                                        [--lr2 LR] [--warmup2 STEPS] [--snr A,B,...] [--stage1 DIR] [--keep DIR]

Defaults: --split fsdd --train 900 --extra 1200 --test 120 --epochs 20,16 --lr2 0.002 --warmup2 400 --snr 10,0.

Data (../shared/data/fsdd, or $PARATUNE_SHARED_DATA/fsdd): "phone numbers" of 3-5 digits, each made of
one speaker's FSDD clips joined by 0.05-0.2 s of silence (transcript "381"). `--split fsdd` (default):
FSDD's own split, recordings 0-4 of every speaker for the test, 5-49 for training; `--split speaker`:
george, jackson and lucas train, nicolas is the test. Training: `--train` utterances plus the training
clips as single digits, every 10th held out for validation; stage 2 trains on that set's multi-digit
utterances plus `--extra` more, made from the same training recordings with their own generator.
Test: `--test` utterances per target word plus as many with none of them; each target word ("3 8",
"6 1", "2 9 5") is said at a random place in its utterances, and no utterance holds a target word it
was not built for. The test set is decoded clean and with white noise at each `--snr` (dB, against the
speech's power).

Model (built from examples/fsdd/model's sizes, tokens 0-9 plus a NO_BIAS token "<nobias>"):
1. a BiCifParaformer (SeACo's encoder, decoder and CifPredictorV3) trained from scratch with `paratune
   finetune --from-scratch` (white-noise augmentation, dataset_conf.noise_snr_db [5, 40]);
2. the same turned into a SeacoParaformer (this script adds the bias encoder, seaco decoder and hotword
   head, freshly initialised with seed 0, to the trained weights: a SeACo model's loss does not train the
   predictor, so it is not trained from scratch, as FunASR's is fine-tuned from a Paraformer), then
   `paratune finetune --freeze encoder. predictor. decoder.` with hotwords sampled from the transcripts
   (paratune's default for SeACo), at peak learning rate `--lr2` after `--warmup2` steps (warmuplr).
   Only the hotword parts train, so without hotwords the model decodes exactly as stage 1 did: the "no
   hotword" columns are the baseline. `--stage1 DIR` starts stage 2 from
   an earlier run's stage-1 model (e.g. `--keep`'s exp1/final) instead of training one.

Evaluation: `paratune transcribe --model final` without hotwords, then once per target word with a
hotword file holding that word (one line, "3 8"). Per target word and SNR: recall (the word's
utterances whose hypothesis holds the word's digits in a row), false alarms (the other utterances whose
hypothesis holds them), and the token error rate over all test utterances, each without and with the
hotword. And the paired counts: of the word's utterances, how many the hotword turned from a miss into
a hit and from a hit into a miss, with an exact two-sided sign test (McNemar's exact test) of the two;
of the others, how many false alarms it added and removed. Seeds are fixed; training uses one thread
(OMP_NUM_THREADS=1).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml

from paratune.train.metrics import edit_distance

ROOT = Path(__file__).resolve().parents[1]
FSDD = Path(os.environ.get("PARATUNE_SHARED_DATA", ROOT.parent / "shared" / "data")) / "fsdd"
TEST_SPEAKER = "nicolas"
SPLIT = "speaker"  # --split
TARGETS = ("38", "61", "295")
NO_BIAS = "<nobias>"


# ---- data

def in_split(speaker: str, index: str, test: bool) -> bool:
    """--split speaker: nicolas is the test, the others train; --split fsdd (FSDD's own split): recordings
    0-4 of every speaker are the test, 5-49 train."""
    if SPLIT == "fsdd":
        return (int(index) < 5) == test
    return (speaker == TEST_SPEAKER) == test


def load_clips(test: bool) -> dict:
    """{(speaker, digit): [waveform, ...]} at FSDD's 8 kHz."""
    clips: dict = {}
    for p in sorted(FSDD.glob("*_*_*.wav")):
        digit, speaker, index = p.stem.split("_")
        if in_split(speaker, index, test):
            wave, fs = sf.read(p, dtype="float32")
            assert fs == 8000, p
            clips.setdefault((speaker, digit), []).append(wave)
    return clips


def join(clips: dict, speaker: str, digits: str, rng: random.Random) -> tuple[np.ndarray, float]:
    """The utterance and the mean power of its speech (the clips, not the silences)."""
    pieces, speech = [np.zeros(int(8000 * rng.uniform(0.05, 0.2)), np.float32)], []
    for d in digits:
        clip = rng.choice(clips[(speaker, d)])
        clip = clip / (np.abs(clip).max() + 1e-9) * 0.5
        pieces += [clip, np.zeros(int(8000 * rng.uniform(0.05, 0.2)), np.float32)]
        speech.append(clip)
    return np.concatenate(pieces), float(np.mean(np.concatenate(speech) ** 2))


def random_digits(rng: random.Random, n: int, avoid=()) -> str:
    while True:
        s = "".join(rng.choice("0123456789") for _ in range(n))
        if not any(t in s for t in avoid):
            return s


def test_transcripts(rng: random.Random, per_word: int) -> list[tuple[str, str]]:
    """(target or "", digits): per_word utterances per target word and per_word with none."""
    out = []
    for target in (*TARGETS, ""):
        for _ in range(per_word):
            while True:
                n = rng.randint(3, 5)
                if not target:
                    s = random_digits(rng, n, TARGETS)
                else:
                    k = max(0, n - len(target))
                    at = rng.randint(0, k)
                    s = random_digits(rng, at) + target + random_digits(rng, k - at)
                if [t for t in TARGETS if t in s] == ([target] if target else []):
                    break
            out.append((target, s))
    return out


def write_numbers(folder: Path, prefix: str, n: int, clips: dict, speakers: list, rng: random.Random) -> list[str]:
    """`n` utterances of 3-5 digits, the speakers in turn, written to `folder`: their TSV lines."""
    folder.mkdir()
    lines = []
    for i in range(n):
        speaker = speakers[i % len(speakers)]
        digits = random_digits(rng, rng.randint(3, 5))
        wave, _ = join(clips, speaker, digits, rng)
        name = f"{prefix}{speaker}_{i:05d}"
        sf.write(folder / f"{name}.wav", wave, 8000)
        lines.append(f"{name}.wav\t{digits}\n")
    return lines


def build_data(tmp: Path, n_train: int, per_word: int, snrs: list[float], n_extra: int = 0) -> dict:
    rng = random.Random(14)
    clips = load_clips(test=False)
    speakers = sorted({k[0] for k in clips})
    lines = write_numbers(tmp / "train", "", n_train, clips, speakers, rng)
    for p in sorted(FSDD.glob("*_*_*.wav")):  # and the training speakers' single digits as they are
        digit, speaker, index = p.stem.split("_")
        if in_split(speaker, index, test=False):
            (tmp / "train" / p.name).symlink_to(p)
            lines.append(f"{p.name}\t{digit}\n")
    (tmp / "train.tsv").write_text("".join(lines))
    # stage 2 only: more multi-digit utterances of the training recordings (their own generator, so the
    # stage-1 data and the test set do not depend on how many)
    extra = write_numbers(tmp / "extra", "x", n_extra, clips, speakers, random.Random(1414))
    (tmp / "extra.tsv").write_text("".join(extra))

    clips = load_clips(test=True)
    speakers = sorted({k[0] for k in clips})
    test = test_transcripts(rng, per_word)
    refs = {}
    waves = []
    for i, (target, digits) in enumerate(test):
        speaker = speakers[i % len(speakers)]
        key = f"{speaker}_{i:04d}"
        refs[key] = {"target": target, "ref": digits}
        waves.append((key, *join(clips, speaker, digits, rng)))
    for snr in [None, *snrs]:
        folder = tmp / "test" / ("clean" if snr is None else f"snr{snr:g}")
        folder.mkdir(parents=True)
        noise_rng = np.random.default_rng(1400 + (0 if snr is None else int(snr * 10) + 1000))
        scp = []
        for key, wave, power in waves:
            if snr is not None:
                wave = wave + noise_rng.standard_normal(len(wave)).astype(np.float32) * np.sqrt(power / 10 ** (snr / 10))
            sf.write(folder / f"{key}.wav", wave.astype(np.float32), 8000, subtype="FLOAT")
            scp.append(f"{key} {folder / f'{key}.wav'}\n")
        (folder / "wav.scp").write_text("".join(scp))
    return refs


# ---- model directories

def stage1_dir(out: Path) -> None:
    """examples/fsdd/model as a BiCifParaformer with SeACo's predictor and a NO_BIAS token."""
    out.mkdir(parents=True)
    config = yaml.safe_load((ROOT / "examples" / "fsdd" / "model" / "config.yaml").read_text())
    tokens = json.loads((ROOT / "examples" / "fsdd" / "model" / "tokens.json").read_text()) + [NO_BIAS]
    config["model"] = "BiCifParaformer"
    config["predictor"] = "CifPredictorV3"
    config["predictor_conf"].update({"smooth_factor2": 0.25, "noise_threshold2": 0.01, "upsample_times": 3,
                                     "use_cif1_cnn": False, "upsample_type": "cnn_blstm"})
    config["train_conf"].update({"keep_nbest_models": 3, "avg_nbest_model": 3})
    config["frontend_conf"]["lfr_n"] = 6  # SeACo's frame rate: half the encoder frames of the recipe's 3
    config["dataset_conf"].update({"noise_snr_db": [5.0, 40.0], "max_batch": 16})
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (out / "tokens.json").write_text(json.dumps(tokens, indent=1))


def stage2_dir(stage1: Path, out: Path) -> None:
    """Stage 1's trained model as a SeacoParaformer: its weights plus fresh SeACo parts (seed 0)."""
    import torch

    from paratune.model.build import build_paraformer
    from paratune.modeldir import load_state_dict
    shutil.copytree(stage1, out)
    config = yaml.safe_load((out / "config.yaml").read_text())
    tokens = json.loads((out / "tokens.json").read_text())
    d = config["encoder_conf"]["output_size"]
    config["model"] = "SeacoParaformer"
    config["model_conf"].update({"inner_dim": d, "bias_encoder_type": "lstm", "bias_encoder_bid": False,
                                 "seaco_lsm_weight": 0.1, "seaco_length_normalized_loss": True,
                                 "train_decoder": True, "seaco_weight": 0.01, "NO_BIAS": tokens.index(NO_BIAS)})
    config["seaco_decoder"] = "ParaformerSANMDecoder"
    config["seaco_decoder_conf"] = {"attention_heads": 4, "linear_units": 2 * d, "num_blocks": 2, "att_layer_num": 2,
                                    "dropout_rate": 0.1, "positional_dropout_rate": 0.1,
                                    "self_attention_dropout_rate": 0.1, "src_attention_dropout_rate": 0.1,
                                    "kernel_size": 11, "sanm_shfit": 0, "use_output_layer": False,
                                    "wo_input_layer": True}
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    torch.manual_seed(0)
    fc = config["frontend_conf"]
    model = build_paraformer(config, len(tokens), fc["n_mels"] * fc["lfr_m"])
    state = model.state_dict()
    trained = load_state_dict(stage1 / "model.pt")
    assert set(trained) <= set(state), sorted(set(trained) - set(state))[:5]
    state.update(trained)
    torch.save(state, out / "model.pt")


# ---- running paratune

def paratune(*args, env=None, log=None) -> str:
    out = subprocess.run([sys.executable, "-m", "paratune", *map(str, args)], capture_output=True, text=True,
                         cwd=ROOT, env=env)
    if log is not None:
        log.write(f"$ paratune {' '.join(map(str, args))}\n{out.stderr}\n")
        log.flush()
    if out.returncode not in (0, 1) or (out.returncode == 1 and args[0] != "prepare"):
        raise SystemExit(f"paratune {' '.join(map(str, args))} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return out.stdout


def transcribe(model: Path, scp: Path, env, log, hotword_file: Path | None = None) -> dict:
    extra = ["--hotword-file", hotword_file] if hotword_file else []
    out = paratune("transcribe", "--model", model, "--threads", "1", "--batch-size", "16", *extra, scp,
                   env=env, log=log)
    hyps = {}
    for line in out.splitlines():
        key, _, text = line.partition("\t")
        hyps[key] = "".join(re.findall(r"[0-9]", text))
    return hyps


def scores(refs: dict, hyps: dict, target: str) -> dict:
    pos = [k for k, r in refs.items() if r["target"] == target]
    neg = [k for k, r in refs.items() if target not in r["ref"]]
    return {"recall": sum(target in hyps.get(k, "") for k in pos) / len(pos),
            "false_alarm": sum(target in hyps.get(k, "") for k in neg) / len(neg),
            "ter": sum(edit_distance(r["ref"], hyps.get(k, "")) for k, r in refs.items()) / sum(len(r["ref"]) for r in refs.values()),
            "n_pos": len(pos), "n_neg": len(neg)}


def flips(refs: dict, plain: dict, biased: dict, target: str, positive: bool) -> tuple[int, int]:
    """(wrong -> right, right -> wrong) from no hotword to the hotword: on the word's utterances "right"
    is a hit (the word in the hypothesis); on the others (positive False) it is a false alarm."""
    keys = [k for k, r in refs.items() if (r["target"] == target if positive else target not in r["ref"])]
    a = [target in plain.get(k, "") for k in keys]
    b = [target in biased.get(k, "") for k in keys]
    return sum(y and not x for x, y in zip(a, b)), sum(x and not y for x, y in zip(a, b))


def sign_p(up: int, down: int) -> float:
    """Exact two-sided sign test (McNemar's exact test) of `up` against `down` discordant pairs."""
    from math import comb
    n = up + down
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(comb(n, k) for k in range(min(up, down) + 1)) / 2 ** n)


def train(tmp: Path, epochs: tuple[int, int], env, log, stage1: Path | None = None, lr2: float = 0.002,
          warmup2: int = 40) -> tuple[Path, dict]:
    data = tmp / "data"
    paratune("prepare", tmp / "train", "--transcripts", tmp / "train.tsv", "--model", ROOT / "examples" / "fsdd" / "model",
             "--output", data, env=env, log=log)
    rows = (data / "data.jsonl").read_text().splitlines(keepends=True)
    (data / "fit.jsonl").write_text("".join(r for i, r in enumerate(rows) if (i + 1) % 10 != 0))
    (data / "heldout.jsonl").write_text("".join(r for i, r in enumerate(rows) if (i + 1) % 10 == 0))
    common = ["--train", data / "fit.jsonl", "--valid", data / "heldout.jsonl", "--budget", "1GiB", "--seed", "0"]
    # stage 2 learns from the utterances with hotwords to sample: the multi-digit ones, and the extra ones
    multi = [r for r in (data / "fit.jsonl").read_text().splitlines(keepends=True) if len(json.loads(r)["target"]) > 1]
    if (tmp / "extra.tsv").read_text():
        paratune("prepare", tmp / "extra", "--transcripts", tmp / "extra.tsv", "--model",
                 ROOT / "examples" / "fsdd" / "model", "--output", tmp / "data_extra", env=env, log=log)
        multi += (tmp / "data_extra" / "data.jsonl").read_text().splitlines(keepends=True)
    (data / "fit_multi.jsonl").write_text("".join(multi))
    times = {}
    if stage1 is None:
        stage1_dir(tmp / "model1")
        start = time.perf_counter()
        paratune("finetune", "--model", tmp / "model1", "--from-scratch", "--output", tmp / "exp1", *common,
                 f"++train_conf.max_epoch={epochs[0]}",
                 "++scheduler_conf.warmup_steps=100", env=env, log=log)
        times["stage1"] = time.perf_counter() - start
        stage1 = tmp / "exp1" / "final"
    stage2_dir(stage1, tmp / "model2")
    start = time.perf_counter()
    # no --valid: its CER is decoded without hotwords, the same every epoch, so it would pick the first
    # epochs; the final model is the last weights
    paratune("finetune", "--model", tmp / "model2", "--output", tmp / "exp2", "--train", data / "fit_multi.jsonl",
             "--budget", "1GiB", "--seed", "0",
             "--freeze", "encoder.", "predictor.", "decoder.", f"++train_conf.max_epoch={epochs[1]}",
             f"++optim_conf.lr={lr2}", f"++scheduler_conf.warmup_steps={warmup2}", env=env, log=log)
    times["stage2"] = time.perf_counter() - start
    return tmp / "exp2" / "final", times


def main() -> None:
    args = sys.argv[1:]
    opts = {"--keep": None, "--stage1": None, "--split": "fsdd", "--train": "900", "--extra": "1200", "--test": "120",
            "--epochs": "20,16", "--lr2": "0.002", "--warmup2": "400", "--snr": "10,0"}
    while args[:1] and args[0] in opts and len(args) > 1:
        opts[args[0]] = args[1]
        args = args[2:]
    if args:
        raise SystemExit(__doc__)
    global SPLIT
    SPLIT = opts["--split"]
    if SPLIT not in ("speaker", "fsdd"):
        raise SystemExit("--split: speaker or fsdd")
    snrs = [float(s) for s in opts["--snr"].split(",") if s]
    epochs = tuple(int(e) for e in opts["--epochs"].split(","))
    tmp = Path(tempfile.mkdtemp(prefix="hotword_recall."))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PARATUNE_CACHE": str(tmp / "cache")}
    log = open(tmp / "run.log", "w")
    try:
        t0 = time.perf_counter()
        refs = build_data(tmp, int(opts["--train"]), int(opts["--test"]), snrs, int(opts["--extra"]))
        model, times = train(tmp, epochs, env, log, Path(opts["--stage1"]) if opts["--stage1"] else None,
                             float(opts["--lr2"]), int(opts["--warmup2"]))
        size = (model / "model.pt").stat().st_size
        results = []
        for cond in ["clean", *(f"snr{s:g}" for s in snrs)]:
            scp = tmp / "test" / cond / "wav.scp"
            plain = transcribe(model, scp, env, log)
            for target in TARGETS:
                hw = tmp / f"hotword_{target}.txt"
                hw.write_text(" ".join(target) + "\n")
                biased = transcribe(model, scp, env, log, hw)
                results.append((cond, target, scores(refs, plain, target), scores(refs, biased, target),
                                flips(refs, plain, biased, target, True), flips(refs, plain, biased, target, False)))
                (tmp / f"hyps_{cond}_{target}.json").write_text(json.dumps({"plain": plain, "biased": biased}))
        total = time.perf_counter() - t0
        train_rows = int(opts["--train"])
        split = (f"test speaker {TEST_SPEAKER}, the other three train" if SPLIT == "speaker" else
                 "FSDD's split: recordings 0-4 of each speaker for the test, 5-49 for training")
        print(f"{split}; train: {train_rows} utterances of 3-5 digits and the single-digit clips (every 10th for "
              f"validation); test: {len(refs)} utterances ({opts['--test']} per target word, {opts['--test']} with none)")
        stage1_time = f"{times['stage1'] / 60:.1f} min" if "stage1" in times else f"not run (--stage1 {opts['--stage1']})"
        print(f"stage 1 (BiCifParaformer from scratch, {epochs[0]} epochs): {stage1_time}; "
              f"stage 2 (SeACo hotword parts only, {epochs[1]} epochs): {times['stage2'] / 60:.1f} min; "
              f"model.pt {size / 1e6:.2f} MB; everything {total / 60:.1f} min")
        print()
        print("| test audio | hotword | recall without | recall with | false alarms without | false alarms with "
              "| TER without | TER with |")
        print("|---|---|---|---|---|---|---|---|")
        for cond, target, a, b, _, _ in results:
            print(f"| {cond} | {' '.join(target)} | {100 * a['recall']:.1f} % | {100 * b['recall']:.1f} % "
                  f"| {100 * a['false_alarm']:.1f} % | {100 * b['false_alarm']:.1f} % "
                  f"| {100 * a['ter']:.1f} % | {100 * b['ter']:.1f} % |")
        n_pos, n_neg = results[0][2]["n_pos"], results[0][2]["n_neg"]
        print(f"\nrecall over {n_pos} utterances holding the word; false alarms over the {n_neg} without it; "
              f"TER over all {len(refs)}")
        print("\n| test audio | hotword | hits: wrong -> right | hits: right -> wrong | sign test p "
              "| false alarms: new | false alarms: gone |")
        print("|---|---|---|---|---|---|---|")
        tot = [0, 0, 0, 0]
        for cond, target, _, _, (up, down), (fa_new, fa_gone) in results:
            tot = [tot[0] + up, tot[1] + down, tot[2] + fa_new, tot[3] + fa_gone]
            print(f"| {cond} | {' '.join(target)} | {up} | {down} | {sign_p(up, down):.2g} | {fa_new} | {fa_gone} |")
        print(f"| all | all | {tot[0]} | {tot[1]} | {sign_p(tot[0], tot[1]):.2g} | {tot[2]} | {tot[3]} |")
        hits = [sum(round(r[i]["recall"] * r[i]["n_pos"]) for r in results) for i in (2, 3)]
        fas = [sum(round(r[i]["false_alarm"] * r[i]["n_neg"]) for r in results) for i in (2, 3)]
        print(f"\nall cells: recall {hits[0]} -> {hits[1]} of {n_pos * len(results)} "
              f"({100 * hits[0] / (n_pos * len(results)):.1f} % -> {100 * hits[1] / (n_pos * len(results)):.1f} %); "
              f"false alarms {fas[0]} -> {fas[1]} of {n_neg * len(results)}")
        if opts["--keep"]:
            keep = Path(opts["--keep"])
            shutil.rmtree(keep, ignore_errors=True)
            log.close()
            shutil.copytree(tmp, keep, symlinks=True, ignore=shutil.ignore_patterns("*.wav"))
    except BaseException:
        if opts["--keep"]:  # what there is, for a look at why
            log.close()
            shutil.rmtree(opts["--keep"], ignore_errors=True)
            shutil.copytree(tmp, opts["--keep"], symlinks=True, ignore=shutil.ignore_patterns("*.wav"))
        raise
    finally:
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
