"""Helpers shared by the data tests."""


def read_transcripts(zh_real):
    texts = {}
    for line in (zh_real / "text").read_text(encoding="utf-8").splitlines():
        key, text = line.split(maxsplit=1)
        texts[key] = text
    assert len(texts) >= 7
    return texts


def pieces_of(word, vocab):
    """A split of ``word`` into vocabulary pieces 'xx@@ ... yy', or None (small DP)."""
    best = {0: []}
    for end in range(1, len(word) + 1):
        for start in range(end):
            if start in best:
                piece = word[start:end]
                token = piece if end == len(word) else piece + "@@"
                if token in vocab and end not in best:
                    best[end] = best[start] + [token]
    return best.get(len(word))
