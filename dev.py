#!/usr/bin/env python3
"""Set-up and tasks that need nothing but Python >= 3.10 with pip.

    python3 dev.py demo           # venv + paratune; transcribe the bundled clips, then `paratune demo` (fine-tuning)
    python3 dev.py test [ARGS]    # venv + paratune + test extras + funasr reference, then pytest [ARGS],
                                  # a pytest-xdist worker per core unless ARGS say `-n`

Each task creates `.venv/` and installs what it needs the first time (and again when pyproject.toml
changes). Without an NVIDIA driver, PyTorch is pinned to 2.13.0 before paratune's own range is
resolved, so pip takes the CPU wheel where one is offered (set PARATUNE_TORCH_INDEX to an index URL,
e.g. PyTorch's CPU index, to choose where it comes from); with a driver, pip resolves a CUDA build.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("PARATUNE_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
CPU_TORCH = "torch==2.13.0"


def run(*cmd, **kw) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run(list(map(str, cmd)), check=True, **kw)


def ensure(extras: str) -> None:
    if not PY.exists():
        venv.create(VENV, with_pip=True)
        run(PY, "-m", "pip", "install", "-q", "--upgrade", "pip")
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    stamp = VENV / f".installed-{extras or 'base'}-{digest}"
    if stamp.exists():
        return
    has_torch = subprocess.run([PY, "-c", "import torch"], capture_output=True).returncode == 0
    if not has_torch and shutil.which("nvidia-smi") is None:
        index = os.environ.get("PARATUNE_TORCH_INDEX")
        run(PY, "-m", "pip", "install", "-q", CPU_TORCH, *(["--index-url", index] if index else []))
    target = f".[{extras}]" if extras else "."
    run(PY, "-m", "pip", "install", "-q", "-e", target, cwd=ROOT)
    stamp.touch()


def demo(args: list[str]) -> int:
    ensure("")
    clips = sorted(str(p) for p in (ROOT / "paratune/assets/demo").glob("*.wav"))
    model = ROOT / "paratune/assets/demo_model"
    print(f"\nTranscribing {len(clips)} bundled clip(s) with the bundled model {model.relative_to(ROOT)}:\n", flush=True)
    code = subprocess.run([BIN / "paratune", "transcribe", "--model", model, *clips]).returncode
    text = ROOT / "paratune/assets/demo/text"
    if text.exists():
        print(f"\nReference transcripts ({text.relative_to(ROOT)}):\n{text.read_text(encoding='utf-8')}")
    if code != 0:
        return code
    print("\nFine-tuning it on a condition it never heard (paratune demo):\n", flush=True)
    return subprocess.run([BIN / "paratune", "demo", *args]).returncode


def test(args: list[str]) -> int:
    ensure("test,reference")
    return subprocess.run([PY, "-m", "pytest", *workers(args), *args], cwd=ROOT).returncode


def workers(args: list[str]) -> list[str]:
    """pytest-xdist options: a worker per core (at most 8, each holds torch and a model or two), each test
    file kept whole on one worker so that its module fixtures are built once. ARGS that choose (`-n 0`,
    `-p no:xdist`) win. tests/conftest.py gives each worker one compute thread."""
    if any(a.startswith(("-n", "--numprocesses", "--dist")) or a in ("no:xdist", "-pno:xdist") for a in args):
        return []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n = min(cores, 8)
    return ["-n", str(n), "--dist", "loadfile"] if n > 1 else []


TASKS = {"demo": demo, "test": test}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in TASKS:
        sys.exit(__doc__)
    sys.exit(TASKS[sys.argv[1]](sys.argv[2:]))
