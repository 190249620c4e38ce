"""Our tokenizers as llama.cpp's: the token list, types and merges of its `gpt2` tokenizer model.

llama.cpp's `gpt2` model is byte-level BPE: text is cut by a pre-tokenizer regex named in the file,
each piece's UTF-8 bytes become GPT-2's byte-level characters, merges join neighbours by rank, and
the result is looked up in the token list (a piece no token matches falls back to one token per
byte, and bytes without a token are dropped). Our kinds map onto it so:

* bpe (byte-level, GPT-2's regex, no prefix space): tokens and merges as they are, pre-tokenizer
  `gpt-2`, llama.cpp's name for exactly GPT-2's regex. Imported tokenizers of the same make (the
  hub's gpt2) go the same way; other makes are refused, naming what differs.
* char: each character is written as the byte-level string of its UTF-8 bytes, and merges rebuild
  every multi-byte character from its bytes, left to right. No merge can join two characters: its
  right side is always a continuation byte, which never starts one. So llama.cpp cuts any text into
  exactly our characters, whatever its pre-tokenizer. The partial byte strings are merge results
  only, never tokens (llama.cpp does not look them up), so the vocabulary keeps its size. A
  character the tokenizer never saw differs: ours encodes it as `<unk>`, llama.cpp drops its bytes
  (`llmcli generate` refuses such prompts; `unknown_chars` lists them).
* word: refused. It drops spaces, rejoins words with spaces when decoding and turns unseen words
  into `<unk>`; none of llama.cpp's tokenizers does any of this.

Added tokens keep their text: special ones (`<|endoftext|>`) as control tokens, which llama.cpp
matches in text when it parses special tokens (as we always do), others as user-defined ones.
`<unk>` stays a normal token, so the literal text "<unk>" is five characters in both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer, pre_tokenizers

from llmcli.errors import UserError
from llmcli.tokenizer import kind_of

TOKENIZER_MODEL = "gpt2"  # llama.cpp's name for byte-level BPE
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for GPT-2's pre-tokenizer regex
# gguf.TokenType, spelled here so that this module needs no gguf import to be read.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
_BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)


@dataclass(frozen=True)
class GGUFVocab:
    """What the GGUF file says about the tokenizer (`tokenizer.ggml.*`)."""

    kind: str  # our TokenizerConfig.kind: "bpe" or "char"
    tokens: list[str]  # by id, in llama.cpp's (byte-level) spelling
    types: list[int]  # gguf.TokenType of each
    merges: list[str]  # "left right", by rank
    unk_id: int | None = None

    def describe(self) -> str:
        how = "byte-level BPE" if self.kind == "bpe" else "characters as byte-level BPE"
        return (f"{how}: {len(self.tokens)} tokens, {len(self.merges)} merges, llama.cpp tokenizer "
                f"{TOKENIZER_MODEL} with pre-tokenizer {PRE_TOKENIZER}")


def byte_level(text: str) -> str:
    """`text`'s UTF-8 bytes as GPT-2's byte-level characters (one character per byte)."""
    return "".join(piece for piece, _ in _BYTE_LEVEL.pre_tokenize_str(text))


def gguf_vocab(tok: Tokenizer, vocab_size: int, where: str) -> GGUFVocab:
    """The GGUF vocabulary of `tok` for a model of `vocab_size` tokens (rows past the tokenizer's
    become unused placeholder tokens); refused in one line where llama.cpp cannot reproduce it."""
    spec = json.loads(tok.to_str())
    kind = kind_of(tok)
    if kind == "bpe":
        _check_byte_level(spec, where)
        vocab = _by_id(spec["model"]["vocab"], where)
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    elif kind == "char":
        vocab, merges = _char_vocab(spec, where)
    elif kind == "word":
        raise UserError(f"{where}: a word tokenizer cannot be written for llama.cpp (it drops spaces, joins words "
                        "with spaces when decoding and maps unseen words to <unk>; llama.cpp's tokenizers do none "
                        "of that): train the model with tokenizer.kind=bpe or char to export it as GGUF, or use "
                        "--format hf")
    else:
        raise UserError(f"{where}: a {kind} tokenizer (imported) has no llama.cpp equivalent that llmcli writes: "
                        "export --format hf and convert that folder with llama.cpp's convert_hf_to_gguf.py, which "
                        "knows the hub's tokenizers")
    tokens, types = _with_added_tokens(vocab, spec.get("added_tokens") or [], where)
    if len(tokens) > vocab_size:
        raise UserError(f"{where}: the tokenizer has {len(tokens)} tokens but the model only {vocab_size}")
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(UNUSED)
    unk = spec["model"].get("unk_token")
    return GGUFVocab(kind, tokens, types, merges, tokens.index(unk) if kind == "char" and unk in tokens else None)


def _check_byte_level(spec: dict[str, Any], where: str) -> None:
    """A BPE tokenizer llama.cpp's gpt2 model with pre-tokenizer gpt-2 reproduces, or a UserError."""
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers") or []) == 1:
        pre = pre["pretokenizers"][0]
    problems = []
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        problems.append(f"pre-tokenizer {json.dumps(pre)} (llmcli's is ByteLevel with GPT-2's regex)")
    elif pre.get("add_prefix_space"):
        problems.append("a space added before the text (add_prefix_space)")
    if spec.get("normalizer"):
        problems.append(f"normalizer {spec['normalizer'].get('type')}")
    for key in ("byte_fallback", "continuing_subword_prefix", "end_of_word_suffix", "dropout", "ignore_merges"):
        if model.get(key):
            problems.append(f"BPE {key}={json.dumps(model[key])}")
    if problems:
        raise UserError(f"{where}: this BPE tokenizer is not GPT-2's byte-level make ({'; '.join(problems)}), so "
                        "llama.cpp's gpt-2 pre-tokenizer would cut text differently: export --format hf and convert "
                        "that folder with llama.cpp's convert_hf_to_gguf.py, which knows the hub's tokenizers")


def _char_vocab(spec: dict[str, Any], where: str) -> tuple[dict[int, str], list[str]]:
    """A char tokenizer's tokens in byte-level spelling, and the merges that rebuild each character."""
    added = {t["content"] for t in spec.get("added_tokens") or []}
    unk = spec["model"].get("unk_token")
    vocab: dict[int, str] = {}
    merges: dict[str, None] = {}  # ordered and unique: characters share leading bytes
    for token, ident in spec["model"]["vocab"].items():
        if token in added or token == unk:
            vocab[ident] = token
            continue
        if len(token) != 1:
            raise UserError(f"{where}: char tokenizer token {token!r} is not one character")
        spelled = vocab[ident] = byte_level(token)
        for end in range(1, len(spelled)):  # ("e1", "e2"), ("e1e2", "e3"), ...
            merges[f"{spelled[:end]} {spelled[end]}"] = None
    return vocab, list(merges)


def _by_id(vocab: dict[str, int], where: str) -> dict[int, str]:
    out = {ident: token for token, ident in vocab.items()}
    if len(out) != len(vocab):
        raise UserError(f"{where}: two tokens share an id")
    return out


def _with_added_tokens(vocab: dict[int, str], added: list[dict[str, Any]],
                       where: str) -> tuple[list[str], list[int]]:
    """(tokens, types) by id, 0..n-1, with the added tokens' text and types; a gap is refused."""
    types = dict.fromkeys(vocab, NORMAL)
    for token in added:
        vocab[token["id"]] = token["content"]
        types[token["id"]] = CONTROL if token.get("special") else USER_DEFINED
    missing = sorted(set(range(max(vocab) + 1)) - set(vocab)) if vocab else []
    if missing:
        raise UserError(f"{where}: the tokenizer has no token with id {missing[0]} (llama.cpp needs ids 0..n-1)")
    return [vocab[i] for i in range(len(vocab))], [types[i] for i in range(len(vocab))]
