"""The run folder (`--output`): what a run checks there before it loads anything, what it may remove, what
it says when the disk fails, and how SIGINT and SIGTERM stop it at a step boundary.

- set-up, before the data, the memory fit and the model: the folder is writable; a fresh run refuses a
  folder that holds a run unless `--overwrite`; `--resume` refuses when there is nothing to resume, and
  reads and checks the checkpoint (a truncated or foreign file is a CheckpointError naming it);
- the lead then removes the temp files of interrupted saves, and with `--overwrite` the files an earlier
  run wrote (only those); on resume it drops the ledger's and memory.csv's rows of steps after the checkpoint;
- kept models are named relative to the folder (`model.ep3.pt`) and removed only by such a name, inside it.
"""
from __future__ import annotations

import errno
import os
import signal
import tempfile
import threading
from pathlib import Path

from paratune.io import remove_stale_temps
from paratune.train import checkpoint
from paratune.train.checkpoint import KEPT_NAME
from paratune.train.ledger import Ledger
from paratune.train.monitor import truncate_csv

WRITTEN = ("ledger.jsonl", "checkpoint.pt", "memory.csv", "memory.png")  # what a run writes at the top


class RunFolderError(RuntimeError):
    """The output folder cannot take this run: not writable, full, holding another run, nothing to resume."""


class Interrupted(Exception):
    """Raised at a step boundary after SIGINT or SIGTERM, once the checkpoint is saved."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{out}: is a file, not a folder: give --output a folder (new or a run's)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out, prefix=".paratune-probe."):
            pass
    except OSError as e:
        raise RunFolderError(f"{out}: cannot write there ({e.strerror or e})") from None


def open_folder(out: Path, resume: bool, overwrite: bool, valid, log) -> dict | None:
    """Set-up's checks of the folder, on every rank (they all reach the same answer); the checkpoint's
    state when resuming."""
    check_writable(out)
    ckpt, ledger = out / "checkpoint.pt", out / "ledger.jsonl"
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite: choose one (continue the run, or start it over)")
    if not resume:
        used = [p.name for p in (ledger, ckpt) if p.exists()]
        if used and not overwrite:
            raise RunFolderError(f"{out} holds a run ({', '.join(used)}): --resume to continue it, --overwrite to "
                                 "start it over, or another --output")
        return None
    if not ckpt.exists():
        hint = "; start over with --overwrite" if ledger.exists() else ""
        raise RunFolderError(f"--resume: nothing to resume in {out} (no checkpoint.pt){hint}")
    state = checkpoint.load_state(ckpt)
    if (state.get("valid") or state["best"]) and not valid:
        # without validation the epochs after the resume would never be kept, and final/ would be the
        # average of the epochs before it
        raise RunFolderError(f"--resume: the run in {out} validated on {', '.join(state.get('valid') or ['a set'])}"
                             "; give --valid again (final/ averages the best epochs by validation CER)")
    if state.get("valid") and [str(v) for v in valid] != state["valid"]:
        log(f"warning: --valid differs from the run's ({', '.join(state['valid'])}): CERs before and after the "
            "resume are compared to choose the models kept")
    kept = [[cer, name] for cer, name in state["best"] if (out / name).is_file()]
    for _, name in state["best"]:
        if not (out / name).is_file():
            log(f"warning: kept model {out / name} is missing: left out of the models averaged into final/")
    state["best"] = kept
    return state


def prepare(out: Path, state: dict | None, overwrite: bool, lead: bool, rank: int, log) -> None:
    """After the checks: stale temp files and (with --overwrite) the earlier run's files removed by the lead;
    on resume, the rows of steps after the checkpoint dropped (each rank checks the ledger, the lead writes)."""
    if lead:
        for folder in (out, out / "final"):
            for p in remove_stale_temps(folder):
                log(f"removed {p}, left by an interrupted save")
        if overwrite:
            clear(out, log)
    if state is None:
        return
    Ledger.truncate_after(out / "ledger.jsonl", state["epoch"], state["step"], log=log if lead else (lambda m: None),
                          write=lead)
    truncate_csv((out if lead else out / f"rank{rank}") / "memory.csv", state["step"])


def clear(out: Path, log) -> None:
    """--overwrite: the files an earlier run wrote into the folder removed; nothing else."""
    files = [out / n for n in WRITTEN] + [p for p in out.glob("model.ep*.pt") if KEPT_NAME.fullmatch(p.name)]
    files += list(out.glob("rank[0-9]*/memory.csv")) + list(out.glob("tensorboard/events.out.tfevents.*"))
    removed = 0
    for p in files:
        if p.is_file() or p.is_symlink():
            p.unlink()
            removed += 1
    if removed:
        log(f"--overwrite: removed {removed} files of the earlier run in {out}")


def remove_kept(out: Path, name: str, log) -> None:
    """A kept model no longer among the n best: removed only if it is one this run's folder holds by name."""
    path = out / name
    if not KEPT_NAME.fullmatch(name) or path.is_symlink() or path.resolve().parent != out.resolve():
        log(f"warning: not removing {path}: not a kept model of this run folder")
        return
    path.unlink(missing_ok=True)


def save(path: Path, obj, saved: int | None) -> None:
    """`checkpoint.save`, where a full disk or a folder made read-only while the run goes on is said, with
    what is kept (the last checkpoint, at step `saved`: atomic writes leave it whole)."""
    kept = f"the previous checkpoint (step {saved}) is intact" if saved is not None else "no checkpoint was saved yet"
    try:
        checkpoint.save(path, obj)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RunFolderError(f"{path}: no space left on device; {kept}") from None
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise RunFolderError(f"{path}: cannot write ({e.strerror}); {kept}") from None
        raise


class Interrupts:
    """SIGINT and SIGTERM set a flag the training loop reads at each step boundary, where every rank saves
    a checkpoint and stops. A second signal aborts at once (KeyboardInterrupt)."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}
        self._pid = os.getpid()

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal works only there (a run inside a thread keeps Python's handlers)
        self._pid = os.getpid()
        for s in self.SIGNALS:
            self._old[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: the terminal's Ctrl-C reaches it too; the trainer decides
        if self.signum is not None:
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum
        # os.write, not print: a handler may run in the middle of a print to the same stream
        os.write(2, f"{signal.Signals(signum).name}: saving a checkpoint at the end of this step, then stopping "
                    "(send it again to stop at once)\n".encode())

    def exit_code(self) -> int:
        return 128 + int(self.signum or signal.SIGTERM)  # 130 for SIGINT, 143 for SIGTERM
