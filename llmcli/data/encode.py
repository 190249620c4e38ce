"""Texts -> token ids, each document followed by the end-of-text id, in worker processes.

`stream_pieces` cuts a stream of document parts into pieces where the tokenizer never joins tokens
across (see PIECE_CHARS), `BlockEncoder` turns a block of pieces into ids (byte-level BPE through a
cache of the ids of each distinct chunk, `_ChunkEncoder`; our char tokenizer through a table of code
points), and `Encoders` runs it in `data.num_proc` processes: all give exactly the ids of encoding
each whole document, only faster and in bounded memory.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import re
import sys
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from llmcli.tokenizer import EOT, UNK, WORD_PIECES

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# Long documents are encoded in pieces of about PIECE_CHARS characters, about GROUP_CHARS at a time
# (CHUNK_GROUP_CHARS through the chunk cache below): memory stays bounded (an Encoding costs ~100
# bytes per token) whatever a line's length, and one huge document still uses every core. A piece
# ends where the tokenizer never joins tokens across, so the ids are exactly those of the whole
# text: anywhere for our char tokenizer; for byte-level bpe and our word tokenizer where a non-space
# character meets one of " \t\n\r" (see _CHUNK below; a word piece never holds whitespace), or, in
# a stretch without such whitespace, at the end of a pre-token (GPT-2's pattern has no look-behind,
# and its look-ahead only ends whitespace runs). Other tokenizers (tokenizer.path) get whole documents.
PIECE_CHARS = 1 << 14
GROUP_CHARS = 1 << 18
CHUNK_GROUP_CHARS = 1 << 22
BLOCK_CHARS = 1 << 22  # characters handed to a worker process at a time
_SPACE_CUT = re.compile(r"(?<=\S)[ \t\n\r]")
Part = tuple[str, bool]  # (text, ends its document)


def stream_pieces(parts: Iterable[Part], rule: str | None, pre_tokenizer: Any = None,
                  added: list[str] = ()) -> Iterator[Part]:
    """Document parts -> pieces of about PIECE_CHARS characters cut where `rule` allows (see
    PIECE_CHARS), never inside an added token (`added`: their texts, e.g. <|endoftext|>). A cut is
    looked for only where the text after it is known (the document ended, or 2 x PIECE_CHARS follow),
    so the pieces are those of the whole document whatever its parts."""
    buffer = ""
    for text, ends in parts:
        buffer += text
        start, pos = 0, PIECE_CHARS
        while rule is not None and pos < len(buffer) and (ends or pos + 2 * PIECE_CHARS <= len(buffer)):
            cut = _cut_after(buffer, pos, rule, pre_tokenizer)
            if cut is None:  # one pre-token fills the window: look further on
                pos += PIECE_CHARS
                continue
            cut = _outside_added(buffer, cut, added)
            yield buffer[start:cut], False
            start, pos = cut, cut + PIECE_CHARS
        buffer = buffer[start:]
        if ends:
            yield buffer, True
            buffer = ""
    if buffer:
        yield buffer, True


def _pieces(text: str, rule: str | None, pre_tokenizer: Any = None, added: list[str] = ()) -> list[str]:
    """One whole `text` in pieces (see stream_pieces)."""
    return [piece for piece, _ in stream_pieces([(text, True)], rule, pre_tokenizer, added)]


def cut_rule(tok: Tokenizer) -> tuple[str | None, Any, list[str]]:
    """(rule, pre-tokenizer, added token texts): what stream_pieces needs to cut texts for `tok`."""
    spec = json.loads(tok.to_str())
    return _cut_rule(spec), tok.pre_tokenizer, [t["content"] for t in spec.get("added_tokens") or []]


def _cut_rule(spec: dict[str, Any]) -> str | None:
    """Where texts may be cut for this tokenizer: "any" position, at "space" boundaries, or None."""
    pre = spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") is not None:
        return None
    if pre.get("type") == "ByteLevel":
        return "space" if not pre.get("add_prefix_space") and pre.get("use_regex", True) else None
    if pre.get("type") == "Split" and pre.get("pattern") == {"Regex": r"[\s\S]"}:
        return "any"
    words = pre.get("type") == "Split" and pre.get("pattern") == {"Regex": WORD_PIECES} and pre.get("invert")
    return "space" if words else None


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


# --------------------------------------------------------------------------------------------
# Blocks of pieces -> ids, in worker processes


@dataclass
class Encoded:
    """One block's ids (every document followed by <|endoftext|>) and what it held."""

    ids: np.ndarray
    characters: int
    bytes: int
    documents: int
    unknown: list[str]  # distinct pieces encoded as <unk> (at most MAX_UNKNOWN)


MAX_UNKNOWN = 1000


class _CharTable:
    """Our char tokenizer (one id per code point, <unk> otherwise) as a table lookup: the same ids."""

    def __init__(self, tok: Tokenizer, eot: int):
        self.eot, self.unk = eot, tok.token_to_id(UNK)
        self.table = np.full(0x110000, self.unk, dtype=np.uint32)
        for piece, ident in tok.get_vocab().items():
            if len(piece) == 1:
                self.table[ord(piece)] = ident

    def __call__(self, text: str) -> tuple[np.ndarray, set[str]]:
        parts = text.split(EOT)  # the literal text of <|endoftext|> is its special token
        out = []
        for i, part in enumerate(parts):
            if i:
                out.append(np.array([self.eot], dtype=np.uint32))
            out.append(self.table[np.frombuffer(part.encode("utf-32-le"), dtype=np.uint32)])
        ids = np.concatenate(out)
        unknown = set()
        if (ids == self.unk).any():
            points = np.frombuffer("".join(parts).encode("utf-32-le"), dtype=np.uint32)
            unknown = {chr(c) for c in np.unique(points[self.table[points] == self.unk])[:MAX_UNKNOWN]}
        return ids, unknown


def _is_our_char(spec: dict[str, Any]) -> bool:
    added = spec.get("added_tokens") or []
    return (_cut_rule(spec) == "any" and (spec.get("model") or {}).get("type") == "WordLevel"
            and [t["content"] for t in added] == [EOT] and spec.get("post_processor") is None
            and spec.get("truncation") is None and spec.get("padding") is None)


class BlockEncoder:
    """Pieces (see stream_pieces) -> `Encoded`; picklable: each worker process builds its own engine."""

    def __init__(self, tokenizer_json: str, eot: int, dtype: str):
        self.tokenizer_json, self.eot, self.dtype = tokenizer_json, eot, np.dtype(dtype)
        self._engine: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_engine": None}

    def _start(self) -> None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(self.tokenizer_json)
        spec = json.loads(self.tokenizer_json)
        self.vocab = tok.get_vocab()
        unk = getattr(tok.model, "unk_token", None)
        self.unk = tok.token_to_id(unk) if unk else None
        self.words = re.compile(WORD_PIECES) if (spec.get("pre_tokenizer") or {}).get("pattern") == \
            {"Regex": WORD_PIECES} else None
        self.pre_tokenizer = tok.pre_tokenizer
        if _is_our_char(spec):
            self._engine = ("char", _CharTable(tok, self.eot))
        elif _by_chunks(spec):
            self._engine = ("chunks", _ChunkEncoder(tok, self.eot))
        else:
            encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
            self._engine = ("plain", lambda texts: [np.asarray(e.ids, dtype=np.uint32)
                                                    for e in encode_batch(texts, add_special_tokens=False)])

    def __call__(self, pieces: list[str], ends: list[bool]) -> Encoded:
        if self._engine is None:
            self._start()
        kind, engine = self._engine
        unknown: set[str] = set()
        per_piece: list[np.ndarray] = []
        if kind == "char":
            for piece in pieces:
                ids, missing = engine(piece)
                per_piece.append(ids)
                unknown |= missing
        else:
            limit = CHUNK_GROUP_CHARS if kind == "chunks" else GROUP_CHARS
            for group in _groups(pieces, limit):
                per_piece += engine(group)
            if self.unk is not None:
                unknown = self._unknown(pieces, per_piece)
        out = self._with_ends(per_piece, ends)
        return Encoded(out.astype(self.dtype, copy=False), sum(map(len, pieces)),
                       sum(len(p.encode("utf-8")) for p in pieces), sum(ends), sorted(unknown)[:MAX_UNKNOWN])

    def _with_ends(self, per_piece: list[np.ndarray], ends: list[bool]) -> np.ndarray:
        end = np.array([self.eot], dtype=np.uint32)
        out = [a for ids, last in zip(per_piece, ends, strict=True) for a in ((ids, end) if last else (ids,))]
        return np.concatenate(out) if out else np.zeros(0, np.uint32)

    def _unknown(self, pieces: list[str], per_piece: list[np.ndarray]) -> set[str]:
        found: set[str] = set()
        for piece, ids in zip(pieces, per_piece, strict=True):
            if len(found) >= MAX_UNKNOWN or not (ids == self.unk).any():
                continue
            words = self.words.findall(piece) if self.words is not None else \
                [p for p, _ in self.pre_tokenizer.pre_tokenize_str(piece)] if self.pre_tokenizer else list(piece)
            found.update(w for w in set(words) if w not in self.vocab)
        return found


def _groups(pieces: list[str], chars: int) -> Iterator[list[str]]:
    """Runs of consecutive pieces, each closed once it holds `chars` characters."""
    start = size = 0
    for stop, piece in enumerate(pieces, 1):
        size += len(piece)
        if size >= chars or stop == len(pieces):
            yield pieces[start:stop]
            start, size = stop, 0


@dataclass
class Block:
    """Consecutive pieces of one split: `index` counts the split's blocks from 0."""

    split: str
    index: int
    pieces: list[str]
    ends: list[bool]


def blocks(routed: Iterable[tuple[str, str, bool]], rule: str | None, pre_tokenizer: Any = None,
           added: list[str] = ()) -> Iterator[Block]:
    """(split, text, ends) parts -> each split's pieces in blocks of about BLOCK_CHARS characters."""
    streams: dict[str, _SplitBlocks] = {}
    for split, text, ends in routed:
        stream = streams.get(split) or streams.setdefault(split, _SplitBlocks(split, rule, pre_tokenizer, added))
        yield from stream.feed(text, ends)
    for stream in streams.values():
        yield from stream.flush()


class _SplitBlocks:
    def __init__(self, split: str, rule: str | None, pre_tokenizer: Any, added: list[str]):
        self.split, self.rule, self.pre_tokenizer, self.added = split, rule, pre_tokenizer, added
        self.pieces: list[str] = []
        self.ends: list[bool] = []
        self.chars = self.index = 0
        self.carry: list[Part] = []  # the parts of a document whose pieces are not all known yet

    def feed(self, text: str, ends: bool) -> Iterator[Block]:
        self.carry.append((text, ends))
        if not ends and sum(len(t) for t, _ in self.carry) < 4 * PIECE_CHARS:
            return
        parts, self.carry = self.carry, []
        pieces = list(stream_pieces(parts, self.rule, self.pre_tokenizer, self.added))
        if not ends and pieces:  # the last piece may still grow: keep it for the next part
            tail, _ = pieces.pop()
            self.carry = [(tail, False)]
        for piece, last in pieces:
            self.pieces.append(piece)
            self.ends.append(last)
            self.chars += len(piece)
            if self.chars >= BLOCK_CHARS:
                yield self._take()

    def flush(self) -> Iterator[Block]:
        if self.carry:
            for piece, last in stream_pieces(self.carry, self.rule, self.pre_tokenizer, self.added):
                self.pieces.append(piece)
                self.ends.append(last)
            self.carry = []
        if self.pieces:
            yield self._take()

    def _take(self) -> Block:
        block = Block(self.split, self.index, self.pieces, self.ends)
        self.pieces, self.ends, self.chars, self.index = [], [], 0, self.index + 1
        return block


_worker_encoder: BlockEncoder | None = None


def _start_worker(encoder: BlockEncoder) -> None:
    global _worker_encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core; no Rust thread pool each
    _worker_encoder = encoder


def _encode_in_worker(pieces: list[str], ends: list[bool]) -> Encoded:
    assert _worker_encoder is not None
    return _worker_encoder(pieces, ends)


class Encoders:
    """`encoder` over a stream of blocks in `procs` worker processes (in this one when procs is 1 or
    the stream is a single block); results in order, at most 2 blocks per process in flight."""

    def __init__(self, encoder: BlockEncoder, procs: int):
        self.encoder, self.procs = encoder, procs

    def map(self, stream: Iterable[Block], skip: Callable[[Block], bool] = lambda b: False
            ) -> Iterator[tuple[Block, Encoded | None]]:
        """(block, its Encoded) for each block; (block, None) for those `skip` says are done already."""
        todo = iter(stream)
        head = list(itertools.islice(todo, 2))
        if self.procs <= 1 or len(head) < 2:
            for block in itertools.chain(head, todo):
                yield block, None if skip(block) else self.encoder(block.pieces, block.ends)
            return
        # fork where it is safe (Linux): no re-import of the caller's __main__, workers start at once
        context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with context.Pool(self.procs, initializer=_start_worker, initargs=(self.encoder,)) as pool:
            pending: deque = deque()
            for block in itertools.chain(head, todo):
                job = None if skip(block) else pool.apply_async(_encode_in_worker, (block.pieces, block.ends))
                pending.append((block, job))
                while len(pending) > 2 * self.procs or (pending and pending[0][1] is None):
                    done, result = pending.popleft()
                    yield done, None if result is None else result.get()
            while pending:
                done, result = pending.popleft()
                yield done, None if result is None else result.get()
