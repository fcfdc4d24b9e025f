"""CharTokenizer against FunASR's on the real Paraformer-large vocabulary."""
import json

import numpy as np
import pytest

from paratune.data.tokenizer import CharTokenizer, TokenizerError, UnknownTokenError

from .helpers import pieces_of, read_transcripts


@pytest.fixture(scope="module")
def vocab(large_dir):
    return json.loads((large_dir / "tokens.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def seg_dict_file(tmp_path_factory, zh_real, vocab):
    """A seg_dict in FunASR's format for the English transcript (one word left out) and the
    characters of two Chinese transcripts."""
    texts = read_transcripts(zh_real)
    vocab_set = set(vocab)
    lines = []
    words = sorted(set(texts["librispeech_1995-1837-0001"].lower().split()) - {"cotton"})
    for word in words:
        pieces = pieces_of(word, vocab_set)
        assert pieces, word
        lines.append(" ".join([word] + pieces))
    for char in sorted(set(texts["funasr_sample"] + texts["nst_ID001"])):
        lines.append(f"{char} {char}")
    lines.append("")  # FunASR's files end with a newline; a blank line must be harmless
    path = tmp_path_factory.mktemp("seg") / "seg_dict"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def test_json_and_txt_token_lists_agree(large_dir, vocab):
    from_json = CharTokenizer(large_dir / "tokens.json")
    from_txt = CharTokenizer.from_file(large_dir / "tokens.txt")
    assert from_json.token_list == from_txt.token_list == vocab
    assert len(from_json) == 8404
    assert from_json.unk_id == vocab.index("<unk>")
    assert CharTokenizer(vocab).token_list == vocab


def test_encode_equals_funasr(funasr, large_dir, zh_real):
    from funasr.tokenizer.char_tokenizer import CharTokenizer as FunasrCharTokenizer

    ref = FunasrCharTokenizer(token_list=str(large_dir / "tokens.json"), unk_symbol="<unk>")
    ours = CharTokenizer(large_dir / "tokens.json")
    texts = list(read_transcripts(zh_real).values()) + ["我想问 hello", "  a  b ", "价格\t上涨", ""]
    for text in texts:
        assert ours.text2tokens(text) == ref.text2tokens(text), text
        assert ours.encode(text) == ref.encode(text), text
        ids = ours.encode(text)
        assert ours.decode(ids) == ref.decode(ids), text
    # Chinese transcripts round-trip exactly
    for key, text in read_transcripts(zh_real).items():
        if not key.startswith("librispeech"):
            assert ours.decode(ours.encode(text, strict=True)) == text


def test_seg_dict_equals_funasr(funasr, large_dir, zh_real, seg_dict_file):
    from funasr.tokenizer.char_tokenizer import CharTokenizer as FunasrCharTokenizer

    ref = FunasrCharTokenizer(token_list=str(large_dir / "tokens.json"), seg_dict=str(seg_dict_file))
    ours = CharTokenizer(large_dir / "tokens.json", seg_dict=seg_dict_file)
    texts = list(read_transcripts(zh_real).values()) + [
        "我想问 It was",  # Chinese word split into characters, English words looked up
        "IT  WAS",  # double space: an empty word -> <unk>
        "-was was- 3d",  # only the first character decides whether a word is split
        " it was ",
    ]
    for text in texts:
        assert ours.text2tokens(text) == ref.text2tokens(text), text
        assert ours.encode(text) == ref.encode(text), text
    english = read_transcripts(zh_real)["librispeech_1995-1837-0001"]
    tokens = ours.text2tokens(english)
    assert "<unk>" in tokens  # "cotton" is not in the seg_dict, so its letters are unknown
    assert tokens.count("<unk>") == len("cotton")
    assert any(t.endswith("@@") for t in tokens)


def test_seg_dict_as_mapping(large_dir):
    ours = CharTokenizer(large_dir / "tokens.json", seg_dict={"price": ["price"], "these": ["these"]})
    assert ours.text2tokens("Price THESE x") == ["price", "these", "<unk>"]


def test_strict_encode_lists_unknown_tokens(large_dir, seg_dict_file):
    tok = CharTokenizer(large_dir / "tokens.json")
    assert tok.encode("IT 你") == [tok.unk_id, tok.unk_id, tok.token2id["你"]]
    with pytest.raises(UnknownTokenError) as err:
        tok.encode("IT IS 你", strict=True)
    assert err.value.unknown == ["I", "T", "S"]
    assert "'I'" in str(err.value) and "'T'" in str(err.value)

    seg = CharTokenizer(large_dir / "tokens.json", seg_dict=seg_dict_file)
    with pytest.raises(UnknownTokenError) as err:
        seg.encode("it was cotton", strict=True)
    assert err.value.unknown == ["c", "o", "t", "n"]
    assert seg.encode("it was", strict=True) == seg.encode("it was")


def test_ids2tokens_checks_range_and_shape(large_dir):
    tok = CharTokenizer(large_dir / "tokens.json")
    assert tok.ids2tokens(np.array([4, 5])) == tok.token_list[4:6]
    with pytest.raises(IndexError, match="8404"):
        tok.ids2tokens([8404])
    with pytest.raises(IndexError):
        tok.ids2tokens([-1])
    with pytest.raises(ValueError):
        tok.ids2tokens(np.zeros((2, 2), dtype=int))


def test_space_symbol_decodes_to_space():
    tok = CharTokenizer(["<unk>", "a", "<space>", "b"])
    assert tok.decode([1, 2, 3]) == "a b"


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("missing.json", None, "not found"),
        ("bad.json", '["<unk>", "a",', "not valid JSON"),
        ("dict.json", '{"<unk>": 0}', "list of strings"),
        ("dup.json", '["<unk>", "a", "a"]', "appears twice"),
        ("dup.txt", "<unk>\na\nb\na\n", "appears twice"),
        ("no_unk.txt", "<blank>\na\nb\n", "'<unk>' is not in the token list"),
        ("latin1.txt", b"<unk>\n\xe9\n", "cannot read"),
    ],
)
def test_bad_token_files_raise_naming_file(tmp_path, name, content, reason):
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(TokenizerError, match=reason) as err:
        CharTokenizer.from_file(path)
    assert str(path) in str(err.value)


def test_duplicates_in_a_list_and_missing_seg_dict(tmp_path):
    with pytest.raises(TokenizerError, match="appears twice"):
        CharTokenizer(["<unk>", "x", "x"])
    missing = tmp_path / "seg_dict"
    with pytest.raises(TokenizerError, match="seg_dict not found") as err:
        CharTokenizer(["<unk>", "x"], seg_dict=missing)
    assert str(missing) in str(err.value)
