"""Which constrained-decoding library: the per-token mask cost of llguidance, xgrammar and
outlines-core on our own tokenizers (char, byte-level BPE 4k and 16k), for a JSON schema and a regex.

Each library walks the same kind of valid output: at every step it computes the mask of allowed
tokens (what the engine pays per token), then a seeded random allowed token is taken (never the
end while anything else is allowed), for STEPS tokens or until the format is complete. Reported:
the median and min-max of the per-step mask time over interleaved rounds, and the time to compile
the format once. Libraries that are not installed are left out (only llguidance is a dependency):

    pip install xgrammar outlines-core   # into a scratch environment; see docs/structured-outputs.md
    python benchmarks/bench_constrain_libraries.py
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table

from llmcli.config import TokenizerConfig
from llmcli.constrain.vocabulary import Vocabulary
from llmcli.data.shakespeare import markdown_to_text, shakespeare_plays
from llmcli.tokenizer import eot_id, train_tokenizer

STEPS = 64
ROUNDS = 5
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
    "lines": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
    "mood": {"enum": ["merry", "sad", "wroth"]}}, "required": ["name", "age", "mood"], "additionalProperties": False}
REGEX = r"[A-Z][a-z]+ (of|to|and) [A-Z][a-z]+(, [a-z]+){0,6}\."


class Walker:
    """One library's matcher for one format over one vocabulary."""

    def mask(self) -> torch.Tensor:  # bool [V]
        raise NotImplementedError

    def accept(self, token: int) -> None:
        raise NotImplementedError


class LLGuidance(Walker):
    name = "llguidance"

    def __init__(self, vocab: Vocabulary, tokenizer, eos: int, kind: str):
        from llmcli.constrain.grammar import Format, Grammars

        self.grammars = Grammars(tokenizer, eos)
        fmt = Format.json_schema(SCHEMA) if kind == "json" else Format.regex(REGEX)
        started = time.perf_counter()
        self.grammars.check(fmt)
        self.compile_seconds = time.perf_counter() - started
        self.fmt, self.size = fmt, len(vocab.spellings)
        self.bitmask = torch.zeros(1, (self.size + 31) // 32, dtype=torch.int32)
        self.shifts = torch.arange(32, dtype=torch.int32)

    def reset(self) -> None:
        self.matcher = self.grammars.matcher(self.fmt)

    def mask(self) -> torch.Tensor:
        from llguidance.torch import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        return ((self.bitmask[0, :, None] >> self.shifts) & 1).flatten()[:self.size].bool()

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)


class XGrammar(Walker):
    name = "xgrammar"

    def __init__(self, vocab: Vocabulary, tokenizer, eos: int, kind: str):
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo(list(vocab.spellings), vocab_type=xgr.VocabType.RAW, stop_token_ids=[eos])
        started = time.perf_counter()
        compiler = xgr.GrammarCompiler(info)
        self.compiled = compiler.compile_json_schema(json.dumps(SCHEMA)) if kind == "json" else \
            compiler.compile_regex(REGEX)
        self.compile_seconds = time.perf_counter() - started
        self.size = len(vocab.spellings)
        self.bitmask = xgr.allocate_token_bitmask(1, self.size)
        self.shifts = torch.arange(32, dtype=torch.int32)

    def reset(self) -> None:
        self.matcher = self.xgr.GrammarMatcher(self.compiled)

    def mask(self) -> torch.Tensor:
        self.matcher.fill_next_token_bitmask(self.bitmask)
        return ((self.bitmask[0, :, None] >> self.shifts) & 1).flatten()[:self.size].bool()

    def accept(self, token: int) -> None:
        self.matcher.accept_token(token)


class OutlinesCore(Walker):
    name = "outlines-core"

    def __init__(self, vocab: Vocabulary, tokenizer, eos: int, kind: str):
        from outlines_core import Guide, Index
        from outlines_core import Vocabulary as OVocabulary
        from outlines_core.json_schema import build_regex_from_schema

        self.Guide = Guide
        tokens: dict[bytes, list[int]] = {}
        for ident, spelled in enumerate(vocab.spellings):
            if spelled and ident != eos:
                tokens.setdefault(spelled, []).append(ident)
        regex = build_regex_from_schema(json.dumps(SCHEMA)) if kind == "json" else REGEX
        started = time.perf_counter()
        self.index = Index(regex, OVocabulary(eos, tokens))
        self.compile_seconds = time.perf_counter() - started
        self.size = len(vocab.spellings)

    def reset(self) -> None:
        self.guide = self.Guide(self.index)

    def mask(self) -> torch.Tensor:
        out = torch.zeros(self.size, dtype=torch.bool)
        out[torch.tensor(self.guide.get_tokens(), dtype=torch.long)] = True
        return out

    def accept(self, token: int) -> None:
        self.guide.advance(token)


def walk(walker: Walker, eos: int, seed: int) -> list[float]:
    """Seconds of each mask computation along one seeded walk."""
    rng = random.Random(seed)
    walker.reset()
    times = []
    for _ in range(STEPS):
        started = time.perf_counter()
        allowed = walker.mask()
        times.append(time.perf_counter() - started)
        choices = [t for t in allowed.nonzero().flatten().tolist() if t != eos]
        if not choices:
            break
        walker.accept(rng.choice(choices))
    return times


def main() -> None:
    torch.set_num_threads(1)
    text = "".join(markdown_to_text(p.read_text(encoding="utf-8")) for p in list(shakespeare_plays().values())[:12])
    json_marks = '{}[]"0123456789:,'  # the plays' characters lack `{`: a char vocabulary that spells JSON
    tokenizers = {"char": train_tokenizer(TokenizerConfig(kind="char"), [text, json_marks]),
                  "bpe 4k": train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=4096), [text]),
                  "bpe 16k": train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=16384), [text])}
    libraries = []
    for cls, module in ((LLGuidance, "llguidance"), (XGrammar, "xgrammar"), (OutlinesCore, "outlines_core")):
        try:
            __import__(module)
            libraries.append(cls)
        except ImportError:
            print(f"{module} is not installed: left out")
    rows = []
    for label, tokenizer in tokenizers.items():
        vocab, eos = Vocabulary.of(tokenizer), eot_id(tokenizer)
        for kind in ("json", "regex"):
            walkers = [cls(vocab, tokenizer, eos, kind) for cls in libraries]
            per_round: dict[str, list[float]] = {w.name: [] for w in walkers}
            for r in range(ROUNDS):
                for w in walkers:  # interleaved rounds
                    per_round[w.name].append(statistics.median(walk(w, eos, seed=r)) * 1e6)
            for w in walkers:
                values = per_round[w.name]
                rows.append([f"{label} ({len(vocab.spellings)})", kind, w.name,
                             f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})",
                             f"{w.compile_seconds * 1e3:.1f}"])
    table(f"per-token mask cost, median (min-max) of {ROUNDS} interleaved rounds of {STEPS}-step walks",
          ["vocabulary", "format", "library", "us per mask", "compile ms"], rows)


if __name__ == "__main__":
    main()
