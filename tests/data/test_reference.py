"""Prepared token shards equal, token for token, an independent simple reference: every document of
every split read whole into memory, split as split.py documents it, tokenized by a tokenizer trained
on the whole training documents, and encoded one document at a time followed by <|endoftext|>."""

import bz2
import gzip
import json
import lzma

import numpy as np
import pytest
from rich.console import Console

from llmcli.data.prepare import prepare_data
from llmcli.data.shakespeare import markdown_to_text, shakespeare_plays, shakespeare_split_plays
from llmcli.tokenizer import EOT, train_tokenizer

KINDS = [("char", []), ("bpe", ["tokenizer.vocab_size=400"]), ("word", ["tokenizer.vocab_size=300"])]


def reference_tail(docs: list[str], val_fraction: float, test_fraction: float) -> dict[str, list[str]]:
    """split_by=tail as documented: [train | test | val] by characters, cuts moved forward to the next
    line start when one is within 1000 characters of the same document."""
    text = "".join(docs)
    starts = np.cumsum([0] + [len(d) for d in docs])

    def snap(pos: int, limit: int) -> int:
        doc = int(np.searchsorted(starts, pos, side="right")) - 1
        if doc >= len(docs) or pos == starts[doc] or text[pos - 1] == "\n":
            return pos
        newline = text.find("\n", pos, min(pos + 1000, starts[doc + 1]))
        return newline + 1 if newline != -1 and newline + 1 < limit else pos

    total = len(text)
    val = snap(total - max(1, round(total * val_fraction)), total) if val_fraction else total
    test = min(snap(val - max(1, round(total * test_fraction)), val), val) if test_fraction else val
    out = {}
    for name, (lo, hi) in {"train": (0, test), "test": (test, val), "val": (val, total)}.items():
        pieces = [text[max(lo, a):min(hi, b)] for a, b in zip(starts[:-1], starts[1:], strict=True)]
        out[name] = [p for p in pieces if p]
    return {k: v for k, v in out.items() if v or k == "train"}


def check_equal(prepared, splits: dict[str, list[str]], tokenizer_cfg) -> None:
    tok = train_tokenizer(tokenizer_cfg, splits["train"])
    assert json.loads(prepared.tokenizer_path.read_text()) == json.loads(tok.to_str())
    eot = tok.token_to_id(EOT)
    assert sorted(prepared.splits) == sorted(splits)
    for split, docs in splits.items():
        expected = np.array([t for d in docs for t in tok.encode(d, add_special_tokens=False).ids + [eot]])
        assert np.array_equal(np.asarray(prepared.tokens(split)), expected), split
        assert prepared.stats[split]["documents"] == len(docs)
        assert prepared.stats[split]["characters"] == sum(map(len, docs))


@pytest.mark.slow
@pytest.mark.parametrize("kind, extra", KINDS)
def test_shakespeare_matches_the_reference(cfg, kind, extra):
    c = cfg(f"tokenizer.kind={kind}", *extra)
    plays = shakespeare_plays()
    splits = {split: [markdown_to_text(plays[name].read_text(encoding="utf-8")) for name in names]
              for split, names in shakespeare_split_plays(c.data).items()}
    check_equal(prepare_data(c, console=Console(quiet=True)), splits, c.tokenizer)


def _corpus_docs() -> list[str]:
    lines = ["First Citizen:", "Before we proceed any further, hear me speak.", "", "All:  Speak,  speak.",
             "\tROMEO: But, soft! what light through yonder window breaks?", "ünïcödé 日本 😀 'tis 42"]
    return ["\n".join(lines[(i * 7 + j) % len(lines)] + " " * (j % 3) for j in range(40 + 13 * i)) + "\n"
            for i in range(5)]


@pytest.mark.parametrize("kind, extra", KINDS)
def test_multi_file_text_matches_the_reference(tmp_path, cfg, kind, extra):
    docs = _corpus_docs()
    for i, doc in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(doc)
    c = cfg(f"data.source={tmp_path}", "data.val_fraction=0.15", "data.test_fraction=0.1",
            f"tokenizer.kind={kind}", "tokenizer.min_frequency=1", *extra)
    check_equal(prepare_data(c, console=Console(quiet=True)), reference_tail(docs, 0.15, 0.1), c.tokenizer)


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst"])
def test_compressed_files_match_the_reference(tmp_path, cfg, suffix):
    pa = pytest.importorskip("pyarrow")
    docs = _corpus_docs()
    for i, doc in enumerate(docs):
        raw = doc.encode()
        if suffix == ".zst":
            with pa.CompressedOutputStream(str(tmp_path / f"{i}.txt{suffix}"), "zstd") as out:
                out.write(raw)
            continue
        packed = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[suffix](raw)
        (tmp_path / f"{i}.txt{suffix}").write_bytes(packed)
    c = cfg(f"data.source={tmp_path}", "tokenizer.kind=bpe", "tokenizer.vocab_size=400",
            "tokenizer.min_frequency=1")
    check_equal(prepare_data(c, console=Console(quiet=True)), reference_tail(docs, 0.1, 0.0), c.tokenizer)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_rows_match_the_reference(tmp_path, cfg, fmt):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = [line + "\n" for doc in _corpus_docs() for line in doc.split("\n")[:30] if line.strip()]
    rows = [{"id": i, "body": d} for i, d in enumerate(docs)]
    path = tmp_path / f"rows.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=17)
    c = cfg(f"data.source={path}", "data.text_field=body", "data.val_fraction=0.2", "tokenizer.kind=bpe",
            "tokenizer.vocab_size=400", "tokenizer.min_frequency=1")
    check_equal(prepare_data(c, console=Console(quiet=True)), reference_tail(docs, 0.2, 0.0), c.tokenizer)
