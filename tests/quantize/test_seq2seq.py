"""`llmcli quantize` of sequence-to-sequence runs: int8 and int4 checkpoints load, generate, and
score close to the float model on the run's own test pairs."""

from __future__ import annotations

import json

import pytest

from llmcli.checkpoint import load_model, read_quantization
from llmcli.quantize import modules as Q

pytestmark = pytest.mark.slow


def _scores(cli, run) -> dict:
    result = cli("eval", run, "--split", "test", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def _targets(cli, run, folder) -> list[str]:
    result = cli("generate", run, "-f", folder / "sources.txt", "--lines", "-t", "0", "--json")
    assert result.exit_code == 0, result.output
    return [json.loads(line)["target"] for line in result.stdout.splitlines()]


@pytest.mark.parametrize("arch", ["encoder-decoder", "gru-seq2seq"])
def test_int8_and_int4_seq2seq_checkpoints_generate_and_score_like_float(seq2seq_runs, tmp_path, cli, arch):
    run = seq2seq_runs[arch]
    (tmp_path / "sources.txt").write_text("abc\nhgfe\ndead\nbeef\ncafe\nfade\n")
    float_scores, float_targets = _scores(cli, run), _targets(cli, run, tmp_path)
    for method, extra in (("int8", []), ("int4", ["--group-size", "32"])):
        out = tmp_path / method
        result = cli("quantize", run, "--method", method, *extra, "--out", out, "--eval-tokens", "300",
                     "--decode-tokens", "16")
        assert result.exit_code == 0, result.output
        assert "greedy tokens equal" in result.stdout and read_quantization(out)["method"] == method
        assert any(isinstance(m, Q.QuantizedLinear) for m in load_model(out).modules())
        targets = _targets(cli, out, tmp_path)
        same = sum(a == b for a, b in zip(targets, float_targets, strict=True))
        scores = _scores(cli, out)
        print(f"{arch} {method}: {same}/6 outputs as float; PER {scores['per']:.3f} vs {float_scores['per']:.3f}, "
              f"ppl {scores['perplexity']:.3f} vs {float_scores['perplexity']:.3f}")
        assert same >= (5 if method == "int8" else 2)  # a 40-step model: many near-ties for int4 to flip
        assert abs(scores["per"] - float_scores["per"]) <= (0.03 if method == "int8" else 0.1)
        assert scores["perplexity"] <= float_scores["perplexity"] * (1.02 if method == "int8" else 1.15)
