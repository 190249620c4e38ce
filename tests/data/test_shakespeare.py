import re

import pytest

from llmcli.data.shakespeare import (
    DEFAULT_TEST_PLAYS,
    DEFAULT_VAL_PLAYS,
    markdown_to_text,
    shakespeare_plays,
    shakespeare_split_plays,
)
from llmcli.errors import UserError


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


def test_shakespeare_has_38_plays_split_by_play(shakespeare, cfg, texts):
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


def test_shakespeare_text_is_plain(shakespeare, texts):
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


def test_play_lists_override_and_names_are_normalized(cfg, texts, load_corpus):
    corpus = load_corpus(cfg("data.val_plays=[A Midsummer Night's Dream]", "data.test_plays=[]").data)
    assert list(corpus) == ["train", "val"]
    assert texts(corpus, "val")[0].startswith("A Midsummer Night's Dream\n\nACT I\n")
    assert len(corpus["train"]) == 37


def test_unknown_or_overlapping_plays(cfg, load_corpus):
    with pytest.raises(UserError, match=r"data.val_plays: unknown play 'hamlett'; valid names: .*hamlet"):
        load_corpus(cfg("data.val_plays=[hamlett]").data)
    with pytest.raises(UserError, match="both contain hamlet"):
        load_corpus(cfg("data.val_plays=[hamlet]", "data.test_plays=[hamlet]").data)
