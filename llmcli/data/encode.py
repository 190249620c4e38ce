"""Texts -> token ids, each document followed by the end-of-text id.

`_document_encoder` encodes long documents in pieces, and byte-level BPE through a cache of the
ids of each distinct chunk (`_ChunkEncoder`): both give exactly the ids of encoding each whole
text, only faster and in bounded memory.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# Long documents are encoded in pieces of about PIECE_CHARS characters, about GROUP_CHARS at a time
# (CHUNK_GROUP_CHARS through the chunk cache below): memory stays bounded (an Encoding costs ~100
# bytes per token) whatever a line's length, and one huge document still uses every core. A piece
# ends where the tokenizer never joins tokens across, so the ids are exactly those of the whole
# text: anywhere for our char tokenizer; for byte-level bpe where a non-space character meets one
# of " \t\n\r" (see _CHUNK below), or, in a stretch without such whitespace, at the end of a
# pre-token (GPT-2's pattern has no look-behind, and its look-ahead only ends whitespace runs).
# Other tokenizers (tokenizer.path) get whole documents.
PIECE_CHARS = 1 << 14
GROUP_CHARS = 1 << 18
CHUNK_GROUP_CHARS = 1 << 22
_SPACE_CUT = re.compile(r"(?<=\S)[ \t\n\r]")


def _document_encoder(tok: Tokenizer, eot: int) -> Callable[[list[str]], list[np.ndarray]]:
    """texts -> the ids of each, followed by `eot`."""
    spec = json.loads(tok.to_str())
    rule = _cut_rule(spec)
    added = [t["content"] for t in spec.get("added_tokens") or []]
    if _by_chunks(spec):
        encode, group_chars = _ChunkEncoder(tok, eot), CHUNK_GROUP_CHARS
    else:
        encode, group_chars = _plain_encoder(tok), GROUP_CHARS
    end = np.array([eot], dtype=np.uint32)

    def tokenize(texts: list[str]) -> list[np.ndarray]:
        pieces = [(i, piece) for i, text in enumerate(texts)
                  for piece in _pieces(text, rule, tok.pre_tokenizer, added)]
        parts: list[list[np.ndarray]] = [[] for _ in texts]
        for group in _groups(pieces, group_chars):
            for (i, _), ids in zip(group, encode([p for _, p in group]), strict=True):
                parts[i].append(ids)
        return [np.concatenate([*p, end]) for p in parts]

    return tokenize


def _groups(pieces: list[tuple[int, str]], chars: int) -> Iterator[list[tuple[int, str]]]:
    """Runs of consecutive pieces, each closed once it holds `chars` characters."""
    start = size = 0
    for stop, (_, piece) in enumerate(pieces, 1):
        size += len(piece)
        if size >= chars or stop == len(pieces):
            yield pieces[start:stop]
            start, size = stop, 0


def _plain_encoder(tok: Tokenizer) -> Callable[[list[str]], list[np.ndarray]]:
    encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return lambda texts: [np.asarray(e.ids, dtype=np.uint32)
                          for e in encode_batch(texts, add_special_tokens=False)]


def _cut_rule(spec: dict[str, Any]) -> str | None:
    """Where texts may be cut for this tokenizer: "any" position, at "space" boundaries, or None."""
    pre = spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") is not None:
        return None
    if pre.get("type") == "ByteLevel":
        return "space" if not pre.get("add_prefix_space") and pre.get("use_regex", True) else None
    return "any" if pre.get("type") == "Split" and pre.get("pattern") == {"Regex": r"[\s\S]"} else None


def _pieces(text: str, rule: str | None, pre_tokenizer: Any = None, added: list[str] = ()) -> list[str]:
    """`text` in pieces of about PIECE_CHARS characters, cut where `rule` allows (see PIECE_CHARS)
    and never inside an added token (`added`: their texts, e.g. <|endoftext|>)."""
    if rule is None or len(text) <= PIECE_CHARS:
        return [text]
    out, start = [], 0
    while len(text) - start > PIECE_CHARS:
        cut = _cut_after(text, start + PIECE_CHARS, rule, pre_tokenizer)
        if cut is None:
            break
        cut = _outside_added(text, cut, added)
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def _outside_added(text: str, cut: int, added: list[str]) -> int:
    """`cut`, or the end of an added token's occurrence that it would split."""
    for token in added:
        if len(token) > 1:
            found = text.find(token, max(0, cut - len(token) + 1), cut + len(token) - 1)
            if found != -1 and found < cut < found + len(token):
                return _outside_added(text, found + len(token), added)
    return cut


def _cut_after(text: str, pos: int, rule: str, pre_tokenizer: Any) -> int | None:
    if rule == "any":
        return pos
    match = _SPACE_CUT.search(text, pos, pos + PIECE_CHARS)
    if match is not None:
        return match.start()
    window = pre_tokenizer.pre_tokenize_str(text[pos:pos + PIECE_CHARS])
    if len(window) < 2:
        return None
    return pos + window[0][1][1]


# Byte-level BPE gives a text exactly the ids of its chunks laid end to end when every cut falls
# where a non-space character is followed by one of " \t\n\r": a GPT-2 pre-token holds at most
# one space, in front, and otherwise never runs from a non-space into whitespace; the pattern has
# no look-behind, and its one look-ahead only ends runs of whitespace. (Python's \S is safe here:
# its \s is a superset of the tokenizer's.) A chunk is thus leading whitespace and a run of
# non-space characters (first alternative), continued while the whitespace after the run starts
# with a character other than " \t\n\r" (second); whitespace at the very end is a chunk itself.
# Words repeat (Shakespeare: ~75k distinct chunks in ~900k), so each distinct chunk is encoded
# once per process and its ids are looked up after.
_CHUNK = re.compile(r"\s*\S+(?![^ \t\n\r])|\s*\S+(?:[^\S \t\n\r]\s*\S*)+|\s+")
CACHED_CHUNKS = 1 << 20  # about 150 MB; the cache starts over past this
JOINED_CHUNKS = 1024  # new chunks per string handed to the tokenizer


def _by_chunks(spec: dict[str, Any]) -> bool:
    """Whether encoding by chunks (see _CHUNK) gives exactly the ids of the whole text.

    Byte-level BPE without dropout, truncation or padding, and added tokens that never span a cut
    (no whitespace) nor look past their own ends (lstrip, rstrip, single_word).
    """
    model = spec.get("model") or {}
    added = spec.get("added_tokens") or []
    return (_cut_rule(spec) == "space"
            and model.get("type") == "BPE" and model.get("dropout") is None
            and spec.get("truncation") is None and spec.get("padding") is None
            and not any(any(ch.isspace() for ch in t["content"]) or t.get("lstrip") or t.get("rstrip")
                        or t.get("single_word") for t in added))


class _ChunkEncoder:
    """Byte-level BPE through a cache of chunk ids (see _CHUNK)."""

    def __init__(self, tok: Tokenizer, eot: int):
        self.tok, self.eot = tok, eot
        # New chunks go to the tokenizer JOINED_CHUNKS to a string, separated by the end-of-text
        # token: added tokens split a text before anything else sees it, so each chunk is still
        # encoded on its own. Only when that is the one added token and no end of its text starts
        # it again (true of <|endoftext|>): then no match can reach across a separator, and a chunk
        # that holds the token's text shows as one id too many.
        text = tok.id_to_token(eot)
        overlaps = any(text.startswith(text[i:]) for i in range(1, len(text)))
        only_eot = len(tok.get_added_tokens_decoder()) == 1
        self.separator = text if only_eot and not overlaps else None
        self._clear()

    def _clear(self) -> None:
        self.number: defaultdict[str, int] = defaultdict(itertools.count().__next__)  # chunk -> 0, 1, ...
        self.ids = np.zeros(0, dtype=np.uint32)  # every numbered chunk's ids, in number order
        self.starts = np.zeros(0, dtype=np.intp)  # where each chunk's ids start in self.ids
        self.sizes = np.zeros(0, dtype=np.intp)

    def __getstate__(self) -> dict[str, Any]:
        return {"tok": self.tok, "eot": self.eot, "separator": self.separator}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._clear()  # worker processes start their own cache

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        if len(self.number) > CACHED_CHUNKS:
            self._clear()
        known = len(self.number)
        chunks_of = [_CHUNK.findall(text) for text in texts]
        chunks = list(itertools.chain.from_iterable(chunks_of))
        # A chunk looked up for the first time gets the next number: the new ones are the last.
        which = np.fromiter(map(self.number.__getitem__, chunks), np.intp, len(chunks))
        if new := list(itertools.islice(reversed(self.number), len(self.number) - known))[::-1]:
            ids, sizes = self._encode(new)
            self.starts = np.concatenate((self.starts, len(self.ids) + np.cumsum(sizes) - sizes))
            self.sizes = np.concatenate((self.sizes, sizes))
            self.ids = np.concatenate((self.ids, ids))
        # Occurrence k's ids are self.ids[start[k]:start[k] + n[k]]; they go to out[end[k] - n[k]:end[k]].
        n, start = self.sizes[which], self.starts[which]
        end = np.cumsum(n)
        out = self.ids[np.repeat(start - end + n, n) + np.arange(end[-1] if len(end) else 0)]
        text_end = np.concatenate(([0], end))[np.cumsum([len(c) for c in chunks_of])]
        return np.split(out, text_end[:-1])

    def _encode(self, chunks: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The ids of `chunks` laid end to end, and how many each has."""
        if self.separator is None:
            return self._encode_each(chunks)
        groups = [chunks[i:i + JOINED_CHUNKS] for i in range(0, len(chunks), JOINED_CHUNKS)]
        encodings = self.tok.encode_batch_fast([self.separator.join(g) for g in groups],
                                               add_special_tokens=False)
        parts = []
        for group, encoding in zip(groups, encodings, strict=True):
            ids = np.array(encoding.ids, dtype=np.uint32)
            separators = np.flatnonzero(ids == self.eot)
            if len(separators) != len(group) - 1:  # a chunk holds the token's text
                parts.append(self._encode_each(group))
            else:
                sizes = np.diff(separators, prepend=-1, append=len(ids)) - 1
                parts.append((np.delete(ids, separators), sizes))
        return np.concatenate([ids for ids, _ in parts]), np.concatenate([sizes for _, sizes in parts])

    def _encode_each(self, chunks: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = [e.ids for e in self.tok.encode_batch_fast(chunks, add_special_tokens=False)]
        return (np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32),
                np.fromiter(map(len, ids), dtype=np.intp, count=len(ids)))
