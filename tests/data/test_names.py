"""safe_name and FileNames: keys from a manifest become file names inside one folder."""
import pytest

from paratune.data.names import MAX_BYTES, FileNames, safe_name


@pytest.mark.parametrize("key", ["utt001", "spk1-utt_02.3", "我的朋友", "A B"])
def test_ordinary_keys_stay_as_they_are(key):
    assert safe_name(key) == key


@pytest.mark.parametrize("key", ["/tmp/evil", "../../evil", "a/b", "a\\b", "..", ".", ".hidden", "", "a\x00b",
                                 "a\nb", "con", "NUL.txt", "x" * 300, "字" * 100, "c:evil", "a*?<>|\""])
def test_unsafe_keys_become_one_plain_name(key):
    name = safe_name(key)
    assert "/" not in name and "\\" not in name and not name.startswith(".") and name not in ("", "..")
    assert all(c.isprintable() for c in name)
    assert len(name.encode("utf-8")) <= MAX_BYTES
    assert name != key


def test_changed_keys_that_look_alike_get_different_names():
    assert safe_name("a/b") != safe_name("a\\b") != safe_name("a_b")
    assert safe_name("x" * 300) != safe_name("x" * 301)


def test_file_names_stay_in_the_folder_and_collisions_are_reported(tmp_path):
    names = FileNames(tmp_path / "seg")
    paths = {}
    for key in ["/tmp/evil", "../../evil", "a/b", "A", "a"]:
        path, note = names.path(key, ".wav")
        assert path.parent == tmp_path / "seg"
        paths[key] = (path, note)
    # "A" and "a" are one file on macOS and Windows: the second gets another name, and says so
    assert paths["A"][1] is None and paths["a"][1] is not None and "'A'" in paths["a"][1]
    assert len({p.name.casefold() for p, _ in paths.values()}) == 5
