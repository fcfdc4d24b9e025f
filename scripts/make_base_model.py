#!/usr/bin/env python3
"""Build the FSDD recipe's base model (`examples/fsdd/base/`): a small Paraformer pretrained on
English digits spoken by every synthetic voice Debian ships, as real base models are trained on many
voices before anyone fine-tunes them on their own.

    apt-get install espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts sox
    python scripts/make_base_model.py [--work DIR] [--utterances N] [--epochs E]

1. Texts: single digits ("seven") and sequences of 2-4 digits ("three seven one"); the transcript is
   the digits ("371"), as the recipe's tokens are the characters 0-9.
2. Voices: eSpeak NG's seven English accents, each with any of its voice variants; flite's kal, kal16,
   awb, rms and slt; festival's kal and ked diphone voices and the HTS US voice (slt).
3. Perturbation: speaking rate and pitch through each synthesizer's own settings (festival's HTS
   voice: rate only), a vocal-tract-length warp (sox `speed a tempo 1/a`: formants and pitch move by a,
   the duration stays), silence trimmed to a random margin, 70 % band-limited to 8 kHz (telephone-like
   recordings such as FSDD's), a microphone and room (sox: bass and treble tilts of up to 8-10 dB, a
   50-300 Hz high-pass on half, reverberation on 40 %), a random level, white or brown noise at 5-40 dB
   SNR on 60 %, and 8-bit quantization on 10 %.
4. Pretrains with `paratune prepare` and `paratune finetune --from-scratch --budget 1GiB`, as a user
   would, and copies the run's `final/` (a FunASR model directory) to `examples/fsdd/base/`.

Every random choice comes from a generator seeded by (seed, utterance index), and sox runs without
dither, so the audio is the same bytes on every run (the script prints a digest of it); training runs
on a fixed two torch threads and is deterministic, so a rerun with the same Debian packages and torch
writes the same model.pt.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "fsdd"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ESPEAK_ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
                  "en-029"]
FLITE_VOICES = ["kal", "kal16", "awb", "rms", "slt"]
FESTIVAL_VOICES = ["kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts"]
ENGINE_SHARE = {"espeak": 0.4, "flite": 0.35, "festival": 0.25}
# The model: the recipe's frontend and tokens (examples/fsdd/model), a little wider and deeper.
MODEL_EDITS = {"encoder_conf": {"output_size": 128, "linear_units": 256, "num_blocks": 5},
               "decoder_conf": {"linear_units": 256}, "predictor_conf": {"idim": 128}}
PRETRAIN = ["++train_conf.max_epoch=16", "++train_conf.keep_nbest_models=3", "++train_conf.avg_nbest_model=3",
            "++scheduler_conf.warmup_steps=500", "++dataset_conf.max_batch=48"]
FS = 16000


def espeak_variants() -> list[str]:
    out = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True, check=True)
    return sorted(token[3:] for line in out.stdout.splitlines() for token in line.split() if token.startswith("!v/"))


def plan_utterance(index: int, seed: int, variants: list[str]) -> dict:
    """Everything random about one utterance, from its own generator."""
    rng = np.random.default_rng([seed, index])
    digits = rng.integers(0, 10, size=1 if rng.random() < 0.55 else int(rng.integers(2, 5)))
    engine = str(rng.choice(list(ENGINE_SHARE), p=list(ENGINE_SHARE.values())))
    voice = {"espeak": lambda: f"{rng.choice(ESPEAK_ACCENTS)}+{rng.choice(variants)}",
             "flite": lambda: str(rng.choice(FLITE_VOICES)),
             "festival": lambda: str(rng.choice(FESTIVAL_VOICES))}[engine]()
    return {"key": f"syn{index:05d}", "digits": "".join(map(str, digits)),
            "words": " ".join(WORDS[d] for d in digits), "engine": engine, "voice": voice,
            "stretch": float(rng.uniform(0.8, 1.3)), "pitch": float(rng.uniform(0.0, 1.0)),
            "warp": float(rng.uniform(0.85, 1.15)), "margin": rng.uniform(0.0, 0.2, size=2).tolist(),
            "narrow": bool(rng.random() < 0.7), "level_db": float(rng.uniform(-30.0, -3.0)),
            "highpass": float(rng.uniform(50.0, 300.0)) if rng.random() < 0.5 else 0.0,
            "bass_db": float(rng.uniform(-8.0, 8.0)), "treble_db": float(rng.uniform(-10.0, 6.0)),
            "reverb": float(rng.uniform(10.0, 60.0)) if rng.random() < 0.4 else 0.0,
            "room": float(rng.uniform(10.0, 60.0)), "bits": 8 if rng.random() < 0.1 else 16,
            "noise": str(rng.choice(["none", "white", "brown"], p=[0.4, 0.3, 0.3])),
            "snr_db": float(rng.uniform(5.0, 40.0)), "noise_seed": int(rng.integers(2**31))}


def synth_command(u: dict, out: Path) -> list[str]:
    if u["engine"] == "espeak":
        return ["espeak-ng", "-v", u["voice"], "-s", str(round(175 / u["stretch"])),
                "-p", str(round(20 + 60 * u["pitch"])), "-w", str(out), u["words"]]
    return ["flite", "-voice", u["voice"], "--setf", f"duration_stretch={u['stretch']:.3f}",
            "--setf", f"int_f0_target_mean={80 + 140 * u['pitch']:.1f}", "-t", u["words"], "-o", str(out)]


def festival_script(batch: list[dict], raw: Path) -> str:
    lines = []
    for u in batch:
        lines.append(f"(voice_{u['voice']})")
        lines.append(f"(Parameter.set 'Duration_Stretch {u['stretch']:.3f})")
        if u["voice"].endswith("_diphone"):
            mean = 80 + 140 * u["pitch"]
            lines.append(f"(set! int_lr_params '((target_f0_mean {mean:.1f}) (target_f0_std {mean / 6:.1f}) "
                         "(model_f0_mean 170) (model_f0_std 34)))")
        lines.append(f'(utt.save.wave (utt.synth (Utterance Text "{u["words"]}")) "{raw / u["key"]}.wav" \'riff)')
    return "\n".join(lines) + "\n"


def perturb(u: dict, raw_wav: Path, out_dir: Path) -> Path:
    """sox: warp, trim, pad, resample (no dither); numpy: level and noise; 16-bit wav out."""
    rate = 8000 if u["narrow"] else FS
    warped = raw_wav.with_suffix(".f32.wav")
    # the microphone and the room: a bass and treble tilt, a high-pass on some, reverberation on some
    channel = ["bass", f"{u['bass_db']:.2f}", "treble", f"{u['treble_db']:.2f}"]
    channel += ["highpass", f"{u['highpass']:.1f}"] if u["highpass"] else []
    channel += ["reverb", f"{u['reverb']:.1f}", "50", f"{u['room']:.1f}"] if u["reverb"] else []
    subprocess.run(["sox", "-D", "-V1", str(raw_wav), "-e", "floating-point", "-b", "32", str(warped),
                    "speed", f"{u['warp']:.4f}", "tempo", "-s", f"{1 / u['warp']:.4f}",
                    "silence", "1", "0.01", "0.5%", "reverse", "silence", "1", "0.01", "0.5%", "reverse",
                    *channel, "pad", f"{u['margin'][0]:.3f}", f"{u['margin'][1]:.3f}", "rate", "-h", str(rate)],
                   check=True)
    audio, _ = sf.read(warped, dtype="float64")
    warped.unlink()
    audio = audio if audio.ndim == 1 else audio.mean(axis=1)
    audio *= 10 ** (u["level_db"] / 20) / max(np.abs(audio).max(), 1e-9)
    if u["noise"] != "none":
        noise = np.random.default_rng(u["noise_seed"]).standard_normal(len(audio))
        if u["noise"] == "brown":
            noise = np.cumsum(noise)
            noise -= np.convolve(noise, np.ones(401) / 401, mode="same")  # no drift, keep the low rumble
        speech = np.mean(audio**2) + 1e-12
        audio += noise * np.sqrt(speech / (np.mean(noise**2) * 10 ** (u["snr_db"] / 10)))
    audio = np.clip(audio, -1.0, 1.0)
    if u["bits"] == 8:  # recorded at 8 bits near full scale, stored at 16 (as some of FSDD's recordings are)
        peak = max(np.abs(audio).max(), 1e-9)
        audio = np.round(audio / peak * 127) / 127 * peak
    path = out_dir / f"{u['key']}.wav"
    sf.write(path, audio, rate, subtype="PCM_16")
    return path


def synthesize_batch(batch: list[dict], out_dir: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp)
        festival = [u for u in batch if u["engine"] == "festival"]
        if festival:
            (raw / "batch.scm").write_text(festival_script(festival, raw))
            subprocess.run(["festival", "-b", str(raw / "batch.scm")], check=True, capture_output=True)
        for u in batch:
            if u["engine"] != "festival":
                subprocess.run(synth_command(u, raw / f"{u['key']}.wav"), check=True, capture_output=True)
            perturb(u, raw / f"{u['key']}.wav", out_dir)


def synthesize(utterances: list[dict], out_dir: Path, workers: int) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = [utterances[i:i + 200] for i in range(0, len(utterances), 200)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(synthesize_batch, batches, [out_dir] * len(batches)))
    digest = hashlib.sha256()
    for u in utterances:
        digest.update((out_dir / f"{u['key']}.wav").read_bytes())
    return digest.hexdigest()


def model_dir(work: Path) -> Path:
    """The recipe's model directory with MODEL_EDITS applied: the pretraining starts from it."""
    dest = work / "model"
    shutil.copytree(RECIPE / "model", dest, dirs_exist_ok=True)
    config = yaml.safe_load((dest / "config.yaml").read_text())
    for section, values in MODEL_EDITS.items():
        config[section].update(values)
    (dest / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dest


def pretrain(work: Path, utterances: list[dict], overrides: list[str]) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONHASHSEED": "0"}
    paratune = [sys.executable, "-m", "paratune"]
    data = work / "data"
    data.mkdir(exist_ok=True)
    (data / "all.tsv").write_text("".join(f"{u['key']}.wav\t{u['digits']}\n" for u in utterances))
    model = model_dir(work)
    subprocess.run(paratune + ["prepare", str(work / "audio"), "--transcripts", str(data / "all.tsv"),
                               "--model", str(model), "--output", str(data / "all")], check=True, env=env)
    rows = (data / "all" / "data.jsonl").read_text().splitlines(keepends=True)
    (data / "fit.jsonl").write_text("".join(r for i, r in enumerate(rows) if i % 20))
    (data / "valid.jsonl").write_text("".join(r for i, r in enumerate(rows) if i % 20 == 0))
    subprocess.run(paratune + ["finetune", "--model", str(model), "--from-scratch", "--train", str(data / "fit.jsonl"),
                               "--valid", str(data / "valid.jsonl"), "--output", str(work / "exp"),
                               "--budget", "1GiB", "--overwrite", *overrides], check=True, env=env)
    return work / "exp" / "final"


def provenance(utterances: list[dict], hours: float, digest: str, minutes: tuple[float, float],
               overrides: list[str]) -> str:
    engines = {e: sum(u["engine"] == e for u in utterances) for e in ENGINE_SHARE}
    versions = subprocess.run(["dpkg-query", "-W", "espeak-ng", "flite", "festival", "sox", "festvox-kallpc16k",
                               "festvox-kdlpc16k", "festvox-us-slt-hts"], capture_output=True, text=True).stdout
    import torch
    return (f"# The FSDD recipe's base model\n\nBuilt by `python scripts/make_base_model.py` "
            f"(see its docstring): `examples/fsdd/model/config.yaml` with "
            f"{'; '.join(f'{k}: {v}' for k, v in MODEL_EDITS.items())}, pretrained from scratch on "
            f"{len(utterances)} synthetic utterances "
            f"({hours:.2f} h) of English digits, {', '.join(f'{n} {e}' for e, n in engines.items())}, "
            f"with `{' '.join(overrides)}`; the weights are the average of the best epochs by validation CER on "
            f"every 20th utterance.\n\n- synthesis {minutes[0]:.1f} CPU-min, pretraining {minutes[1]:.1f} CPU-min "
            f"(2-core Xeon, torch {torch.__version__})\n- audio sha256 `{digest}`\n- Debian packages:\n\n"
            + "".join(f"      {line}\n" for line in versions.splitlines()))


def publish(final: Path, dest: Path, readme: str) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(final, tmp)
    digest = hashlib.sha256((tmp / "model.pt").read_bytes()).hexdigest()
    (tmp / "README.md").write_text(readme + f"\nmodel.pt sha256 `{digest}`: a rebuild with the same packages and "
                                            "torch writes the same bytes.\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def cpu_minutes() -> float:
    """User + system time of this process and every child it waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime) / 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="keep audio and the training run here (default: a temp folder)")
    parser.add_argument("--utterances", type=int, default=10000)
    parser.add_argument("--epochs", type=int, help="override the pretraining's 16 epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RECIPE / "base")
    parser.add_argument("--synthesize-only", action="store_true")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="paratune-base-"))
    variants = espeak_variants()
    utterances = [plan_utterance(i, args.seed, variants) for i in range(args.utterances)]
    start = time.time(), cpu_minutes()
    digest = synthesize(utterances, work / "audio", args.workers)
    seconds = sum(sf.info(work / "audio" / f"{u['key']}.wav").duration for u in utterances)
    synth_cpu = cpu_minutes() - start[1]
    print(f"synthesized {len(utterances)} utterances, {seconds / 3600:.2f} h of audio, "
          f"{time.time() - start[0]:.0f} s wall, {synth_cpu:.1f} CPU-min; audio sha256 {digest}", flush=True)
    if args.synthesize_only:
        return
    start = time.time(), cpu_minutes()
    overrides = PRETRAIN + ([f"++train_conf.max_epoch={args.epochs}"] if args.epochs else [])
    final = pretrain(work, utterances, overrides)
    train_cpu = cpu_minutes() - start[1]
    print(f"pretrained in {(time.time() - start[0]) / 60:.1f} min wall, {train_cpu:.1f} CPU-min", flush=True)
    publish(final, args.output, provenance(utterances, seconds / 3600, digest, (synth_cpu, train_cpu), overrides))
    print(f"model.pt sha256 {hashlib.sha256((args.output / 'model.pt').read_bytes()).hexdigest()}")
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
