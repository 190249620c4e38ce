"""Paired data: the CMUdict default split by word, local files, and the bad inputs."""

from __future__ import annotations

import json

import pytest

from llmcli.config_loader import load_config
from llmcli.data.cmudict import cmudict_pairs
from llmcli.data.pairs import load_pairs, split_pairs
from llmcli.data.sources import _stderr_console
from llmcli.errors import UserError


def test_cmudict_pairs_are_words_and_phonemes():
    pairs = cmudict_pairs()
    assert len(pairs) > 130_000
    assert ("shakespeare", "SH EY1 K S P IY2 R") in pairs
    assert all(not any(ch.isdigit() for ch in p) for _, p in cmudict_pairs(stress=False)[:1000])


def test_cmudict_split_keeps_every_word_in_one_split():
    cfg = load_config(None, ["data.task=seq2seq", "data.val_fraction=0.05", "data.test_fraction=0.05"]).data
    splits = load_pairs(cfg, _stderr_console())
    words = {name: {w for w, _ in rows} for name, rows in splits.items()}
    assert set(splits) == {"train", "val", "test"}
    assert not (words["train"] & words["val"]) and not (words["train"] & words["test"]) and not (words["val"] & words["test"])
    assert sum(map(len, splits.values())) == len(cmudict_pairs())  # alternatives stay, beside their word
    assert 0.04 < len(words["test"]) / sum(map(len, words.values())) < 0.06
    assert load_pairs(cfg, _stderr_console()) == splits  # a fixed seed


def test_split_by_source_is_fixed_and_keeps_alternatives_together():
    pairs = [(f"w{i}", f"p{j}") for i in range(50) for j in range(1 + i % 3)]
    cfg = load_config(None, ["data.task=seq2seq", "data.val_fraction=0.2"]).data
    first, again = split_pairs(pairs, cfg), split_pairs(list(pairs), cfg)
    assert first == again and set(first) == {"train", "val"}
    for rows in first.values():
        for word in {w for w, _ in rows}:
            assert [p for w, p in rows if w == word] == [p for w, p in pairs if w == word]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv"])
def test_local_pair_files(tmp_path, suffix):
    rows = [("hallo welt", "hello world"), ("guten tag", "good day"), ("danke", "thanks")] * 4
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({"de": s, "en": t}) + "\n" for s, t in rows))
    else:
        sep = "," if suffix == ".csv" else "\t"
        path.write_text(f"de{sep}en\n" + "".join(f"{s}{sep}{t}\n" for s, t in rows))
    cfg = load_config(None, ["data.task=seq2seq", f"data.source={path}", "data.source_field=de",
                             "data.target_field=en", "data.val_fraction=0.34"]).data
    splits = load_pairs(cfg, _stderr_console())
    assert sorted(set(splits["train"] + splits["val"])) == sorted(set(rows))


def test_parquet_pairs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [(f"wort {i}", f"word {i}") for i in range(12)]
    pq.write_table(pa.table({"de": [s for s, _ in rows], "en": [t for _, t in rows], "n": list(range(12))}),
                   tmp_path / "pairs.parquet")
    cfg = load_config(None, ["data.task=seq2seq", f"data.source={tmp_path / 'pairs.parquet'}", "data.source_field=de",
                             "data.target_field=en", "data.val_fraction=0.25"]).data
    splits = load_pairs(cfg, _stderr_console())
    assert len(splits["val"]) == 3 and sorted(splits["train"] + splits["val"]) == sorted(rows)


def test_save_to_disk_folder_keeps_its_own_splits(tmp_path):
    """A DatasetDict with train / validation / test: its splits are used as they are."""
    import datasets

    def split(name: str, n: int) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"translation": [{"de": f"{name} eins {i}", "en": f"{name} one {i}"}
                                                           for i in range(n)]})

    datasets.DatasetDict(train=split("train", 8), validation=split("val", 3), test=split("test", 2)).save_to_disk(
        tmp_path / "saved")
    cfg = load_config(None, ["data.task=seq2seq", f"data.source={tmp_path / 'saved'}", "data.source_lang=de",
                             "data.target_lang=en", "data.val_fraction=0.5"]).data
    splits = load_pairs(cfg, _stderr_console())
    assert {k: len(v) for k, v in splits.items()} == {"train": 8, "val": 3, "test": 2}
    assert splits["test"][1] == ("test eins 1", "test one 1")
    bad = load_config(None, ["data.task=seq2seq", f"data.source={tmp_path / 'saved'}", "data.source_field=de"]).data
    with pytest.raises(UserError, match="no column 'de'"):
        load_pairs(bad, _stderr_console())


def test_translation_column_with_languages(tmp_path):
    path = tmp_path / "wmt.jsonl"
    path.write_text("".join(json.dumps({"translation": {"de": f"eins {i}", "en": f"one {i}"}}) + "\n"
                            for i in range(10)))
    cfg = load_config(None, ["data.task=seq2seq", f"data.source={path}", "data.source_lang=de",
                             "data.target_lang=en", "data.val_fraction=0.2"]).data
    splits = load_pairs(cfg, _stderr_console())
    assert ("eins 3", "one 3") in splits["train"] + splits["val"]


@pytest.mark.parametrize("content, fragment", [
    ('{"source": "a", "target": ""}\n', "empty target"),
    ('{"source": "", "target": "b"}\n', "empty source"),
    ('{"src": "a", "target": "b"}\n', "source"),
])
def test_bad_pairs_are_one_line_errors_and_nothing_is_written(tmp_path, content, fragment, cli, one_line_error):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"source": "x", "target": "y"}\n' * 5 + content)
    out = tmp_path / "run"
    result = cli("train", "--out", out, "data.task=seq2seq", f"data.source={path}", "train.max_steps=1")
    one_line_error(result, fragment)
    assert not out.exists() or not any(out.iterdir())  # at most the empty --out train checks it can write
