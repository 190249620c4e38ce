"""What each token spells: the bytes a token adds to the text, for every kind of tokenizer.

A grammar constrains bytes; the model picks tokens. So each token id needs the exact bytes it
adds to the text, whatever made the tokenizer:

* byte-level BPE (ours, and GPT-2-style imports): the token's string, read back through GPT-2's
  byte-to-character table, is its bytes;
* char: the character's UTF-8 bytes;
* word: the bare word (or punctuation mark, or newline). A word tokenizer keeps no spaces: its
  decoder puts them back between words, by rules that look at the neighbours. Constrained text is
  the tokens' spellings joined as they are, so `{"name":"ROMEO"}` is spellable and words inside a
  string run together;
* other imported tokenizers: each token decoded alone (`<0x0A>`-style byte-fallback tokens are
  that byte).

Special tokens (`<|endoftext|>`, `<unk>`, added control tokens) spell nothing: a grammar never
allows them, only the end of the text, which the engine maps to the request's stop tokens.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from llmcli.tokenizer import UNK, encode, kind_of

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: {the character standing for a byte: the byte}. Printable bytes
    stand for themselves; the others take the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


@dataclass(frozen=True)
class Vocabulary:
    """Token id -> the bytes it spells (b"" for special tokens), for one tokenizer."""

    spellings: tuple[bytes, ...]
    special: frozenset[int]
    kind: str

    @classmethod
    def of(cls, tokenizer: Any) -> Vocabulary:
        kind = kind_of(tokenizer)
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        added = json.loads(tokenizer.to_str()).get("added_tokens") or []
        special = {t["id"] for t in added if t.get("special")}
        unk = tokenizer.token_to_id(UNK)
        if unk is not None and kind in ("char", "word"):
            special.add(unk)
        byte_level = _decodes_byte_level(tokenizer)
        table = byte_level_table() if byte_level else {}
        spellings = []
        for ident in range(size):
            token = tokenizer.id_to_token(ident)
            if ident in special or token is None:
                spellings.append(b"")
            elif byte_level:
                spellings.append(bytes(table[c] for c in token) if all(c in table for c in token)
                                 else token.encode())
            elif kind in ("char", "word"):
                spellings.append(token.encode())
            elif (match := _BYTE_FALLBACK.fullmatch(token)) is not None:
                spellings.append(bytes([int(match.group(1), 16)]))
            else:
                spellings.append(tokenizer.decode([ident], skip_special_tokens=False).encode())
        return cls(tuple(spellings), frozenset(special), kind)

    @cached_property
    def _pieces(self) -> frozenset[bytes]:
        return frozenset(s for s in self.spellings if s)

    @cached_property
    def _longest(self) -> int:
        return max((len(s) for s in self._pieces), default=0)

    def spells(self, text: str) -> bool:
        """Whether some sequence of tokens spells `text` exactly (a segmentation into spellings)."""
        data = text.encode()
        reachable = [True] + [False] * len(data)
        for start in range(len(data)):
            if reachable[start]:
                for end in range(start + 1, min(len(data), start + self._longest) + 1):
                    if data[start:end] in self._pieces:
                        reachable[end] = True
        return reachable[-1]

    @cached_property
    def letters(self) -> frozenset[str]:
        """The characters some token contains."""
        return frozenset(c for s in self._pieces for c in s.decode("utf-8", errors="ignore"))

    def missing(self, text: str) -> list[str]:
        """Why no tokens spell `text`: the distinct characters of it that no token contains, sorted,
        else (a word vocabulary lacking a word) the text itself; [] when it is spellable."""
        if self.spells(text):
            return []
        return sorted(set(text) - self.letters) or [text]


def _decodes_byte_level(tokenizer: Any) -> bool:
    decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", []) or []]
    return "ByteLevel" in kinds


def tokenize_bytes(tokenizer: Any):
    """A function from bytes to token ids (the grammar library re-tokenizes forced text with it)."""
    return lambda data: encode(tokenizer, data.decode("utf-8", errors="ignore") if isinstance(data, bytes) else data)
