"""FSDD recordings prepared by `paratune prepare` for training tests."""
from __future__ import annotations

from pathlib import Path

from paratune.cli import main


def prepare_fsdd(shared_data: Path, out: Path, speakers: tuple[str, ...], n: int, model: Path) -> Path:
    """About `n` recordings of `speakers`, spread over the digits, prepared into out/data/data.jsonl."""
    folder = out / "wavs"
    folder.mkdir(parents=True)
    files = [p for p in sorted((shared_data / "fsdd").glob("*.wav")) if p.stem.split("_")[1] in speakers]
    files = files[:: max(1, len(files) // n)][:n]
    for p in files:
        (folder / p.name).symlink_to(p)
    tsv = out / "transcripts.tsv"
    tsv.write_text("".join(f"{p.name}\t{p.stem.split('_')[0]}\n" for p in files))
    assert main(["prepare", str(folder), "--transcripts", str(tsv), "--model", str(model),
                 "--output", str(out / "data")]) == 0
    return out / "data" / "data.jsonl"
