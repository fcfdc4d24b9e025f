"""File names from data: an utterance key becomes a file name that cannot leave its folder.

A key is data, written by whoever made the manifest: `/tmp/evil`, `../../x` or `a/b` must not become a
path. Ordinary keys are kept as they are, so segment files stay readable; any key that had to change gets
a short hash of the original, so two keys that change the same way still get different names.
"""
from __future__ import annotations

import hashlib
import unicodedata
from pathlib import Path

# reserved on Windows whatever the extension; a corpus copied there must still work
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
_UNSAFE = set('/\\:*?"<>|')
MAX_BYTES = 120  # leaves room for suffixes under the usual 255-byte limit


class FileNameError(ValueError):
    """A key that cannot be given a file name in its folder (no free name left)."""


def _hash(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def _safe_char(c: str) -> str:
    return "_" if c in _UNSAFE or unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn") else c


def safe_name(key: str, max_bytes: int = MAX_BYTES) -> str:
    """A file name (no folder part) for `key`: the key itself where it is a plain name; otherwise path
    separators, control and reserved characters become "_", leading dots and spaces are dropped, the
    length is bounded, and "-<hash of the key>" is appended."""
    name = "".join(map(_safe_char, key)).lstrip(". ").rstrip(". ")
    if name == key and name and name.split(".")[0].lower() not in _RESERVED \
            and len(name.encode("utf-8")) <= max_bytes:
        return name
    name = name or "_"
    while len(name.encode("utf-8")) > max_bytes - 9:
        name = name[:-1]
    return f"{name}-{_hash(key)}"


class FileNames:
    """The file names given out in one folder, with collisions (also case-insensitive ones, which macOS
    and Windows make) resolved by a hash of the key and reported."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.owners: dict[str, str] = {}  # casefolded file name -> the key that has it

    def path(self, key: str, suffix: str = "") -> tuple[Path, str | None]:
        """(path inside the folder for `key` + `suffix`, a note when the plain name was taken)."""
        base, note = safe_name(key), None
        name = base + suffix
        if name.casefold() in self.owners:
            other = self.owners[name.casefold()]
            for n in range(100):
                name = f"{base}-{_hash(f'{key}#{n}' if n else key)}{suffix}"
                if name.casefold() not in self.owners:
                    break
            else:
                raise FileNameError(f"no free file name for key {key!r} in {self.folder}")
            note = f"file name {base + suffix!r} is already used by key {other!r}: written as {name!r}"
        self.owners[name.casefold()] = key
        path = self.folder / name
        # belt and braces: whatever the rules above miss, nothing lands outside the folder
        if path.parent != self.folder or name in (".", ".."):
            raise FileNameError(f"key {key!r} does not make a file name")
        return path, note
