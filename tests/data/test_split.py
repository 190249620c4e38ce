import pytest

from llmcli.errors import UserError


def test_txt_tail_split_is_contiguous(txt, cfg, texts, lines, load_corpus):
    corpus = load_corpus(cfg(f"data.source={txt}").data)
    assert list(corpus) == ["train", "val"]
    train, val = texts(corpus, "train"), texts(corpus, "val")
    assert train[0] + val[0] == lines
    assert val[0].startswith("line ")  # the cut moved to a line start
    assert abs(len(val[0]) / len(lines) - 0.1) < 0.01


def test_tail_split_test_sits_before_val(txt, cfg, texts, lines, load_corpus):
    base = load_corpus(cfg(f"data.source={txt}").data)
    corpus = load_corpus(cfg(f"data.source={txt}", "data.test_fraction=0.2").data)
    train, val, test = (texts(corpus, s)[0] for s in ("train", "val", "test"))
    assert train + test + val == lines
    assert val == texts(base, "val")[0]  # adding a test split leaves val unchanged
    assert abs(len(test) / len(lines) - 0.2) < 0.01


def test_split_by_document_needs_documents(txt, cfg, load_corpus):
    with pytest.raises(UserError, match="too few"):
        load_corpus(cfg(f"data.source={txt}", "data.split_by=document").data)
