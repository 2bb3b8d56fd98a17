"""Text <-> token ids through a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library).

Special tokens (e.g. Llama's BOS) come from the file's own post-processor, so encoding matches
what the model was trained with.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import tokenizers

__all__ = ["Tokenizer", "TokenizerError", "byte_tokenizer"]


class TokenizerError(ValueError):
    """A tokenizer file cannot be read (the message names it)."""


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer``: ``encode`` to ids, ``decode`` to text."""

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self._tok = tokenizer

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "Tokenizer":
        """Read ``folder/tokenizer.json``.

        Raises:
          FileNotFoundError: there is none.
          TokenizerError: it is not a tokenizer file (truncated, not JSON, unknown model type).
        """
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no tokenizer.json in {os.fspath(folder)!r}; pass a Tokenizer (or token ids) instead"
            )
        try:
            return cls(tokenizers.Tokenizer.from_file(path))
        except Exception as e:  # tokenizers raises a bare Exception for unparsable files
            raise TokenizerError(f"{path} is not a valid tokenizer.json: {e}") from e

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def save(self, folder: str | os.PathLike) -> None:
        os.makedirs(folder, exist_ok=True)
        self._tok.save(os.path.join(folder, "tokenizer.json"))


def byte_tokenizer() -> Tokenizer:
    """A byte-level tokenizer built offline: ids 0-255 are bytes, then ``<s>``, ``</s>``, ``<pad>``.

    Any text encodes losslessly; it is the demo model's tokenizer and suits small experiments.
    """
    byte_chars = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps byte b to a printable character; order the vocabulary by byte value.
    mapping = _bytes_to_unicode()
    vocab = {mapping[b]: b for b in range(256)}
    assert set(vocab) == set(byte_chars)
    specials = ["<s>", "</s>", "<pad>"]
    for i, token in enumerate(specials):
        vocab[token] = 256 + i
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 256)]
    )
    return Tokenizer(tok)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what ByteLevel uses)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars
