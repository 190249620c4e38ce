"""Data preparation benchmark: MB/s of text tokenized with byte-level BPE into the token cache.

    python benchmarks/bench_data.py

Tokenizes the Shakespeare corpus (about 5 MB) with a 4096-token byte-level BPE trained once
beforehand. The baseline is the plain loop: `tokenizer.encode(document)` per play, in the same run.
`llmcli data prepare` is timed end to end (markdown to text, tokenize, write the cache); the
tokenize + write row runs the same code on the corpus already in memory, with a freshly loaded
tokenizer and an empty chunk cache each time. Every figure is the median of 3 runs.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Spread, ratios, table

from llmcli.config_loader import load_config
from llmcli.data.encode import _document_encoder
from llmcli.data.prepare import _write_tokens, prepare_data, train_tokenizer_for_config
from llmcli.data.sources import load_corpus
from llmcli.tokenizer import eot_id, load_tokenizer

RUNS = 3


def main() -> None:
    import datasets
    from rich.console import Console

    datasets.disable_progress_bars()
    quiet = Console(quiet=True)
    with tempfile.TemporaryDirectory() as tmp:
        import os

        os.environ["LLMCLI_CACHE_DIR"] = tmp
        tokenizer_path = Path(tmp) / "bpe.json"
        cfg = load_config(None, ["tokenizer.kind=bpe", "tokenizer.vocab_size=4096"])
        train_tokenizer_for_config(cfg, tokenizer_path, console=quiet)
        cfg = load_config(None, ["tokenizer.kind=bpe", f"tokenizer.path={tokenizer_path}"])
        corpus = load_corpus(cfg.data, console=quiet)
        docs = [text for split in corpus.values() for text in split["text"]]
        megabytes = sum(len(d.encode("utf-8")) for d in docs) / 1e6

        def rate(fn) -> float:
            start = time.perf_counter()
            fn()
            return megabytes / (time.perf_counter() - start)

        tok = load_tokenizer(tokenizer_path)
        plain_tokens = sum(len(tok.encode(d).ids) for d in docs)
        prepared = prepare_data(cfg, force=True, console=quiet)
        ours_tokens = sum(s["tokens"] for s in prepared.stats.values())

        def tokenize_and_write() -> int:
            tok = load_tokenizer(tokenizer_path)
            tokenize = _document_encoder(tok, eot_id(tok))
            return sum(_write_tokens(corpus[split], tokenize, prepared.dtype, Path(tmp) / f"{split}.bin",
                                     cfg.data.num_proc, split)["tokens"]
                       for split in corpus)

        in_memory_tokens = tokenize_and_write()
        plain, ours, in_memory = [], [], []
        for _ in range(RUNS):  # interleaved rounds
            plain.append(rate(lambda: [tok.encode(d) for d in docs]))
            ours.append(rate(lambda: prepare_data(cfg, force=True, console=quiet)))
            in_memory.append(rate(tokenize_and_write))
    table(f"Data preparation: {megabytes:.1f} MB of Shakespeare, byte-level BPE (4096), "
          f"median (min-max) of {RUNS} interleaved rounds",
          ["path", "MB/s", "vs plain", "tokens"],
          [["plain loop: tokenizer.encode per document", Spread.of(plain), 1.0, plain_tokens],
           ["llmcli data prepare (load, tokenize, write cache)", Spread.of(ours), ratios(ours, plain), ours_tokens],
           ["tokenize + write only (corpus in memory)", Spread.of(in_memory), ratios(in_memory, plain),
            in_memory_tokens]])
    print("target: llmcli data prepare >= 5 MB/s (tokens include one <|endoftext|> per document)")


if __name__ == "__main__":
    main()
