"""Sequence scores against hand-computed cases (BLEU and chrF against sacrebleu itself)."""

from __future__ import annotations

import pytest
import sacrebleu

from llmcli.metrics import edit_distance, sequence_scores


@pytest.mark.parametrize("a, b, distance", [
    ("", "", 0), ("abc", "", 3), ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("abc", "abc", 0),
])
def test_edit_distance(a, b, distance):
    assert edit_distance(list(a), list(b)) == distance == edit_distance(list(b), list(a))


def test_g2p_scores_by_hand():
    """Three words; the second has two pronunciations and the output matches the other one."""
    outputs = ["SH EY1 K S P IH2 R", "T AH0 M EY1 T OW2", "K AE1 T S"]
    references = [["SH EY1 K S P IY2 R"], ["T AH0 M EY1 T OW2", "T AH0 M AA1 T OW2"], ["K AE1 T"]]
    s = sequence_scores(outputs, references)
    # word 1: one substitution over 7; word 2: exact (0 over 6, the closest reference); word 3: one insertion over 3
    assert s["correct"] == 1 and s["exact_match"] == pytest.approx(1 / 3) and s["wer"] == pytest.approx(2 / 3)
    assert (s["edits"], s["reference_tokens"]) == (2, 16) and s["per"] == pytest.approx(2 / 16)
    refs = [["SH EY1 K S P IY2 R", "T AH0 M EY1 T OW2", "K AE1 T"], [None, "T AH0 M AA1 T OW2", None]]
    assert s["bleu"] == pytest.approx(sacrebleu.corpus_bleu(outputs, refs).score)
    assert s["chrf"] == pytest.approx(sacrebleu.corpus_chrf(outputs, refs).score)


def test_whitespace_is_normalised_and_a_perfect_output_scores_perfectly():
    s = sequence_scores(["  a  b c d e "], [["a b c d e"]])
    assert s["exact_match"] == 1.0 and s["per"] == 0.0 and s["wer"] == 0.0 and s["bleu"] == pytest.approx(100.0)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="one output per source"):
        sequence_scores(["a"], [])
    with pytest.raises(ValueError, match="at least one reference"):
        sequence_scores(["a"], [[]])
