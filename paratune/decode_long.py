"""`paratune transcribe` on inputs longer than --max-duration: cut at pauses (silero-vad, as `prepare
--long-audio split` cuts), decoded piece by piece, the pieces' texts joined and their timestamps moved
to where each piece starts. Decoded whole, one 3-hour clip took 240 s and 3.4 GB before printing
anything. Also the line transcribe prints per input."""
from __future__ import annotations

import json

from paratune.data.audio import AudioError, load_audio, resample
from paratune.data.longaudio import VAD_RATE, SplitError, split
from paratune.data.manifest import output_line


def decode_long(asr, utterances, max_duration: float, batch_size: int, errors: list, report, log,
                hotwords=None) -> dict:
    """{key: Transcript} for `utterances` (each over `max_duration` seconds); a piece's timestamps are
    shifted by where it starts. Where the VAD finds no speech
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
        bounds = [(a, b) for a, b in bounds if (b - a) >= 0.1]  # under 0.1 s: no frame worth decoding
        pieces = [resample(wave[int(a * VAD_RATE):int(b * VAD_RATE)], VAD_RATE, asr.frontend.fs)  # as load_audio
                  for a, b in bounds]
        asr.frontend.eval()
        out = []
        for b in range(0, len(pieces), batch_size):
            out += asr.decode_batch([asr.frontend.features(p) for p in pieces[b:b + batch_size]], hotwords)
        texts[u.key] = join_pieces(out, [a for a, _ in bounds])
    return texts


def join_pieces(pieces: list, starts: list[float]):
    """The pieces' transcripts as one, each piece's timestamps moved by its start (seconds)."""
    from paratune.modeldir import Transcript
    if pieces and pieces[0].timestamps is None:
        return Transcript(join_texts([p.text for p in pieces]))
    stamps = [[s + round(start * 1000), e + round(start * 1000)] for p, start in zip(pieces, starts)
              for s, e in p.timestamps]
    return Transcript(" ".join(p.text for p in pieces if p.text), stamps)


def join_texts(texts: list[str]) -> str:
    """Pieces' texts as one: a space between two words of a spaced script, none between CJK characters."""
    out = ""
    for t in (t.strip() for t in texts):
        if out and t and out[-1].isascii() and out[-1].isalnum() and t[0].isascii() and t[0].isalnum():
            out += " "
        out += t
    return out


def transcript_line(key: str, transcript, timestamps: bool) -> str:
    """`key<TAB>text`, and `<TAB>[[start_ms, end_ms], ...]` (FunASR's `timestamp`) with --timestamps."""
    line = output_line(key, transcript.text)
    return f"{line}\t{json.dumps(transcript.timestamps)}" if timestamps else line
