"""One request's decoding settings: `generate`'s flags and `serve`'s request fields."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from llmcli.errors import FieldError
from llmcli.options.fields import AT_LEAST_ONE, NOT_NEGATIVE, Options, is_integer, is_number, option


def unescape(text: str) -> str:
    """`\\n`, `\\t`, `\\r` and `\\\\` typed on a command line (e.g. in --stop) as the characters."""
    table = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    return re.sub(r"\\([ntr\\])", lambda m: table[m.group(1)], text)


@dataclass(frozen=True, kw_only=True)
class SamplingParams(Options):
    """How one request is decoded; the engine applies them in the order of generate/sampling.py."""

    max_new_tokens: int = option(256, "--max-new-tokens", "-n", help="Tokens to generate at most.",
                                 check=(lambda v: is_integer(v) and v >= 1, "a positive integer"))
    temperature: float = option(0.8, "--temperature", "-t", help="0 = greedy (always the most likely).",
                                check=(lambda v: is_number(v) and v >= 0, ">= 0 (0 = greedy)"))
    top_k: int = option(0, "--top-k", help="Sample from the k most likely tokens only (0 = off).",
                        check=(lambda v: is_integer(v) and v >= 0, "an integer >= 0 (0 = off)"))
    top_p: float = option(1.0, "--top-p", help="Nucleus: the smallest set of tokens with probability >= p, "
                                               "in (0, 1] (1 = off).",
                          check=(lambda v: is_number(v) and 0 < v <= 1, "in (0, 1]"))
    min_p: float = option(0.0, "--min-p", help="Drop tokens less likely than min-p x the most likely one, "
                                               "in [0, 1] (0 = off).",
                          check=(lambda v: is_number(v) and 0 <= v <= 1, "in [0, 1]"))
    repetition_penalty: float = option(1.0, "--repetition-penalty",
                                       help="Above 1 discourages tokens already in the prompt or output "
                                            "(1 = off).",
                                       check=(lambda v: is_number(v) and v > 0, "> 0"))
    seed: Optional[int] = option(None, "--seed", help="Seed for reproducible samples (sample j of each prompt "
                                                      "uses seed+j).",
                                 check=(lambda v: is_integer(v) and 0 <= v < 2**63, "an integer in [0, 2^63)"))
    stop: tuple[str, ...] = option((), "--stop", help="Stop before this text (repeatable; \\n and \\t are "
                                                      "understood).",
                                   cli_type=Optional[list[str]], convert=lambda items: tuple(map(unescape, items or ())))
    ignore_eot: bool = option(False, "--ignore-eot", help="Keep going past <|endoftext|>.")

    def check(self) -> None:
        if not isinstance(self.stop, tuple) or any(not isinstance(s, str) for s in self.stop):
            raise FieldError("stop", "must be a tuple of strings")
        if any(s == "" for s in self.stop):
            raise FieldError("stop", ": a stop string cannot be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True, kw_only=True)
class BeamOptions(Options):
    """Beam search (generate and eval)."""

    beams: int = option(1, "--beams", help="Beam search with N beams, keeping the best hypothesis (1 = off). "
                                           "Deterministic: temperature, top-k/p, min-p, the repetition penalty "
                                           "and the seed do not apply.", check=AT_LEAST_ONE)
    length_penalty: Optional[float] = option(None, "--length-penalty",
                                             help="Beam search: a hypothesis scores log-probability / length^p "
                                                  "(default 1; 0 = the plain sum; larger favours longer ones).",
                                             check=(is_number, "a number"))
    early_stopping: bool = option(False, "--early-stopping", help="Beam search: stop as soon as N hypotheses "
                                                                  "ended (default: once no running beam can "
                                                                  "beat them).")

    def check(self) -> None:
        if self.beams == 1 and self.length_penalty is not None:
            raise FieldError("length_penalty", "applies to beam search only; add --beams N")
        if self.beams == 1 and self.early_stopping:
            raise FieldError("early_stopping", "applies to beam search only; add --beams N")


@dataclass(frozen=True, kw_only=True)
class SpeculationOptions(Options):
    """Speculative decoding: a proposer guesses tokens, the model verifies them in one forward."""

    draft: Optional[Path] = option(None, "--draft", help="Speculative decoding with this smaller model (same "
                                                         "tokenizer) proposing --draft-tokens at a time.",
                                   file_okay=False)
    draft_tokens: int = option(4, "--draft-tokens", help="Speculative decoding: tokens proposed per round.",
                               check=AT_LEAST_ONE)
    prompt_lookup: int = option(0, "--prompt-lookup", help="Speculative decoding without a draft: propose what "
                                                           "followed the latest earlier match of the last N "
                                                           "tokens (N-gram; 0 = off).", check=NOT_NEGATIVE)

    def check(self) -> None:
        if self.draft is not None and self.prompt_lookup:
            raise FieldError("prompt_lookup", "and --draft are two ways to speculate: give one")

    @property
    def enabled(self) -> bool:
        return self.draft is not None or self.prompt_lookup > 0


@dataclass(frozen=True, kw_only=True)
class FormatOptions(Options):
    """Constrained decoding: the output must be in one format (generate and chat)."""

    json_schema: Optional[Path] = option(None, "--json-schema", metavar="FILE",
                                         help="Constrain the output to JSON matching this JSON schema file "
                                              "({\"type\": \"object\"}: any JSON object).", dir_okay=False)
    regex: Optional[str] = option(None, "--regex", metavar="REGEX",
                                  help="Constrain the output to text matching this regular expression (whole).")
    grammar: Optional[Path] = option(None, "--grammar", metavar="FILE",
                                     help="Constrain the output to this Lark grammar (llguidance's dialect: "
                                          "`start: ...`; %json {...} inlines a JSON schema).", dir_okay=False)

    def check(self) -> None:
        given = [name for name in ("json_schema", "regex", "grammar") if getattr(self, name) is not None]
        if len(given) > 1:
            raise FieldError(given[1], f"and --{given[0].replace('_', '-')} both constrain the output: give one")
        if self.regex is not None and not self.regex:
            raise FieldError("regex", "cannot be empty")

    @property
    def enabled(self) -> bool:
        return self.json_schema is not None or self.regex is not None or self.grammar is not None

    def format(self):
        """The constraint as a constrain.grammar.Format (None: free text); files read and checked."""
        import json

        from llmcli.constrain.grammar import Format, GrammarError
        from llmcli.errors import UserError
        from llmcli.io import read_text_file

        if self.regex is not None:
            return Format.regex(self.regex)
        path = self.json_schema or self.grammar
        if path is None:
            return None
        path = Path(path).expanduser()
        text = read_text_file(path, f"{'--json-schema' if self.json_schema else '--grammar'} file")
        if self.grammar is not None:
            return Format.grammar(text)
        try:
            return Format.json_schema(json.loads(text))
        except ValueError as exc:
            raise UserError(f"{path}: not a JSON schema ({exc})") from None
        except GrammarError as exc:
            raise UserError(f"{path}: {exc}") from None
