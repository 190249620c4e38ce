import json
import os

import numpy as np
import pytest
from rich.console import Console

from llmcli.data.prepare import prepare_data, print_summary, train_tokenizer_for_config
from llmcli.errors import UserError
from llmcli.tokenizer import EOT, decode, load_tokenizer


def test_prepare_writes_arrays_and_reuses_them(txt, cache_dir, cfg):
    c = cfg(f"data.source={txt}")
    first = prepare_data(c, console=Console(quiet=True))
    assert not first.reused and first.dir.parent == cache_dir
    assert first.dtype == np.uint16 and first.eot_id == 0
    names = sorted(p.name for p in first.dir.iterdir())
    assert names == ["config.yaml", "meta.json", "tokenizer.json", "train-00000.bin", "val-00000.bin"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.dir.iterdir()}

    second = prepare_data(c, console=Console(quiet=True))
    assert second.reused and second.dir == first.dir and second.stats == first.stats
    assert {p.name: p.stat().st_mtime_ns for p in first.dir.iterdir()} == mtimes

    forced = prepare_data(c, force=True, console=Console(quiet=True))
    assert not forced.reused and forced.stats == first.stats
    assert np.array_equal(forced.tokens("train"), first.tokens("train"))


def test_prepared_arrays_decode_to_the_documents(tmp_path, cfg, texts, load_corpus):
    folder = tmp_path / "docs"
    folder.mkdir()
    docs = [f"Document {'x' * (i + 1)}.\n" + "words and more words\n" * (i + 1) for i in range(6)]
    for i, d in enumerate(docs):
        (folder / f"{i}.txt").write_text(d)
    c = cfg(f"data.source={folder}", "data.split_by=document", "data.val_fraction=0.2",
            "data.test_fraction=0.2")
    prepared = prepare_data(c, console=Console(quiet=True))
    corpus = load_corpus(c.data)
    tok = load_tokenizer(prepared.tokenizer_path)
    meta = json.loads((prepared.dir / "meta.json").read_text())
    assert meta["splits"] == prepared.stats and meta["dtype"] == "uint16"
    for split in ("train", "val", "test"):
        arr = prepared.tokens(split)
        assert all(isinstance(part, np.memmap) for part in arr.parts) and arr.dtype == np.uint16
        arr = np.asarray(arr)
        stats = prepared.stats[split]
        assert len(arr) == stats["tokens"]
        assert stats["documents"] == len(corpus[split]) == int((arr == prepared.eot_id).sum())
        assert arr[-1] == prepared.eot_id  # every document is followed by EOT
        split_texts = texts(corpus, split)
        assert stats["characters"] == sum(map(len, split_texts))
        assert stats["bytes"] == sum(len(t.encode()) for t in split_texts)
        assert decode(tok, arr) == "".join(t + EOT for t in split_texts)
    assert sum(s["tokens"] for s in prepared.stats.values()) == sum(
        os.path.getsize(prepared.dir / f"{s}-00000.bin") // 2 for s in prepared.stats)


def test_prepare_bpe_and_num_proc(txt, cfg):
    c1 = cfg(f"data.source={txt}", "tokenizer.kind=bpe", "tokenizer.vocab_size=300")
    c2 = cfg(f"data.source={txt}", "tokenizer.kind=bpe", "tokenizer.vocab_size=300", "data.num_proc=2")
    one = prepare_data(c1, console=Console(quiet=True))
    two = prepare_data(c2, console=Console(quiet=True), force=True)
    assert two.dir == one.dir  # num_proc does not change the result, so it is not in the key
    assert one.vocab_size == 300 and one.stats["train"]["tokens"] < one.stats["train"]["characters"]
    assert np.array_equal(np.asarray(one.tokens("train")), np.asarray(two.tokens("train")))


def test_cache_key_follows_inputs(txt, cfg, lines):
    base = prepare_data(cfg(f"data.source={txt}"), console=Console(quiet=True))
    other_split = prepare_data(cfg(f"data.source={txt}", "data.val_fraction=0.2"), console=Console(quiet=True))
    assert other_split.dir != base.dir
    txt.write_text(lines + "one more line\n")
    changed = prepare_data(cfg(f"data.source={txt}"), console=Console(quiet=True))
    assert changed.dir != base.dir and not changed.reused


def test_missing_split_and_tokens_error(txt, cfg):
    prepared = prepare_data(cfg(f"data.source={txt}"), console=Console(quiet=True))
    with pytest.raises(UserError, match="no 'test' split"):
        prepared.tokens("test")


def test_tokenizer_path_and_uint32(tmp_path, txt, cfg, lines):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from llmcli.tokenizer import save_tokenizer

    # A word-level tokenizer with a vocabulary too large for uint16.
    vocab = {"<unk>": 0, EOT: 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    for word in sorted(set(lines.split())):
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "big.json"
    save_tokenizer(tok, path)
    prepared = prepare_data(cfg(f"data.source={txt}", f"tokenizer.path={path}"), console=Console(quiet=True))
    assert prepared.dtype == np.uint32 and prepared.vocab_size == len(vocab)
    arr = np.asarray(prepared.tokens("train"))
    assert arr.max() >= 70_000 and arr[-1] == 1
    with pytest.raises(UserError, match="tokenizer file not found: .*nope.json"):
        prepare_data(cfg(f"data.source={txt}", f"tokenizer.path={tmp_path / 'nope.json'}"))


def test_unseen_val_characters_warn(tmp_path, cfg, quiet):
    path = tmp_path / "t.txt"
    path.write_text("abc abc abc\n" * 20 + "xyz Ω\n")
    console, out = quiet()
    prepare_data(cfg(f"data.source={path}", "data.val_fraction=0.02"), console=console)
    assert out.getvalue() == ("warning: val: 3 character(s) not in the tokenizer's vocabulary are "
                              "encoded as <unk>: 'y' 'z' 'Ω'\n")


def test_print_summary(txt, cfg, quiet):
    prepared = prepare_data(cfg(f"data.source={txt}"), console=Console(quiet=True))
    console, out = quiet()
    print_summary(prepared, console=console)
    text = out.getvalue()
    for word in ("split", "documents", "characters", "tokens", "chars/token", "train", "val",
                 f"{prepared.stats['train']['tokens']:,}", str(prepared.dir), "built in"):
        assert word in text
    console, out = quiet()
    print_summary(prepare_data(cfg(f"data.source={txt}"), console=Console(quiet=True)), console=console)
    assert "(reused)" in out.getvalue()


def test_train_tokenizer_for_config(tmp_path, txt, cfg, quiet):
    out = tmp_path / "tok.json"
    console, log = quiet()
    train_tokenizer_for_config(cfg(f"data.source={txt}", "tokenizer.kind=bpe", "tokenizer.vocab_size=280"),
                               out, console=console)
    assert load_tokenizer(out).get_vocab_size() == 280
    assert f"bpe tokenizer, vocab size 280 -> {out}" in log.getvalue()
    with pytest.raises(UserError, match="already exists .*--overwrite"):
        train_tokenizer_for_config(cfg(f"data.source={txt}"), out)
    train_tokenizer_for_config(cfg(f"data.source={txt}"), out, overwrite=True, console=console)
    assert load_tokenizer(out).get_vocab_size() < 280  # now a char tokenizer
    folder = tmp_path / "toks"
    folder.mkdir()
    assert train_tokenizer_for_config(cfg(f"data.source={txt}"), folder, console=console) == folder / "tokenizer.json"
    assert train_tokenizer_for_config(cfg(f"data.source={txt}"), f"{tmp_path}/new/", console=console) == \
        tmp_path / "new" / "tokenizer.json"


def test_train_tokenizer_unwritable(tmp_path, txt, cfg):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        train_tokenizer_for_config(cfg(f"data.source={txt}"), blocker / "tok.json")


def test_tokenizer_without_eot_gets_one(tmp_path, txt, cfg, quiet, lines):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from llmcli.tokenizer import save_tokenizer

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(sorted(set(lines.split())))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "noeot.json"
    save_tokenizer(tok, path)
    console, out = quiet()
    prepared = prepare_data(cfg(f"data.source={txt}", f"tokenizer.path={path}"), console=console)
    assert prepared.eot_id == len(vocab) and prepared.vocab_size == len(vocab) + 1
    assert f"has no {EOT} token; added it with id {len(vocab)}" in out.getvalue()
    assert load_tokenizer(prepared.tokenizer_path).token_to_id(EOT) == len(vocab)
