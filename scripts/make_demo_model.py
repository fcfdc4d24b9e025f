#!/usr/bin/env python3
"""Build the tiny demo model and clips bundled in `paratune/assets/` (what `make demo` transcribes).

    pip install espeakng-loader          # libespeak-ng + its data (Mandarin voice `cmn`), no system package
    python scripts/make_demo_model.py    # ~10 min on one CPU core; seeded: a rerun gives the same model

1. Writes a few hundred short everyday Mandarin sentences from templates over a small character set
   and holds some of them out (every held-out character also occurs in training).
2. Synthesises each training sentence several times with eSpeak NG (voice `cmn`, called through ctypes on
   the library that the `espeakng-loader` wheel ships), varying the voice variant, speed, pitch and pitch
   range, then adds a low noise floor and a random gain; audio goes to a temporary folder at 16 kHz
   (16-bit wav), never into the repository.
3. Computes features with paratune's `WavFrontend` (80 mels, hamming, LFR 7/6, FunASR's settings) and a
   global CMVN estimated on the training features.
4. Trains a small Paraformer from scratch (paraformer-large's config layout, tiny sizes) with
   `paratune.train.step.train_step` in a plain loop: length-bucketed batches, warmup then cosine
   LR decay, SpecAugment on the LFR features. Every other epoch it decodes the held-out sentences
   (greedy CIF, `ASRModel.transcribe`) with the current weights and with the average of the last five
   epochs' weights, keeps the best, and stops once they decode without error on two evaluations in a row.
5. Saves the model with `paratune.save_model` (config.yaml, model.pt, tokens.json, am.mvn), three
   held-out clips plus a Kaldi `text` file, and a provenance note (`paratune/assets/README.md`), then
   reloads the directory and prints hypothesis vs reference per clip and the CER.
   Exit status 0 only if all three demo clips decode exactly.

With the default single torch thread a rerun with the same seed gives the same weights.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import importlib.metadata
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paratune import ASRModel, load_model, save_model  # noqa: E402
from paratune.data.audio import load_audio, resample  # noqa: E402
from paratune.data.frontend import WavFrontend  # noqa: E402
from paratune.data.tokenizer import CharTokenizer  # noqa: E402
from paratune.model.build import build_paraformer, paraformer_config  # noqa: E402
from paratune.data.specaug import spec_augment  # noqa: E402
from paratune.train.metrics import edit_distance  # noqa: E402
from paratune.train.step import make_optimizer, train_step  # noqa: E402

FS = 16000

# --------------------------------------------------------------------------------------------------
# Text: templates over small word lists
# --------------------------------------------------------------------------------------------------

SUBJ = ["我", "你", "他", "我们", "你们", "他们", "妈妈", "爸爸", "哥哥", "姐姐", "弟弟", "妹妹", "老师",
        "同学们", "小王", "小李", "医生", "我的朋友"]
TIME = ["今天", "明天", "昨天", "早上", "晚上", "中午", "下午", "周末", "现在", "每天"]
PLACE = ["学校", "公园", "商店", "医院", "图书馆", "饭店", "超市", "银行", "火车站", "机场", "北京", "上海",
         "公司", "电影院", "朋友家"]
FOOD = ["米饭", "面条", "包子", "饺子", "水果", "苹果", "鸡蛋", "牛肉", "蛋糕", "青菜", "西瓜", "鱼"]
DRINK = ["茶", "咖啡", "牛奶", "果汁", "热水", "啤酒"]
THING = ["衣服", "鞋子", "手机", "电脑", "雨伞", "礼物", "自行车", "书包", "帽子", "面包"]
SHOW = ["电视", "电影", "新闻", "比赛", "报纸", "小说"]
VEHICLE = ["公交车", "地铁", "出租车", "飞机", "火车"]
WEATHER = ["很好", "不错", "很冷", "很热", "有点冷", "非常热", "特别好"]
FEEL = ["很忙", "很累", "很高兴", "非常开心", "有点饿", "不太舒服", "特别忙"]
AT_HOME = ["做作业", "休息", "打电话", "听音乐", "做饭", "睡觉", "打扫房间", "学习中文"]
NUM = ["一", "两", "三", "四", "五", "六", "七", "八", "九", "十"]


def _templates(rng: random.Random):
    c = rng.choice
    return [
        lambda: f"{c(SUBJ)}{c(TIME)}去{c(PLACE)}",
        lambda: f"{c(SUBJ)}{c(TIME)}想去{c(PLACE)}",
        lambda: f"{c(SUBJ)}{c(TIME)}要去{c(PLACE)}买{c(THING)}",
        lambda: f"{c(SUBJ)}喜欢吃{c(FOOD)}",
        lambda: f"{c(SUBJ)}{c(TIME)}想吃{c(FOOD)}",
        lambda: f"{c(SUBJ)}{c(TIME)}吃了{c(FOOD)}",
        lambda: f"{c(SUBJ)}{c(TIME)}喝{c(DRINK)}",
        lambda: f"{c(SUBJ)}不喜欢喝{c(DRINK)}",
        lambda: f"{c(SUBJ)}{c(TIME)}在家里看{c(SHOW)}",
        lambda: f"{c(SUBJ)}{c(TIME)}坐{c(VEHICLE)}去{c(PLACE)}",
        lambda: f"{c(TIME)}天气{c(WEATHER)}",
        lambda: f"{c(SUBJ)}{c(TIME)}{c(FEEL)}",
        lambda: f"{c(SUBJ)}{c(TIME)}在家{c(AT_HOME)}",
        lambda: f"请问{c(PLACE)}在哪里",
        lambda: f"现在{c(NUM)}点了",
        lambda: f"这个{c(THING)}多少钱",
        lambda: f"这个{c(THING)}{c(NUM)}十块钱",
        lambda: f"{c(SUBJ)}和{c(SUBJ)}一起去{c(PLACE)}",
        lambda: f"{c(SUBJ)}{c(TIME)}没有去{c(PLACE)}",
        lambda: f"你{c(TIME)}去{c(PLACE)}吗",
        lambda: f"{c(SUBJ)}也{c(FEEL)}",
        lambda: f"{c(PLACE)}的{c(FOOD)}很好吃",
        lambda: f"{c(SUBJ)}买了{c(NUM[1:])}个{c(FOOD[4:6] + ['包子', '面包', '蛋糕'])}",
        lambda: f"{c(SUBJ)}{c(TIME)}在{c(PLACE)}看{c(SHOW)}",
    ]


def make_sentences(n_train: int, n_heldout: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """Distinct sentences; held-out ones use only characters seen in training."""
    templates = _templates(rng)
    pool: list[str] = []
    seen = set()
    while len(pool) < n_train + n_heldout:
        s = rng.choice(templates)()
        if s not in seen and 4 <= len(s) <= 14 and len(set(s)) > 1:
            seen.add(s)
            pool.append(s)
    rng.shuffle(pool)
    train, heldout = pool[n_heldout:], []
    chars = set("".join(train))
    for s in pool[:n_heldout]:
        (heldout if set(s) <= chars else train).append(s)
    return train, heldout


# --------------------------------------------------------------------------------------------------
# Speech: eSpeak NG through ctypes on espeakng-loader's library
# --------------------------------------------------------------------------------------------------

# voice variants (espeak-ng-data/voices/!v); whisper and the novelty voices are left out
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "klatt", "klatt2", "klatt3"]
ESPEAK_RATE, ESPEAK_PITCH, ESPEAK_RANGE = 1, 3, 4
AUDIO_OUTPUT_SYNCHRONOUS, ESPEAK_CHARS_UTF8, POS_CHARACTER = 2, 1, 1


class Espeak:
    """The few calls of espeak-ng's C API (speak_lib.h) needed to render text to a waveform."""

    CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

    def __init__(self):
        try:
            import espeakng_loader
        except ImportError:
            sys.exit("needs the espeakng-loader wheel (libespeak-ng + data): pip install espeakng-loader")
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                          ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        # its random numbers (breathy variants, Klatt noise) come from a seedable generator
        self.lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self.lib.espeak_Info.restype = ctypes.c_char_p
        self.lib.espeak_Info.argtypes = [ctypes.c_void_p]
        self.sample_rate = self.lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                                      espeakng_loader.get_data_path().encode(), 0)
        if self.sample_rate <= 0:
            raise RuntimeError("espeak_Initialize failed")
        self.version = self.lib.espeak_Info(None).decode()
        self._chunks: list[np.ndarray] = []
        self._callback = self.CALLBACK(self._collect)  # keep a reference: C holds only the pointer
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n, _events):
        if n > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def synth(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int, seed: int) -> np.ndarray:
        """float32 samples in [-1, 1] at `self.sample_rate`; the same arguments give the same samples."""
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"espeak-ng has no voice {voice!r}")
        for param, value in ((ESPEAK_RATE, rate), (ESPEAK_PITCH, pitch), (ESPEAK_RANGE, pitch_range)):
            self.lib.espeak_SetParameter(param, value, 0)
        self.lib.espeak_ng_SetRandSeed(seed)
        self._chunks = []
        data = text.encode("utf-8")
        if self.lib.espeak_Synth(data, len(data) + 1, 0, POS_CHARACTER, 0, ESPEAK_CHARS_UTF8, None, None) != 0:
            raise RuntimeError(f"espeak_Synth failed on {text!r}")
        self.lib.espeak_Synchronize()
        if not self._chunks:
            raise RuntimeError(f"espeak-ng rendered nothing for {text!r}")
        return np.concatenate(self._chunks).astype(np.float32) / 32768.0


def speak(tts: Espeak, text: str, rng: random.Random, variant: str, rate: tuple[int, int] = (120, 210),
          lead: tuple[float, float] = (0.1, 0.35), gain: tuple[float, float] = (0.3, 0.9)):
    """`text` spoken at a random speed, pitch and range, trimmed, at 16 kHz, between random silences,
    scaled to a random peak. Returns the samples, the lead and tail silences (samples) and the prosody."""
    rate_, pitch, prange = rng.randint(*rate), rng.randint(25, 75), rng.randint(30, 90)
    x = tts.synth(text + "。", f"cmn+{variant}", rate_, pitch, prange, seed=rng.getrandbits(31))
    voiced = np.flatnonzero(np.abs(x) > 1e-3)
    x = x[voiced[0]: voiced[-1] + 1] if voiced.size else x
    x = resample(x, tts.sample_rate, FS)
    head, tail = (int(rng.uniform(*lead) * FS) for _ in range(2))
    x = np.concatenate([np.zeros(head, np.float32), x, np.zeros(tail, np.float32)])
    x = x / max(1e-6, float(np.abs(x).max())) * rng.uniform(*gain)
    return x, head, tail, (rate_, pitch, prange)


def render(tts: Espeak, text: str, rng: random.Random, variant: str | None = None) -> tuple[np.ndarray, str]:
    """One randomised rendering at 16 kHz: voice variant, speed, pitch, range, silence, noise, gain."""
    variant = variant or rng.choice(VARIANTS)
    x, _, _, (rate, pitch, prange) = speak(tts, text, rng, variant)
    noise_db = rng.uniform(-65, -45)  # a noise floor: no digital silence, so dither makes no difference
    x = x + np.random.default_rng(rng.getrandbits(32)).standard_normal(x.shape[0]).astype(np.float32) * (
        10 ** (noise_db / 20))
    desc = f"cmn+{variant} rate {rate} pitch {pitch} range {prange} noise {noise_db:.0f} dBFS"
    return np.clip(x, -1, 1).astype(np.float32), desc


def write_wav(path: Path, x: np.ndarray) -> None:
    sf.write(str(path), x, FS, subtype="PCM_16")


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def model_config(d: int, enc_blocks: int, dec_blocks: int, ffn: int) -> dict:
    """paraformer-large's config.yaml layout (shared/data/paraformer_large/config.yaml), tiny sizes."""
    return {
        **paraformer_config(d, enc_blocks, dec_blocks, ffn, FS),
        "specaug": "SpecAugLFR",
        "specaug_conf": {"apply_time_warp": False, "time_warp_window": 5, "time_warp_mode": "bicubic",
                         "apply_freq_mask": True, "freq_mask_width_range": [0, 30], "lfr_rate": 6,
                         "num_freq_mask": 1, "apply_time_mask": True, "time_mask_width_range": [0, 4],
                         "num_time_mask": 1},
        "train_conf": {"accum_grad": 1, "grad_clip": 5},
        "optim": "adam",
        "optim_conf": {"lr": 0.002},
        "scheduler": "warmuplr",
        "scheduler_conf": {"warmup_steps": 400},
        "tokenizer": "CharTokenizer",
        "tokenizer_conf": {"unk_symbol": "<unk>", "split_with_space": True},
        "ctc_conf": {"dropout_rate": 0.0, "ctc_type": "builtin", "reduce": True, "ignore_nan_grad": True},
        "normalize": None,
    }


def average_states(states) -> dict:
    states = list(states)
    return {k: torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v
            for k, v in states[-1].items()}


def make_batches(lengths: list[int], max_frames: int, rng: random.Random) -> list[list[int]]:
    """Indices bucketed by length (after a little jitter), each batch at most `max_frames` padded frames."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i] + rng.uniform(-3, 3))
    batches, cur, longest = [], [], 0
    for i in order:
        longest_new = max(longest, lengths[i])
        if cur and longest_new * (len(cur) + 1) > max_frames:
            batches.append(cur)
            cur, longest_new = [], lengths[i]
        cur.append(i)
        longest = longest_new
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


@torch.no_grad()
def decodes_with_margin(asr: ASRModel, wave: np.ndarray, text: str, min_margin: float = 2.0) -> bool:
    """`wave` decodes to `text`, with every token's log-probability at least `min_margin` above the
    runner-up and the CIF token count well away from a rounding boundary: so another CPU's float
    rounding cannot change the transcript of a bundled clip."""
    model = asr.model.eval()
    if asr.transcribe([wave])[0] != text:
        return False
    feats = asr.frontend.features(wave)[None]
    enc, enc_len = model.encode(feats, torch.tensor([feats.shape[1]]))
    embeds, token_num, _, _ = model.predict(enc, enc_len)
    n = token_num.round().long()
    top2 = model.decoder(enc, enc_len, embeds, n).log_softmax(-1)[0].topk(2, -1).values
    return bool((top2[:, 0] - top2[:, 1]).min() >= min_margin and (token_num - n).abs().max() < 0.25)


def cer(hyps: list[str], refs: list[str]) -> float:
    return sum(edit_distance(h, r) for h, r in zip(hyps, refs)) / max(1, sum(len(r) for r in refs))


# --------------------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-out", type=Path, default=ROOT / "paratune/assets/demo_model")
    p.add_argument("--demo-out", type=Path, default=ROOT / "paratune/assets/demo")
    p.add_argument("--readme", type=Path, default=ROOT / "paratune/assets/README.md")
    p.add_argument("--workdir", type=Path, default=None, help="where the synthetic audio goes (default: a temp dir, removed)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--train-sentences", type=int, default=420)
    p.add_argument("--heldout-sentences", type=int, default=24)
    p.add_argument("--renderings", type=int, default=5, help="renderings per training sentence")
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--enc-blocks", type=int, default=5)
    p.add_argument("--dec-blocks", type=int, default=2)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=400)
    p.add_argument("--max-frames", type=int, default=2400, help="padded LFR frames per batch")
    p.add_argument("--max-epochs", type=int, default=44)
    p.add_argument("--min-epochs", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--average", type=int, default=5, help="also try the average of the last N epochs' weights")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: the same result on any machine, and no slowdown when cores are busy)")
    args = p.parse_args()

    t_start = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)

    # ---- text ------------------------------------------------------------------------------------
    train_text, heldout_text = make_sentences(args.train_sentences, args.heldout_sentences, rng)
    chars = sorted(set("".join(train_text)))
    tokens = ["<blank>", "<s>", "</s>", *chars, "<unk>"]
    tokenizer = CharTokenizer(tokens)
    print(f"{len(train_text)} training sentences, {len(heldout_text)} held out, {len(chars)} characters")

    # ---- speech ----------------------------------------------------------------------------------
    tts = Espeak()
    print(f"eSpeak NG {tts.version} at {tts.sample_rate} Hz, variants {', '.join(VARIANTS)}")
    tmp = tempfile.TemporaryDirectory(prefix="paratune-demo-") if args.workdir is None else None
    work = Path(tmp.name) if tmp else args.workdir
    work.mkdir(parents=True, exist_ok=True)

    def synthesise(texts: list[str], copies: int, tag: str) -> list[dict]:
        out = []
        for i, text in enumerate(texts):
            for k in range(copies):
                x, desc = render(tts, text, rng)
                path = work / f"{tag}_{i:04d}_{k}.wav"
                write_wav(path, x)
                out.append({"path": path, "text": text, "desc": desc})
        return out

    t0 = time.time()
    train_utts = synthesise(train_text, args.renderings, "train")
    dev_utts = synthesise(heldout_text, 2, "heldout")
    hours = sum(sf.info(str(u["path"])).duration for u in train_utts) / 3600
    print(f"synthesised {len(train_utts)} training clips ({hours:.2f} h) and {len(dev_utts)} held-out clips "
          f"in {time.time() - t0:.0f} s")

    # ---- features and CMVN -----------------------------------------------------------------------
    config = model_config(args.dim, args.enc_blocks, args.dec_blocks, args.ffn)
    config["optim_conf"]["lr"] = args.lr
    config["scheduler_conf"]["warmup_steps"] = args.warmup
    frontend = WavFrontend.from_config(config["frontend_conf"]).eval()
    train_feats = [frontend.features(load_audio(u["path"], FS)) for u in train_utts]
    stacked = torch.cat(train_feats)
    mean, std = stacked.mean(0), stacked.std(0).clamp(min=1e-5)
    # the frontend's cmvn buffer: row 0 is added (-mean), row 1 multiplies (1/std); save_model writes am.mvn
    cmvn = torch.stack([-mean, 1.0 / std])
    frontend = WavFrontend(**config["frontend_conf"], cmvn=cmvn).eval()
    train_feats = [(f + cmvn[0]) * cmvn[1] for f in train_feats]  # what frontend.features computes
    train_ids = [torch.tensor(tokenizer.encode(u["text"], strict=True)) for u in train_utts]
    dev_waves = [load_audio(u["path"], FS) for u in dev_utts]
    lengths = [f.shape[0] for f in train_feats]
    print(f"features: {len(train_feats)} x (~{np.mean(lengths):.0f}, {stacked.shape[1]}) LFR frames")

    # ---- model and training ----------------------------------------------------------------------
    model = build_paraformer(config, len(tokenizer), frontend.output_size())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters, vocab {len(tokenizer)}")
    asr = ASRModel(model, frontend, tokenizer, config)
    optimizer = make_optimizer(model, lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)

    total_steps = args.max_epochs * len(make_batches(lengths, args.max_frames, random.Random(0)))

    def lr_at(step: int) -> float:  # linear warmup to args.lr, cosine decay to 5% of it at the last epoch
        if step < args.warmup:
            return args.lr * step / args.warmup
        done = min(1.0, (step - args.warmup) / max(1, total_steps - args.warmup))
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * done)))

    def evaluate() -> tuple[float, list[str]]:
        hyps = []
        for b in range(0, len(dev_waves), 16):
            hyps += asr.transcribe(dev_waves[b:b + 16])
        return cer(hyps, [u["text"] for u in dev_utts]), hyps

    step, clean_evals, best = 0, 0, (float("inf"), None, "")
    recent = collections.deque(maxlen=args.average)
    t_train = time.time()
    for epoch in range(1, args.max_epochs + 1):
        model.train()
        sums, n = {}, 0
        for batch_idx in make_batches(lengths, args.max_frames, rng):
            feats = [spec_augment(train_feats[i], gen) for i in batch_idx]
            ids = [train_ids[i] for i in batch_idx]
            batch = {
                "speech": torch.nn.utils.rnn.pad_sequence(feats, batch_first=True),
                "speech_lengths": torch.tensor([f.shape[0] for f in feats], dtype=torch.int32),
                "text": torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=-1),
                "text_lengths": torch.tensor([len(t) for t in ids], dtype=torch.int32),
            }
            step += 1
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            stats = train_step(model, optimizer, batch, grad_clip=5.0).floats()
            for k in ("loss", "loss_att", "loss_pre", "acc"):
                sums[k] = sums.get(k, 0.0) + stats[k]
            n += 1
        line = " ".join(f"{k} {v / n:.3f}" for k, v in sums.items())
        msg = f"epoch {epoch:3d} step {step:5d} lr {lr_at(step):.2e} {line} ({time.time() - t_train:.0f} s)"
        recent.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        if epoch % args.eval_every == 0 or epoch == args.max_epochs:
            # the weights now, and the average of the last `--average` epochs' (FunASR's avg_nbest_model)
            current = recent[-1]
            candidates = [(f"weights of epoch {epoch}", current)]
            if len(recent) > 1:
                candidates.append((f"average of the weights of epochs {epoch - len(recent) + 1}-{epoch}",
                                   average_states(recent)))
            cers = []
            for name, state in candidates:
                model.load_state_dict(state)
                cers.append(evaluate()[0])
                if cers[-1] <= best[0]:  # ties go to the later (and to the average)
                    best = (cers[-1], state, name)
            model.load_state_dict(current)
            msg += " held-out CER " + " / average ".join(f"{c:.2%}" for c in cers)
            clean_evals = clean_evals + 1 if min(cers) == 0 else 0
        print(msg, flush=True)
        if clean_evals >= 2 and epoch >= args.min_epochs:
            break
    train_seconds = time.time() - t_train
    model.load_state_dict(best[1])
    model.eval()
    dev_cer, dev_hyps = evaluate()
    print(f"trained {epoch} epochs ({step} steps) in {train_seconds / 60:.1f} min; "
          f"keeping the {best[2]}: held-out CER {dev_cer:.2%}")
    for u, h in zip(dev_utts, dev_hyps):
        if h != u["text"]:
            print(f"  miss: {u['text']} -> {h} ({u['desc']})")

    # ---- save --------------------------------------------------------------------------------------
    if args.model_out.exists():
        shutil.rmtree(args.model_out)
    save_model(asr, args.model_out)
    for f in args.model_out.iterdir():
        f.chmod(0o644)  # save_model's atomic writes leave 0600 files; these are package data
    # demo clips: three held-out sentences (never trained on), different templates and voices,
    # each rendered afresh and kept only if decoded correctly with a safe margin
    if args.demo_out.exists():
        shutil.rmtree(args.demo_out)
    args.demo_out.mkdir(parents=True)
    demo_rng = random.Random(args.seed + 1)
    candidates = sorted(heldout_text, key=lambda s: (-len(s), s))
    voices = ["f2", "m3", "klatt2", "f4", "m1", "m7"]
    picked, lines = [], []
    for text in candidates:
        if len(picked) == 3:
            break
        if any(text[i:i + 3] in q for q, _ in picked for i in range(len(text) - 2)):
            continue  # three different sentence patterns
        x, desc = render(tts, text, demo_rng, variant=voices[len(picked)])
        if not decodes_with_margin(asr, x, text):
            continue
        key = f"demo_{len(picked) + 1:02d}"
        write_wav(args.demo_out / f"{key}.wav", x)
        picked.append((text, desc))
        lines.append(f"{key} {text}")
    (args.demo_out / "text").write_text("\n".join(lines) + "\n", encoding="utf-8")

    # check the saved files, as `make demo` will read them
    reloaded = load_model(args.model_out)
    wavs = sorted(args.demo_out.glob("*.wav"))
    hyps = reloaded.transcribe_files(wavs) if wavs else []
    refs = [line.split(" ", 1)[1] for line in lines]
    demo_cer = cer(hyps, refs)
    print("\ndemo clips (held-out sentences, decoded from the saved directory):")
    for w, h, r in zip(wavs, hyps, refs):
        print(f"  {w.name}: hyp {h}  ref {r}  {'OK' if h == r else 'WRONG'}")
    size = sum(f.stat().st_size for f in args.model_out.iterdir())
    demo_size = sum(f.stat().st_size for f in args.demo_out.iterdir())
    print(f"demo CER {demo_cer:.2%}; model directory {size / 1e6:.2f} MB, demo clips {demo_size / 1e3:.0f} kB; "
          f"total {(time.time() - t_start) / 60:.1f} min")

    enc, dec = config["encoder_conf"], config["decoder_conf"]
    try:
        loader = f"espeakng-loader {importlib.metadata.version('espeakng-loader')}"
    except importlib.metadata.PackageNotFoundError:
        loader = "espeakng-loader"
    clips = "\n".join(f"  - `{line.split()[0]}.wav`: {t} ({d})" for line, (t, d) in zip(lines, picked))
    args.readme.write_text(f"""# Bundled demo assets

What `make demo` transcribes: `paratune transcribe --model paratune/assets/demo_model paratune/assets/demo/*.wav`.
Everything here is synthetic (no recorded speech, no pretrained weights) and was made by

    pip install espeakng-loader
    python scripts/make_demo_model.py          # seed {args.seed}, {args.threads} torch thread(s)

- `demo_model/`: a tiny Paraformer trained from scratch, {n_params / 1e6:.2f} M parameters ({size / 1e6:.1f} MB),
  in FunASR's model-directory layout; it loads in paratune and in `funasr.AutoModel`. `config.yaml` has
  paraformer-large's layout with tiny sizes: SANM encoder {enc['num_blocks']} blocks x {enc['output_size']}, \
decoder {dec['num_blocks']} blocks,
  FFN {enc['linear_units']}, 4 heads, kernel 11, CIF predictor. `tokens.json`: {len(tokenizer)} tokens \
({len(chars)} characters plus
  `<blank>` `<s>` `</s>` `<unk>`). `am.mvn`: CMVN estimated on the training features.
  It knows only the {len(chars)} characters of a few hundred template sentences about everyday life
  (going places, food, weather, time) as eSpeak NG speaks them: a demo, not a speech recogniser.
- `demo/`: {len(picked)} clips (16 kHz, 16-bit) of held-out sentences the model never saw in training,
  and their transcripts in `text` (Kaldi style `key transcript`):
{clips}

Speech: eSpeak NG {tts.version.split()[0] if tts.version else ''} from the {loader} wheel (its \
libespeak-ng and data, called
through ctypes), Mandarin voice `cmn` with variants {', '.join(VARIANTS)}; random speed
(120-210 wpm), pitch and pitch range, a -65 to -45 dBFS noise floor and a random gain.
{len(train_text)} training sentences x {args.renderings} renderings ({hours:.1f} h); {len(heldout_text)} held-out \
sentences x 2 renderings.

Training: `paratune.train.step.train_step` with `make_optimizer` (AdamW, peak LR {args.lr}, linear warmup
{args.warmup} steps, cosine decay over {args.max_epochs} epochs), length-bucketed batches, SpecAugment on the LFR
features. Stopped after {epoch} epochs ({step} steps, {train_seconds / 60:.0f} min, {args.threads} torch thread(s)), \
keeping the {best[2]}.
Held-out CER {dev_cer:.2%} ({len(dev_utts)} clips); demo clips CER {demo_cer:.2%}.
""", encoding="utf-8")
    if tmp:
        tmp.cleanup()
    return 0 if demo_cer == 0 and len(picked) == 3 else 1


if __name__ == "__main__":
    sys.exit(main())
