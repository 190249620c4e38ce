"""`llmcli generate` with a sequence-to-sequence checkpoint: the prompt is the source, the output
the target; greedy, sampling, beams, --lines, --json, and the bad sources."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def _json(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize("arch", ["encoder-decoder", "gru-seq2seq"])
def test_generate_prints_the_target(seq2seq_runs, cli, tmp_path, arch):
    run = seq2seq_runs[arch]
    (alone,) = _json(cli("generate", run, "abc", "-t", "0", "--json"))
    assert alone["source"] == "abc" and alone["target"].strip()
    assert set(alone["target"].split()) <= set("ABCDEFGH")
    text = cli("generate", run, "abc", "-t", "0")
    assert text.exit_code == 0 and text.stdout.strip() == alone["target"].strip()
    lines = tmp_path / "sources.txt"
    lines.write_text("hgfe\nabc\n\ndd\n")
    batch = _json(cli("generate", run, "-f", lines, "--lines", "-t", "0", "--json"))
    assert [r["source"] for r in batch] == ["hgfe", "abc", "dd"] and batch[1]["target"] == alone["target"]
    wide = _json(cli("generate", run, "-f", lines, "--lines", "--beams", "3", "--num-samples", "2", "--json"))
    assert len(wide) == 6 and [r["source"] for r in wide] == ["hgfe", "hgfe", "abc", "abc", "dd", "dd"]
    sampled = [_json(cli("generate", run, "abc", "--seed", "3", "--json", "-t", "1.5"))[0]["target"] for _ in "ab"]
    assert sampled[0] == sampled[1]  # a seed makes sampling reproducible


@pytest.mark.parametrize("source, fragment", [
    ("abcdefgh" * 3, "this model's encoder takes at most 12"),
    ("ab!", "never saw: '!'"),
])
def test_bad_sources_are_one_line_errors(seq2seq_runs, cli, one_line_error, source, fragment):
    one_line_error(cli("generate", seq2seq_runs["encoder-decoder"], source), fragment)


def test_chat_refuses_a_seq2seq_checkpoint(seq2seq_runs, cli, one_line_error):
    one_line_error(cli("chat", seq2seq_runs["gru-seq2seq"], input="hello\n"), "keeps no conversation")
