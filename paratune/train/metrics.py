"""Character and word error rates (edit distance over characters or space-separated words)."""
from __future__ import annotations


def edit_distance(a, b) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def error_rate(hyps: list[str], refs: list[str], unit: str = "char") -> float:
    """Errors / reference units; `unit` "char" ignores spaces, "word" splits on them."""
    split = (lambda s: s.split()) if unit == "word" else (lambda s: [c for c in s if not c.isspace()])
    errors = sum(edit_distance(split(h), split(r)) for h, r in zip(hyps, refs))
    return errors / max(1, sum(len(split(r)) for r in refs))
