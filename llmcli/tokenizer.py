"""Tokenizers built with the Hugging Face `tokenizers` library and saved as `tokenizer.json`.

Three kinds are trained from the training split (see `TokenizerConfig.kind`):

* `char`: one token per distinct character (Unicode code point) seen in training. Ids are
  `<|endoftext|>` = 0, `<unk>` = 1, then the characters in sorted order, so the same text always
  gives the same vocabulary. Decoding concatenates tokens, so any text made of seen characters
  round-trips exactly, whitespace and newlines included.
* `bpe`: byte-level BPE (GPT-2 style). Its base alphabet is all 256 bytes, so every UTF-8 string
  round-trips exactly and nothing is ever unknown. `<|endoftext|>` has id 0.
* `word`: the classic word-level vocabulary (a `WordLevel` model): text is split into words (runs
  of letters, digits and underscores), single punctuation characters and newlines; spaces and tabs
  are dropped. The `vocab_size` most frequent words (at least `min_frequency` times) are kept after
  `<|endoftext|>` = 0 and `<unk>` = 1; every other word encodes as `<unk>`. Decoding joins words
  with a space, none before punctuation and none around newlines, so text round-trips up to its
  spacing.

Characters a char tokenizer never saw (words, for a word tokenizer): encoding maps each of them to
`<unk>` (id 1), which decodes to the literal text "<unk>", so such text does not round-trip.
`unknown_chars(tok, text)` lists them; `llmcli data prepare` warns when a split contains any, and
`llmcli generate` refuses prompts that contain any, naming them. For byte-level BPE the list is
always empty.

`<|endoftext|>` is a special token: the literal string in a text encodes to the EOT id.
The files load unchanged with `tokenizers.Tokenizer.from_file` and with
`transformers.PreTrainedTokenizerFast(tokenizer_file=...)`, which give the same ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from llmcli.config import TokenizerConfig
from llmcli.errors import UserError
from llmcli.io import atomic_write

EOT = "<|endoftext|>"
UNK = "<unk>"

__all__ = [
    "EOT", "UNK", "train_tokenizer", "unknown_chars", "save_tokenizer", "load_tokenizer",
    "eot_id", "encode", "decode", "min_bpe_vocab_size", "check_config", "unknown_noun", "distinct_pieces",
    "unknown_pieces", "untrained",
]

# A word tokenizer's pieces: words, single punctuation characters and newlines (other space goes).
WORD_PIECES = r"\n|\w+|[^\w\s]"


def train_tokenizer(cfg: TokenizerConfig, texts: Iterable[str | list[str]]) -> Tokenizer:
    """Train a `cfg.kind` tokenizer on `texts` (the training split only): strings, or batches
    (lists) of them, streamed; memory holds the vocabulary's statistics, not the texts.

    For bpe and word, a text cut where `untrained(cfg)`'s pre-tokenizer never joins across (see
    llmcli/data/encode.py) trains exactly the tokenizer of the whole text."""
    check_config(cfg)
    if cfg.kind == "char":
        return _train_char(texts)
    if cfg.kind == "bpe":
        return _train_bpe(cfg, texts)
    if cfg.kind == "word":
        return _train_word(cfg, texts)
    raise UserError(f"tokenizer.kind: unknown kind {cfg.kind!r} (expected char, bpe or word)")


def untrained(cfg: TokenizerConfig) -> Tokenizer:
    """A `cfg.kind` tokenizer before training: its model type, pre-tokenizer and decoder."""
    if cfg.kind == "char":
        tok = Tokenizer(models.WordLevel({EOT: 0, UNK: 1}, unk_token=UNK))
        # Every code point is its own piece (`[\s\S]` also matches newlines); Fuse joins them back.
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
    elif cfg.kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    else:
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(WORD_PIECES), behavior="removed", invert=True)
        tok.decoder = decoders.Sequence([
            decoders.WordPiece(prefix="##", cleanup=True),  # a space before each word, none before . , ! ?
            decoders.Fuse(),
            decoders.Replace(Regex(r" ?\n ?"), "\n"),
            decoders.Replace(" :", ":"),
            decoders.Replace(" ;", ";"),
        ])
    return tok


def _train_char(texts: Iterable[str | list[str]]) -> Tokenizer:
    seen: set[str] = set()
    for item in texts:
        for text in [item] if isinstance(item, str) else item:
            seen.update(text)
    vocab = {EOT: 0, UNK: 1}
    for ch in sorted(seen):
        vocab.setdefault(ch, len(vocab))
    tok = untrained(TokenizerConfig(kind="char"))
    tok.model = models.WordLevel(vocab, unk_token=UNK)
    tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    return tok


def min_bpe_vocab_size() -> int:
    """256 byte tokens plus the special tokens."""
    return 256 + 1


def check_config(cfg: TokenizerConfig) -> None:
    """Refuse settings no tokenizer can be trained with (called before any data is read)."""
    minimum = min_bpe_vocab_size()
    if cfg.kind == "bpe" and cfg.vocab_size < minimum:
        raise UserError(f"tokenizer.vocab_size={cfg.vocab_size} is too small for byte-level bpe: "
                        f"the minimum is {minimum} (256 bytes + {EOT})")


def _train_bpe(cfg: TokenizerConfig, texts: Iterable[str | list[str]]) -> Tokenizer:
    tok = untrained(cfg)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[AddedToken(EOT, special=True, normalized=False)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _train_word(cfg: TokenizerConfig, texts: Iterable[str | list[str]]) -> Tokenizer:
    tok = untrained(cfg)
    trainer = trainers.WordLevelTrainer(vocab_size=cfg.vocab_size + 2, min_frequency=cfg.min_frequency,
                                        special_tokens=[EOT, UNK], show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    return tok


def unknown_chars(tok: Tokenizer, text: str) -> list[str]:
    """The distinct pieces of `text` (characters; words for a word tokenizer) that `tok` encodes as
    its unknown token, sorted.

    Empty for tokenizers without an unknown token (byte-level BPE can encode anything).
    """
    return unknown_pieces(tok, distinct_pieces(tok, [text]))


def distinct_pieces(tok: Tokenizer, texts: Iterable[str]) -> set[str]:
    """The distinct pieces `tok`'s pre-tokenizer cuts `texts` into (characters, for a char tokenizer)."""
    seen: set[str] = set()
    if tok.pre_tokenizer is None or _splits_characters(tok):
        for text in texts:
            seen.update(text)
    else:
        for text in texts:
            seen.update(piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str(text))
    return seen


def unknown_pieces(tok: Tokenizer, pieces: Iterable[str]) -> list[str]:
    """Those of `pieces` that `tok` encodes as its unknown token, sorted."""
    unk = getattr(tok.model, "unk_token", None)
    unk_id = tok.token_to_id(unk) if unk else None
    if unk_id is None:
        return []
    vocab = tok.get_vocab()
    return [piece for piece in sorted(pieces)
            if piece not in vocab and unk_id in tok.encode(piece, add_special_tokens=False).ids]


def kind_of(tok: Tokenizer) -> str:
    """Which `TokenizerConfig.kind` made `tok` (char and word are both WordLevel models); another
    model's type (an imported tokenizer's) as it is."""
    model = json.loads(tok.to_str()).get("model", {}).get("type")
    if model == "WordLevel":
        return "char" if _splits_characters(tok) else "word"
    return {"BPE": "bpe"}.get(model, str(model))


def _splits_characters(tok: Tokenizer) -> bool:
    pre = json.loads(tok.to_str()).get("pre_tokenizer") or {}
    return pre.get("type") == "Split" and pre.get("pattern") == {"Regex": r"[\s\S]"}


def unknown_noun(pieces: list[str]) -> str:
    """What `unknown_chars` found, in words: "3 character(s)" or "3 word(s)"."""
    kind = "character" if all(len(p) == 1 for p in pieces) else "word"
    return f"{len(pieces)} {kind}(s)"


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """Write `tok` as tokenizer.json at `path`, atomically."""
    atomic_write(path, lambda tmp: tok.save(str(tmp), pretty=True))


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"tokenizer file not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises plain Exceptions with long messages
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}: not a valid tokenizer.json ({reason})") from None


def eot_id(tok: Tokenizer) -> int:
    ident = tok.token_to_id(EOT)
    if ident is None:
        raise UserError(f"the tokenizer has no {EOT} token")
    return ident


def encode(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def decode(tok: Tokenizer, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
    """Ids back to text; `<|endoftext|>` stays in the text unless skip_special_tokens."""
    return tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
