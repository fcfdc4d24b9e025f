"""Atomic file writes: a reader never sees a half-written file. A crash can leave the temp file beside
it; `remove_stale_temps` clears those at the next start."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Callable

import torch


TEMP_SUFFIX = ".tmp"
# what mkstemp makes of atomic_write's prefix and suffix: ".NAME." + 8 random characters + ".tmp"
TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[object], None], mode: str = "wb") -> Path:
    """Call `write(fileobj)` on a temp file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """The temp files an interrupted atomic_write left in `folder` (not below it), removed: only
    regular files named as atomic_write names them. Call it when nothing writes there."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for p in sorted(folder.iterdir()):
        if TEMP_NAME.fullmatch(p.name) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
