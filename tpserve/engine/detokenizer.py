"""Text of a growing completion, decoded a few tokens at a time.

Re-decoding the whole completion for every new token costs O(n) per token, O(n^2) per
request. Here each token decodes only a short window: the tokens since the previous piece of
text was emitted (for context: a multi-byte character can span tokens, and some tokenizers
change a token's text by what precedes it) and the new one, as vLLM's incremental
detokenizer does. The result equals ``tokenizer.decode(ids, skip_special_tokens=True)``.
"""

from __future__ import annotations

from pathlib import Path

# Files that mean "this directory has a tokenizer"; a model without any loads with none.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model",
                   "tokenizer.tiktoken", "vocab.txt")


def has_tokenizer_files(path: Path) -> bool:
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def max_token_chars(tokenizer) -> int:
    """The most characters any one token stands for (at least 1).

    A token's vocabulary string has at least as many characters as its decoded text (byte-level
    BPE spells one byte per character, SentencePiece's '▁' is one space, byte fallback tokens
    like '<0x0A>' are longer than their byte), so a text of more than ``n * max_token_chars``
    characters needs more than ``n`` tokens: a prompt can be refused as too long without
    tokenizing it. (A normalizer that deletes characters would break this bound; the supported
    model families' tokenizers have none.)
    """
    vocab = tokenizer.get_vocab()
    return max(1, max((len(t) for t in vocab), default=1))


class IncrementalDetokenizer:
    """``add(token)`` returns the new text that token completes ('' while a character is still
    partial); ``text`` is everything emitted so far, ``text + tail`` the whole decode."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self.tail = ""  # decoded text held back: it ends in an incomplete character
        self._prefix = 0  # window start: the tokens of the previous emitted piece, kept for context
        self._read = 0  # tokens before this are in ``text``

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix:self._read])
        window = self._decode(self.ids[self._prefix:])
        if len(window) > len(before) and not window.endswith("\ufffd"):
            new = window[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += new
            self.tail = ""
            return new
        self.tail = window[len(before):]
        return ""
