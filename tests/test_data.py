import io
import json
import os
import re

import numpy as np
import pytest
from rich.console import Console

from llmcli.config import load_config
from llmcli.data import (
    DEFAULT_TEST_PLAYS,
    DEFAULT_VAL_PLAYS,
    load_corpus,
    markdown_to_text,
    prepare_data,
    print_summary,
    shakespeare_plays,
    shakespeare_split_plays,
    train_tokenizer_for_config,
)
from llmcli.errors import UserError
from llmcli.tokenizer import EOT, decode, load_tokenizer


def cfg(*overrides):
    return load_config(None, list(overrides))


def texts(corpus, split):
    return list(corpus[split]["text"])


def quiet():
    buf = io.StringIO()
    return Console(file=buf, width=200), buf


LINES = "".join(f"line {i:03d}: the quick brown fox jumps over the lazy dog.\n" for i in range(200))


@pytest.fixture
def txt(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(LINES)
    return path


# --------------------------------------------------------------------------------------------
# Shakespeare


def test_markdown_to_text_handles_every_construct():
    md = (
        "# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore. A platform.\n\n"
        "_FRANCISCO at his post. Enter to him\nBERNARDO_\n\n"
        "**BERNARDO**  \nWho's there?  \nStand, _\\[Aside]_ and unfold\n\n"
        "**LYSANDER**  \n__\\[Awaking]_  \nAnd run through fire.\n\n"
        "**PAGE**  \n[Within]_  \nWho's there?\n\n"
        "*Enter King Edward, and\nArtois.*\n\n"
        "**KING EDWARD**  \n*[Aside.]* 'Commend me'\\--and 9\\. more _\\[ ]_\n\n"
        "_Burthen _\\[dispersedly, within_\n\n"
        "_Exit Ghost_\n"
    )
    assert markdown_to_text(md) == (
        "Hamlet\n\nACT I\n\nSCENE I. Elsinore. A platform.\n\n"
        "[FRANCISCO at his post. Enter to him BERNARDO]\n\n"
        "BERNARDO:\nWho's there?\nStand, [Aside] and unfold\n\n"
        "LYSANDER:\n[Awaking]\nAnd run through fire.\n\n"
        "PAGE:\n[Within]\nWho's there?\n\n"
        "[Enter King Edward, and Artois.]\n\n"
        "KING EDWARD:\n[Aside.] 'Commend me'--and 9. more\n\n"
        "[Burthen dispersedly, within]\n\n"
        "[Exit Ghost]\n"
    )


@pytest.fixture(scope="module")
def shakespeare():
    return load_corpus(cfg().data, console=Console(quiet=True))


def test_shakespeare_has_38_plays_split_by_play(shakespeare):
    plays = shakespeare_plays()
    assert len(plays) == 38 and "hamlet" in plays and "a-midsummer-night-s-dream" in plays
    split = shakespeare_split_plays(cfg().data)
    assert split["val"] == DEFAULT_VAL_PLAYS and split["test"] == DEFAULT_TEST_PLAYS
    names = split["train"] + split["val"] + split["test"]
    assert sorted(names) == sorted(plays) and len(set(names)) == 38  # disjoint, cover every play
    assert {s: len(shakespeare[s]) for s in shakespeare} == {"train": 34, "val": 2, "test": 2}
    chars = {s: sum(map(len, texts(shakespeare, s))) for s in shakespeare}
    total = sum(chars.values())
    assert 0.86 < chars["train"] / total < 0.92
    assert 0.03 < chars["val"] / total < 0.07 and 0.03 < chars["test"] / total < 0.07
    assert texts(shakespeare, "val")[0].startswith("Macbeth\n\nACT I\n\nSCENE I.")


def test_shakespeare_text_is_plain(shakespeare):
    everything = [t for s in shakespeare for t in texts(shakespeare, s)]
    for text in everything:
        assert text.strip()
        for mark in ("#", "*", "_", "\\", "`", "  \n", "[[", "]]", "[]"):
            assert mark not in text, (mark, text[:40])
        assert not re.search(r" +$", text, re.M)
        assert text.count("[") == text.count("]")
    hamlet = next(t for t in texts(shakespeare, "train") if t.startswith("Hamlet\n"))
    assert "\n\nHAMLET:\nO, that this too too solid flesh would melt\n" in hamlet
    assert "\n\n[Enter Ghost]\n\n" in hamlet
    speakers = re.findall(r"^([A-Z][A-Za-z .,'&-]*):$", hamlet, re.M)
    assert {"HAMLET", "HORATIO", "OPHELIA", "First Clown"} <= set(speakers)


def test_play_lists_override_and_names_are_normalized():
    corpus = load_corpus(cfg("data.val_plays=[A Midsummer Night's Dream]", "data.test_plays=[]").data)
    assert list(corpus) == ["train", "val"]
    assert texts(corpus, "val")[0].startswith("A Midsummer Night's Dream\n\nACT I\n")
    assert len(corpus["train"]) == 37


def test_unknown_or_overlapping_plays():
    with pytest.raises(UserError, match=r"data.val_plays: unknown play 'hamlett'; valid names: .*hamlet"):
        load_corpus(cfg("data.val_plays=[hamlett]").data)
    with pytest.raises(UserError, match="both contain hamlet"):
        load_corpus(cfg("data.val_plays=[hamlet]", "data.test_plays=[hamlet]").data)


# --------------------------------------------------------------------------------------------
# Local files


def test_txt_tail_split_is_contiguous(txt):
    corpus = load_corpus(cfg(f"data.source={txt}").data)
    assert list(corpus) == ["train", "val"]
    train, val = texts(corpus, "train"), texts(corpus, "val")
    assert train[0] + val[0] == LINES
    assert val[0].startswith("line ")  # the cut moved to a line start
    assert abs(len(val[0]) / len(LINES) - 0.1) < 0.01


def test_tail_split_test_sits_before_val(txt):
    base = load_corpus(cfg(f"data.source={txt}").data)
    corpus = load_corpus(cfg(f"data.source={txt}", "data.test_fraction=0.2").data)
    train, val, test = (texts(corpus, s)[0] for s in ("train", "val", "test"))
    assert train + test + val == LINES
    assert val == texts(base, "val")[0]  # adding a test split leaves val unchanged
    assert abs(len(test) / len(LINES) - 0.2) < 0.01


def test_folder_of_txt(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    for i in range(10):
        (folder / ("sub" if i % 2 else "") / f"doc{i}.txt").write_text(f"document {i}\n" * 20)
    (folder / "empty.txt").write_text("  \n")
    (folder / ".hidden" / "secret.txt").write_text("not data")
    (folder / "notes.md").write_text("ignored")
    by_tail = load_corpus(cfg(f"data.source={folder}").data)
    assert len(by_tail["train"]) + len(by_tail["val"]) == 10  # the last document is val
    assert texts(by_tail, "val") == ["document 9\n" * 20]
    by_doc = load_corpus(cfg(f"data.source={folder}", "data.split_by=document", "data.val_fraction=0.2",
                             "data.test_fraction=0.1").data)
    sizes = {s: len(by_doc[s]) for s in by_doc}
    assert sizes == {"train": 7, "val": 2, "test": 1}
    every = sorted(t for s in by_doc for t in texts(by_doc, s))
    assert every == sorted(f"document {i}\n" * 20 for i in range(10))
    assert "not data" not in every
    again = load_corpus(cfg(f"data.source={folder}", "data.split_by=document", "data.val_fraction=0.2",
                            "data.test_fraction=0.1").data)
    assert texts(again, "val") == texts(by_doc, "val")  # deterministic
    glob = load_corpus(cfg(f"data.source={folder}/**/doc*.txt", "data.split_by=document").data)
    assert len(glob["train"]) + len(glob["val"]) == 10


def test_split_by_document_needs_documents(txt):
    with pytest.raises(UserError, match="too few"):
        load_corpus(cfg(f"data.source={txt}", "data.split_by=document").data)


def test_jsonl_csv_parquet_with_text_field(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"id": i, "body": f"row {i} " * 10} for i in range(10)]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv = tmp_path / "b.csv"
    csv.write_text("id,body\n" + "".join(f'{r["id"]},"{r["body"]}"\n' for r in rows))
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    for path in (jsonl, csv, parquet):
        corpus = load_corpus(cfg(f"data.source={path}", "data.text_field=body",
                                 "data.split_by=document").data)
        assert sorted(t for s in corpus for t in texts(corpus, s)) == sorted(r["body"] for r in rows)
        assert len(corpus["val"]) == 1
    with pytest.raises(UserError, match=r"data.text_field: no column 'text' in .*a.jsonl \(columns: id, body\)"):
        load_corpus(cfg(f"data.source={jsonl}").data)
    with pytest.raises(UserError, match="column 'id' .* not text"):
        load_corpus(cfg(f"data.source={csv}", "data.text_field=id").data)


def test_mixed_folder(tmp_path):
    (tmp_path / "a.txt").write_text("plain text document\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "json document\n"}) + "\n")
    corpus = load_corpus(cfg(f"data.source={tmp_path}", "data.val_fraction=0").data)
    assert texts(corpus, "train") == ["plain text document\n", "json document\n"]


def test_non_utf8(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good text\n" * 5 + b"caf\xe9 \xff\xfe end\n" + b"more text\n" * 5)
    with pytest.raises(UserError, match=r"bad.txt: not valid UTF-8 at byte 53 \(line 6\); set data.encoding_errors=replace"):
        load_corpus(cfg(f"data.source={bad}").data)
    console, out = quiet()
    corpus = load_corpus(cfg(f"data.source={bad}", "data.encoding_errors=replace").data, console=console)
    assert "caf\ufffd \ufffd\ufffd end" in "".join(texts(corpus, "train") + texts(corpus, "val"))
    assert out.getvalue().count("\n") == 1
    assert re.fullmatch(r"warning: .*bad.txt: replaced 3 invalid UTF-8 byte sequence\(s\) with U\+FFFD\n",
                        out.getvalue())

    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n{"text": "fine"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl: not valid UTF-8 at byte 28 \(line 2\)"):
        load_corpus(cfg(f"data.source={jsonl}").data)
    corpus = load_corpus(cfg(f"data.source={jsonl}", "data.encoding_errors=replace",
                             "data.split_by=document").data, console=Console(quiet=True))
    assert "caf\ufffd" in [t for s in corpus for t in texts(corpus, s)]


def test_saved_datasets(tmp_path):
    import datasets

    own = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["a b c\n", "d e f\n", ""]}),
        "validation": datasets.Dataset.from_dict({"text": ["g h\n"]}),
        "test": datasets.Dataset.from_dict({"text": ["i j\n"]}),
    })
    own.save_to_disk(tmp_path / "dd")
    corpus = load_corpus(cfg(f"data.source={tmp_path / 'dd'}").data)
    assert {s: texts(corpus, s) for s in corpus} == {"train": ["a b c\n", "d e f\n"], "val": ["g h\n"],
                                                      "test": ["i j\n"]}
    single = datasets.Dataset.from_dict({"content": [f"doc {i}\n" for i in range(10)]})
    single.save_to_disk(tmp_path / "single")
    corpus = load_corpus(cfg(f"data.source={tmp_path / 'single'}", "data.text_field=content",
                             "data.split_by=document").data)
    assert (len(corpus["train"]), len(corpus["val"])) == (9, 1)
    with pytest.raises(UserError, match=r"no column 'text' in .*single \[train\] \(columns: content\)"):
        load_corpus(cfg(f"data.source={tmp_path / 'single'}").data)


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_text(""), "is empty"),
    (lambda p: p.mkdir(), "contains no supported files"),
    (lambda p: (p.mkdir(), (p / "x.md").write_text("x")), "contains no supported files"),
    (lambda p: (p.mkdir(), (p / "a.txt").write_text(" "), (p / "b.txt").write_text("\n")),
     "has only empty documents"),
])
def test_missing_and_empty_sources(tmp_path, setup, message):
    path = tmp_path / "src.txt"
    setup(path)
    with pytest.raises(UserError, match=message) as info:
        load_corpus(cfg(f"data.source={path}").data)
    assert "src.txt" in str(info.value) and "\n" not in str(info.value)


def test_glob_without_matches(tmp_path):
    with pytest.raises(UserError, match="no files match"):
        load_corpus(cfg(f"data.source={tmp_path}/*.txt").data)


def test_hub_failure_is_one_line(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/nothing' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"^could not load hub dataset 'someone/nothing': Couldn't reach [^\n]*$"):
        load_corpus(cfg("data.source=hf:someone/nothing").data)


def test_hub_uses_the_same_split_logic(monkeypatch):
    import datasets

    def fake(name, config=None):
        assert (name, config) == ("org/set", "small")
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": [f"{i}\n" for i in range(20)]}),
                                     "test": datasets.Dataset.from_dict({"text": ["t\n"]})})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    corpus = load_corpus(cfg("data.source=hf:org/set", "data.hf_config=small", "data.split_by=document").data)
    assert {s: len(corpus[s]) for s in corpus} == {"train": 18, "val": 2, "test": 1}


# --------------------------------------------------------------------------------------------
# prepare_data


def test_prepare_writes_arrays_and_reuses_them(txt, cache_dir):
    c = cfg(f"data.source={txt}")
    first = prepare_data(c, console=Console(quiet=True))
    assert not first.reused and first.dir.parent == cache_dir
    assert first.dtype == np.uint16 and first.eot_id == 0
    names = sorted(p.name for p in first.dir.iterdir())
    assert names == ["config.yaml", "meta.json", "tokenizer.json", "train.bin", "val.bin"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.dir.iterdir()}

    second = prepare_data(c, console=Console(quiet=True))
    assert second.reused and second.dir == first.dir and second.stats == first.stats
    assert {p.name: p.stat().st_mtime_ns for p in first.dir.iterdir()} == mtimes

    forced = prepare_data(c, force=True, console=Console(quiet=True))
    assert not forced.reused and forced.stats == first.stats
    assert np.array_equal(forced.tokens("train"), first.tokens("train"))


def test_prepared_arrays_decode_to_the_documents(tmp_path):
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
        assert isinstance(arr, np.memmap) and arr.dtype == np.uint16
        stats = prepared.stats[split]
        assert len(arr) == stats["tokens"]
        assert stats["documents"] == len(corpus[split]) == int((arr == prepared.eot_id).sum())
        assert arr[-1] == prepared.eot_id  # every document is followed by EOT
        split_texts = texts(corpus, split)
        assert stats["characters"] == sum(map(len, split_texts))
        assert stats["bytes"] == sum(len(t.encode()) for t in split_texts)
        assert decode(tok, arr) == "".join(t + EOT for t in split_texts)
    assert sum(s["tokens"] for s in prepared.stats.values()) == sum(
        os.path.getsize(prepared.dir / f"{s}.bin") // 2 for s in prepared.stats)


def test_prepare_bpe_and_num_proc(txt):
    c1 = cfg(f"data.source={txt}", "tokenizer.kind=bpe", "tokenizer.vocab_size=300")
    c2 = cfg(f"data.source={txt}", "tokenizer.kind=bpe", "tokenizer.vocab_size=300", "data.num_proc=2")
    one = prepare_data(c1, console=Console(quiet=True))
    two = prepare_data(c2, console=Console(quiet=True), force=True)
    assert two.dir == one.dir  # num_proc does not change the result, so it is not in the key
    assert one.vocab_size == 300 and one.stats["train"]["tokens"] < one.stats["train"]["characters"]
    assert np.array_equal(np.asarray(one.tokens("train")), np.asarray(two.tokens("train")))


def test_cache_key_follows_inputs(txt):
    base = prepare_data(cfg(f"data.source={txt}"), console=Console(quiet=True))
    other_split = prepare_data(cfg(f"data.source={txt}", "data.val_fraction=0.2"), console=Console(quiet=True))
    assert other_split.dir != base.dir
    txt.write_text(LINES + "one more line\n")
    changed = prepare_data(cfg(f"data.source={txt}"), console=Console(quiet=True))
    assert changed.dir != base.dir and not changed.reused


def test_missing_split_and_tokens_error(txt):
    prepared = prepare_data(cfg(f"data.source={txt}"), console=Console(quiet=True))
    with pytest.raises(UserError, match="no 'test' split"):
        prepared.tokens("test")


def test_tokenizer_path_and_uint32(tmp_path, txt):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from llmcli.tokenizer import save_tokenizer

    # A word-level tokenizer with a vocabulary too large for uint16.
    vocab = {"<unk>": 0, EOT: 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    for word in sorted(set(LINES.split())):
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "big.json"
    save_tokenizer(tok, path)
    prepared = prepare_data(cfg(f"data.source={txt}", f"tokenizer.path={path}"), console=Console(quiet=True))
    assert prepared.dtype == np.uint32 and prepared.vocab_size == len(vocab)
    arr = prepared.tokens("train")
    assert arr.max() >= 70_000 and arr[-1] == 1
    with pytest.raises(UserError, match="tokenizer file not found: .*nope.json"):
        prepare_data(cfg(f"data.source={txt}", f"tokenizer.path={tmp_path / 'nope.json'}"))


def test_unseen_val_characters_warn(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abc abc abc\n" * 20 + "xyz Ω\n")
    console, out = quiet()
    prepare_data(cfg(f"data.source={path}", "data.val_fraction=0.02"), console=console)
    assert out.getvalue() == ("warning: val: 3 character(s) not in the tokenizer's vocabulary are "
                              "encoded as <unk>: 'y' 'z' 'Ω'\n")


def test_print_summary(txt):
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


def test_train_tokenizer_for_config(tmp_path, txt):
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


def test_train_tokenizer_unwritable(tmp_path, txt):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        train_tokenizer_for_config(cfg(f"data.source={txt}"), blocker / "tok.json")


def test_tokenizer_without_eot_gets_one(tmp_path, txt):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from llmcli.tokenizer import save_tokenizer

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(sorted(set(LINES.split())))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "noeot.json"
    save_tokenizer(tok, path)
    console, out = quiet()
    prepared = prepare_data(cfg(f"data.source={txt}", f"tokenizer.path={path}"), console=console)
    assert prepared.eot_id == len(vocab) and prepared.vocab_size == len(vocab) + 1
    assert f"has no {EOT} token; added it with id {len(vocab)}" in out.getvalue()
    assert load_tokenizer(prepared.tokenizer_path).token_to_id(EOT) == len(vocab)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_long_documents_are_encoded_in_pieces_with_identical_ids(tmp_path, monkeypatch, kind):
    import llmcli.data as data_mod
    from llmcli.tokenizer import encode

    lines = ["plain line", "trailing space ", "  leading", "", "'s contraction", "42 numbers 7",
             "\tTab", "ünïcödé 日本 😀", "x", "end."]
    doc = "\n".join(lines[i % len(lines)] + str(i % 3) * (i % 2) for i in range(400)) + "\n"
    path = tmp_path / "long.txt"
    path.write_text(doc)
    monkeypatch.setattr(data_mod, "PIECE_CHARS", 40)
    assert len(data_mod._pieces(doc, True)) > 50
    prepared = prepare_data(cfg(f"data.source={path}", "data.val_fraction=0", f"tokenizer.kind={kind}",
                                "tokenizer.vocab_size=320", "tokenizer.min_frequency=1"),
                            console=Console(quiet=True))
    tok = load_tokenizer(prepared.tokenizer_path)
    assert prepared.tokens("train").tolist() == encode(tok, doc) + [prepared.eot_id]


# --------------------------------------------------------------------------------------------
# Byte-level BPE through the chunk cache

NASTY = [
    "", " ", "\n", "  \t \r\n", "plain words, and more words.", "  leading and trailing  ",
    "tabs\tand\t\ttabs\t", "windows\r\nlines\r\n\r\nend\r\n", "it's I'll 'tis they've we'd 'S 's'",
    "digits 123 4567890 3.14 1,000", "punctuation!!! ... ?!?; -- (x) [y] {z} \"q\" ''",
    "accents: café naïve Ærø", "CJK: 日本語のテキスト", "emoji: 😀👍🏽 👨‍👩‍👧",
    "nbsp:\xa0a\xa0 b \xa0c\xa0", "separators\u2028here \u2029", "file\x1cseparator \x1c x\x1d\x1e\x1f",
    "end.\x1c\x1d next!\x1f? \x1e.", "a \xa0 b\xa0  c\u3000\t d",
    "odd\x0bvertical\x0cfeed \x85next", "wide\u3000space \u2003em",
    "special <|endoftext|> inside<|endoftext|>text <|endoftext|>", "<|endoftext|>",
]


def nasty_bpe():
    from llmcli.config import TokenizerConfig
    from llmcli.tokenizer import train_tokenizer

    return train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=400, min_frequency=1), NASTY * 3)


def pre_tokens(tok, *strings):
    return [piece for string in strings for piece, _ in tok.pre_tokenizer.pre_tokenize_str(string)]


def test_bpe_by_chunks_gives_the_ids_of_plain_encode(monkeypatch):
    import llmcli.data as data_mod
    from llmcli.tokenizer import encode, eot_id

    tok = nasty_bpe()
    assert data_mod._by_chunks(json.loads(tok.to_str()))
    monkeypatch.setattr(data_mod, "PIECE_CHARS", 30)  # long texts in pieces,
    monkeypatch.setattr(data_mod, "CHUNK_GROUP_CHARS", 200)  # pieces in several groups,
    monkeypatch.setattr(data_mod, "JOINED_CHUNKS", 3)  # several strings to the tokenizer,
    monkeypatch.setattr(data_mod, "CACHED_CHUNKS", 40)  # and the cache starts over on the way
    docs = NASTY + ["\n".join(NASTY), " ".join(NASTY), "\n\n".join(NASTY * 3)]
    for text in docs:  # chunks cut nowhere inside a pre-token
        chunks = data_mod._CHUNK.findall(text)
        assert "".join(chunks) == text
        assert pre_tokens(tok, *chunks) == pre_tokens(tok, text)
    want = [encode(tok, text) + [eot_id(tok)] for text in docs]
    tokenize = data_mod._document_encoder(tok, eot_id(tok))
    for _ in range(2):  # the second time mostly from the cache
        assert [ids.tolist() for ids in tokenize(docs)] == want


def test_prepared_plays_have_the_ids_of_plain_encode(tmp_path, shakespeare):
    from llmcli.config import TokenizerConfig
    from llmcli.tokenizer import encode, save_tokenizer, train_tokenizer

    path = tmp_path / "bpe.json"
    save_tokenizer(train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=1000), texts(shakespeare, "val")), path)
    prepared = prepare_data(cfg(f"tokenizer.path={path}"), console=Console(quiet=True))
    tok = load_tokenizer(prepared.tokenizer_path)
    for split in ("val", "test"):  # four whole plays
        want = [i for play in texts(shakespeare, split) for i in encode(tok, play) + [prepared.eot_id]]
        assert prepared.tokens(split).tolist() == want


@pytest.mark.parametrize("change, by_chunks", [
    ("added token with a space", False), ("lstrip added token", False), ("add_prefix_space", False),
    ("second added token", True),  # chunks, but each encoded on its own
])
def test_other_bpe_tokenizers_keep_the_ids_of_plain_encode(tmp_path, change, by_chunks):
    from tokenizers import AddedToken, pre_tokenizers

    import llmcli.data as data_mod
    from llmcli.tokenizer import encode, save_tokenizer

    tok = nasty_bpe()
    if change == "added token with a space":
        tok.add_tokens(["and more"])
    elif change == "lstrip added token":
        tok.add_special_tokens([AddedToken("<sep>", lstrip=True)])
    elif change == "add_prefix_space":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    else:
        tok.add_special_tokens(["<pad>"])
    assert data_mod._by_chunks(json.loads(tok.to_str())) == by_chunks
    save_tokenizer(tok, tmp_path / "tok.json")
    doc = "\n".join(NASTY) + " and more <sep> words <pad>\n"
    (tmp_path / "doc.txt").write_text(doc, encoding="utf-8", newline="")
    prepared = prepare_data(cfg(f"data.source={tmp_path / 'doc.txt'}", "data.val_fraction=0",
                                f"tokenizer.path={tmp_path / 'tok.json'}"), console=Console(quiet=True))
    assert prepared.tokens("train").tolist() == encode(tok, doc) + [prepared.eot_id]


def test_chunks_are_joined_only_by_a_separator_that_cannot_overlap():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    import llmcli.data as data_mod
    from llmcli.tokenizer import encode

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    docs = ["plain aX words aX more aX", "aX aX", "x <|endoftext|> y"]
    tok.train_from_iterator(docs * 5, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["aXa"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    eot = tok.token_to_id("aXa")  # " aX" + "aXa" would match "aXa" one character early
    assert data_mod._ChunkEncoder(tok, eot).separator is None
    tokenize = data_mod._document_encoder(tok, eot)
    assert [ids.tolist() for ids in tokenize(docs)] == [encode(tok, text) + [eot] for text in docs]
