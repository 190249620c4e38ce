"""Output formats (JSON object, JSON schema, regex, Lark grammar) compiled for one vocabulary, once.

A `Format` says what the text must be; `Grammars` turns it into an llguidance matcher over the
tokenizer's tokens (vocabulary.py says what each spells) and keeps the compiled matcher in a
small LRU cache, so a schema is compiled once and every request with it starts from a copy.
llguidance (Microsoft's Rust engine behind Guidance, used by vLLM and llama.cpp) was chosen over
xgrammar and outlines-core by the per-token mask cost measured on our tokenizers
(docs/structured-outputs.md); it takes any token list, which our char and word vocabularies need.

A format the library cannot compile is a `GrammarError` with its reason. A format whose forced
text (what every valid output starts with, e.g. `{` for JSON) the vocabulary cannot spell is
refused naming the missing characters: the Shakespeare char vocabulary has no `{`.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmcli.constrain.vocabulary import Vocabulary
from llmcli.errors import UserError
from llmcli.tokenizer import encode

FORMAT_KINDS = ("json_object", "json_schema", "regex", "grammar")
CACHE_SIZE = 64  # compiled formats kept per vocabulary


class GrammarError(UserError):
    """A format that cannot be compiled, or that this vocabulary cannot spell."""


@dataclass(frozen=True)
class Format:
    """What a constrained output must be: `kind` one of FORMAT_KINDS; `source` the JSON schema (as
    canonical JSON), the regular expression or the Lark grammar; `strict`: refuse JSON-schema
    keywords that cannot be enforced (else they are ignored)."""

    kind: str
    source: str = ""
    strict: bool = False

    @classmethod
    def json_object(cls) -> Format:
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: Any, strict: bool = False) -> Format:
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"a JSON schema is an object (or true/false); got {type(schema).__name__}")
        # Keys keep their order: properties are written in the order the schema lists them.
        return cls("json_schema", json.dumps(schema, separators=(",", ":")), strict)

    @classmethod
    def regex(cls, pattern: str) -> Format:
        return cls("regex", pattern)

    @classmethod
    def grammar(cls, lark: str) -> Format:
        return cls("grammar", lark)

    def describe(self) -> str:
        return {"json_object": "a JSON object", "json_schema": "JSON matching the schema",
                "regex": f"text matching /{self.source}/", "grammar": "text of the grammar"}[self.kind]

    def grammar_text(self) -> str:
        """llguidance's grammar for this format."""
        from llguidance import LLMatcher

        options = {"whitespace_flexible": False, "lenient": not self.strict}
        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=options)
        if self.kind == "json_schema":
            try:
                return LLMatcher.grammar_from_json_schema(self.source, defaults=options)
            except ValueError as exc:
                raise GrammarError(f"the JSON schema cannot be compiled: {exc}") from None
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.source)
        return LLMatcher.grammar_from_lark(self.source)


class _Wrapped:
    """What llguidance's TokenizerWrapper reads: the tokens' bytes, end and special ids, and a
    function from bytes to ids."""

    def __init__(self, vocabulary: Vocabulary, tokenizer: Any, eos: int):
        self.tokens = list(vocabulary.spellings)
        self.eos_token_id, self.bos_token_id = eos, None
        self.special_token_ids = sorted(vocabulary.special)
        self._tokenizer = tokenizer

    def __call__(self, data: bytes | str) -> list[int]:
        text = data.decode("utf-8", errors="ignore") if isinstance(data, bytes) else data
        return encode(self._tokenizer, text)


class Grammars:
    """Formats compiled into llguidance matchers for one tokenizer, cached (thread-safe).

    `eos` is the id the grammar allows at its end (the engine allows every stop token there).
    """

    def __init__(self, tokenizer: Any, eos: int):
        import llguidance

        self.vocabulary = Vocabulary.of(tokenizer)
        self.eos = eos
        self.size = len(self.vocabulary.spellings)
        wrapper = llguidance.TokenizerWrapper(_Wrapped(self.vocabulary, tokenizer, eos))
        self.tokenizer = llguidance.LLTokenizer(wrapper, n_vocab=self.size)
        self._cache: OrderedDict[Format, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._executor: Any = None
        self.compiled = 0  # formats compiled (cache misses): the benchmark reports it

    @property
    def executor(self) -> Any:
        """llguidance's thread pool, which fills a batch's masks in parallel on the cores torch's
        threads leave spare; None where fewer than two are spare (there its threads would fight
        torch's for the same cores: the masks are filled one after the other instead)."""
        if self._executor is None:
            import os

            import llguidance
            import torch

            spare = (os.cpu_count() or 1) - torch.get_num_threads()
            self._executor = llguidance.LLExecutor(spare) if spare >= 2 else False
        return self._executor or None

    def matcher(self, fmt: Format) -> Any:
        """A fresh llguidance matcher for `fmt` (a copy of the cached compiled one)."""
        with self._lock:
            template = self._cache.get(fmt)
            if template is not None:
                self._cache.move_to_end(fmt)
                return template.deep_copy()
        template = self._compile(fmt)
        with self._lock:
            self._cache[fmt] = template
            self.compiled += 1
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return template.deep_copy()

    def check(self, fmt: Format) -> None:
        """Refuse a format that does not compile or that this vocabulary cannot spell (compiles it
        into the cache on the way)."""
        self.matcher(fmt)

    def _compile(self, fmt: Format) -> Any:
        from llguidance import LLMatcher

        grammar = fmt.grammar_text()
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise GrammarError(f"{fmt.kind} cannot be compiled: {_first_line(messages)}")
        matcher = LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"{fmt.kind} cannot be compiled: {_first_line([matcher.get_error()])}")
        self._check_spellable(fmt, matcher)
        return matcher

    def _check_spellable(self, fmt: Format, matcher: Any) -> None:
        """Every output starts with the text the format forces (`{"name":"` for a schema whose first
        property is required): each of its characters needs a token; and at least one token must
        be allowed first. Read off a matcher over single bytes, which spells whatever the format
        forces, so the refusal names every missing character of it, not only the first."""
        forced, first = self._forced_and_first(fmt)
        missing = self.vocabulary.missing(forced) if forced else []
        if not missing and not forced:
            bits = matcher.compute_logit_bias()
            if not any(bits[:self.size]) and not matcher.is_accepting():
                missing = sorted(set(first) - self.vocabulary.letters) or first
        if missing:
            shown = " ".join(repr(c) for c in missing[:20]) + (" ..." if len(missing) > 20 else "")
            raise GrammarError(f"this model's vocabulary cannot spell {fmt.describe()}: it has no token for "
                               f"{shown}")

    def _forced_and_first(self, fmt: Format) -> tuple[str, list[str]]:
        """(the text every output starts with, the characters an output may start with), from a
        matcher over single bytes."""
        import llguidance

        tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteTokens()), n_vocab=257)
        matcher = llguidance.LLMatcher(tokenizer, fmt.grammar_text(), log_level=0)
        forced = matcher.compute_ff_bytes().decode("utf-8", errors="ignore")
        bits = matcher.compute_logit_bias()
        return forced, [chr(b) for b in range(128) if bits[b]] or ["(no character)"]


class _ByteTokens:
    """A vocabulary of the 256 single bytes and an end token (id 256)."""

    tokens = [bytes([b]) for b in range(256)] + [b""]
    eos_token_id, bos_token_id, special_token_ids = 256, None, [256]

    def __call__(self, data: bytes | str) -> list[int]:
        return list(data.encode() if isinstance(data, str) else data)


def _first_line(messages: Sequence[str]) -> str:
    """The library's message in one line: its first line and the line that names the error."""
    lines = [line.strip() for m in messages if m for line in m.splitlines() if line.strip()] or ["unknown error"]
    named = next((line for line in lines[1:] if line.startswith("error:")), "")
    return f"{lines[0].removesuffix(':')} ({named.removeprefix('error: ')})"[:400] if named else lines[0][:400]
