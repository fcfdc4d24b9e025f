"""`exp/ledger.jsonl`: one line per utterance per epoch: trained, quarantined or excluded.

Appended and flushed after every step, so a crash loses at most the step in flight; on resume the lines
of steps after the checkpoint are dropped (they will be trained again)."""
from __future__ import annotations

import json
import os
from pathlib import Path

STATUSES = ("trained", "quarantined", "excluded")


class Ledger:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, epoch: int, step: int, keys, status: str, reason: str | None = None,
              rank: int | None = None) -> None:
        assert status in STATUSES, status
        for key in keys:
            row = {"epoch": epoch, "key": key, "step": step, "status": status}
            if rank is not None:
                row["rank"] = rank
            if reason:
                row["reason"] = reason
            self._f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    @staticmethod
    def truncate_after(path: str | os.PathLike, epoch: int, step: int) -> None:
        """Keep the lines up to (epoch, step): what the checkpoint being resumed had done."""
        path = Path(path)
        if not path.exists():
            return
        keep = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and (json.loads(line)["epoch"], json.loads(line)["step"]) <= (epoch, step)]
        from paratune.io import atomic_write_text
        atomic_write_text(path, "".join(line + "\n" for line in keep))
