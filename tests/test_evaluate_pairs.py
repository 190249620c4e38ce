"""`llmcli eval` of sequence-to-sequence checkpoints: teacher-forced and decoded scores, beams,
the model-vs-model table, and the options that belong to the other task."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_eval_scores_decoded_outputs(seq2seq_runs, cli):
    runs = list(seq2seq_runs.values())
    result = cli("eval", *runs, "--split", "test", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["checkpoint"] for r in rows] == [str(r) for r in runs]
    for r in rows:
        assert r["sources"] == r["pairs"] == 40 and r["beams"] == 1
        assert 0 <= r["exact_match"] <= 1 and r["wer"] == pytest.approx(1 - r["exact_match"])
        assert 0 <= r["per"] and 0 <= r["bleu"] <= 100 and r["perplexity"] > 1
    table = cli("eval", *runs, "--split", "test", "--limit", "10", "--beams", "2")
    assert table.exit_code == 0, table.output
    for column in ("exact", "PER", "WER", "BLEU", "chrF", "beams"):
        assert column in table.stdout


@pytest.mark.parametrize("args, fragment", [
    (["--text-file", "{pairs}"], "--text-file applies to language models"),
    (["--stride", "4"], "--stride applies to language models"),
])
def test_lm_options_on_a_seq2seq_checkpoint(seq2seq_runs, pairs_file, cli, one_line_error, args, fragment):
    args = [a.replace("{pairs}", str(pairs_file)) for a in args]
    one_line_error(cli("eval", seq2seq_runs["encoder-decoder"], *args), fragment)


@pytest.mark.parametrize("args, fragment", [
    (["--beams", "2"], "--beams applies to sequence-to-sequence models"),
    (["--limit", "3"], "--limit applies to sequence-to-sequence models and --tasks"),
])
def test_seq2seq_options_on_a_language_model(trained_runs, cli, one_line_error, args, fragment):
    one_line_error(cli("eval", trained_runs["gpt2"], *args), fragment)


def test_lm_eval_tasks_refuse_a_seq2seq_checkpoint(seq2seq_runs, cli, one_line_error):
    pytest.importorskip("lm_eval")
    one_line_error(cli("eval", seq2seq_runs["gru-seq2seq"], "--tasks", "lambada_openai"),
                   "--tasks scores language models")
