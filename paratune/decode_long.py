"""`paratune transcribe` on inputs longer than --max-duration: cut at pauses (silero-vad, as `prepare
--long-audio split` cuts), decoded piece by piece, the pieces' texts joined. Decoded whole, one
3-hour clip took 240 s and 3.4 GB before printing anything."""
from __future__ import annotations

from paratune.data.audio import AudioError, load_audio, resample
from paratune.data.longaudio import VAD_RATE, SplitError, split


def decode_long(asr, utterances, max_duration: float, batch_size: int, errors: list, report, log) -> dict:
    """{key: text} for `utterances` (each over `max_duration` seconds). Where the VAD finds no speech
    or a stretch without a pause, the clip is cut every `max_duration` seconds instead. An input that
    cannot be read is appended to `errors` and given to `report(utterance, error)`."""
    texts = {}
    for u in utterances:
        try:
            wave = load_audio(u.source, VAD_RATE)
        except AudioError as e:
            errors.append(e)
            report(u, e)
            continue
        duration = len(wave) / VAD_RATE
        try:
            bounds = [(s.start, s.end) for s in split(wave, max_duration)]
            how = "at pauses"
        except SplitError as e:
            n = max(1, -int(-duration // max_duration))
            bounds = [(i * max_duration, min((i + 1) * max_duration, duration)) for i in range(n)]
            how = f"every {max_duration:g} s ({e})"
        log(f"{u.key}: {duration:.1f} s is over --max-duration {max_duration:g}: decoded in {len(bounds)} pieces "
            f"cut {how}")
        pieces = [wave[int(a * VAD_RATE):int(b * VAD_RATE)] for a, b in bounds]
        pieces = [p for p in pieces if len(p) >= VAD_RATE // 10]  # under 0.1 s: no frame worth decoding
        pieces = [resample(p, VAD_RATE, asr.frontend.fs) for p in pieces]  # as load_audio would have
        asr.frontend.eval()
        out = []
        for b in range(0, len(pieces), batch_size):
            out += asr.decode_features([asr.frontend.features(p) for p in pieces[b:b + batch_size]])
        texts[u.key] = join_texts(out)
    return texts


def join_texts(texts: list[str]) -> str:
    """Pieces' texts as one: a space between two words of a spaced script, none between CJK characters."""
    out = ""
    for t in (t.strip() for t in texts):
        if out and t and out[-1].isascii() and out[-1].isalnum() and t[0].isascii() and t[0].isalnum():
            out += " "
        out += t
    return out
