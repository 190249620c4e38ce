"""Data preparation benchmark: MB/s of text tokenized with byte-level BPE into the token cache.

    python benchmarks/bench_data.py

Tokenizes the Shakespeare corpus (about 5 MB) with a 4096-token byte-level BPE trained once
beforehand, through `prepare_data` (datasets.map, chunked batches, memmap writes). The baseline is
the plain loop: `tokenizer.encode(document)` per play, in the same run.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402

from llmcli.config import load_config  # noqa: E402
from llmcli.data import load_corpus, prepare_data, train_tokenizer_for_config  # noqa: E402
from llmcli.tokenizer import load_tokenizer  # noqa: E402


def main() -> None:
    from rich.console import Console

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

        tok = load_tokenizer(tokenizer_path)
        start = time.perf_counter()
        plain_tokens = sum(len(tok.encode(d).ids) for d in docs)
        plain = megabytes / (time.perf_counter() - start)

        start = time.perf_counter()
        prepared = prepare_data(cfg, force=True, console=quiet)
        ours = megabytes / (time.perf_counter() - start)
        ours_tokens = sum(prepared.stats[s]["tokens"] for s in prepared.stats)
    table(f"Data preparation: {megabytes:.1f} MB of Shakespeare, byte-level BPE (4096)",
          ["path", "MB/s", "vs plain", "tokens"],
          [["plain loop: tokenizer.encode per document", plain, 1.0, plain_tokens],
           ["llmcli data prepare (load, tokenize, write cache)", ours, ours / plain, ours_tokens]])
    print("target: llmcli data prepare >= 5 MB/s (tokens include one <|endoftext|> per document)")


if __name__ == "__main__":
    main()
