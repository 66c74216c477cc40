"""Tokenizers: the real BERT vocabulary offline, the WordPiece builder, caption encoding, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from real_data import BERT_VOCAB
from raydistill.models.tokenizers import (
    build_wordpiece_tokenizer,
    encode_texts,
    load_tokenizer,
    read_vocab,
    tokenizer_from_vocab,
)

CAPTIONS = [
    "a red circle to the left of a blue square",
    "a small green triangle above a large red circle",
    "two blue squares next to a yellow triangle",
    "A large yellow circle below a small green square.",
]


@pytest.fixture(scope="module")
def bert_vocab_file() -> Path:
    return BERT_VOCAB


def _line_ids(vocab_file: Path, tokens: list[str]) -> list[int]:
    """Reference ids: the 0-based line number of each token in vocab.txt."""
    lines = vocab_file.read_text(encoding="utf-8").splitlines()
    return [lines.index(token) for token in tokens]


def _naive_wordpiece(word: str, vocab: dict[str, int]) -> list[str]:
    """Reference WordPiece: repeatedly take the longest vocabulary prefix of the rest of the word."""
    pieces, start = [], 0
    while start < len(word):
        for end in range(len(word), start, -1):
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in vocab:
                break
        else:
            return ["[UNK]"]
        pieces.append(piece)
        start = end
    return pieces


def test_real_bert_vocab_tokenises_like_bert_base_uncased(bert_vocab_file: Path) -> None:
    tokenizer = tokenizer_from_vocab(bert_vocab_file)
    ids = tokenizer("a dog runs.")["input_ids"]
    assert ids == [101, 1037, 3899, 3216, 1012, 102]
    assert ids == _line_ids(bert_vocab_file, ["[CLS]", "a", "dog", "runs", ".", "[SEP]"])
    assert len(tokenizer) == 30522
    # Uncased: case and accents do not change the ids.
    assert tokenizer("A DÓG Runs.")["input_ids"] == ids
    # Words outside the vocabulary split into pieces by greedy longest match, as in BERT.
    vocab = read_vocab(bert_vocab_file)
    for word in ("captioning", "skateboarders", "frisbees", "unaffable"):
        pieces = tokenizer.tokenize(word)
        assert len(pieces) > 1
        assert pieces == _naive_wordpiece(word, vocab)


def test_load_tokenizer_accepts_a_vocab_file_or_folder(bert_vocab_file: Path) -> None:
    assert load_tokenizer(bert_vocab_file)("a dog runs.")["input_ids"] == [101, 1037, 3899, 3216, 1012, 102]
    assert load_tokenizer(bert_vocab_file.parent)("a dog runs.")["input_ids"] == [101, 1037, 3899, 3216, 1012, 102]


def test_encode_texts_pads_and_truncates(bert_vocab_file: Path) -> None:
    tokenizer = tokenizer_from_vocab(bert_vocab_file)
    ids, mask = encode_texts(tokenizer, ["a dog runs.", "a dog runs a dog runs a dog"], max_len=8)
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == mask.shape == (2, 8)
    np.testing.assert_array_equal(ids[0], [101, 1037, 3899, 3216, 1012, 102, 0, 0])
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 1, 1, 0, 0])
    # Truncated to 6 pieces between [CLS] and [SEP].
    np.testing.assert_array_equal(ids[1], [101, 1037, 3899, 3216, 1037, 3899, 3216, 102])
    np.testing.assert_array_equal(mask[1], np.ones(8))


def test_encode_texts_empty_and_bad_input(bert_vocab_file: Path) -> None:
    tokenizer = tokenizer_from_vocab(bert_vocab_file)
    ids, mask = encode_texts(tokenizer, [], max_len=30)
    assert ids.shape == mask.shape == (0, 30) and ids.dtype == np.int64 and mask.dtype == np.int64
    with pytest.raises(ValueError, match=r"texts\[1\] must be a str"):
        encode_texts(tokenizer, ["fine", None], max_len=8)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="max_len"):
        encode_texts(tokenizer, ["fine"], max_len=1)
    with pytest.raises(ValueError, match="not a single str"):
        encode_texts(tokenizer, "fine", max_len=8)


def test_wordpiece_builder_special_ids_and_encoding() -> None:
    tokenizer = build_wordpiece_tokenizer(CAPTIONS, vocab_size=300)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tokenizer.convert_tokens_to_ids(specials) == [0, 1, 2, 3, 4]
    assert tokenizer.pad_token_id == 0
    assert len(tokenizer) <= 300
    encoded = tokenizer("a red circle")["input_ids"]
    assert encoded[0] == 2 and encoded[-1] == 3
    assert tokenizer.convert_ids_to_tokens(encoded[1:-1]) == ["a", "red", "circle"]
    # Lowercasing happens before lookup; a character never seen in training is unknown.
    assert tokenizer("A RED Circle")["input_ids"] == encoded
    assert tokenizer.convert_ids_to_tokens(tokenizer("a red ☂")["input_ids"]) == [
        "[CLS]", "a", "red", "[UNK]", "[SEP]",
    ]
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "a red circle"


def test_wordpiece_builder_cased_keeps_case() -> None:
    tokenizer = build_wordpiece_tokenizer(["Red red"], vocab_size=100, lowercase=False)
    ids = tokenizer("Red red")["input_ids"]
    assert len(set(ids[1:-1])) == 2
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["Red", "red"]


def test_wordpiece_vocabulary_is_the_documented_deterministic_one() -> None:
    # words: the x2, cat, dog; characters: t x3, e x2, h x2, then a c d g o once each.
    tokenizer = build_wordpiece_tokenizer(["The cat", "the dog"])
    chars = ["t", "e", "h", "a", "c", "d", "g", "o"]
    expected = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    for char in chars:
        expected += [char, "##" + char]
    expected += ["the", "cat", "dog"]
    assert tokenizer.get_vocab() == {token: index for index, token in enumerate(expected)}
    # min_frequency applies to whole words: only "the" is seen twice.
    frequent = build_wordpiece_tokenizer(["The cat", "the dog"], min_frequency=2).get_vocab()
    assert "the" in frequent and "cat" not in frequent and len(frequent) == 5 + 2 * len(chars) + 1
    # A word outside the vocabulary splits into the longest known pieces.
    assert build_wordpiece_tokenizer(["the cat sat"]).tokenize("cats") == ["cat", "##s"]


def test_wordpiece_vocab_size_limit_splits_rare_words() -> None:
    # 100 words "wordaa".."wordjj" seen once each; 13 distinct characters (w o r d and a..j, which
    # holds d again) take 26 ids after the 5 special ones, leaving 29 for whole words: alphabetically
    # the first 29, "wordaa".."wordci".
    words = [f"word{chr(97 + i)}{chr(97 + j)}" for i in range(10) for j in range(10)]
    tokenizer = build_wordpiece_tokenizer([" ".join(words)], vocab_size=60)
    assert len(tokenizer) == 60
    assert tokenizer.tokenize("wordaa") == ["wordaa"] and tokenizer.tokenize("wordci") == ["wordci"]
    assert tokenizer.tokenize("wordcj") == ["w", "##o", "##r", "##d", "##c", "##j"]
    ids, _ = encode_texts(tokenizer, words, max_len=10)
    assert (ids != 1).all()  # no [UNK]: every character was seen


def test_wordpiece_round_trips_through_save_pretrained(tmp_path: Path) -> None:
    tokenizer = build_wordpiece_tokenizer(CAPTIONS, vocab_size=300)
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    reloaded = load_tokenizer(tmp_path / "tok")
    for max_len in (4, 16):
        original = encode_texts(tokenizer, CAPTIONS, max_len)
        for a, b in zip(original, encode_texts(reloaded, CAPTIONS, max_len)):
            np.testing.assert_array_equal(a, b)
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    assert reloaded.pad_token == "[PAD]" and reloaded.cls_token == "[CLS]"


def test_wordpiece_builder_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one text"):
        build_wordpiece_tokenizer([])
    with pytest.raises(ValueError, match=r"texts\[1\] must be a str"):
        build_wordpiece_tokenizer(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="vocab_size"):
        build_wordpiece_tokenizer(["ok"], vocab_size=5)
    with pytest.raises(ValueError, match="min_frequency"):
        build_wordpiece_tokenizer(["ok"], min_frequency=0)


def test_read_vocab_and_vocab_errors(tmp_path: Path) -> None:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n", encoding="utf-8")
    assert read_vocab(vocab) == {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "hello": 4}
    assert tokenizer_from_vocab(vocab)("Hello there")["input_ids"] == [2, 4, 1, 3]
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        tokenizer_from_vocab(tmp_path / "nope.txt")
    duplicated = tmp_path / "dup.txt"
    duplicated.write_text("[PAD]\na\na\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"'a' twice \(lines 2 and 3\)"):
        read_vocab(duplicated)
    no_specials = tmp_path / "plain.txt"
    no_specials.write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"lacks the special token"):
        tokenizer_from_vocab(no_specials)


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing-dir"):
        load_tokenizer(tmp_path / "missing-dir")
    with pytest.raises(FileNotFoundError, match="missing-dir"):
        load_tokenizer(f"{tmp_path}/missing-dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a tokenizer directory"):
        load_tokenizer(tmp_path / "empty")
    # A hub-style name with no local path and no cache: a clear error, no network needed.
    with pytest.raises(ValueError, match="could not load tokenizer 'no-such-org/no-such-tokenizer'"):
        load_tokenizer("no-such-org/no-such-tokenizer", local_files_only=True)
