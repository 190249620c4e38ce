"""Structured outputs and embeddings: what the constraint costs, whether outputs are valid, how fast
embeddings are.

    python benchmarks/bench_structured.py                          # trains the small BPE model first
    python benchmarks/bench_structured.py --trained runs/bpe/best  # or uses a trained run

1. Overhead: decode tokens/s with a format vs without, at batch 1 and 8, on the demo model's shape
   (llama 4 x 128, Shakespeare's char vocabulary, random weights) and on a 4 x 256 model with the
   4096-token byte-level BPE vocabulary. The char vocabulary has no `{`, so the demo shape is
   constrained by a Lark grammar of speeches (NAME: then lines); the BPE model by a JSON schema
   whose outputs cannot end before the token limit (an array of at least 40 records), so both sides
   generate the same number of tokens in batches that stay full. The format is compiled once (the script checks the cache compiled it
   once for all rounds). Interleaved rounds; ratio = constrained / free tokens/s per round.
2. Validity: 200 requests, 40 with each of 5 JSON schemas, sampled at temperature 1 from a model
   with random weights and from the trained small model, with and without the schema: the share
   whose text parses as JSON and validates (`jsonschema`).
3. Embeddings: inputs/s of `Embedder.vectors` (batching by length, pooling, normalizing) vs the
   model's plain forward over the same padded batches, on 1,024 lines of Shakespeare.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Spread, ratios, table

from llmcli.config import ModelConfig, TokenizerConfig
from llmcli.constrain.grammar import Format
from llmcli.data.shakespeare import markdown_to_text, shakespeare_plays
from llmcli.embed import Embedder
from llmcli.generate.text import Generator
from llmcli.load import load_checkpoint
from llmcli.models.transformer import Transformer
from llmcli.options.sampling import SamplingParams
from llmcli.tokenizer import encode, train_tokenizer

REPO = Path(__file__).resolve().parent.parent
SPEECHES = 'start: speech+\nspeech: NAME ":\\n" LINE+ "\\n"\nNAME: /[A-Z]{2,12}/\nLINE: /[A-Za-z ,.;!?\']{1,60}\\n/'
RECORDS = {"type": "array", "items": {"type": "object", "properties": {
    "speaker": {"type": "string", "maxLength": 12}, "line": {"type": "string", "maxLength": 40}},
    "required": ["speaker", "line"], "additionalProperties": False}, "minItems": 40}
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"play": {"enum": ["Hamlet", "Macbeth", "Othello"]},
                                      "act": {"type": "integer", "minimum": 1, "maximum": 5},
                                      "comedy": {"type": "boolean"}},
     "required": ["play", "act", "comedy"], "additionalProperties": False},
    {"type": "object", "properties": {"speaker": {"type": "string", "maxLength": 12},
                                      "lines": {"type": "array", "items": {"type": "string", "maxLength": 24},
                                                "minItems": 1, "maxItems": 3}},
     "required": ["speaker", "lines"], "additionalProperties": False},
    {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Z][a-z]{2,10}$"},
                                      "temperature": {"type": "number", "minimum": -40, "maximum": 50}},
     "required": ["city", "temperature"], "additionalProperties": False},
    {"type": "object", "properties": {"cast": {"type": "array", "maxItems": 4, "items": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                         "role": {"enum": ["lover", "villain", "fool"]}},
        "required": ["name", "role"], "additionalProperties": False}}},
     "required": ["cast"], "additionalProperties": False},
]
REQUESTS = 200


def plays_text(count: int = 12) -> str:
    return "".join(markdown_to_text(p.read_text(encoding="utf-8")) for p in list(shakespeare_plays().values())[:count])


def random_model(vocab: int, *, preset: str, n_layer: int, d_model: int, block_size: int) -> Transformer:
    torch.manual_seed(0)
    fields = dict(preset=preset, n_layer=n_layer, n_head=4, d_model=d_model, block_size=block_size, vocab_size=vocab)
    return Transformer(ModelConfig(**fields)).eval()


def tokens_per_second(generator: Generator, batch: int, tokens: int, fmt: Format | None, prompt: str) -> float:
    params = SamplingParams(max_new_tokens=tokens, temperature=1.0, ignore_eot=True)
    ids = [generator.submit(prompt, dataclasses.replace(params, seed=i), fmt) for i in range(batch)]
    started = time.perf_counter()
    while generator.has_work():
        generator.step()
    elapsed = time.perf_counter() - started
    return sum(generator.completion(i).tokens for i in ids) / elapsed


def overhead(rounds: int, tokens: int) -> None:
    text = plays_text(4)
    char = train_tokenizer(TokenizerConfig(kind="char"), [text])
    bpe = train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=4096), [plays_text()])
    cases = [("demo shape: llama 4x128, char", random_model(char.get_vocab_size(), preset="llama", n_layer=4,
                                                            d_model=128, block_size=64),
              char, Format.grammar(SPEECHES), "grammar", "ROMEO:\n"),
             ("4x256, bpe 4096", random_model(bpe.get_vocab_size(), preset="llama", n_layer=4, d_model=256,
                                              block_size=256),
              bpe, Format.json_schema(RECORDS), "json schema", "JSON:")]
    rows = []
    for label, model, tokenizer, fmt, kind, prompt in cases:
        for batch in (1, 8):
            generator = Generator(model, tokenizer, max_batch_size=batch)
            generator.grammars.check(fmt)
            tokens_per_second(generator, batch, 8, fmt, prompt)  # warm-up
            free, constrained = [], []
            for _ in range(rounds):
                free.append(tokens_per_second(generator, batch, tokens, None, prompt))
                constrained.append(tokens_per_second(generator, batch, tokens, fmt, prompt))
            assert generator.grammars.compiled == 1, "the format was compiled more than once"
            ratio = ratios(constrained, free)
            rows.append([label, kind, batch, Spread.of(free), Spread.of(constrained), ratio,
                         "met" if ratio.median >= 0.9 or batch == 1 else "missed"])
    table(f"constrained decoding overhead: tokens/s, median (min-max) of {rounds} interleaved rounds of {tokens} "
          "tokens per sequence (target at batch 8: ratio >= 0.90)",
          ["model", "format", "batch", "free tok/s", "constrained tok/s", "ratio", "target"], rows)


def share_valid(generator: Generator, constrained: bool, max_tokens: int) -> tuple[float, float]:
    """(share of REQUESTS outputs that parse and validate, seconds)."""
    started = time.perf_counter()
    ids = []
    for i in range(REQUESTS):
        schema = SCHEMAS[i % len(SCHEMAS)]
        fmt = Format.json_schema(schema) if constrained else None
        prompt = f"JSON matching {json.dumps(schema)}:\n"
        ids.append((generator.submit(prompt, SamplingParams(max_new_tokens=max_tokens, temperature=1.0, seed=i), fmt),
                    schema))
    while generator.has_work():
        generator.step()
    good = 0
    for request, schema in ids:
        try:
            jsonschema.validate(json.loads(generator.completion(request).completion), schema)
            good += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    return good / REQUESTS, time.perf_counter() - started


def validity(trained: Path) -> None:
    bpe = train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=4096), [plays_text()])
    loaded = load_checkpoint(trained, torch.device("cpu"), torch.float32)
    model, tokenizer = loaded.model, loaded.tokenizer
    cases = [("random weights, 4x256, bpe 4096", random_model(bpe.get_vocab_size(), preset="llama", n_layer=4,
                                                             d_model=256, block_size=512), bpe),
             (f"trained: {trained}", model, tokenizer)]
    rows = []
    for label, net, tok in cases:
        generator = Generator(net, tok, max_batch_size=16)
        free, free_s = share_valid(generator, False, 160)
        held, held_s = share_valid(generator, True, 160)
        rows.append([label, f"{free:.1%}", f"{held:.1%}", f"{free_s:.0f}", f"{held_s:.0f}",
                     "met" if held == 1.0 else "missed"])
    table(f"validity: {REQUESTS} requests, 40 with each of {len(SCHEMAS)} JSON schemas, temperature 1, at most "
          "160 tokens (target: 100% with the schema)",
          ["model", "valid, free", "valid, with schema", "free s", "with schema s", "target"], rows)


def embeddings(trained: Path, rounds: int) -> None:
    loaded = load_checkpoint(trained, torch.device("cpu"), torch.float32)
    model, tokenizer = loaded.model, loaded.tokenizer
    lines = [line for line in plays_text(2).splitlines() if line.strip()][:1024]
    embedder = Embedder(model, tokenizer)
    inputs = [encode(tokenizer, line)[:model.context_length] for line in lines]

    def forward_alone() -> None:
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        with torch.inference_mode():
            for start in range(0, len(order), 64):
                rows = [inputs[i] for i in order[start:start + 64]]
                idx = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
                for b, ids in enumerate(rows):
                    idx[b, :len(ids)] = torch.tensor(ids)
                model(idx)

    full, alone = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        embedder.vectors([encode(tokenizer, line)[:model.context_length] for line in lines])
        full.append(len(lines) / (time.perf_counter() - started))
        started = time.perf_counter()
        forward_alone()
        alone.append(len(lines) / (time.perf_counter() - started))
    table(f"embeddings: inputs/s over {len(lines)} lines of Shakespeare, median (min-max) of {rounds} rounds",
          ["model", "embed (tokenize, batch, pool, normalize)", "forward alone (with the LM head)", "ratio"],
          [[str(trained), Spread.of(full), Spread.of(alone), ratios(full, alone)]])


def train_small(out: Path) -> Path:
    if not (out / "best").is_dir():
        subprocess.run([sys.executable, "-m", "llmcli", "train", "-c", str(REPO / "configs" / "shakespeare-bpe.yaml"),
                        "--out", str(out), "--overwrite", "train.max_minutes=3"], check=True)
    return out / "best"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trained", type=Path, help="a trained run (default: train shakespeare-bpe for 3 minutes)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--only", choices=["overhead", "validity", "embeddings"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.only in (None, "overhead"):
        overhead(args.rounds, args.tokens)
    if args.only in (None, "validity", "embeddings"):
        trained = args.trained or train_small(REPO / "runs" / "bench-structured")
        if args.only in (None, "validity"):
            validity(trained)
        if args.only in (None, "embeddings"):
            embeddings(trained, args.rounds)


if __name__ == "__main__":
    main()
