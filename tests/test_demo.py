"""`paratune demo`: the README's first command fine-tunes the bundled model and lowers its CER."""
from __future__ import annotations

import json
import re

import pytest

from paratune.cli import main


@pytest.mark.slow
def test_demo_fine_tunes_the_bundled_model(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out)]) == 0
    err = capsys.readouterr().err
    before, after = (float(x) for x in re.search(r"CER on the 24 test clips: ([\d.]+) % before, ([\d.]+) % after",
                                                 err).groups())
    assert after < before
    assert "plan: 80 utterances" in err  # the plan is shown
    for name in ("final/model.pt", "final/config.yaml", "memory.png", "memory.csv", "ledger.jsonl"):
        assert (out / name).exists(), name
    trained = [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]
    assert len(trained) == 80 * 12 and {r["status"] for r in trained} == {"trained"}
