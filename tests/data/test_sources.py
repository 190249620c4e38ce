import json
import re

import pytest
from rich.console import Console

from llmcli.errors import UserError


def test_folder_of_txt(tmp_path, cfg, texts, load_corpus):
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


def test_jsonl_csv_parquet_with_text_field(tmp_path, cfg, texts, load_corpus):
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


def test_mixed_folder(tmp_path, cfg, texts, load_corpus):
    (tmp_path / "a.txt").write_text("plain text document\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "json document\n"}) + "\n")
    corpus = load_corpus(cfg(f"data.source={tmp_path}", "data.val_fraction=0").data)
    assert texts(corpus, "train") == ["plain text document\n", "json document\n"]


def test_non_utf8(tmp_path, cfg, texts, quiet, load_corpus):
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


def test_saved_datasets(tmp_path, cfg, texts, load_corpus):
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
def test_missing_and_empty_sources(tmp_path, setup, message, cfg, load_corpus):
    path = tmp_path / "src.txt"
    setup(path)
    with pytest.raises(UserError, match=message) as info:
        load_corpus(cfg(f"data.source={path}").data)
    assert "src.txt" in str(info.value) and "\n" not in str(info.value)


def test_glob_without_matches(tmp_path, cfg, load_corpus):
    with pytest.raises(UserError, match="no files match"):
        load_corpus(cfg(f"data.source={tmp_path}/*.txt").data)


def test_hub_failure_is_one_line(monkeypatch, cfg, load_corpus):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/nothing' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"^could not load hub dataset 'someone/nothing': Couldn't reach [^\n]*$"):
        load_corpus(cfg("data.source=hf:someone/nothing").data)


def test_hub_uses_the_same_split_logic(monkeypatch, cfg, load_corpus):
    import datasets

    def fake(name, config=None):
        assert (name, config) == ("org/set", "small")
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": [f"{i}\n" for i in range(20)]}),
                                     "test": datasets.Dataset.from_dict({"text": ["t\n"]})})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    corpus = load_corpus(cfg("data.source=hf:org/set", "data.hf_config=small", "data.split_by=document").data)
    assert {s: len(corpus[s]) for s in corpus} == {"train": 18, "val": 2, "test": 1}


def test_jsonl_files_with_different_other_columns_read_their_text_field(tmp_path, cfg, texts, load_corpus):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": f"first {i} " * 5}) + "\n" for i in range(6)))
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": f"second {i} " * 5, "extra": i}) + "\n"
                                            for i in range(6)))
    corpus = load_corpus(cfg(f"data.source={folder}", "data.split_by=document").data)
    assert sum(len(texts(corpus, s)) for s in corpus) == 12
    (folder / "c.jsonl").write_text(json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(UserError, match=r"no column 'text' in .*c.jsonl \(columns: body\)"):
        load_corpus(cfg(f"data.source={folder}").data)
