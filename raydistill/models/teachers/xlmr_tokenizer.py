"""BEiT-3's text tokenizer: the XLM-R SentencePiece model (``beit3.spm``) with fairseq's id layout.

The official BEiT-3 code tokenises with transformers' (slow, SentencePiece-backed)
``XLMRobertaTokenizer("beit3.spm")``: ``tokenize`` then ``convert_tokens_to_ids``, and builds the
text segment ``<s> tokens </s>`` padded with ``<pad>`` to ``num_max_bpe_tokens`` (64), with a padding
mask that is 1 at padding (unilm ``beit3/datasets.py``, ``_get_text_segment``). That tokenizer maps
ids the fairseq way:

- ``<s>`` = 0, ``<pad>`` = 1, ``</s>`` = 2, ``<unk>`` = 3;
- every other SentencePiece piece gets its SentencePiece id + 1 (the "fairseq offset": SentencePiece
  itself has ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2);
- a piece SentencePiece does not know (its id 0) becomes ``<unk>`` = 3;
- ``<mask>`` = number of SentencePiece pieces + 1.

Special-token strings written in the text itself (``"<s>"``, ``"<mask>"``, ...) are kept whole and
mapped to their ids, and ``<mask>`` swallows the whitespace before it, as the transformers tokenizer
(4.34 and later) does. From transformers 5 on, ``XLMRobertaTokenizer`` is a different, converted
``tokenizers`` implementation, so this module reproduces the original with ``sentencepiece`` directly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
FAIRSEQ_OFFSET = 1
_SPECIAL_SPLIT = re.compile(r"(<s>|</s>|<unk>|<pad>|<mask>)")


class XLMRTokenizer:
    """XLM-R SentencePiece tokenizer producing the ids the official BEiT-3 code produces.

    Args:
        spm_path: The SentencePiece model file (``beit3.spm``).

    Raises:
        ValueError: the file is missing or is not a SentencePiece model (the message names it).
    """

    def __init__(self, spm_path: str | os.PathLike[str]) -> None:
        import sentencepiece

        self.path = Path(spm_path)
        if not self.path.is_file():
            raise ValueError(f"SentencePiece model {self.path} does not exist")
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except (OSError, RuntimeError) as error:
            raise ValueError(f"{self.path} is not a SentencePiece model: {error}") from error
        self.mask_id = len(self._sp) + FAIRSEQ_OFFSET
        self._special = {"<s>": BOS_ID, "<pad>": PAD_ID, "</s>": EOS_ID, "<unk>": UNK_ID, "<mask>": self.mask_id}

    @property
    def vocab_size(self) -> int:
        """Ids in use: SentencePiece pieces + the fairseq offset + ``<mask>``."""
        return len(self._sp) + FAIRSEQ_OFFSET + 1

    def token_ids(self, text: str) -> list[int]:
        """Ids of ``text`` without ``<s>`` / ``</s>`` (``tokenize`` + ``convert_tokens_to_ids``)."""
        chunks = _SPECIAL_SPLIT.split(text)
        ids: list[int] = []
        for index, chunk in enumerate(chunks):
            if chunk in self._special:
                ids.append(self._special[chunk])
                continue
            if index + 1 < len(chunks) and chunks[index + 1] == "<mask>":
                chunk = chunk.rstrip()  # <mask> is an lstrip token: it takes the space before it
            if chunk:
                ids.extend(piece + FAIRSEQ_OFFSET if piece else UNK_ID for piece in self._sp.encode(chunk))
        return ids

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and padding mask of ``<s> tokens </s>`` segments padded to ``max_len``.

        Texts longer than ``max_len - 2`` tokens are cut, as in the official code.

        Args:
            texts: Captions.
            max_len: Segment length, special tokens included (at least 3).

        Returns:
            ``(ids, padding_mask)``, int64 arrays ``[N, max_len]``; the mask is 1 at padding.

        Raises:
            ValueError: ``max_len`` below 3, or a text with no token at all (the official code refuses
                those too); the message gives the text's index.
        """
        if max_len < 3:
            raise ValueError(f"max_len must be at least 3 (<s>, one token, </s>), got {max_len}")
        ids = np.full((len(texts), max_len), PAD_ID, dtype=np.int64)
        padding = np.ones((len(texts), max_len), dtype=np.int64)
        for row, text in enumerate(texts):
            tokens = self.token_ids(text)
            if not tokens:
                raise ValueError(f"text {row} ({text!r}) has no token; BEiT-3 needs at least one")
            segment = [BOS_ID, *tokens[: max_len - 2], EOS_ID]
            ids[row, : len(segment)] = segment
            padding[row, : len(segment)] = 0
        return ids, padding
