"""The `paratune` command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_PARTIAL, EXIT_FAILED = 0, 1, 2


def _transcribe(args) -> int:
    import torch

    from paratune.data.audio import AudioError, audio_info, load_audio
    from paratune.data.inputs import read_inputs
    from paratune.modeldir import ModelDirError, load_model

    try:
        asr = load_model(args.model, device=args.device)
    except ModelDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    if args.threads:
        torch.set_num_threads(args.threads)
    utterances, errors = read_inputs(args.inputs)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)

    # Decode in windows: sorted by duration inside a window (little padding), printed in input order.
    window = max(1, args.batch_size) * 16
    decoded = 0
    for start in range(0, len(utterances), window):
        chunk = utterances[start : start + window]
        durations = {}
        for u in chunk:
            try:
                sr, frames, _ = audio_info(u.source)
                durations[u.key] = frames / sr
            except AudioError as e:
                errors.append(e)
                print(f"error: {u.origin}: {e}", file=sys.stderr)
        ready = sorted((u for u in chunk if u.key in durations), key=lambda u: durations[u.key])
        texts = {}
        asr.frontend.eval()
        for b in range(0, len(ready), args.batch_size):
            batch, feats = [], []
            for u in ready[b : b + args.batch_size]:
                try:
                    feats.append(asr.frontend.features(load_audio(u.source, asr.frontend.fs)))
                    batch.append(u)
                except (AudioError, ValueError) as e:  # ValueError: too short for one frame
                    errors.append(e)
                    print(f"error: {u.origin}: {e}", file=sys.stderr)
            if batch:
                texts.update(zip((u.key for u in batch), asr.decode_features(feats)))
        for u in chunk:
            if u.key in texts:
                print(f"{u.key}\t{texts[u.key]}", flush=True)
                decoded += 1
    if errors:
        return EXIT_PARTIAL if decoded else EXIT_FAILED
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paratune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("transcribe", help="decode audio with a FunASR Paraformer model directory",
                       description="Prints `key<TAB>text` per utterance. INPUT: audio files (key = file stem), "
                                   "a Kaldi wav.scp, or a FunASR jsonl. Bad inputs are reported on stderr; "
                                   "the others are still decoded (exit status 1 if any failed).")
    p.add_argument("--model", required=True, type=Path, help="model directory (config.yaml, model.pt, tokens, am.mvn)")
    p.add_argument("--batch-size", type=int, default=8, help="utterances decoded together (default 8)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.set_defaults(func=_transcribe)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
