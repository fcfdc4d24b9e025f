"""The README's first command from a fresh clone: how long `make demo` takes and what it reports.

    python benchmarks/demo.py [--keep DIR]

Clones this repository (its committed HEAD) into a temporary folder, runs `python3 dev.py demo` there
(what `make demo` runs: a new .venv, PyTorch and paratune installed, the bundled clips transcribed,
then `paratune demo`), and prints the wall time of the whole command, the time `paratune demo`
reports for itself, and the CER before and after fine-tuning.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    args, keep = sys.argv[1:], None
    if args[:1] == ["--keep"] and len(args) > 1:
        keep = Path(args[1])
    tmp = Path(tempfile.mkdtemp())
    clone = tmp / "paratune"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    start = time.time()
    proc = subprocess.run([sys.executable, "dev.py", "demo"], cwd=clone, capture_output=True, text=True)
    wall = time.time() - start
    out = proc.stdout + proc.stderr
    m = re.search(r"CER on the 24 test clips: ([\d.]+) % before, ([\d.]+) % after fine-tuning \((\d+) s\)", out)
    if keep:
        shutil.copytree(tmp, keep, dirs_exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    if proc.returncode != 0 or not m:
        print(out[-3000:])
        print(f"make demo failed (exit status {proc.returncode})")
        return 1
    print(f"make demo from a fresh clone: {wall:.0f} s wall, venv and installation included")
    print(f"paratune demo: {m.group(3)} s; CER {m.group(1)} % before, {m.group(2)} % after fine-tuning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
