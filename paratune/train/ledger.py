"""`exp/ledger.jsonl`: one line per utterance per epoch: trained, quarantined or excluded.

Appended and flushed after every step, so a crash loses at most the step in flight; on resume the lines
of steps after the checkpoint are dropped (they will be trained again), and so is a last line a crash
tore in half. A line that cannot be read anywhere else is damage paratune did not do: an error."""
from __future__ import annotations

import json
import os
from pathlib import Path

STATUSES = ("trained", "quarantined", "excluded")


class LedgerError(RuntimeError):
    """A ledger line that is not one paratune wrote, before the last line."""


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

    def write_step(self, epoch: int, step: int, parts: list, ranked: bool) -> None:
        """One step's (trained, quarantined, [(key, reason) left out at load time]) of each rank, flushed."""
        for r, (trained, quarantined, unreadable) in enumerate(parts):
            rank = r if ranked else None
            self.write(epoch, step, trained, "trained", rank=rank)
            self.write(epoch, step, quarantined, "quarantined", "out of memory even alone", rank=rank)
            for key, reason in unreadable:
                self.write(epoch, step, [key], "excluded", reason, rank=rank)
        self.flush()

    def flush(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    @staticmethod
    def truncate_after(path: str | os.PathLike, epoch: int, step: int, log=print, write: bool = True) -> int:
        """Keep the lines up to (epoch, step): what the checkpoint being resumed had done. A torn last
        line is dropped with a warning. `write=False` only checks. Returns the number of lines kept."""
        path = Path(path)
        if not path.exists():
            return 0
        lines = path.read_text(encoding="utf-8").splitlines()
        keep = []
        for n, line in enumerate(lines, 1):
            row = _row(line)
            if row is None and n == len(lines):
                log(f"warning: {path}:{n}: dropped a torn last line (a crash in the middle of writing it)")
            elif row is None:
                raise LedgerError(f"{path}:{n}: not a ledger line ({line[:60]!r}); the file was edited or damaged")
            elif (row["epoch"], row["step"]) <= (epoch, step):
                keep.append(line)
        if write:
            from paratune.io import atomic_write_text
            atomic_write_text(path, "".join(line + "\n" for line in keep))
        return len(keep)


def _row(line: str) -> dict | None:
    """A ledger row, or None when the line is not one."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(row, dict) and isinstance(row.get("epoch"), int) and isinstance(row.get("step"), int)
    return row if ok else None
