"""`paratune prepare`: read a corpus, check every utterance, handle long clips, write a canonical jsonl.

Inputs: FunASR jsonl (`key`, `source`, `target`, lengths optional), a Kaldi `wav.scp` with its `text`
beside it (or a Kaldi data folder holding both), or a folder of audio files with a transcript TSV
(`name<TAB>text`, name = file name or stem), read by paratune.data.manifest. Each audio file is decoded
once, in parallel: a header cannot show NaN/inf samples or data cut short.

Nothing is dropped silently: every utterance left out is in the report with its reason, and so is every
one kept with a warning (an unusual speaking rate or duration, a sample rate unlike the rest).
"""
from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from paratune.data.audio import AudioError, audio_error_kind, load_audio, scan_audio
from paratune.data.lengths import lfr_frames, unknown_tokens
from paratune.data.manifest import read_manifests
from paratune.data.names import FileNameError, FileNames
from paratune.data.tokenizer import CharTokenizer
from paratune.io import atomic_write, atomic_write_text

# Iglewicz and Hoaglin's cut-off for the modified z-score 0.6745 (x - median) / MAD
ROBUST_Z = 3.5


class PrepareError(ValueError):
    """The corpus cannot be read at all (the message says which file and why)."""


@dataclass
class Item:
    key: str
    source: str
    target: str | None
    origin: str  # file:line
    sample_rate: int = 0
    seconds: float = 0.0
    tokens: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass
class Report:
    inputs: list[str]
    kept: list[Item] = field(default_factory=list)
    excluded: list[dict] = field(default_factory=list)  # {"key", "origin", "reason"}
    unknown_tokens: Counter = field(default_factory=Counter)
    split: list[dict] = field(default_factory=list)  # {"key", "segments"}

    def exclude(self, key: str, origin: str, kind: str, reason: str) -> None:
        """`kind` is one of KINDS, for counting; `reason` says it for a person."""
        assert kind in KINDS, kind
        self.excluded.append({"key": key, "origin": origin, "kind": kind, "reason": reason})


KINDS = ("bad_line", "duplicate_key", "no_transcript", "no_audio", "missing_audio", "empty_audio", "corrupt_audio",
         "non_finite_audio", "too_short", "empty_transcript", "unknown_tokens", "too_long", "split_failed",
         "empty_segment")


# -- reading the inputs ----------------------------------------------------------------------------

def read_corpus(inputs, transcripts: Path | None, report: Report) -> list[Item]:
    """The corpus through the one manifest reader; its per-line problems become exclusions."""
    records, errors = read_manifests(inputs, need_audio=True, targets="paired", transcripts=transcripts)
    for e in errors:
        if e.kind == "input":  # a whole argument unusable: say so rather than prepare a part
            raise PrepareError(str(e))
        report.exclude(e.key, e.path if e.line is None else f"{e.path}:{e.line}", e.kind, e.reason)
    return [Item(r.key, r.source, r.target, r.origin) for r in records]


# -- checks ------------------------------------------------------------------------------------------

def robust_z(x: np.ndarray) -> np.ndarray:
    med = np.median(x)
    mad = np.median(np.abs(x - med))
    if mad == 0:
        return np.zeros_like(x, dtype=float)
    return 0.6745 * (x - med) / mad


def check(items: list[Item], tokenizer: CharTokenizer, report: Report, min_seconds: float, workers: int) -> list[Item]:
    """Audio decoded in parallel (a header cannot show NaN samples or a file cut short), then transcripts;
    returns the usable items (with warnings attached)."""
    def scan(it):
        try:
            sr, n, _ = scan_audio(it.source)
            return sr, n, None
        except AudioError as e:
            return 0, 0, e
    with ThreadPoolExecutor(workers) as pool:  # libsndfile decodes without the GIL
        scanned = list(pool.map(scan, items))
    good = []
    for it, (sr, n, err) in zip(items, scanned):
        if err is not None:
            report.exclude(it.key, it.origin, audio_error_kind(err), f"audio {it.source}: {err.reason}")
            continue
        it.sample_rate, it.seconds = sr, n / sr
        if it.seconds < min_seconds:
            report.exclude(it.key, it.origin, "too_short", f"audio too short ({it.seconds * 1000:.0f} ms, under one 25 ms frame)")
            continue
        if it.target is not None:
            if not it.target.strip():
                report.exclude(it.key, it.origin, "empty_transcript", "empty transcript")
                continue
            pieces, unknown = unknown_tokens(tokenizer, it.target)
            if unknown:  # stricter than training, which refuses only transcripts of nothing but these
                report.unknown_tokens.update(unknown)
                report.exclude(it.key, it.origin, "unknown_tokens", "unknown tokens: " + " ".join(unknown))
                continue
            it.tokens = len(pieces)
        good.append(it)
    if good:
        rates = Counter(it.sample_rate for it in good)
        common = rates.most_common(1)[0][0]
        for it in good:
            if it.sample_rate != common:
                it.warnings.append(f"sample rate {it.sample_rate} Hz (most are {common} Hz; resampled when read)")
        labelled = [it for it in good if it.target is not None]
        if len(labelled) >= 10:
            tps = np.array([it.tokens / it.seconds for it in labelled])
            for it, z, r in zip(labelled, robust_z(tps), tps):
                if abs(z) > ROBUST_Z:
                    it.warnings.append(f"{r:.1f} tokens/s is {'fast' if z > 0 else 'slow'} for this corpus "
                                       f"(robust z {z:+.1f}): check the transcript matches the audio")
        if len(good) >= 10:
            for it, z in zip(good, robust_z(np.log([it.seconds for it in good]))):
                if abs(z) > ROBUST_Z:
                    it.warnings.append(f"duration {it.seconds:.1f} s is unusual for this corpus (robust z {z:+.1f})")
    return good


# -- long audio ----------------------------------------------------------------------------------------

def token_spans(tokenizer: CharTokenizer, text: str) -> list[tuple[int, int]]:
    """The character span of the transcript each token comes from (a word's pieces share its span)."""
    spans = []
    if tokenizer.seg_dict is None:
        return [(i, i + 1) for i, c in enumerate(text) if c != " "]
    pos = 0
    for word in text.strip().split(" "):
        start = text.index(word, pos) if word else pos
        pieces = tokenizer.text2tokens(word) if word else ["<unk>"]
        spans += [(start, start + len(word))] * len(pieces)
        pos = start + len(word)
    return spans


def split_long(it: Item, max_duration: float, tokenizer: CharTokenizer, align, names: FileNames,
               report: Report) -> list[Item]:
    """Cut a long clip at pauses into segment files in `names`' folder (named after the key, made safe);
    divide its transcript by the alignment."""
    import soundfile as sf

    from paratune.data.longaudio import SplitError, split

    wave = load_audio(it.source, 16000)
    tokens = tokenizer.text2tokens(it.target) if it.target is not None else None
    try:
        segments = split(wave, max_duration, tokens, align)
    except SplitError as e:
        report.exclude(it.key, it.origin, "split_failed", f"longer than {max_duration:g} s and cannot be split: {e}")
        return []
    spans = token_spans(tokenizer, it.target) if it.target is not None else []
    out, k = [], 0
    for i, seg in enumerate(segments):
        key = f"{it.key}-{i:03d}"
        text = None
        if seg.tokens is not None:
            mine = spans[k:k + len(seg.tokens)]
            k += len(seg.tokens)
            if not mine:
                report.exclude(key, it.origin, "empty_segment", f"segment {seg.start:.2f}-{seg.end:.2f} s of {it.key} has no words "
                                               "after alignment")
                continue
            text = it.target[mine[0][0]:mine[-1][1]].strip()
        try:
            path, note = names.path(key, ".wav")
        except FileNameError as e:
            report.exclude(key, it.origin, "split_failed", str(e))
            continue
        piece = wave[int(seg.start * 16000):int(seg.end * 16000)]
        atomic_write(path, lambda f: sf.write(f, piece, 16000, format="WAV", subtype="PCM_16"))
        seg_item = Item(key, str(path), text, it.origin, 16000, len(piece) / 16000,
                        len(tokenizer.text2tokens(text)) if text is not None else 0,
                        [f"segment {i} of {it.key} ({seg.start:.2f}-{seg.end:.2f} s)", *([note] if note else [])])
        out.append(seg_item)
    report.split.append({"key": it.key, "origin": it.origin, "segments": [s.key for s in out]})
    return out


# -- outputs -------------------------------------------------------------------------------------------

def canonical(it: Item, lfr_n: int) -> dict:
    frames10 = int(it.seconds * 100)
    row = {"key": it.key, "source": str(Path(it.source).resolve()), "source_len": frames10,
           "duration": round(it.seconds, 3), "sample_rate": it.sample_rate,
           "frames": int(lfr_frames(frames10, lfr_n))}
    if it.target is not None:
        row.update(target=it.target, target_len=it.tokens, tokens=it.tokens)
    return row


def report_dict(report: Report) -> dict:
    kept = report.kept
    seconds = np.array([it.seconds for it in kept]) if kept else np.zeros(0)
    reasons = Counter(e["kind"] for e in report.excluded)
    return {
        "inputs": report.inputs,
        "counts": {"kept": len(kept), "excluded": len(report.excluded),
                   "with_warnings": sum(bool(it.warnings) for it in kept), "split": len(report.split),
                   "unlabelled": sum(it.target is None for it in kept)},
        "hours": float(seconds.sum() / 3600),
        "duration_s": {"min": float(seconds.min()), "median": float(np.median(seconds)), "max": float(seconds.max())}
        if len(seconds) else {},
        "sample_rates": {str(k): v for k, v in sorted(Counter(it.sample_rate for it in kept).items())},
        "excluded_by_reason": dict(reasons.most_common()),
        "unknown_tokens": dict(report.unknown_tokens.most_common()),
        "excluded": report.excluded,
        "warnings": [{"key": it.key, "origin": it.origin, "warnings": it.warnings} for it in kept if it.warnings],
        "split": report.split,
    }


def summary_text(d: dict) -> str:
    c = d["counts"]
    lines = [f"kept {c['kept']} utterances ({d['hours']:.2f} h), excluded {c['excluded']}, "
             f"{c['with_warnings']} kept with warnings, {c['split']} long clips split"]
    if d["duration_s"]:
        lines.append(f"duration: min {d['duration_s']['min']:.2f} s, median {d['duration_s']['median']:.2f} s, "
                     f"max {d['duration_s']['max']:.2f} s; sample rates: "
                     + ", ".join(f"{k} Hz x {v}" for k, v in d["sample_rates"].items()))
    for reason, n in d["excluded_by_reason"].items():
        lines.append(f"  excluded, {reason.replace('_', ' ')}: {n}")
    if d["unknown_tokens"]:
        lines.append("unknown tokens: " + " ".join(list(d["unknown_tokens"])[:30]))
    for e in d["excluded"][:20]:
        lines.append(f"  {e['origin']}: {e['key'] or '(no key)'}: {e['reason']}")
    if len(d["excluded"]) > 20:
        lines.append(f"  ... {len(d['excluded']) - 20} more in report.json")
    for w in d["warnings"][:10]:
        lines.append(f"  warning {w['origin']}: {w['key']}: {'; '.join(w['warnings'])}")
    return "\n".join(lines)


def write_png(report: Report, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = report.kept
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    seconds = np.array([it.seconds for it in kept]) if kept else np.zeros(1)
    a.hist(seconds, bins=60, color="tab:blue")
    a.set_xlabel("duration (s)")
    a.set_ylabel("utterances")
    a.set_yscale("log")
    labelled = [it for it in kept if it.target is not None]
    if labelled:
        tps = np.array([it.tokens / it.seconds for it in labelled])
        b.hist(tps, bins=60, color="tab:green")
        med, mad = np.median(tps), np.median(np.abs(tps - np.median(tps)))
        for sign in (-1, 1):
            if mad:
                b.axvline(med + sign * ROBUST_Z * mad / 0.6745, color="red", ls="--", lw=0.8)
    b.set_xlabel("tokens per second (dashed: outlier limits)")
    fig.suptitle(f"{len(kept)} utterances kept, {len(report.excluded)} excluded")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def prepare(inputs, out_dir, tokenizer: CharTokenizer, lfr_n: int, transcripts=None, max_duration: float | None = None,
            long_audio: str = "keep", align=None, workers: int = 16) -> dict:
    out_dir = Path(out_dir)
    report = Report([str(p) for p in inputs])
    items = read_corpus(inputs, Path(transcripts) if transcripts else None, report)
    good = check(items, tokenizer, report, min_seconds=0.025, workers=workers)
    if max_duration and long_audio == "split" and align is None and any(
            it.target is not None and it.seconds > max_duration for it in good):
        raise PrepareError("--long-audio split needs --align-model DIR for labelled audio: without one the "
                           "transcript of each piece is unknown (use --long-audio drop or keep instead)")
    names = FileNames(out_dir / "segments")
    for it in good:
        if max_duration and it.seconds > max_duration:
            if long_audio == "drop":
                report.exclude(it.key, it.origin, "too_long", f"longer than {max_duration:g} s ({it.seconds:.1f} s): dropped "
                                                  "(--long-audio drop)")
                continue
            if long_audio == "split":
                report.kept += split_long(it, max_duration, tokenizer, align, names, report)
                continue
            it.warnings.append(f"longer than {max_duration:g} s ({it.seconds:.1f} s): kept (--long-audio keep)")
        report.kept.append(it)
    rows = "".join(json.dumps(canonical(it, lfr_n), ensure_ascii=False) + "\n" for it in report.kept)
    atomic_write_text(out_dir / "data.jsonl", rows)
    d = report_dict(report)
    atomic_write_text(out_dir / "report.json", json.dumps(d, ensure_ascii=False, indent=1))
    atomic_write_text(out_dir / "report.txt", summary_text(d) + "\n")
    write_png(report, out_dir / "report.png")
    return d

