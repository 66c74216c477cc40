"""Text tokenizers for the student's text tower: load one, build one offline, and encode captions.

Three ways to get a BERT-style tokenizer, none of which needs a network:

- ``load_tokenizer(path)``: a Hugging Face tokenizer directory (``save_pretrained`` output), or a bare
  WordPiece ``vocab.txt``; a hub name is tried only when it is not a local path.
- ``tokenizer_from_vocab(vocab.txt)``: the BERT uncased/cased tokenizer from its vocabulary file.
- ``build_wordpiece_tokenizer(texts)``: learn a WordPiece vocabulary from the captions themselves
  (the embedded demo does this), deterministically; it is saved with the model and travels with it.

``encode_texts`` turns captions into fixed-length ``input_ids`` / ``attention_mask`` arrays.

Why the backend tokenizer is assembled here rather than with ``BertTokenizerFast(vocab_file=...)``:
from transformers 5 on, that keyword is silently ignored (the result has a five-token vocabulary and
maps every word to [UNK]); passing a ready ``tokenizers.Tokenizer`` as ``tokenizer_object`` behaves
the same in transformers 4 and 5.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import BertTokenizerFast  # AutoTokenizer pulls in torch: imported where it is used

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
# Order fixes the ids of a built vocabulary: [PAD]=0 matches BERT's pad_token_id default.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, CLS, SEP, MASK)

# Files that make a directory a saved Hugging Face tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model")
_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def _bert_pipeline(tokenizer: Tokenizer, lowercase: bool) -> Tokenizer:
    """Give a WordPiece ``Tokenizer`` BERT's normaliser, pre-tokeniser and decoder, in place."""
    # strip_accents=None follows `lowercase`, as the original BERT uncased/cased vocabularies expect.
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def _add_bert_post_processor(tokenizer: Tokenizer) -> Tokenizer:
    """Wrap encodings as ``[CLS] a [SEP]`` (and ``[CLS] a [SEP] b [SEP]`` for pairs), in place."""
    ids = {token: tokenizer.token_to_id(token) for token in (CLS, SEP)}
    missing = [token for token, idx in ids.items() if idx is None]
    if missing:
        raise ValueError(f"the vocabulary lacks the special token(s) {missing}")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS}:0 $A:0 {SEP}:0",
        pair=f"{CLS}:0 $A:0 {SEP}:0 $B:1 {SEP}:1",
        special_tokens=[(CLS, ids[CLS]), (SEP, ids[SEP])],
    )
    return tokenizer


def _wrap(tokenizer: Tokenizer, lowercase: bool) -> BertTokenizerFast:
    return BertTokenizerFast(
        tokenizer_object=tokenizer,
        do_lower_case=lowercase,
        unk_token=UNK,
        sep_token=SEP,
        pad_token=PAD,
        cls_token=CLS,
        mask_token=MASK,
    )


def read_vocab(vocab_txt: str | Path) -> dict[str, int]:
    """Read a WordPiece ``vocab.txt`` (one token per line; the line number is the id).

    Args:
        vocab_txt: Path of the vocabulary file.

    Returns:
        Mapping token -> id.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty or lists a token twice.
    """
    path = Path(vocab_txt)
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file not found: {path}")
    tokens = path.read_text(encoding="utf-8").split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()  # the file's final newline, not an empty token
    tokens = [token.rstrip("\r") for token in tokens]
    if not tokens:
        raise ValueError(f"vocabulary file {path} is empty")
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if token in vocab:
            raise ValueError(
                f"vocabulary file {path} lists {token!r} twice (lines {vocab[token] + 1} and {index + 1})"
            )
        vocab[token] = index
    return vocab


def tokenizer_from_vocab(vocab_txt: str | Path, lowercase: bool = True) -> BertTokenizerFast:
    """Build a BERT WordPiece tokenizer from its ``vocab.txt``, offline.

    Args:
        vocab_txt: Path of the vocabulary (e.g. BERT-base uncased's 30,522-line ``vocab.txt``).
        lowercase: Lower-case and strip accents before tokenising (True for uncased vocabularies).

    Returns:
        A fast BERT tokenizer whose encodings are ``[CLS] ... [SEP]``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the vocabulary is malformed or lacks [UNK], [CLS], [SEP] or [PAD].
    """
    vocab = read_vocab(vocab_txt)
    missing = [token for token in (UNK, CLS, SEP, PAD) if token not in vocab]
    if missing:
        raise ValueError(f"vocabulary file {vocab_txt} lacks the special token(s) {missing}")
    backend = Tokenizer(models.WordPiece(vocab, unk_token=UNK, continuing_subword_prefix="##"))
    backend = _add_bert_post_processor(_bert_pipeline(backend, lowercase))
    return _wrap(backend, lowercase)


def build_wordpiece_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 8000,
    lowercase: bool = True,
    min_frequency: int = 1,
) -> BertTokenizerFast:
    """Build a BERT-style WordPiece tokenizer whose vocabulary is learned from ``texts``.

    The texts go through BERT's normaliser and pre-tokeniser (from the ``tokenizers`` library). The
    vocabulary is, in id order: the special tokens [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4;
    every character seen, alone and as a ``##`` continuation (most frequent first), so no seen text
    maps to [UNK]; then whole words, most frequent first (ties alphabetical), until ``vocab_size``.
    A word left out is split by WordPiece's greedy longest match into known pieces (``circles`` ->
    ``circle ##s``).

    Why not ``tokenizers``' WordPiece trainer: its vocabulary and ids change from one process to the
    next (Rust's randomly seeded hash maps break ties between equally frequent merges), so the same
    config would get different token ids on every run. This builder is a pure function of the
    texts. The result saves with ``save_pretrained`` and reloads with ``load_tokenizer``.

    Args:
        texts: Training texts (captions); any iterable of strings, read once.
        vocab_size: Largest vocabulary size, special tokens included; smaller when the texts have
            fewer distinct words. Characters beyond the budget (most frequent kept) become [UNK].
        lowercase: Lower-case and strip accents before tokenising.
        min_frequency: Minimum count for a whole word to enter the vocabulary.

    Returns:
        A fast tokenizer (a ``PreTrainedTokenizerFast``; BERT flavoured) whose encodings are
        ``[CLS] ... [SEP]``.

    Raises:
        ValueError: ``texts`` is empty or holds a non-string, or a size argument is too small.
    """
    if not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be an int > {len(SPECIAL_TOKENS)}, got {vocab_size!r}")
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")

    backend = _bert_pipeline(Tokenizer(models.WordPiece(unk_token=UNK)), lowercase)
    word_counts: Counter[str] = Counter()
    n_texts = 0
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{index}] must be a str, got {type(text).__name__}")
        normalised = backend.normalizer.normalize_str(text)
        word_counts.update(word for word, _ in backend.pre_tokenizer.pre_tokenize_str(normalised))
        n_texts += 1
    if n_texts == 0:
        raise ValueError("build_wordpiece_tokenizer needs at least one text to learn a vocabulary from")

    char_counts: Counter[str] = Counter()
    for word, count in word_counts.items():
        for char in word:
            char_counts[char] += count

    def by_frequency(counts: Counter[str]) -> list[str]:
        return sorted(counts, key=lambda item: (-counts[item], item))

    vocab: dict[str, int] = {token: index for index, token in enumerate(SPECIAL_TOKENS)}

    def add(token: str) -> None:
        if token not in vocab and len(vocab) < vocab_size:
            vocab[token] = len(vocab)

    for char in by_frequency(char_counts):
        if len(vocab) + 2 > vocab_size:
            break
        add(char)
        add("##" + char)
    for word in by_frequency(word_counts):
        if word_counts[word] >= min_frequency:
            add(word)

    backend.model = models.WordPiece(vocab, unk_token=UNK, continuing_subword_prefix="##")
    return _wrap(_add_bert_post_processor(backend), lowercase)


def _is_hub_name(name: str) -> bool:
    """True for ``name`` or ``org/name`` as the Hugging Face hub spells repositories."""
    return _HUB_NAME.fullmatch(name) is not None


def load_tokenizer(path_or_name: str | Path, local_files_only: bool | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory or file, or (only if not a local path) the hub.

    Args:
        path_or_name: A directory written by ``save_pretrained`` (``tokenizer.json`` etc.), a WordPiece
            ``vocab.txt`` file or a directory holding only one (loaded as an uncased BERT
            tokenizer), or a hub name such as
            ``"bert-base-uncased"``.
        local_files_only: For hub names: only use the local Hugging Face cache. Defaults to True
            when the ``HF_HUB_OFFLINE`` environment variable is set.

    Returns:
        A transformers tokenizer.

    Raises:
        FileNotFoundError: a local path that does not exist.
        ValueError: a directory that holds no tokenizer files, or a hub name that cannot be loaded
            (offline, unknown name, no cache).
    """
    from transformers import AutoTokenizer

    path = Path(path_or_name).expanduser()
    if path.is_file():
        return tokenizer_from_vocab(path, lowercase=True)
    if path.is_dir():
        if not any((path / name).is_file() for name in _TOKENIZER_FILES):
            raise ValueError(
                f"{path} is not a tokenizer directory: it holds none of {list(_TOKENIZER_FILES)}"
            )
        if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            # A bare BERT vocabulary folder: transformers 5 cannot build a fast tokenizer from it.
            return tokenizer_from_vocab(path / "vocab.txt", lowercase=True)
        try:
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as error:
            raise ValueError(f"could not load the tokenizer in {path}: {error}") from error

    name = str(path_or_name)
    if isinstance(path_or_name, Path) or not _is_hub_name(name):
        raise FileNotFoundError(f"tokenizer path not found: {path}")
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false")
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=local_files_only)
    except (OSError, ValueError) as error:
        where = "the local Hugging Face cache" if local_files_only else "the Hugging Face hub"
        raise ValueError(
            f"could not load tokenizer {name!r} from {where} (no such local path either; offline "
            f"machines need a local tokenizer directory or vocab.txt): {error}"
        ) from error


def encode_texts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise texts to fixed-length id and mask arrays (padded to ``max_len``, truncated to it).

    Truncation keeps the closing special token (``[SEP]``): a long caption becomes its first
    ``max_len - 2`` pieces between ``[CLS]`` and ``[SEP]``.

    Args:
        tokenizer: A transformers tokenizer with a padding token.
        texts: The texts.
        max_len: Length of every row, special tokens included (30 in the DSMD reference).

    Returns:
        ``(input_ids, attention_mask)``, both int64 of shape ``[len(texts), max_len]``.

    Raises:
        ValueError: ``max_len`` below 2, a non-string text, or a tokenizer without a pad token.
    """
    if not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len must be an int >= 2 (room for [CLS] and [SEP]), got {max_len!r}")
    if isinstance(texts, str):
        raise ValueError("texts must be a sequence of strings, not a single str")
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{index}] must be a str, got {type(text).__name__}")
    if not texts:
        empty = np.zeros((0, max_len), dtype=np.int64)
        return empty, empty.copy()
    if tokenizer.pad_token is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no pad token; set tokenizer.pad_token")
    batch = tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=max_len,
        return_attention_mask=True,
        return_token_type_ids=False,
    )
    input_ids = np.asarray(batch["input_ids"], dtype=np.int64)
    attention_mask = np.asarray(batch["attention_mask"], dtype=np.int64)
    return input_ids, attention_mask
